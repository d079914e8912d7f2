"""Database tables and API schemas (SQLModel), in the Base -> Create / table -> Public families."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint
from pydantic import field_validator
from sqlmodel import Field, SQLModel

from trainer.protocol import MEMORY_FIGURES, PEAK_FIGURES, ArtifactKind, Int64, MemoryFigures, merge_memory
from trainer.stages import STAGES


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


class AttemptOutcome(str, Enum):
    """Why an attempt ended, as :func:`server.outcomes.classify` reads its exit."""

    succeeded = "succeeded"          # training reached its steps
    failed = "failed"                # a clean failure the trainer explained (bad data, bad config)
    paused = "paused"                # a pause asked for (by a user or the memory guard), honoured
    cancelled = "cancelled"          # a cancel asked for, honoured
    stopped = "stopped"              # the trainer stopped itself after a checkpoint (a full disk, a signal)
    interrupted = "interrupted"      # the server shut down and stopped it; resumes at the next start
    lost = "lost"                    # the server restarted and found its trainer gone
    crashed = "crashed"              # any other exit: a bug, a kill from outside, a silent trainer
    out_of_memory = "out_of_memory"  # a SIGKILL NeuroLens did not send: the out-of-memory killer
    out_of_time = "out_of_time"      # a batch job's allocation ended (time limit, preemption); requeued
    not_started = "not_started"      # the executor could not start it

    @property
    def spends_retry(self) -> bool:
        """Whether this end counts against the job's ``max_attempts``: only crashes do."""
        return self in (AttemptOutcome.crashed, AttemptOutcome.out_of_memory)


# --- Jobs ---------------------------------------------------------------------------------


# Longest path and path component file systems take (Linux's PATH_MAX and NAME_MAX, in bytes):
# a longer dataset path could only fail with ENAMETOOLONG.
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255


class JobCreate(SQLModel):
    """Body of ``POST /api/jobs``."""

    # The enum documents the registry's names; parse_config refuses others with its own message.
    stage: str = Field(description="'stage1' or 'stage2'.", schema_extra={"json_schema_extra": {"enum": list(STAGES)}})
    dataset: str = Field("synthetic", max_length=MAX_PATH_BYTES,
                         description="A path on the server, 'synthetic', 'synthetic:null', "
                         "'synthetic:zuco' or 'synthetic:zuco-null'.")
    config: dict[str, Any] = Field(default_factory=dict, description="Stage config: preset, steps, ...")
    after: int | None = Field(None, ge=1, le=DB_INT_MAX, description="Stage 2: the Stage 1 job whose encoder to start from.")
    encoder_artifact: int | None = Field(None, ge=1, le=DB_INT_MAX, description="Stage 2: an encoder artifact to start from.")
    checkpoint_artifact: int | None = Field(
        None, ge=1, le=DB_INT_MAX,
        description="Stage 1: resume from this checkpoint artifact (written by a job of the same preset, on any "
                    "machine, device or number of processes) and train on to this job's steps.")

    @field_validator("dataset")
    @classmethod
    def _fits_a_file_system(cls, dataset: str) -> str:
        if len(dataset.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
            raise ValueError(f"dataset path is longer than {MAX_PATH_BYTES} bytes")
        for part in dataset.replace("\\", "/").split("/"):
            size = len(part.encode("utf-8", "surrogatepass"))
            if size > MAX_NAME_BYTES:
                raise ValueError(f"dataset path component {part[:40]!r}... is {size} bytes; "
                                 f"file names are at most {MAX_NAME_BYTES} bytes")
        return dataset


class Job(SQLModel, table=True):
    """The job: what to train and where it stands. What each run of its trainer did is an
    :class:`Attempt`; a job's rows change only through :mod:`server.jobs`."""

    id: int | None = Field(default=None, primary_key=True, sa_type=Int64)
    stage: str = Field(index=True)
    dataset: str
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    after_job_id: int | None = Field(default=None, foreign_key="job.id", sa_type=Int64)
    encoder_artifact_id: int | None = Field(default=None, foreign_key="artifact.id", sa_type=Int64)
    checkpoint_artifact_id: int | None = Field(default=None, foreign_key="artifact.id", sa_type=Int64)
    status: JobStatus = Field(default=JobStatus.queued, index=True)
    reason: str | None = None
    step: int = Field(0, sa_type=Int64)
    total: int = Field(0, sa_type=Int64)
    eta_s: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    predicted_peak_bytes: int | None = Field(None, sa_type=Int64)
    # Attempts started so far; the newest is the one running, if any.
    attempts: int = 0
    # Only attempts numbered above this spend the job's retries: a user's retry sets it to the
    # attempts made so far, which gives the job a fresh budget and keeps its history.
    retry_budget_from: int = 0
    error: str | None = None
    # The trainer's phase now (trainer.protocol.PHASES); None while no trainer runs.
    phase: str | None = None
    # Set when a deletion began: its files go next, then its rows; a restart finishes it.
    deleting_at: datetime | None = None
    # Bumped on every change, the job's attempts included; the job's ETag.
    version: int = 1
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class AttemptBase(MemoryFigures):
    """What one run of a job's trainer did, as the API shows it."""

    number: int = Field(description="1 for the job's first attempt, then counting up.")
    executor: str = Field(description="What ran it: 'local' (a process on the server's machine), ...")
    handle: str | None = Field(None, description="The executor's name for the run: a process id, a batch job id.")
    started_at: datetime = Field(default_factory=utcnow)
    ended_at: datetime | None = None
    start_step: int = Field(0, sa_type=Int64, description="The step its checkpoint held when it started.")
    end_step: int | None = Field(None, sa_type=Int64)
    exit_code: int | None = Field(None, description="The trainer's exit code; negative when a signal ended it.")
    outcome: AttemptOutcome | None = Field(None, description="Why it ended; null while it runs.")
    message: str | None = Field(None, description="How it ended, in words.")
    # Only the server that started an attempt supervises it (its trainer reports there); another
    # server sharing the database leaves it alone while its heartbeat is fresh.
    server_url: str | None = Field(None, description="The public URL of the server that started it.")


class Attempt(AttemptBase, table=True):
    __table_args__ = (UniqueConstraint("job_id", "number"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=Int64)
    job_id: int = Field(foreign_key="job.id", index=True, sa_type=Int64)
    # sha256 of the attempt's trainer token; the token itself lives only in the job's spec.json.
    token_sha256: str | None = None
    last_heartbeat_at: datetime | None = None
    # A pause or cancel asked for by a user or the memory guard, delivered in the next event reply.
    stop_request: str | None = None
    stop_requested_at: datetime | None = None
    # Set when this server kills the trainer itself: a SIGKILL from anyone else is taken to be
    # the operating system's out-of-memory killer.
    killed_by_us: bool = False
    # The attempt's first reported step and when it came: the ETA's rate is measured from there.
    eta_from_step: int | None = Field(None, sa_type=Int64)
    eta_from_at: datetime | None = None
    # Seconds per training step, smoothed over the attempt's reports (server.eta); None until measured.
    step_s: float | None = None


class AttemptPublic(AttemptBase):
    pass


class Progress(SQLModel):
    step: int
    total: int
    eta_s: float | None


class Memory(MemoryFigures):
    """Memory now (the running attempt's) and the peaks over every attempt."""

    predicted_peak_bytes: int | None

    @classmethod
    def of(cls, job: Job, attempts: list[Attempt]) -> "Memory":
        memory = cls(predicted_peak_bytes=job.predicted_peak_bytes)
        for attempt in attempts:  # oldest first: the values now are the newest attempt's
            merge_memory(memory, attempt)
        if not attempts or attempts[-1].ended_at is not None:
            for name in MEMORY_FIGURES:
                if name not in PEAK_FIGURES:
                    setattr(memory, name, None)  # nothing runs, so nothing is "now"
        return memory


# --- Artifacts ----------------------------------------------------------------------------


class Artifact(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True, sa_type=Int64)
    job_id: int | None = Field(default=None, index=True, sa_type=Int64)
    kind: ArtifactKind = Field(index=True)
    filename: str
    size_bytes: int = Field(sa_type=Int64)
    sha256: str
    # Path of the stored file relative to the artifact store root; never taken from a request.
    storage_path: str
    created_at: datetime = Field(default_factory=utcnow)
    # Set when a deletion began (see Job.deleting_at).
    deleting_at: datetime | None = None


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
    attempt_history: list[AttemptPublic] = Field(
        default_factory=list, description="Every attempt, oldest first: when it ran, how it ended, its memory.")
    error: str | None
    phase: str | None = Field(None, description="What the trainer is doing now: 'loading data', 'caching features', "
                                                "'training', 'evaluating', 'probing' or 'saving'; null when not running.")
    disk_bytes: int | None = Field(None, description="Bytes the job's directory and artifacts take on disk "
                                                     "(each file counted once, hard links included).")
    artifacts: list[ArtifactPublic]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_job(cls, job: Job, artifacts: list[Artifact], attempts: list[Attempt]) -> "JobPublic":
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
            memory=Memory.of(job, attempts),
            attempts=job.attempts,
            attempt_history=[AttemptPublic.model_validate(a, from_attributes=True) for a in attempts],
            error=job.error,
            phase=job.phase if job.status == JobStatus.running else None,
            artifacts=[ArtifactPublic.model_validate(a, from_attributes=True) for a in artifacts],
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class JobsPublic(SQLModel):
    data: list[JobPublic]
    count: int


# --- Events -------------------------------------------------------------------------------


class JobEventBase(MemoryFigures):
    job_id: int = Field(foreign_key="job.id", index=True, sa_type=Int64)
    kind: str
    step: int | None = Field(None, sa_type=Int64)
    total: int | None = Field(None, sa_type=Int64)
    loss: float | None = None
    lr: float | None = None
    samples_per_s: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    message: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


class JobEvent(JobEventBase, table=True):
    id: int | None = Field(default=None, primary_key=True, sa_type=Int64)


class JobEventPublic(JobEventBase):
    id: int
    metrics: dict[str, Any]


class JobEventsPublic(SQLModel):
    data: list[JobEventPublic]
    count: int
