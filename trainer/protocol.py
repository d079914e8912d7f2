"""Wire formats shared by the server and the trainer subprocess.

The server writes a :class:`JobSpec` to ``<job dir>/spec.json`` and starts
``python -m trainer run <job dir>/spec.json``. The trainer then talks to the server over HTTP
only, authenticated by the per-job token in the spec:

- ``POST /api/jobs/{id}/events`` with a :class:`TrainerEvent`; the reply is an
  :class:`EventReply` whose ``stop`` field carries a pause or cancel request.
- ``POST /api/jobs/{id}/artifacts/register`` with an :class:`ArtifactRegistration` naming a file
  inside the job directory; the server hashes it and adds it to the artifact store.

Its exit code tells the server how the run ended (:data:`EXIT_OK`, :data:`EXIT_STOPPED`,
:data:`EXIT_FAILED`, :data:`EXIT_OUT_OF_TIME`; anything else is a crash). Pydantic and the torch-free stage registry
only: the server imports this module and must not pull in torch.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from sqlalchemy import BigInteger, Integer
from sqlmodel import Field as ColumnField, SQLModel

from trainer.stages import get_stage

EXIT_OK = 0
"""Training reached its configured step count; final artifacts are registered."""
EXIT_FAILED = 2
"""The trainer failed cleanly (bad data, bad config); the last ``error`` event says why."""
EXIT_STOPPED = 3
"""A stop request (pause or cancel) was honoured after writing a checkpoint."""
EXIT_OUT_OF_TIME = 4
"""The batch system's time-limit warning (SIGUSR1) was honoured after writing a checkpoint: the
run needs another allocation, and resumes from that checkpoint."""

SPEC_FILENAME = "spec.json"
OUTCOME_FILENAME = "outcome.json"
"""Written by rank 0 of a data-parallel run: ``{"exit_code": N}``. torchrun reports any
non-zero worker exit as a failure of its own (code 1), so the workers exit 0 after a clean end
and the server reads how it ended from this file."""
LOG_FILENAME = "trainer.log"
# The built-in datasets a job may name instead of a path; the server checks names, the trainer
# generates them (trainer/data/recordings.py), so both read this one list.
SYNTHETIC_DATASETS = ("synthetic", "synthetic:null", "synthetic:zuco", "synthetic:zuco-null")


class ArtifactKind(str, Enum):
    encoder = "encoder"
    checkpoint = "checkpoint"
    model = "model"
    report = "report"


class StopRequest(str, Enum):
    pause = "pause"
    cancel = "cancel"


class JobSpec(BaseModel):
    """Everything a trainer needs to run one job attempt."""

    job_id: int
    stage: str = Field(description="A stage of the registry (trainer.stages), e.g. 'stage1'.")
    dataset: str = Field(description="A path on this machine, 'synthetic', 'synthetic:null', "
                         "'synthetic:zuco' or 'synthetic:zuco-null'.")
    config: dict[str, Any] = Field(description="The stage config as POSTed, validated by trainer.stages.parse_config.")
    job_dir: str = Field(description="Directory the trainer owns: checkpoints, caches, log.")
    api_url: str = Field(description="Base URL of the server, e.g. http://127.0.0.1:8000.")
    token: str = Field(description="Bearer token that may report for this job only.")
    encoder_path: str | None = Field(None, description="Stage 2: the encoder safetensors file to start from.")
    cache_dir: str | None = Field(None, description="Directory shared by jobs for generated datasets and window caches.")
    resume_from: str | None = Field(None, description="A checkpoint file (an artifact) to start from while the job "
                                                      "directory has no checkpoint of its own.")
    attempt: int = 1
    keep_checkpoints: int = Field(3, ge=0, description="Newest intermediate checkpoints kept in the job directory; "
                                                       "0 keeps every one (NEUROLENS_KEEP_CHECKPOINTS).")

    @field_validator("stage")
    @classmethod
    def _registered(cls, stage: str) -> str:
        get_stage(stage)  # its ConfigError is a ValueError: pydantic reports it as invalid
        return stage


# The largest value an integer column holds (SQLite's INTEGER, PostgreSQL's BIGINT): a reported
# count past it is refused by validation, not by the database.
INT64_MAX = 2**63 - 1


# The column type of ids, steps and byte counts: 64-bit on every database. PostgreSQL's INTEGER is
# 32-bit (a trainer of 3 GB would not fit); SQLite's is 64-bit already, and only an INTEGER
# PRIMARY KEY is its auto-incrementing rowid, so there the columns stay INTEGER.
Int64 = BigInteger().with_variant(Integer(), "sqlite")


def _bytes(description: str):
    return ColumnField(None, ge=0, le=INT64_MAX, sa_type=Int64, description=description)


class MemoryFigures(SQLModel):
    """The memory figures a trainer reports and the server stores, declared once.

    A SQLModel (a pydantic model that tables may inherit columns from) so that the event, the
    attempt and the job's public view all carry these fields without repeating them. A name
    with ``peak`` in it is a high-water mark (merged by maximum); the others are the value now.
    """

    rss_bytes: int | None = _bytes("Resident memory of the trainer's processes now.")
    peak_rss_bytes: int | None = _bytes("Peak resident memory of this attempt's trainer.")
    gpu_allocated_bytes: int | None = _bytes("CUDA memory held by tensors now (rank 0's GPU).")
    gpu_reserved_bytes: int | None = _bytes("CUDA memory held by the caching allocator now.")
    gpu_peak_allocated_bytes: int | None = _bytes("Peak of gpu_allocated_bytes in this attempt.")
    gpu_peak_reserved_bytes: int | None = _bytes("Peak of gpu_reserved_bytes in this attempt.")


MEMORY_FIGURES = tuple(MemoryFigures.model_fields)
PEAK_FIGURES = tuple(name for name in MEMORY_FIGURES if "peak" in name)


def merge_memory(target: Any, report: Any) -> None:
    """Copy the memory figures ``report`` carries onto ``target``: values now replace, peaks rise."""
    for name in MEMORY_FIGURES:
        value = getattr(report, name, None)
        if value is None:
            continue
        if name in PEAK_FIGURES:
            value = max(getattr(target, name) or 0, value)
        setattr(target, name, value)


# What a trainer can be doing, in the order a job meets them; a ``phase`` event names the one it
# enters (its message). The server shows the current one and times only ``training`` for the ETA.
PHASES = ("loading data", "caching features", "training", "evaluating", "probing", "saving")
TRAINING_PHASE = "training"


class TrainerEvent(MemoryFigures):
    """One report from the trainer. ``progress`` events double as heartbeats; a ``phase`` event's
    message is one of :data:`PHASES`."""

    kind: Literal["started", "progress", "log", "checkpoint", "finished", "error", "phase"] = "progress"
    step: int | None = Field(None, ge=0, le=INT64_MAX)
    total: int | None = Field(None, ge=0, le=INT64_MAX)
    loss: float | None = None
    lr: float | None = None
    samples_per_s: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    message: str | None = None

    @model_validator(mode="after")
    def _known_phase(self) -> "TrainerEvent":
        if self.kind == "phase" and self.message not in PHASES:
            raise ValueError(f"Invalid phase {self.message!r}; expected one of {', '.join(map(repr, PHASES))}.")
        return self


class EventReply(BaseModel):
    stop: StopRequest | None = None


class ArtifactRegistration(BaseModel):
    kind: ArtifactKind
    path: str = Field(description="File path relative to the job directory.")
