"""Job rules shared by the API and the scheduler: validation, status changes, events.

Every status change goes through :func:`set_status`, which applies the change's side effects
(timestamps, clearing the stop request and process fields) and commits them in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import update
from sqlmodel import Session, select

from server.exceptions import Conflict, InvalidInput, NotFound
from server.models import Artifact, Job, JobCreate, JobEvent, JobPublic, JobStatus, utcnow
from server.uploads import InvalidArtifactFile, read_safetensors_header
from trainer.config import ConfigError, EncoderConfig, TrainConfigBase
from trainer.memory_prediction import predict_peak_bytes
from trainer.protocol import ArtifactKind, TrainerEvent
from trainer.stages import STAGES, parse_config, stage_names

SYNTHETIC_DATASETS = ("synthetic", "synthetic:null")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"Job {job_id} not found.")
    return job


def job_artifacts(session: Session, job_id: int) -> list[Artifact]:
    return list(session.exec(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.id)))


def to_public(session: Session, job: Job) -> JobPublic:
    return JobPublic.from_job(job, job_artifacts(session, job.id))


def encoder_of(session: Session, job_id: int) -> Artifact | None:
    """The newest encoder artifact a job produced, if any."""
    return session.exec(
        select(Artifact)
        .where(Artifact.job_id == job_id, Artifact.kind == ArtifactKind.encoder)
        .order_by(Artifact.id.desc())
    ).first()


def validate_dataset(dataset: str) -> str:
    if not isinstance(dataset, str) or not dataset.strip():
        raise InvalidInput("Invalid dataset ''; expected a path on the server, 'synthetic' or 'synthetic:null'.")
    dataset = dataset.strip()
    if dataset.startswith("synthetic"):
        if dataset not in SYNTHETIC_DATASETS:
            raise InvalidInput(f"Invalid dataset {dataset!r}; expected 'synthetic' or 'synthetic:null'.")
        return dataset
    if not Path(dataset).expanduser().exists():
        raise InvalidInput(f"Dataset path {dataset!r} does not exist on the server.")
    return str(Path(dataset).expanduser().resolve())


def check_resume_checkpoint(session: Session, body: JobCreate, config: TrainConfigBase,
                            artifact_path: Callable[[Artifact], Path] | None) -> None:
    """The ``checkpoint_artifact`` of a new job must be a checkpoint of the same model.

    Its safetensors header (parsed by the server, nothing unpickled) holds the configs it was
    written with; a checkpoint of another preset could only fail later, in the trainer.
    """
    artifact = session.get(Artifact, body.checkpoint_artifact)
    if artifact is None:
        raise NotFound(f"Artifact {body.checkpoint_artifact} named in 'checkpoint_artifact' not found.")
    if artifact.kind != ArtifactKind.checkpoint:
        raise InvalidInput(
            f"Artifact {artifact.id} is a {artifact.kind.value} artifact; 'checkpoint_artifact' needs a checkpoint.")
    if not STAGES[body.stage].resumable:
        raise InvalidInput(f"'checkpoint_artifact' applies to {stage_names(lambda s: s.resumable)} jobs only; a "
                           f"{body.stage} job resumes from its own checkpoints.")
    if artifact_path is None:
        return
    try:
        metadata = read_safetensors_header(artifact_path(artifact))
        saved = json.loads(metadata.get("encoder_config", "null"))
    except (InvalidArtifactFile, OSError, ValueError) as exc:
        raise InvalidInput(f"Artifact {artifact.id} cannot be read as a checkpoint: {exc}") from exc
    wanted = config.encoder.to_dict()
    if saved != wanted:
        described = f"preset {saved.get('name')!r}" if isinstance(saved, dict) else "no encoder config"
        raise InvalidInput(
            f"Artifact {artifact.id} is a checkpoint of {described} with a different encoder config than this "
            f"job's (preset {config.preset!r}, window {wanted['window_s']:g} s); use the preset and window_s "
            f"it was trained with.")


def _encoder_config_of(after: Job | None, artifact: Artifact | None,
                       artifact_path: Callable[[Artifact], Path] | None) -> EncoderConfig | None:
    """The encoder a job that needs one will start from, as far as it is known before it runs:
    the ``after`` job's config (a stage that produces an encoder describes it in its config's
    ``encoder``), or the encoder artifact's header; ``None`` if neither can be read."""
    if after is not None:
        try:
            return parse_config(after.stage, after.config).encoder
        except ConfigError:
            return None
    if artifact is not None and artifact_path is not None:
        try:
            metadata = read_safetensors_header(artifact_path(artifact))
            return EncoderConfig.from_dict(json.loads(metadata["encoder_config"]))
        except (OSError, KeyError, ValueError, TypeError, InvalidArtifactFile, ConfigError):
            return None
    return None


def create_job(session: Session, body: JobCreate, memory_limit_bytes: int | None = None,
               artifact_path: Callable[[Artifact], Path] | None = None) -> Job:
    """Validate a job request and queue it; nothing is written when any part is invalid.

    ``memory_limit_bytes`` is the most any one job may ever use here (the memory budget, or the
    machine's RAM): a job predicted to need more could only wait forever, so it is refused.
    ``artifact_path`` locates an artifact's file, so that a Stage 2 job's prediction can read
    the size of the encoder artifact it names.
    """
    try:
        config = parse_config(body.stage, body.config)
    except ConfigError as exc:
        raise InvalidInput(str(exc)) from exc
    dataset = validate_dataset(body.dataset)
    stage = STAGES[body.stage]  # parse_config has refused a name the registry lacks

    if not stage.needs_encoder and (body.after is not None or body.encoder_artifact is not None):
        raise InvalidInput(f"'after' and 'encoder_artifact' apply to {stage_names(lambda s: s.needs_encoder)} "
                           f"jobs only.")
    if stage.needs_encoder:
        producers = stage_names(lambda s: ArtifactKind.encoder in s.produces)
        if (body.after is None) == (body.encoder_artifact is None):
            raise InvalidInput(f"A {stage.name} job needs exactly one of 'after' (a {producers} job id) or "
                               f"'encoder_artifact'.")
        if body.after is not None:
            after = session.get(Job, body.after)
            if after is None:
                raise NotFound(f"Job {body.after} named in 'after' not found.")
            if after.stage not in STAGES or ArtifactKind.encoder not in STAGES[after.stage].produces:
                raise InvalidInput(f"Job {body.after} named in 'after' is a {after.stage} job; expected a {producers} job.")
            if after.status in (JobStatus.failed, JobStatus.cancelled):
                raise InvalidInput(f"Job {body.after} named in 'after' is {after.status.value}; it will produce no encoder.")
        if body.encoder_artifact is not None:
            artifact = session.get(Artifact, body.encoder_artifact)
            if artifact is None:
                raise NotFound(f"Artifact {body.encoder_artifact} named in 'encoder_artifact' not found.")
            if artifact.kind != ArtifactKind.encoder:
                raise InvalidInput(
                    f"Artifact {artifact.id} is a {artifact.kind.value} artifact; 'encoder_artifact' needs an encoder."
                )
    encoder = None
    if stage.needs_encoder:
        encoder = _encoder_config_of(session.get(Job, body.after) if body.after is not None else None,
                                     session.get(Artifact, body.encoder_artifact)
                                     if body.encoder_artifact is not None else None, artifact_path)
    # Per trainer process; a data-parallel job runs `devices` of them, each with the whole model.
    predicted = predict_peak_bytes(config, encoder) * config.devices
    if memory_limit_bytes and predicted > memory_limit_bytes:
        raise InvalidInput(
            f"This {body.stage} job is predicted to need {predicted / 2**30:.2f} GB at its peak, more than the "
            f"{memory_limit_bytes / 2**30:.2f} GB NeuroLens may use here; choose a smaller preset or micro_batch_size."
        )

    if body.checkpoint_artifact is not None:
        check_resume_checkpoint(session, body, config, artifact_path)

    job = Job(
        stage=body.stage,
        dataset=dataset,
        config=config.to_dict(),
        after_job_id=body.after,
        encoder_artifact_id=body.encoder_artifact,
        checkpoint_artifact_id=body.checkpoint_artifact,
        total=config.steps,
        predicted_peak_bytes=predicted,
    )
    session.add(job)
    session.commit()
    session.refresh(job)
    return job


def touch(job: Job) -> None:
    """Mark a job changed so its ETag changes.

    The increment is a SQL expression, so two sessions bumping at once never lose a bump.
    """
    job.version = Job.version + 1


class StaleJob(Conflict):
    """The job's status changed between reading it and writing the change."""


def set_status(session: Session, job: Job, status: JobStatus, *, reason: str | None = None,
               error: str | None = None, **fields: Any) -> Job:
    """Move ``job`` to ``status`` with the change's side effects, committed together.

    The write only applies if the job still has the status the caller read; otherwise nothing
    is written and :class:`StaleJob` is raised. This is what keeps the scheduler from starting a
    job a user cancelled a moment before, and the like.
    """
    seen = job.status
    now = utcnow()
    values: dict[str, Any] = {"status": status, "reason": reason}
    if error is not None:
        values["error"] = error
    if status == JobStatus.running:
        values.update(started_at=job.started_at or now, attempt_started_at=now, attempt_start_step=job.step,
                      last_heartbeat_at=now, error=None)
    else:
        values.update(pid=None, token_sha256=None, stop_request=None, stop_requested_at=None, rss_bytes=None,
                      gpu_allocated_bytes=None, gpu_reserved_bytes=None, eta_s=None)
    if status.is_finished:
        values["finished_at"] = now
    values.update(fields)
    return update_if_status(session, job, seen, **values)


def update_if_status(session: Session, job: Job, expected: JobStatus, **values: Any) -> Job:
    """Write ``values`` (and a new version) only while the job's status is ``expected``.

    Raises :class:`StaleJob`, having written nothing, when the status changed meanwhile.
    """
    result = session.execute(
        update(Job).where(Job.id == job.id, Job.status == expected).values(**values, version=Job.version + 1)
    )
    if result.rowcount != 1:
        session.rollback()
        raise StaleJob(f"Job {job.id} changed while it was being updated; try again.")
    session.commit()
    session.refresh(job)
    return job


def _retry_stale(action, session: Session, job: Job, *args) -> Job:
    """Run a user's status change again on fresh data if the scheduler changed the job meanwhile."""
    for _ in range(3):
        try:
            return action(session, job, *args)
        except StaleJob:
            session.refresh(job)
    return action(session, job, *args)


_PAST = {"cancel": "cancelled", "pause": "paused"}


def request_stop(session: Session, job: Job, request: str) -> Job:
    """Cancel or pause a job: at once when no trainer runs, else at the trainer's next report."""
    return _retry_stale(_request_stop, session, job, request)


def _request_stop(session: Session, job: Job, request: str) -> Job:
    if job.status.is_finished:
        raise Conflict(f"Job {job.id} is already {job.status.value}; it cannot be {_PAST[request]}.")
    if request == "pause" and job.status != JobStatus.running:
        raise Conflict(f"Job {job.id} is {job.status.value}; only a running job can be paused.")
    if job.status in (JobStatus.queued, JobStatus.paused):
        return set_status(session, job, JobStatus.cancelled)
    # Running: the trainer hears of it in its next event reply, checkpoints and exits.
    return update_if_status(session, job, JobStatus.running, stop_request=request, stop_requested_at=utcnow())


def resume(session: Session, job: Job) -> Job:
    return _retry_stale(_resume, session, job)


def _resume(session: Session, job: Job) -> Job:
    if job.status != JobStatus.paused:
        raise Conflict(f"Job {job.id} is {job.status.value}; only a paused job can be resumed.")
    return set_status(session, job, JobStatus.queued)


def record_event(session: Session, job: Job, event: TrainerEvent) -> str | None:
    """Store a trainer report, refresh the job's progress; return the pending stop request."""
    now = utcnow()
    session.add(JobEvent(job_id=job.id, **event.model_dump()))
    job.last_heartbeat_at = now
    if event.kind == "started":
        # A resumed attempt announces itself before it has loaded its checkpoint, so its step
        # is not news: the job keeps the step its checkpoint holds.
        job.attempt_started_at = now
        job.attempt_start_step = job.step
        job.eta_from_step = job.eta_from_at = None
    elif event.step is not None:
        if job.eta_from_step is None and event.step > job.attempt_start_step:
            # The attempt's first reported step: the ETA's rate is measured from here on. Start-up
            # (imports, data preparation, building the model) and the first step (warm-up,
            # allocator growth) are not training speed; counting them made early ETAs far too long.
            job.eta_from_step, job.eta_from_at = event.step, now
        job.step = event.step
    if event.total is not None:
        job.total = event.total
    metrics = dict(job.metrics)
    for key in ("loss", "lr", "samples_per_s"):
        value = getattr(event, key)
        if value is not None:
            metrics[key] = value
    metrics.update(event.metrics)
    job.metrics = metrics
    if event.peak_rss_bytes is not None:
        job.peak_rss_bytes = max(job.peak_rss_bytes or 0, event.peak_rss_bytes)
    for key in ("gpu_allocated_bytes", "gpu_reserved_bytes"):
        if getattr(event, key) is not None:
            setattr(job, key, getattr(event, key))
    for key in ("gpu_peak_allocated_bytes", "gpu_peak_reserved_bytes"):
        if getattr(event, key) is not None:  # the peak over all attempts, like peak_rss_bytes
            setattr(job, key, max(getattr(job, key) or 0, getattr(event, key)))
    if event.kind == "error" and event.message:
        job.error = event.message
    job.eta_s = _eta_seconds(job, now)
    touch(job)
    session.add(job)
    session.commit()
    return job.stop_request


def _eta_seconds(job: Job, now) -> float | None:
    """Remaining steps at the average rate since the attempt's first reported step."""
    if job.eta_from_at is None or job.eta_from_step is None or job.step <= job.eta_from_step:
        return None
    elapsed = (now - job.eta_from_at).total_seconds()
    rate = (job.step - job.eta_from_step) / max(elapsed, 1e-6)
    return round(max(job.total - job.step, 0) / rate, 1)
