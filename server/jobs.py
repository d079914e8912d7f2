"""The one owner of job state: validation, and every write to a job and its attempts.

The API and the scheduler change a job only through the named operations below (create it,
start an attempt, record an event or a memory sample, ask it to stop, pause it for memory,
resume or retry it, make it wait, end an attempt). Each one writes the job and its side effects in one
transaction. A status change goes through :func:`update_if_status`, which applies only while
the job still has the status the caller read, so the scheduler never starts a job a user
cancelled a moment before. What an attempt's end means is decided in :mod:`server.outcomes`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import subprocess
import sys
import threading
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import case, delete, func, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session, select

from server.exceptions import Conflict, InvalidInput, NotFound
from server.models import (
    Artifact, Attempt, AttemptOutcome, Job, JobCreate, JobEvent, JobPublic, JobStatus, WaitReason, utcnow,
)
from server.eta import eta_seconds, next_step_seconds
from server.outcomes import MAX_IDLE_ALLOCATIONS, Decision, Facts, decide
from trainer.artifact_format import ArtifactFormatError, read_header
from trainer.config import ConfigError, EncoderConfig, TrainConfigBase
from trainer.memory_prediction import predict_peak_bytes
from trainer.protocol import SYNTHETIC_DATASETS, TRAINING_PHASE, ArtifactKind, TrainerEvent, merge_memory
from trainer.stages import STAGES, parse_config, stage_names

log = logging.getLogger("neurolens.jobs")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"Job {job_id} not found.")
    if job.deleting_at is not None:
        raise NotFound(f"Job {job_id} not found: it is being deleted.")
    return job


def job_artifacts(session: Session, job_id: int) -> list[Artifact]:
    return list(session.exec(select(Artifact).where(Artifact.job_id == job_id, Artifact.deleting_at.is_(None))
                             .order_by(Artifact.id)))


def attempts_of(session: Session, job_id: int) -> list[Attempt]:
    """A job's attempts, oldest first."""
    return list(session.exec(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)))


def open_attempt(session: Session, job_id: int) -> Attempt | None:
    """The attempt of a job that has not ended (at most one), if any."""
    return session.exec(select(Attempt).where(Attempt.job_id == job_id, Attempt.ended_at.is_(None))).first()


def to_public(session: Session, job: Job) -> JobPublic:
    return JobPublic.from_job(job, job_artifacts(session, job.id), attempts_of(session, job.id))


def to_public_many(session: Session, jobs: list[Job]) -> list[JobPublic]:
    """Public views of many jobs with two queries in all, not two per job (a listing polls)."""
    ids = [job.id for job in jobs]
    artifacts: dict[int, list[Artifact]] = {job_id: [] for job_id in ids}
    attempts: dict[int, list[Attempt]] = {job_id: [] for job_id in ids}
    if ids:
        for artifact in session.exec(select(Artifact).where(Artifact.job_id.in_(ids), Artifact.deleting_at.is_(None))
                                     .order_by(Artifact.id)):
            artifacts[artifact.job_id].append(artifact)
        for attempt in session.exec(select(Attempt).where(Attempt.job_id.in_(ids)).order_by(Attempt.number)):
            attempts[attempt.job_id].append(attempt)
    return [JobPublic.from_job(job, artifacts[job.id], attempts[job.id]) for job in jobs]


def encoder_of(session: Session, job_id: int) -> Artifact | None:
    """The newest encoder artifact a job produced, if any."""
    return session.exec(
        select(Artifact)
        .where(Artifact.job_id == job_id, Artifact.kind == ArtifactKind.encoder, Artifact.deleting_at.is_(None))
        .order_by(Artifact.id.desc())
    ).first()


def validate_dataset(dataset: str, roots: tuple[Path, ...] = ()) -> str:
    """The dataset value to store: a synthetic name, or the resolved path of one that exists.

    With ``roots`` (resolved folders) a path must resolve, symlinks followed, inside one of
    them; outside, it is refused with the same words whether it exists or not, so the answer
    tells nothing about the server's files.
    """
    if not isinstance(dataset, str) or not dataset.strip():
        raise InvalidInput("Invalid dataset ''; expected a path on the server or one of "
                           f"{', '.join(repr(d) for d in SYNTHETIC_DATASETS)}.")
    dataset = dataset.strip()
    if dataset.startswith("synthetic"):
        if dataset not in SYNTHETIC_DATASETS:
            raise InvalidInput(f"Invalid dataset {dataset!r}; expected one of "
                               f"{', '.join(repr(d) for d in SYNTHETIC_DATASETS)}.")
        return dataset
    if roots and not any(Path(dataset).expanduser().resolve().is_relative_to(root) for root in roots):
        raise InvalidInput(f"Dataset path {dataset!r} is not inside the server's dataset roots "
                           f"({', '.join(map(str, roots))}); NEUROLENS_DATASET_ROOTS names the folders allowed.")
    if not Path(dataset).expanduser().exists():
        raise InvalidInput(f"Dataset path {dataset!r} does not exist on the server.")
    return str(Path(dataset).expanduser().resolve())


def check_recordings(dataset: str, encoder: EncoderConfig, timeout_s: float,
                      test_subjects: list[str] = ()) -> dict[str, Any]:
    """Refuse a dataset the trainer could not train on: every recording is opened (headers only)
    by ``python -m trainer.check_dataset`` in a subprocess with a time limit, so a malformed file
    can neither hang nor crash the server, and MNE never loads here. Held-out ``test_subjects``
    must be among the dataset's. Returns the checker's answer (``summary``: what it found)."""
    try:
        result = subprocess.run([sys.executable, "-m", "trainer.check_dataset",
                                 json.dumps({"dataset": dataset, "channels": list(encoder.channels),
                                             "test_subjects": list(test_subjects)})],
                                capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise InvalidInput(f"Dataset {dataset!r} could not be checked within {timeout_s:g} s (reading the headers "
                           f"of its recordings); point it at fewer or smaller files.") from exc
    try:
        answer = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        answer = {}
    if "recordings" in answer:
        return answer
    lines = (result.stderr or "").strip().splitlines()
    raise InvalidInput(answer.get("error") or f"Dataset {dataset!r} could not be checked: the checker exited with "
                                              f"code {result.returncode}: {lines[-1] if lines else 'no output'}")


def check_resume_checkpoint(session: Session, body: JobCreate, config: TrainConfigBase,
                            artifact_path: Callable[[Artifact], Path] | None) -> None:
    """The ``checkpoint_artifact`` of a new job must be a checkpoint of the same model.

    Its safetensors header (parsed by the server, nothing unpickled) holds the configs it was
    written with; a checkpoint of another preset could only fail later, in the trainer.
    """
    artifact = session.get(Artifact, body.checkpoint_artifact)
    if artifact is None or artifact.deleting_at is not None:
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
        metadata = read_header(artifact_path(artifact)).metadata
        saved = json.loads(metadata.get("encoder_config", "null"))
    except (ArtifactFormatError, OSError, ValueError) as exc:
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
            metadata = read_header(artifact_path(artifact)).metadata
            return EncoderConfig.from_dict(json.loads(metadata["encoder_config"]))
        except (OSError, KeyError, ValueError, TypeError, ArtifactFormatError, ConfigError):
            return None
    return None


def create_job(session: Session, body: JobCreate, memory_limit_bytes: int | None = None,
               artifact_path: Callable[[Artifact], Path] | None = None, dataset_roots: tuple[Path, ...] = (),
               dataset_check_timeout_s: float | None = None) -> Job:
    """Validate a job request and queue it; nothing is written when any part is invalid.

    ``memory_limit_bytes`` is the most any one job may ever use here (the memory budget, or the
    machine's RAM): a job predicted to need more could only wait forever, so it is refused.
    ``artifact_path`` locates an artifact's file, so that a Stage 2 job's prediction can read
    the size of the encoder artifact it names. ``dataset_roots`` confine dataset paths; with
    ``dataset_check_timeout_s`` every recording is opened first (:func:`check_recordings`).
    """
    try:
        config = parse_config(body.stage, body.config)
    except ConfigError as exc:
        raise InvalidInput(str(exc)) from exc
    dataset = validate_dataset(body.dataset, dataset_roots)
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
            if after is None or after.deleting_at is not None:
                raise NotFound(f"Job {body.after} named in 'after' not found.")
            if after.stage not in STAGES or ArtifactKind.encoder not in STAGES[after.stage].produces:
                raise InvalidInput(f"Job {body.after} named in 'after' is a {after.stage} job; expected a {producers} job.")
            if after.status in (JobStatus.failed, JobStatus.cancelled):
                raise InvalidInput(f"Job {body.after} named in 'after' is {after.status.value}; it will produce no encoder.")
        if body.encoder_artifact is not None:
            artifact = session.get(Artifact, body.encoder_artifact)
            if artifact is None or artifact.deleting_at is not None:
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
    found: dict[str, Any] = {}
    if dataset_check_timeout_s is not None and dataset not in SYNTHETIC_DATASETS:
        # Last, as the slowest check: a second or so per dataset, to spare a queued job failing hours later.
        found = check_recordings(dataset, encoder or config.encoder, dataset_check_timeout_s, config.test_subjects)

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
    if found.get("summary"):  # what the check found (subjects, sessions, channels mapped, ...): the first event
        session.flush()
        session.add(JobEvent(job_id=job.id, kind="log", message=f"Dataset check: {found['summary']}"))
    session.commit()
    session.refresh(job)
    return job


def touch(job: Job) -> None:
    """Mark a job changed so its ETag changes.

    The increment is a SQL expression, so two sessions bumping at once never lose a bump.
    """
    job.version = Job.version + 1


def _bump(session: Session, job_id: int) -> None:
    """The same as :func:`touch` for a job that is not loaded."""
    session.execute(update(Job).where(Job.id == job_id).values(version=Job.version + 1))


class StaleJob(Conflict):
    """The job's status changed between reading it and writing the change."""


def update_if_status(session: Session, job: Job, expected: JobStatus, *, commit: bool = True,
                     **values: Any) -> Job:
    """Write ``values`` (and a new version) only while the job's status is ``expected``.

    Raises :class:`StaleJob`, having written nothing, when the status changed meanwhile. With
    ``commit=False`` the caller adds its side effects and commits them with this write.
    """
    # A job being deleted changes no more: its deletion is under way (delete_job).
    result = session.execute(update(Job).where(Job.id == job.id, Job.status == expected, Job.deleting_at.is_(None))
                             .values(**values, version=Job.version + 1))
    if result.rowcount != 1:
        session.rollback()
        raise StaleJob(f"Job {job.id} changed while it was being updated; try again.")
    if commit:
        session.commit()
        session.refresh(job)
    return job


def _status_values(status: JobStatus, **values: Any) -> dict[str, Any]:
    """The job columns a move to ``status`` writes: the status, its timestamps, cleared progress."""
    now = utcnow()
    values = {"status": status, "reason": None, **values}
    if status != JobStatus.running:
        values["eta_s"] = values["phase"] = None
    if status.is_finished:
        values["finished_at"] = now
    return values


def _retry_stale(action, session: Session, job: Job, *args) -> Job:
    """Run a user's status change again on fresh data if the scheduler changed the job meanwhile."""
    for _ in range(3):
        try:
            return action(session, job, *args)
        except StaleJob:
            session.refresh(job)
    return action(session, job, *args)


# --- attempts: start, report, end ---------------------------------------------------------


def start_attempt(session: Session, job: Job, executor: str, token: str, server_url: str | None = None) -> Attempt:
    """Claim a queued job for a new attempt whose trainer will carry ``token``, started by the
    server at ``server_url``.

    The claim fails with :class:`StaleJob` (nothing written) if the job left ``queued`` since it
    was read, e.g. a user cancelled it a moment ago; then no trainer is started. It is safe
    between servers sharing one database: the UPDATE's ``WHERE status = 'queued'`` is judged on
    the row as committed (SQLite runs one writer at a time; PostgreSQL makes a second UPDATE of
    a row wait for the first's commit, then re-checks the condition on the new row), so of two
    servers claiming the same job exactly one changes a row; the other gets :class:`StaleJob`.
    """
    now = utcnow()
    attempt = Attempt(job_id=job.id, number=job.attempts + 1, executor=executor, started_at=now,
                      start_step=job.step, token_sha256=hash_token(token), last_heartbeat_at=now,
                      server_url=server_url)
    update_if_status(session, job, JobStatus.queued, commit=False, **_status_values(
        JobStatus.running, started_at=job.started_at or now, error=None, attempts=attempt.number))
    session.add(attempt)
    try:
        session.commit()
    except IntegrityError as exc:
        # The job went queued -> running -> queued on another server since it was read here:
        # the status matched again, but this attempt's number is taken (unique per job).
        session.rollback()
        raise StaleJob(f"Job {job.id} changed while it was being updated; try again.") from exc
    session.refresh(job)
    session.refresh(attempt)
    return attempt


def attempt_running(session: Session, attempt: Attempt, handle: str) -> None:
    """Record the executor's handle of a started attempt (what a restarted server re-attaches to)."""
    attempt.handle = handle
    session.add(attempt)
    _bump(session, attempt.job_id)
    session.commit()


def reattached(session: Session, attempt: Attempt, server_url: str | None = None) -> None:
    """A restarted server found the attempt's trainer alive: give it a full heartbeat timeout,
    and make the attempt its own (one recorded before servers were, too)."""
    attempt.last_heartbeat_at = utcnow()
    attempt.server_url = server_url or attempt.server_url
    session.add(attempt)
    session.commit()


def record_event(session: Session, job: Job, attempt: Attempt, event: TrainerEvent, *,
                 reported_rss_is_ground_truth: bool = False,
                 max_progress_events: int | None = None, now: datetime | None = None) -> str | None:
    """Store a trainer report, refresh the job's progress; return the pending stop request.

    The trainer's own RSS covers its own process only; where the executor measures the whole
    process tree (``reported_rss_is_ground_truth`` False) that measurement is the one kept.
    A job sends a progress event every few seconds, for days: past ``max_progress_events``
    (``None``: no limit) its progress events are thinned (:func:`_thin_progress`), so its log
    stays bounded; every other kind of event is kept. ``now`` is when the report arrived
    (default: now); the ETA's clock reads it.
    """
    now = now or utcnow()
    session.add(JobEvent(job_id=job.id, created_at=now, **event.model_dump()))
    attempt.last_heartbeat_at = now
    if event.kind == "started":
        # A resumed attempt announces itself before it has loaded its checkpoint, so its step
        # is not news: the job keeps the step its checkpoint holds.
        attempt.eta_from_step = attempt.eta_from_at = None
    elif event.kind == "phase":
        # Only training is timed (server.eta): leaving it stops the clock; the first step
        # reported after entering it again starts it anew.
        job.phase = event.message
        attempt.eta_from_step = attempt.eta_from_at = None
    elif event.step is not None:
        if job.phase in (None, TRAINING_PHASE) and event.step > attempt.start_step:
            if attempt.eta_from_step is None:
                # The first step reported since training began: the clock starts here. Start-up
                # (imports, data, the model) and the first step (warm-up, allocator growth) are
                # not training speed; counting them made early ETAs far too long.
                attempt.eta_from_step, attempt.eta_from_at = event.step, now
            elif event.step > attempt.eta_from_step:
                attempt.step_s = next_step_seconds(attempt.step_s, (now - attempt.eta_from_at).total_seconds(),
                                                   event.step - attempt.eta_from_step, event.step - attempt.start_step)
                attempt.eta_from_step, attempt.eta_from_at = event.step, now
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
    rss_now = attempt.rss_bytes
    merge_memory(attempt, event)
    if not reported_rss_is_ground_truth:
        attempt.rss_bytes = rss_now
    if event.kind == "error" and event.message:
        job.error = event.message
    job.eta_s = eta_seconds(attempt.step_s, job.step, job.total)
    touch(job)
    session.add_all([job, attempt])
    if event.kind == "progress" and max_progress_events is not None:
        session.flush()
        _thin_progress(session, job.id, max_progress_events)
    session.commit()
    return attempt.stop_request


def _thin_progress(session: Session, job_id: int, limit: int) -> None:
    """Past ``limit``, drop every second progress event but the first and the newest: each
    thinning halves the older record evenly, recent progress stays whole, and the cost (one
    count per event, a delete every ``limit / 2`` events) stays small."""
    progress = (JobEvent.job_id == job_id, JobEvent.kind == "progress")
    if session.exec(select(func.count()).select_from(JobEvent).where(*progress)).one() <= limit:
        return
    ids = session.exec(select(JobEvent.id).where(*progress).order_by(JobEvent.id)).all()
    session.exec(delete(JobEvent).where(JobEvent.id.in_(ids[1:-1:2])))
class EventBacklog:
    """Trainer events the database could not take yet, kept in memory until a write lands.

    SQLite on a full disk refuses writes ("database or disk is full") exactly when the trainer
    reports the disk full. Losing that report left the job running for minutes and then
    blamed "a signal from outside NeuroLens"; so the report is kept here, the trainer is
    answered as if it were stored (it can stop at once), reads of the job show the kept error
    (:meth:`error_of`), and the scheduler writes the backlog before it ends the attempt.

    Progress reports are heartbeats, not history: of those only the newest per job is kept, so
    a disk that stays full for hours costs a few events of memory, not one per report.
    """

    MAX_PER_JOB = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[int, OrderedDict[int, tuple[int, TrainerEvent]]] = {}
        self._serial = 0

    def keep(self, job_id: int, attempt_id: int, event: TrainerEvent) -> None:
        with self._lock:
            events = self._events.setdefault(job_id, OrderedDict())
            if event.kind == "progress":
                for key in [k for k, (_, kept) in events.items() if kept.kind == "progress"]:
                    del events[key]
            self._serial += 1
            events[self._serial] = (attempt_id, event)
            while len(events) > self.MAX_PER_JOB:
                events.popitem(last=False)

    def has(self, job_id: int) -> bool:
        with self._lock:
            return bool(self._events.get(job_id))

    def error_of(self, job_id: int) -> str | None:
        """The message of the newest kept ``error`` event of the job, if any."""
        with self._lock:
            errors = [e.message for _, e in self._events.get(job_id, {}).values() if e.kind == "error" and e.message]
        return errors[-1] if errors else None

    def flush(self, session: Session, job_id: int) -> None:
        """Write the job's kept events, oldest first; raises ``OperationalError`` (keeping what is
        not written) while the database still cannot write."""
        while True:
            with self._lock:
                events = self._events.get(job_id)
                if not events:
                    self._events.pop(job_id, None)
                    return
                key, (attempt_id, event) = next(iter(events.items()))
            job, attempt = session.get(Job, job_id), session.get(Attempt, attempt_id)
            if job is not None and attempt is not None:
                if attempt.ended_at is None:
                    record_event(session, job, attempt, event)
                else:  # its attempt was closed meanwhile: the story still belongs in the log
                    session.add(JobEvent(job_id=job_id, **event.model_dump()))
                    session.commit()
            with self._lock:
                self._events.get(job_id, {}).pop(key, None)

    def show(self, public: JobPublic) -> JobPublic:
        """A job as read, with the error a kept event reports (its row cannot say so yet)."""
        error = self.error_of(public.id)
        if error is not None:
            public.error = error
        return public


def report_event(session: Session, backlog: EventBacklog, job: Job, attempt: Attempt, event: TrainerEvent, *,
                 reported_rss_is_ground_truth: bool = False, max_progress_events: int | None = None) -> str | None:
    """:func:`record_event` after any events kept in ``backlog``; when the database cannot write,
    the event joins the backlog and the stop request last read is returned all the same."""
    stop = attempt.stop_request
    try:
        backlog.flush(session, job.id)
        return record_event(session, job, attempt, event, reported_rss_is_ground_truth=reported_rss_is_ground_truth,
                            max_progress_events=max_progress_events)
    except OperationalError as exc:
        session.rollback()
        log.warning("job %s: the database cannot store the trainer's %s event (%s); kept in memory until it can",
                    job.id, event.kind, exc.orig)
        backlog.keep(job.id, attempt.id, event)
        return stop


def record_memory_sample(session: Session, attempt: Attempt, rss: int) -> None:
    """The executor's measurement of the attempt's process tree, with its peak.

    One UPDATE with the maximum taken in SQL: the API's concurrent writes (events, stop
    requests) are neither lost nor overwritten.
    """
    # CASE, not max(a, b): two-argument max is SQLite's; PostgreSQL spells it greatest().
    peak = func.coalesce(Attempt.peak_rss_bytes, 0)
    session.execute(update(Attempt).where(Attempt.id == attempt.id, Attempt.ended_at.is_(None)).values(
        rss_bytes=rss, peak_rss_bytes=case((peak > rss, peak), else_=rss)))
    _bump(session, attempt.job_id)
    session.commit()


def mark_killed(session: Session, attempt: Attempt, message: str) -> None:
    """Record that this server is killing the attempt's trainer, and why; before the kill, so
    the end is never mistaken for the out-of-memory killer's."""
    session.execute(update(Attempt).where(Attempt.id == attempt.id).values(killed_by_us=True, message=message))
    _bump(session, attempt.job_id)
    session.commit()
    session.refresh(attempt)


def pause_for_memory(session: Session, job: Job, attempt: Attempt, message: str) -> None:
    """Ask a running trainer to checkpoint and pause because it nears its memory allowance."""
    session.add(JobEvent(job_id=job.id, kind="log", step=job.step, message=message))
    session.execute(update(Attempt).where(Attempt.id == attempt.id, Attempt.stop_request.is_(None)).values(
        stop_request="pause", stop_requested_at=utcnow()))
    update_if_status(session, job, JobStatus.running, error=message, reason=WaitReason.memory.value)
    session.refresh(attempt)


def _idle_allocations(session: Session, job: Job, attempt: Attempt) -> int:
    """``attempt`` and the attempts just before it that ended out of time with nothing new saved.

    An attempt saved something when it reported a checkpoint beyond its start step; one that did
    not leaves the next attempt to start from the same step."""
    saved = session.exec(select(JobEvent.id).where(
        JobEvent.job_id == job.id, JobEvent.kind == "checkpoint", JobEvent.step > attempt.start_step,
        JobEvent.created_at >= attempt.started_at).limit(1)).first()
    if saved is not None:
        return 0
    idle = 1
    earlier = session.exec(select(Attempt).where(Attempt.job_id == job.id, Attempt.number < attempt.number)
                           .order_by(Attempt.number.desc()).limit(MAX_IDLE_ALLOCATIONS)).all()
    for previous in earlier:
        if previous.outcome != AttemptOutcome.out_of_time or previous.start_step != attempt.start_step:
            break
        idle += 1
    return idle


def end_attempt(session: Session, job: Job, attempt: Attempt, facts: Facts, max_attempts: int) -> Decision:
    """Close ``attempt`` as ``facts`` say and move the job on, in one transaction.

    Raises :class:`StaleJob`, having written nothing, if the job is no longer running.
    """
    failures = session.exec(select(func.count()).select_from(Attempt).where(
        Attempt.job_id == job.id, Attempt.id != attempt.id, Attempt.number > job.retry_budget_from,
        Attempt.outcome.in_([o for o in AttemptOutcome if o.spends_retry]))).one()
    decision = decide(facts, config=job.config, job_error=job.error, job_reason=job.reason,
                      attempts=job.attempts, failures=failures, max_attempts=max_attempts,
                      idle_allocations=_idle_allocations(session, job, attempt))
    values: dict[str, Any] = {"reason": decision.reason}
    if decision.error is not None:
        values["error"] = decision.error
    if decision.config is not None:
        values["config"] = decision.config
    if decision.status == JobStatus.succeeded:
        values["step"] = job.total
    update_if_status(session, job, JobStatus.running, commit=False, **_status_values(decision.status, **values))
    code = facts.exit.effective_code if facts.exit is not None else None
    session.execute(update(Attempt).where(Attempt.id == attempt.id).values(
        ended_at=utcnow(), end_step=job.total if decision.status == JobStatus.succeeded else job.step,
        exit_code=code if code is not None else facts.code, outcome=decision.outcome, message=decision.message,
        token_sha256=None, stop_request=None, stop_requested_at=None,
        rss_bytes=None, gpu_allocated_bytes=None, gpu_reserved_bytes=None))
    if decision.status == JobStatus.queued and decision.error is not None:
        # The event log keeps the story after the retry's start clears `error`.
        session.add(JobEvent(job_id=job.id, kind="log", step=job.step, message=decision.message))
    session.commit()
    session.refresh(job)
    session.refresh(attempt)
    return decision


def start_failed(session: Session, job: Job, attempt: Attempt, error: str) -> None:
    """The executor could not start the attempt's trainer: the job fails with the reason."""
    update_if_status(session, job, JobStatus.running, commit=False,
                     **_status_values(JobStatus.failed, error=error))
    session.execute(update(Attempt).where(Attempt.id == attempt.id).values(
        ended_at=utcnow(), end_step=job.step, outcome=AttemptOutcome.not_started, message=error, token_sha256=None))
    session.commit()
    session.refresh(job)


# --- waiting jobs ---------------------------------------------------------------------------


def wait(session: Session, job: Job, reason: str | None) -> None:
    """Record why a queued job is not started yet (None: in line for a free slot)."""
    if job.reason != reason:
        try:
            update_if_status(session, job, JobStatus.queued, reason=reason)
        except StaleJob:
            pass  # it left the queue meanwhile; the next tick sees it as it is


def fail_waiting(session: Session, job: Job, error: str) -> None:
    """A queued job that can never start (its Stage 1 job failed, its encoder is gone) fails."""
    update_if_status(session, job, JobStatus.queued, **_status_values(JobStatus.failed, error=error))


# --- a user's requests ----------------------------------------------------------------------


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
        return update_if_status(session, job, job.status, **_status_values(JobStatus.cancelled))
    # Running: the trainer hears of it in its next event reply, checkpoints and exits.
    attempt = open_attempt(session, job.id)
    if attempt is None:  # the scheduler is ending it this instant; the retry sees the new status
        raise StaleJob(f"Job {job.id} changed while it was being updated; try again.")
    session.execute(update(Attempt).where(Attempt.id == attempt.id).values(
        stop_request=request, stop_requested_at=utcnow()))
    return update_if_status(session, job, JobStatus.running)


def resume(session: Session, job: Job) -> Job:
    return _retry_stale(_resume, session, job)


def _resume(session: Session, job: Job) -> Job:
    if job.status != JobStatus.paused:
        raise Conflict(f"Job {job.id} is {job.status.value}; only a paused job can be resumed.")
    return update_if_status(session, job, JobStatus.paused, **_status_values(JobStatus.queued))


def retry(session: Session, job: Job) -> Job:
    """Queue a failed or cancelled job again with a fresh retry budget.

    Its trainer resumes from the newest complete checkpoint in the job's directory, as after a
    crash; its attempts so far stay in its history but no longer count against
    ``max_attempts``. A Stage 2 job whose Stage 1 job failed is refused until that job is
    retried; retrying a Stage 1 job also queues the jobs that failed waiting on it (never
    started), so a pipeline continues with one request.
    """
    return _retry_stale(_retry, session, job)


def _retry(session: Session, job: Job) -> Job:
    if job.status not in (JobStatus.failed, JobStatus.cancelled):
        raise Conflict(f"Job {job.id} is {job.status.value}; only a failed or cancelled job can be retried "
                       f"(resume a paused one).")
    if STAGES[job.stage].needs_encoder and job.after_job_id is None and job.encoder_artifact_id is None:
        raise Conflict(f"Job {job.id} cannot be retried: the encoder it started from was deleted; submit a new "
                       f"job naming another encoder.")
    after = session.get(Job, job.after_job_id) if job.after_job_id is not None else None
    if after is not None and after.status in (JobStatus.failed, JobStatus.cancelled):
        raise Conflict(f"Job {job.id} starts from the encoder of job {after.id}, which is {after.status.value}; "
                       f"retry job {after.id} first.")
    # Dependents that failed only because this job did: they never started.
    waiting = list(session.exec(select(Job).where(Job.after_job_id == job.id, Job.status == JobStatus.failed,
                                                  Job.attempts == 0)))
    values = _status_values(JobStatus.queued, error=None, finished_at=None)
    update_if_status(session, job, job.status, commit=False, retry_budget_from=job.attempts, **values)
    for dependent in waiting:
        session.execute(update(Job).where(Job.id == dependent.id, Job.status == JobStatus.failed)
                        .values(version=Job.version + 1, **values))
    session.add(JobEvent(job_id=job.id, kind="log", step=job.step,
                         message=f"retried by a user after {job.attempts} attempts; resumes from the newest "
                                 f"checkpoint with a fresh retry budget"))
    session.commit()
    session.refresh(job)
    return job


# --- deleting -------------------------------------------------------------------------------
#
# A deletion is marked first (one transaction: the mark, and the rows others keep pointing at
# rewired), then the files go (server.housekeeping), then the rows. A server that stops between
# the steps finds the mark at its next start and finishes the deletion; a marked job or
# artifact is already gone for every reader (get_job, the listings).

# Jobs that may still start a trainer: what they use cannot be deleted under them.
ACTIVE = (JobStatus.queued, JobStatus.running, JobStatus.paused)


def _named(jobs: list[Job]) -> str:
    return ", ".join(f"{job.id} ({job.status.value})" for job in jobs)


def mark_job_deleting(session: Session, job: Job) -> list[int]:
    """Mark a job for deletion; return the ids of its artifacts that other jobs use, which are
    kept, detached from it (``job_id`` null, like an imported file).

    Refused (:class:`Conflict`, nothing written) while the job is queued or running, or while
    a queued, running or paused job waits on its encoder. A finished job that started from
    this job's encoder names that encoder artifact instead (it is kept), so its record still
    says what it started from.
    """
    if job.status in (JobStatus.queued, JobStatus.running):
        raise Conflict(f"Job {job.id} is {job.status.value}; cancel it first (a running trainer stops at its next "
                       f"step), then delete it.")
    dependents = list(session.exec(select(Job).where(Job.after_job_id == job.id, Job.deleting_at.is_(None))
                                   .order_by(Job.id)))
    waiting = [d for d in dependents if d.status in ACTIVE]
    if waiting:
        raise Conflict(f"Job {job.id} cannot be deleted: job{'s' if len(waiting) > 1 else ''} {_named(waiting)} "
                       f"start{'' if len(waiting) > 1 else 's'} from its encoder; cancel or delete "
                       f"{'them' if len(waiting) > 1 else 'it'} first.")
    encoder = encoder_of(session, job.id)
    for dependent in dependents:
        session.execute(update(Job).where(Job.id == dependent.id).values(
            after_job_id=None, encoder_artifact_id=encoder.id if encoder is not None else None,
            version=Job.version + 1))
    session.flush()
    own = job_artifacts(session, job.id)
    own_ids = [a.id for a in own]
    used = set(session.exec(select(Job.encoder_artifact_id).where(Job.encoder_artifact_id.in_(own_ids),
                                                                  Job.id != job.id)).all()) if own_ids else set()
    used |= set(session.exec(select(Job.checkpoint_artifact_id).where(Job.checkpoint_artifact_id.in_(own_ids),
                                                                      Job.id != job.id)).all()) if own_ids else set()
    kept = sorted(i for i in used if i is not None)
    now = utcnow()
    if kept:
        session.execute(update(Artifact).where(Artifact.id.in_(kept)).values(job_id=None))
    if own_ids:
        session.execute(update(Artifact).where(Artifact.job_id == job.id).values(deleting_at=now))
    # Compare-and-set like every status change: a retry or resume a moment ago wins.
    update_if_status(session, job, job.status, commit=False, deleting_at=now)
    session.commit()
    return kept


def deleting_artifacts_of(session: Session, job_id: int) -> list[Artifact]:
    """The artifacts a marked job's deletion removes (those not kept)."""
    return list(session.exec(select(Artifact).where(Artifact.job_id == job_id, Artifact.deleting_at.is_not(None))))


def drop_job(session: Session, job_id: int) -> None:
    """The last step of a job's deletion, its files gone: its rows (events, attempts, the
    artifacts not kept, the job)."""
    session.execute(delete(JobEvent).where(JobEvent.job_id == job_id))
    session.execute(delete(Attempt).where(Attempt.job_id == job_id))
    session.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.deleting_at.is_not(None)))
    session.execute(delete(Job).where(Job.id == job_id, Job.deleting_at.is_not(None)))
    session.commit()


def get_artifact(session: Session, artifact_id: int) -> Artifact:
    artifact = session.get(Artifact, artifact_id)
    if artifact is None or artifact.deleting_at is not None:
        raise NotFound(f"Artifact {artifact_id} not found.")
    return artifact


def mark_artifact_deleting(session: Session, artifact: Artifact) -> list[int]:
    """Mark an artifact for deletion; return the finished jobs that named it (their reference is
    cleared: the row it named is going).

    Refused (:class:`Conflict`) while a queued, running or paused job uses it: as its encoder or
    checkpoint to start from, or as the newest encoder of the Stage 1 job it waits on.
    """
    users = list(session.exec(select(Job).where(
        (Job.encoder_artifact_id == artifact.id) | (Job.checkpoint_artifact_id == artifact.id),
        Job.deleting_at.is_(None)).order_by(Job.id)))
    if artifact.kind == ArtifactKind.encoder and artifact.job_id is not None:
        newest = encoder_of(session, artifact.job_id)
        if newest is not None and newest.id == artifact.id:
            users += list(session.exec(select(Job).where(Job.after_job_id == artifact.job_id,
                                                         Job.deleting_at.is_(None)).order_by(Job.id)))
    active = [job for job in users if job.status in ACTIVE]
    if active:
        raise Conflict(f"Artifact {artifact.id} cannot be deleted: job{'s' if len(active) > 1 else ''} "
                       f"{_named(active)} use{'' if len(active) > 1 else 's'} it; cancel or delete "
                       f"{'them' if len(active) > 1 else 'it'} first.")
    named = sorted({job.id for job in users if artifact.id in (job.encoder_artifact_id, job.checkpoint_artifact_id)})
    for column in (Job.encoder_artifact_id, Job.checkpoint_artifact_id):
        session.execute(update(Job).where(column == artifact.id).values({column: None, Job.version: Job.version + 1}))
    result = session.execute(update(Artifact).where(Artifact.id == artifact.id, Artifact.deleting_at.is_(None))
                             .values(deleting_at=utcnow()))
    if result.rowcount != 1:
        session.rollback()
        raise NotFound(f"Artifact {artifact.id} not found: it is being deleted.")
    if artifact.job_id is not None:
        _bump(session, artifact.job_id)
    session.commit()
    return named


def drop_artifact(session: Session, artifact_id: int) -> None:
    """The last step of an artifact's deletion, its file gone: its row."""
    session.execute(delete(Artifact).where(Artifact.id == artifact_id, Artifact.deleting_at.is_not(None)))
    session.commit()


def pending_deletions(session: Session) -> tuple[list[int], list[Artifact]]:
    """Deletions a stopped server left unfinished: marked jobs, and marked artifacts of no marked job."""
    jobs = list(session.exec(select(Job.id).where(Job.deleting_at.is_not(None))).all())
    artifacts = [a for a in session.exec(select(Artifact).where(Artifact.deleting_at.is_not(None)))
                 if a.job_id is None or a.job_id not in jobs]
    return jobs, artifacts
