"""Database tables and API schemas (SQLModel), in the Base -> Create / table -> Public families."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from trainer.protocol import ArtifactKind


def utcnow() -> datetime:
    # SQLModel stores aware datetimes as UTC and returns them aware, also on SQLite.
    return datetime.now(timezone.utc)


# Largest value an id column holds (SQLite and PostgreSQL BIGINT alike).
DB_INT_MAX = 2**63 - 1


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    paused = "paused"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class WaitReason(str, Enum):
    dependency = "dependency"
    memory = "memory"


# --- Jobs ---------------------------------------------------------------------------------


class JobCreate(SQLModel):
    """Body of ``POST /api/jobs``."""

    stage: str = Field(description="'stage1' or 'stage2'.")
    dataset: str = Field("synthetic", description="A path on the server, 'synthetic' or 'synthetic:null'.")
    config: dict[str, Any] = Field(default_factory=dict, description="Stage config: preset, steps, ...")
    after: int | None = Field(None, ge=1, le=DB_INT_MAX, description="Stage 2: the Stage 1 job whose encoder to start from.")
    encoder_artifact: int | None = Field(None, ge=1, le=DB_INT_MAX, description="Stage 2: an encoder artifact to start from.")
    checkpoint_artifact: int | None = Field(
        None, ge=1, le=DB_INT_MAX,
        description="Stage 1: resume from this checkpoint artifact (written by a job of the same preset, on any "
                    "machine, device or number of processes) and train on to this job's steps.")


class Job(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    stage: str = Field(index=True)
    dataset: str
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    after_job_id: int | None = Field(default=None, foreign_key="job.id")
    encoder_artifact_id: int | None = Field(default=None, foreign_key="artifact.id")
    checkpoint_artifact_id: int | None = Field(default=None, foreign_key="artifact.id")
    status: JobStatus = Field(default=JobStatus.queued, index=True)
    reason: str | None = None
    step: int = 0
    total: int = 0
    eta_s: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    rss_bytes: int | None = None
    peak_rss_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    # CUDA memory of a GPU job, as its trainer (rank 0) reports it.
    gpu_allocated_bytes: int | None = None
    gpu_reserved_bytes: int | None = None
    gpu_peak_allocated_bytes: int | None = None
    gpu_peak_reserved_bytes: int | None = None
    attempts: int = 0
    error: str | None = None
    # A pause or cancel asked for by a user, delivered to the trainer in its next event reply.
    stop_request: str | None = None
    stop_requested_at: datetime | None = None
    # sha256 of the per-attempt trainer token; the token itself lives only in the job's spec.json.
    token_sha256: str | None = None
    pid: int | None = None
    last_heartbeat_at: datetime | None = None
    # Step and time at which the current attempt began, for the ETA.
    attempt_start_step: int = 0
    attempt_started_at: datetime | None = None
    # The attempt's first reported step and when it came: the ETA's rate is measured from there.
    eta_from_step: int | None = None
    eta_from_at: datetime | None = None
    # Bumped on every change; the job's ETag.
    version: int = 1
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class Progress(SQLModel):
    step: int
    total: int
    eta_s: float | None


class Memory(SQLModel):
    rss_bytes: int | None
    peak_rss_bytes: int | None
    predicted_peak_bytes: int | None
    gpu_allocated_bytes: int | None = None
    gpu_reserved_bytes: int | None = None
    gpu_peak_allocated_bytes: int | None = None
    gpu_peak_reserved_bytes: int | None = None


# --- Artifacts ----------------------------------------------------------------------------


class Artifact(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    job_id: int | None = Field(default=None, index=True)
    kind: ArtifactKind = Field(index=True)
    filename: str
    size_bytes: int
    sha256: str
    # Path of the stored file relative to the artifact store root; never taken from a request.
    storage_path: str
    created_at: datetime = Field(default_factory=utcnow)


class ArtifactPublic(SQLModel):
    id: int
    job_id: int | None
    kind: ArtifactKind
    filename: str
    size_bytes: int
    sha256: str
    created_at: datetime


class ArtifactsPublic(SQLModel):
    data: list[ArtifactPublic]
    count: int


class JobPublic(SQLModel):
    id: int
    stage: str
    status: JobStatus
    reason: str | None
    dataset: str
    config: dict[str, Any]
    after: int | None
    encoder_artifact: int | None
    checkpoint_artifact: int | None = None
    progress: Progress
    metrics: dict[str, Any]
    memory: Memory
    attempts: int
    error: str | None
    artifacts: list[ArtifactPublic]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_job(cls, job: Job, artifacts: list[Artifact]) -> "JobPublic":
        return cls(
            id=job.id,
            stage=job.stage,
            status=job.status,
            reason=job.reason,
            dataset=job.dataset,
            config=job.config,
            after=job.after_job_id,
            encoder_artifact=job.encoder_artifact_id,
            checkpoint_artifact=job.checkpoint_artifact_id,
            progress=Progress(step=job.step, total=job.total, eta_s=job.eta_s),
            metrics=job.metrics,
            memory=Memory(
                rss_bytes=job.rss_bytes,
                peak_rss_bytes=job.peak_rss_bytes,
                predicted_peak_bytes=job.predicted_peak_bytes,
                gpu_allocated_bytes=job.gpu_allocated_bytes,
                gpu_reserved_bytes=job.gpu_reserved_bytes,
                gpu_peak_allocated_bytes=job.gpu_peak_allocated_bytes,
                gpu_peak_reserved_bytes=job.gpu_peak_reserved_bytes,
            ),
            attempts=job.attempts,
            error=job.error,
            artifacts=[ArtifactPublic.model_validate(a, from_attributes=True) for a in artifacts],
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class JobsPublic(SQLModel):
    data: list[JobPublic]
    count: int


# --- Events -------------------------------------------------------------------------------


class JobEvent(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id", index=True)
    kind: str
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    lr: float | None = None
    samples_per_s: float | None = None
    rss_bytes: int | None = None
    peak_rss_bytes: int | None = None
    gpu_allocated_bytes: int | None = None
    gpu_reserved_bytes: int | None = None
    gpu_peak_allocated_bytes: int | None = None
    gpu_peak_reserved_bytes: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    message: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


class JobEventPublic(SQLModel):
    id: int
    job_id: int
    kind: str
    step: int | None
    total: int | None
    loss: float | None
    lr: float | None
    samples_per_s: float | None
    rss_bytes: int | None
    peak_rss_bytes: int | None
    gpu_allocated_bytes: int | None = None
    gpu_reserved_bytes: int | None = None
    gpu_peak_allocated_bytes: int | None = None
    gpu_peak_reserved_bytes: int | None = None
    metrics: dict[str, Any]
    message: str | None
    created_at: datetime


class JobEventsPublic(SQLModel):
    data: list[JobEventPublic]
    count: int
