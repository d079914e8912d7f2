"""The scheduler: admits queued jobs, spawns trainers, supervises them, records their memory.

It runs in one background thread with its own database sessions, ticking twice a second (or at
once when the API wakes it). Each tick:

1. reaps trainers that exited and maps the exit to a status (see :meth:`Scheduler._finish`);
2. samples each trainer's process-tree RSS with psutil and kills any trainer silent for longer
   than the heartbeat timeout, or slow to honour a stop request;
3. starts the oldest queued jobs whose dependencies are met and whose predicted peak memory
   fits, up to the concurrency limit.

At start-up it reconciles: a job marked running whose trainer is still alive is re-attached;
one whose trainer is gone is queued again, to resume from its newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path

import psutil
from sqlalchemy import func, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from server.gpus import Gpu, list_gpus
from server.jobs import StaleJob, encoder_of, hash_token, new_token, set_status
from server.models import Artifact, Job, JobEvent, JobStatus, WaitReason, utcnow
from server.processes import TrainerProcess, describe_exit
from server.settings import Settings
from server.storage import ArtifactStore
from trainer.memory_prediction import predict_gpu_bytes
from trainer.protocol import EXIT_FAILED, EXIT_OK, EXIT_STOPPED, LOG_FILENAME, SPEC_FILENAME, JobSpec
from trainer.stages import STAGES, parse_config

log = logging.getLogger("neurolens.scheduler")

TICK_S = 0.5
# A trainer gets this long to checkpoint and exit after a stop request reached it.
STOP_GRACE_S = 60.0
SHUTDOWN_GRACE_S = 15.0


def halved_micro_batch(config: dict) -> int | None:
    """The next smaller micro-batch that still divides each process's batch, or None at 1."""
    batch, micro = config["batch_size"] // config.get("devices", 1), config["micro_batch_size"]
    for candidate in range(micro // 2, 0, -1):
        if batch % candidate == 0:
            return candidate
    return None


_ROOT_CAUSE_EXIT = re.compile(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", re.S)


def torchrun_root_cause(log_path: Path, max_bytes: int = 16384) -> int | None:
    """The exit code of the worker whose failure ended a torchrun, from torchrun's report.

    torchrun exits 1 whatever happened to its workers, and prints a "Root Cause (first observed
    failure)" block with that worker's ``exitcode`` (negative: the signal). Reading it tells an
    out-of-memory SIGKILL of one worker from a crash, so that the memory back-off applies to
    data-parallel jobs too.
    """
    found = _ROOT_CAUSE_EXIT.findall(log_tail(log_path, max_bytes) or "")
    return int(found[-1]) if found else None


def uses_gpu(config: dict, gpus: list[Gpu]) -> bool:
    """Whether a job with this config will train on CUDA here ('auto' does when a GPU is seen)."""
    device = config.get("device", "auto")
    return device == "cuda" or (device == "auto" and bool(gpus))


def log_tail(path: Path, max_bytes: int) -> str | None:
    """The last ``max_bytes`` of a trainer log as text, or None when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(fh.seek(0, 2) - max_bytes, 0))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None


def last_log_line(path: Path, max_bytes: int = 4096) -> str:
    """The last non-empty line of a trainer log: usually the exception that ended it."""
    lines = (log_tail(path, max_bytes) or "").strip().splitlines()
    return lines[-1].strip()[:500] if lines else ""


class Scheduler:
    def __init__(self, settings: Settings, engine: Engine, store: ArtifactStore) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.trainers: dict[int, TrainerProcess] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_sample = 0.0
        # Crashed jobs wait a little before their retry, so a crash loop cannot spin the CPU.
        self._retry_after: dict[int, float] = {}
        # Jobs whose trainer this server killed itself: a SIGKILL from anyone else is taken to be
        # the operating system's out-of-memory killer.
        self._killed_by_us: set[int] = set()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.reconcile()
        self._thread = threading.Thread(target=self._run, name="neurolens-scheduler", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def shutdown(self) -> None:
        """Stop ticking, stop every trainer, and queue their jobs to resume at the next start."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        for trainer in self.trainers.values():
            # SIGTERM lets the trainer checkpoint and exit; whatever is left is killed below.
            trainer.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for trainer in self.trainers.values():
            if not trainer.wait(max(deadline - time.monotonic(), 0.1)):
                trainer.kill()
                trainer.wait(5)
        with Session(self.engine) as session:
            for job_id in list(self.trainers):
                job = session.get(Job, job_id)
                if job is not None and job.status == JobStatus.running:
                    try:
                        self._finish(session, job, self.trainers[job_id], shutting_down=True)
                    except StaleJob:
                        log.warning("job %s changed during shutdown; left as it is", job_id)
        self.trainers.clear()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.tick()
            except Exception:  # one bad tick must not end supervision of every other job
                log.exception("scheduler tick failed")
            self._wake.wait(TICK_S)
            self._wake.clear()

    def tick(self) -> None:
        with Session(self.engine) as session:
            self._reap(session)
            self._watch(session)
            self._admit(session)

    # --- start-up reconciliation ---------------------------------------------------------

    def reconcile(self) -> None:
        with Session(self.engine) as session:
            for job in session.exec(select(Job).where(Job.status == JobStatus.running)).all():
                trainer = TrainerProcess.reattach(job.pid, self.job_dir(job.id)) if job.pid else None
                if trainer is not None:
                    log.info("job %s: re-attached to trainer pid %s", job.id, job.pid)
                    self.trainers[job.id] = trainer
                    # Give it a full timeout to report to this new server process.
                    session.execute(update(Job).where(Job.id == job.id).values(last_heartbeat_at=utcnow()))
                    session.commit()
                else:
                    log.info("job %s: trainer gone after a server restart; queued to resume", job.id)
                    set_status(session, job, JobStatus.queued, error="server restarted while the trainer ran; resuming from the newest checkpoint")

    # --- reaping -------------------------------------------------------------------------

    def _reap(self, session: Session) -> None:
        for job_id, trainer in list(self.trainers.items()):
            finished, _ = trainer.poll()
            if not finished:
                continue
            job = session.get(Job, job_id)
            if job is not None and job.status == JobStatus.running:
                self._finish(session, job, trainer)
            del self.trainers[job_id]

    def _finish(self, session: Session, job: Job, trainer: TrainerProcess, *, shutting_down: bool = False) -> None:
        """Map how a trainer ended to the job's next status."""
        finished, code = trainer.poll()
        if code is None:
            code = self._infer_exit_code(session, job)
        stop = job.stop_request
        if code == EXIT_OK:
            set_status(session, job, JobStatus.succeeded, step=job.total)
        elif stop == "cancel":
            set_status(session, job, JobStatus.cancelled)
        elif stop == "pause":
            set_status(session, job, JobStatus.paused, reason=job.reason)  # "memory" when paused for it
        elif shutting_down:
            set_status(session, job, JobStatus.queued)
        elif code == EXIT_FAILED:
            set_status(session, job, JobStatus.failed, error=job.error or "trainer failed; see its log")
        elif code == EXIT_STOPPED:
            # Stopped without a request of ours: the trainer said why (a full disk), or a signal
            # from outside NeuroLens asked it to end. Either way it checkpointed: resumable.
            set_status(session, job, JobStatus.paused, error=job.error or "trainer was stopped from outside NeuroLens")
        else:
            reason = job.error if job.error and job.error.startswith("no report") else describe_exit(code)
            last_line = last_log_line(self.job_dir(job.id) / LOG_FILENAME)
            if last_line:
                reason = f"{reason}: {last_line}"
            sigkill = -getattr(signal, "SIGKILL", 9)
            if code == 1 and job.config.get("devices", 1) > 1:  # torchrun: how did its first worker end?
                worker = torchrun_root_cause(self.job_dir(job.id) / LOG_FILENAME)
                if worker is not None:
                    code = worker
                    reason = f"a torchrun worker: {describe_exit(worker)}"
            killed_by_os = code == sigkill and job.id not in self._killed_by_us
            self._killed_by_us.discard(job.id)
            if job.attempts < self.settings.max_attempts:
                changes: dict = {}
                retry = "retrying from the newest checkpoint"
                if killed_by_os and (smaller := halved_micro_batch(job.config)) is not None:
                    changes["config"] = {**job.config, "micro_batch_size": smaller}
                    accumulation = job.config["batch_size"] // job.config.get("devices", 1) // smaller
                    retry = (f"likely out of memory; {retry} with micro_batch_size {smaller} and {accumulation} "
                             f"accumulation steps (effective batch {job.config['batch_size']} kept)")
                log.warning("job %s: %s; %s (attempt %s of %s)", job.id, reason, retry, job.attempts + 1,
                            self.settings.max_attempts)
                self._retry_after[job.id] = time.monotonic() + min(2.0 ** job.attempts, 30.0)
                # The event log keeps the story after the retry's start clears `error`.
                session.add(JobEvent(job_id=job.id, kind="log", step=job.step, message=f"{reason}; {retry}"))
                set_status(session, job, JobStatus.queued, error=f"{reason}; {retry}", **changes)
            else:
                set_status(session, job, JobStatus.failed, error=f"{reason} (after {job.attempts} attempts)")

    def _infer_exit_code(self, session: Session, job: Job) -> int | None:
        """For a re-attached trainer, whose exit code is lost: read its last event."""
        last = session.exec(
            select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id.desc())
        ).first()
        if last is not None and last.kind == "finished":
            return EXIT_OK
        if last is not None and last.kind == "error":
            return EXIT_FAILED
        return None

    # --- watching ------------------------------------------------------------------------

    def _watch(self, session: Session) -> None:
        now_mono = time.monotonic()
        sample = now_mono - self._last_sample >= self.settings.sample_interval_s
        if sample:
            self._last_sample = now_mono
        now = utcnow()
        samples = {job_id: trainer.tree_rss_bytes() for job_id, trainer in self.trainers.items()} if sample else {}
        for job_id, trainer in self.trainers.items():
            job = session.get(Job, job_id)
            if job is None or job.status != JobStatus.running:
                continue
            if (rss := samples.get(job_id)) is not None:
                others = sum(r or 0 for other, r in samples.items() if other != job_id)
                self._guard_memory(session, job, rss, others)
                # One UPDATE with the maximum taken in SQL: the API's concurrent writes to the same
                # row (progress events, stop requests) are neither lost nor overwritten.
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.running)
                    .values(rss_bytes=rss, peak_rss_bytes=func.max(func.coalesce(Job.peak_rss_bytes, 0), rss),
                            version=Job.version + 1)
                )
            silent_s = (now - job.last_heartbeat_at).total_seconds() if job.last_heartbeat_at else 0.0
            if silent_s > self.settings.heartbeat_timeout_s:
                session.execute(update(Job).where(Job.id == job_id).values(
                    error=f"no report from the trainer for {silent_s:.0f} s; killed", version=Job.version + 1))
                self._killed_by_us.add(job_id)
                trainer.kill()
            elif job.stop_requested_at and (now - job.stop_requested_at).total_seconds() > STOP_GRACE_S:
                log.warning("job %s: trainer ignored a %s request; killing it", job.id, job.stop_request)
                self._killed_by_us.add(job_id)
                trainer.kill()
        session.commit()

    def memory_allowance(self, others_rss: int, own_rss: int) -> int:
        """Bytes one running trainer may use: the budget's share left by the others, or what the
        machine has free beyond the margin (its own RSS counts as usable)."""
        free = own_rss + psutil.virtual_memory().available - self.settings.memory_margin_bytes
        if self.settings.memory_budget_bytes:
            return min(self.settings.memory_budget_bytes - others_rss, free)
        return free

    def _guard_memory(self, session: Session, job: Job, rss: int, others_rss: int) -> None:
        """Pause a trainer, after a checkpoint, when it nears its allowance."""
        allowance = self.memory_allowance(others_rss, rss)
        # Pausing before the limit, not at it, leaves room for the checkpoint the pause writes and
        # keeps the operating system's out-of-memory killer from choosing a victim first.
        if job.stop_request or rss < self.settings.memory_pause_share * allowance:
            return
        message = (f"paused to stay within memory: the trainer used {rss / 2**30:.2f} GB of the "
                   f"{max(allowance, 0) / 2**30:.2f} GB it may use; resume it when memory is free, "
                   f"or with a smaller micro_batch_size")
        log.warning("job %s: %s", job.id, message)
        session.add(JobEvent(job_id=job.id, kind="log", step=job.step, message=message))
        session.execute(update(Job).where(Job.id == job.id, Job.status == JobStatus.running).values(
            stop_request="pause", stop_requested_at=utcnow(), error=message, reason=WaitReason.memory.value,
            version=Job.version + 1))

    # --- admission -----------------------------------------------------------------------

    def _admit(self, session: Session) -> None:
        queued = session.exec(select(Job).where(Job.status == JobStatus.queued).order_by(Job.id)).all()
        for job in queued:
            if self._retry_after.get(job.id, 0.0) > time.monotonic():
                continue
            encoder_path: Path | None = None
            if STAGES[job.stage].needs_encoder:
                ready, encoder_path = self._stage2_encoder(session, job)
                if not ready:
                    continue
            if len(self.trainers) >= self.settings.concurrency:
                self._wait(session, job, None)  # in line for a free slot
                continue
            if not self._fits_in_memory(session, job):
                self._wait(session, job, WaitReason.memory.value)
                continue
            self._spawn(session, job, encoder_path)

    def _fits_in_memory(self, session: Session, job: Job) -> bool:
        """Whether the job's predicted peak fits in free memory and in the budget left, and, for a
        job that will run on GPUs, whether each of its GPUs has room for its share."""
        needed = job.predicted_peak_bytes or 0
        if needed > psutil.virtual_memory().available - self.settings.memory_margin_bytes:
            return False
        if self.settings.memory_budget_bytes:
            committed = session.exec(select(func.coalesce(func.sum(Job.predicted_peak_bytes), 0))
                                     .where(Job.status == JobStatus.running)).one()
            if committed + needed > self.settings.memory_budget_bytes:
                return False
        return self._fits_on_gpus(session, job)

    def _fits_on_gpus(self, session: Session, job: Job) -> bool:
        """A GPU job's process ``i`` runs on GPU ``i`` (torchrun's local rank), so GPU ``i`` must
        hold its prediction beside what the driver already reports used and what running GPU
        jobs were predicted to take there (a job that just started has not allocated yet)."""
        gpus = list_gpus()
        if not gpus or not uses_gpu(job.config, gpus):
            return True  # without nvidia-smi there is nothing to count; the trainer finds out itself
        needed = predict_gpu_bytes(parse_config(job.stage, job.config))
        running = [other for other in session.exec(select(Job).where(Job.status == JobStatus.running)).all()
                   if uses_gpu(other.config, gpus)]
        for gpu in gpus[:job.config.get("devices", 1)]:
            committed = sum(predict_gpu_bytes(parse_config(other.stage, other.config)) for other in running
                            if other.config.get("devices", 1) > gpu.index)
            if needed > min(gpu.free_bytes, gpu.total_bytes - committed):
                return False
        return True

    def _wait(self, session: Session, job: Job, reason: str | None) -> None:
        if job.reason != reason:
            session.execute(update(Job).where(Job.id == job.id, Job.status == JobStatus.queued)
                            .values(reason=reason, version=Job.version + 1))
            session.commit()

    def _stage2_encoder(self, session: Session, job: Job) -> tuple[bool, Path | None]:
        """Whether a Stage 2 job can start, and the encoder file it starts from."""
        if job.encoder_artifact_id is not None:
            artifact = session.get(Artifact, job.encoder_artifact_id)
        else:
            after = session.get(Job, job.after_job_id)
            if after.status in (JobStatus.failed, JobStatus.cancelled):
                set_status(session, job, JobStatus.failed,
                           error=f"Stage 1 job {after.id} {after.status.value}; there is no encoder to start from.")
                return False, None
            if after.status != JobStatus.succeeded:
                self._wait(session, job, WaitReason.dependency.value)
                return False, None
            artifact = encoder_of(session, after.id)
        if artifact is None:
            set_status(session, job, JobStatus.failed, error="The encoder artifact to start from no longer exists.")
            return False, None
        return True, self.store.path_of(artifact.storage_path)

    def _resume_path(self, session: Session, job: Job) -> str | None:
        """The stored file of the job's ``checkpoint_artifact``, if it names one that still exists."""
        if job.checkpoint_artifact_id is None:
            return None
        artifact = session.get(Artifact, job.checkpoint_artifact_id)
        return str(self.store.path_of(artifact.storage_path)) if artifact is not None else None

    def job_dir(self, job_id: int) -> Path:
        return (self.settings.jobs_dir / str(job_id)).resolve()

    def _spawn(self, session: Session, job: Job, encoder_path: Path | None) -> None:
        job_dir = self.job_dir(job.id)
        job_dir.mkdir(parents=True, exist_ok=True)
        token = new_token()
        spec = JobSpec(
            job_id=job.id, stage=job.stage, dataset=job.dataset, config=job.config,
            job_dir=str(job_dir), api_url=self.settings.public_url, token=token,
            encoder_path=str(encoder_path) if encoder_path else None,
            cache_dir=str(self.settings.cache_dir.resolve()), attempt=job.attempts + 1,
            resume_from=self._resume_path(session, job),
        )
        spec_path = job_dir / SPEC_FILENAME
        partial = job_dir / f".{SPEC_FILENAME}.partial"
        # The spec holds the job's token: readable by this user only.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(spec.model_dump(), fh, indent=2)
        os.replace(partial, spec_path)
        # Claim the job before starting its trainer: if a user cancelled it a moment ago, the
        # claim fails and no trainer is started.
        try:
            set_status(session, job, JobStatus.running, token_sha256=hash_token(token), attempts=job.attempts + 1)
        except StaleJob:
            return
        try:
            trainer = TrainerProcess.spawn(spec_path, job_dir / LOG_FILENAME, processes=job.config.get("devices", 1))
        except OSError as exc:
            set_status(session, job, JobStatus.failed, error=f"could not start the trainer: {exc}")
            return
        self.trainers[job.id] = trainer
        log.info("job %s: started trainer pid %s (attempt %s)", job.id, trainer.pid, job.attempts)
        session.execute(update(Job).where(Job.id == job.id).values(pid=trainer.pid, version=Job.version + 1))
        session.commit()
