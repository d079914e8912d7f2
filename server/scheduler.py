"""The scheduler: admits queued jobs, hands them to the executor, supervises their trainers.

It runs in one background thread with its own database sessions, ticking twice a second (or at
once when the API wakes it). Each tick:

1. reaps trainers that ended and has :mod:`server.jobs` close their attempts (what an end means
   is decided in :mod:`server.outcomes`);
2. samples each trainer's memory where the executor can see it, and kills any trainer silent
   for longer than the heartbeat timeout, or slow to honour a stop request;
3. starts the oldest queued jobs whose dependencies are met and whose predicted peak memory
   fits, up to the concurrency limit.

At start-up it reconciles: a job marked running whose trainer is still alive is re-attached;
one whose trainer is gone is queued again, to resume from its newest checkpoint. Servers may
share one database (a standby): each attempt records the server that started it, and a server
touches another's running attempt only once its heartbeat is stale (that server is gone, and its
trainer cannot report anywhere); it checks for such orphans at start-up and every few seconds.
Claiming a queued job is a compare-and-set on its status (:func:`server.jobs.start_attempt`),
so of two servers that both read it as queued, exactly one starts it.

What runs a trainer is the executor's business (:mod:`server.executors`); the scheduler sees
only its :class:`~server.executors.base.Run`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import psutil
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select

from server import jobs
from server.artifacts import VALIDATORS
from server.executors import make_executor
from server.executors.base import Exit, Run, last_log_line
from server.gpus import Gpu, list_gpus
from server.jobs import StaleJob, encoder_of, new_token
from server.models import Artifact, Attempt, Job, JobEvent, JobStatus, WaitReason, utcnow
from server.outcomes import Facts
from server.settings import Settings
from server.storage import ArtifactStore
from trainer.memory_prediction import predict_gpu_bytes
from trainer.protocol import LOG_FILENAME, SPEC_FILENAME, JobSpec
from trainer.stages import STAGES, parse_config

log = logging.getLogger("neurolens.scheduler")

TICK_S = 0.5
# A trainer gets this long to checkpoint and exit after a stop request reached it.
STOP_GRACE_S = 60.0
SHUTDOWN_GRACE_S = 15.0
# How often a running server looks for attempts whose server is gone (a stale heartbeat).
ORPHAN_CHECK_S = 5.0


def uses_gpu(config: dict, gpus: list[Gpu]) -> bool:
    """Whether a job with this config will train on CUDA here ('auto' does when a GPU is seen)."""
    device = config.get("device", "auto")
    return device == "cuda" or (device == "auto" and bool(gpus))


class Scheduler:
    def __init__(self, settings: Settings, engine: Engine, store: ArtifactStore) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.executor = make_executor(settings)
        # The run of each job whose trainer this server supervises, by job id.
        self.runs: dict[int, Run] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_sample = 0.0
        # Crashed jobs wait a little before their retry, so a crash loop cannot spin the CPU.
        self._retry_after: dict[int, float] = {}
        # Where each running attempt's lines begin in its job's trainer log, so that a crash is
        # never explained by an earlier attempt's last line (unknown after a restart: 0).
        self._log_start: dict[int, int] = {}
        # When each run was last seen waiting in its batch queue (see Run.pending).
        self._pending_seen: dict[int, datetime] = {}
        # Trainer events the database could not take (a full disk); written before the attempt ends.
        self.backlog = jobs.EventBacklog()
        self._db_warned_at = 0.0
        self._orphans_checked = time.monotonic()

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
        if self.executor.outlives_server:
            # Batch jobs run on without us; the next start re-attaches to them by their handle.
            self.runs.clear()
            return
        for run in self.runs.values():
            run.stop()  # the trainer checkpoints and exits; whatever is left is killed below
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for run in self.runs.values():
            if not run.wait(max(deadline - time.monotonic(), 0.1)):
                run.kill()
                run.wait(5)
        with Session(self.engine) as session:
            for job_id, run in self.runs.items():
                try:
                    self._end(session, job_id, run.poll() or Exit(None), shutting_down=True)
                except StaleJob:
                    log.warning("job %s changed during shutdown; left as it is", job_id)
        self.runs.clear()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.tick()
            except OperationalError as exc:  # a full disk: every tick retries, one warning a minute
                self._warn_database(exc)
            except Exception:  # one bad tick must not end supervision of every other job
                log.exception("scheduler tick failed")
            self._wake.wait(TICK_S)
            self._wake.clear()

    def tick(self) -> None:
        with Session(self.engine) as session:
            self._reap(session)
            self._watch(session)
            if time.monotonic() - self._orphans_checked >= ORPHAN_CHECK_S:
                self._orphans_checked = time.monotonic()
                self._recover(session, at_start=False)
            self._admit(session)

    def job_dir(self, job_id: int) -> Path:
        return (self.settings.jobs_dir / str(job_id)).resolve()

    # --- start-up reconciliation ---------------------------------------------------------

    def reconcile(self) -> None:
        with Session(self.engine) as session:
            self._recover(session, at_start=True)

    def _is_mine(self, attempt: Attempt) -> bool:
        """Whether this server started the attempt: the attempt records the server's name
        (:attr:`Settings.server_name`; the same server restarted on its address is the same
        server). Attempts from before servers were recorded count as everyone's: they predate
        sharing a database."""
        return attempt.server_url in (None, self.settings.server_name)

    def _recover(self, session: Session, *, at_start: bool) -> None:
        """Re-attach to this server's live trainers (at start-up), and queue again the jobs whose
        trainer is gone: this server's, at start-up; another server's, once its heartbeat is
        older than the heartbeat timeout, which a live server's trainer never lets it be."""
        stale_before = utcnow() - timedelta(seconds=self.settings.heartbeat_timeout_s)
        for job in session.exec(select(Job).where(Job.status == JobStatus.running)).all():
            if job.id in self.runs:
                continue
            attempt = jobs.open_attempt(session, job.id)
            if attempt is None:  # cannot happen through server.jobs; repair rather than stall
                try:
                    jobs.update_if_status(session, job, JobStatus.running, status=JobStatus.queued)
                except StaleJob:
                    pass
                continue
            mine = self._is_mine(attempt)
            if not mine and attempt.last_heartbeat_at is not None and attempt.last_heartbeat_at > stale_before:
                continue  # another server's, and that server is alive: never ours to judge
            if mine and not at_start:
                continue  # this server's attempt between its claim and its run: _spawn's to finish
            run = None
            if attempt.handle and attempt.executor == self.executor.name:
                run = self.executor.reattach(attempt.handle, self.job_dir(job.id))
            if run is not None and mine:
                log.info("job %s: re-attached to trainer %s", job.id, run.handle)
                self.runs[job.id] = run
                jobs.reattached(session, attempt, self.settings.server_name)
                continue
            if run is not None:
                # Its server is gone, so it cannot report; two trainers must never write one
                # job's checkpoints, so it goes before the job is queued again.
                jobs.mark_killed(session, attempt, f"its server {attempt.server_url} is gone; killed")
                run.kill()
                run.wait(10)
            if mine:
                log.info("job %s: trainer gone after a server restart; queued to resume", job.id)
            else:
                log.warning("job %s: no heartbeat from server %s for over %.0f s; queued to resume here", job.id,
                            attempt.server_url, self.settings.heartbeat_timeout_s)
            try:
                jobs.end_attempt(session, job, attempt, Facts(exit=None), self.settings.max_attempts)
            except StaleJob:
                pass  # its server ended it meanwhile after all

    # --- reaping -------------------------------------------------------------------------

    def _reap(self, session: Session) -> None:
        for job_id, run in list(self.runs.items()):
            ended = run.poll()
            if ended is None:
                continue
            try:
                self._end(session, job_id, ended)
            except StaleJob:
                log.warning("job %s changed while its attempt ended; left as it is", job_id)
            except OperationalError as exc:
                # The database cannot write (a full disk): keep the run, so the next tick, half a
                # second on, tries to end its attempt again; the exit is not lost meanwhile.
                session.rollback()
                self._warn_database(exc)
                continue
            del self.runs[job_id]
            self._pending_seen.pop(job_id, None)

    def _warn_database(self, exc: OperationalError) -> None:
        if time.monotonic() - self._db_warned_at > 60:
            self._db_warned_at = time.monotonic()
            log.warning("the database cannot write (%s); retrying every tick", exc.orig)

    def _end(self, session: Session, job_id: int, ended: Exit, *, shutting_down: bool = False) -> None:
        """Close the job's open attempt with what is known of how its trainer ended."""
        job = session.get(Job, job_id)
        if job is None or job.status != JobStatus.running:
            return
        attempt = jobs.open_attempt(session, job_id)
        if attempt is None:
            return
        # The trainer's last words (a full disk, an error) come first: the decision reads them.
        self.backlog.flush(session, job_id)
        session.refresh(job)
        last = session.exec(select(JobEvent.kind).where(JobEvent.job_id == job_id)
                            .order_by(JobEvent.id.desc())).first()
        facts = Facts(exit=ended, stop_request=attempt.stop_request, killed_by_us=attempt.killed_by_us,
                      kill_message=attempt.message, last_event=last, shutting_down=shutting_down,
                      log_line=last_log_line(self.job_dir(job_id) / LOG_FILENAME,
                                             since=self._log_start.pop(job_id, 0)))
        decision = jobs.end_attempt(session, job, attempt, facts, self.settings.max_attempts)
        if decision.retry_delay_s:
            log.warning("job %s: %s (attempt %s ended %s; NEUROLENS_MAX_ATTEMPTS %s)", job_id, decision.message,
                        job.attempts, decision.outcome.value, self.settings.max_attempts)
            self._retry_after[job_id] = time.monotonic() + decision.retry_delay_s

    # --- watching ------------------------------------------------------------------------

    def _watch(self, session: Session) -> None:
        now_mono = time.monotonic()
        sample = now_mono - self._last_sample >= self.settings.sample_interval_s
        if sample:
            self._last_sample = now_mono
        now = utcnow()
        samples = {job_id: run.rss_bytes() for job_id, run in self.runs.items()} if sample else {}
        for job_id, run in self.runs.items():
            job = session.get(Job, job_id)
            attempt = jobs.open_attempt(session, job_id) if job is not None else None
            if job is None or job.status != JobStatus.running or attempt is None:
                continue
            if (rss := samples.get(job_id)) is not None:
                others = sum(r or 0 for other, r in samples.items() if other != job_id)
                self._guard_memory(session, job, attempt, rss, others)
                jobs.record_memory_sample(session, attempt, rss)
            if run.pending():
                # Waiting in a batch queue is not silence: the heartbeat clock starts when it runs.
                self._pending_seen[job_id] = now
                continue
            heard = max(filter(None, (attempt.last_heartbeat_at, self._pending_seen.get(job_id))), default=None)
            silent_s = (now - heard).total_seconds() if heard else 0.0
            if attempt.killed_by_us:
                continue  # already on its way out
            if silent_s > self.settings.heartbeat_timeout_s:
                jobs.mark_killed(session, attempt, f"no report from the trainer for {silent_s:.0f} s; killed")
                run.kill()
            elif attempt.stop_requested_at and (now - attempt.stop_requested_at).total_seconds() > STOP_GRACE_S:
                log.warning("job %s: trainer ignored a %s request; killing it", job_id, attempt.stop_request)
                jobs.mark_killed(session, attempt, f"the trainer ignored a {attempt.stop_request} request; killed")
                run.kill()

    def memory_allowance(self, others_rss: int, own_rss: int) -> int:
        """Bytes one running trainer may use: the budget's share left by the others, or what the
        machine has free beyond the margin (its own RSS counts as usable)."""
        free = own_rss + psutil.virtual_memory().available - self.settings.memory_margin_bytes
        if self.settings.memory_budget_bytes:
            return min(self.settings.memory_budget_bytes - others_rss, free)
        return free

    def _guard_memory(self, session: Session, job: Job, attempt: Attempt, rss: int, others_rss: int) -> None:
        """Pause a trainer, after a checkpoint, when it nears its allowance."""
        allowance = self.memory_allowance(others_rss, rss)
        # Pausing before the limit, not at it, leaves room for the checkpoint the pause writes and
        # keeps the operating system's out-of-memory killer from choosing a victim first.
        if attempt.stop_request or rss < self.settings.memory_pause_share * allowance:
            return
        message = (f"paused to stay within memory: the trainer used {rss / 2**30:.2f} GB of the "
                   f"{max(allowance, 0) / 2**30:.2f} GB it may use; resume it when memory is free, "
                   f"or with a smaller micro_batch_size")
        log.warning("job %s: %s", job.id, message)
        try:
            jobs.pause_for_memory(session, job, attempt, message)
        except StaleJob:
            pass  # it ended meanwhile

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
            if len(self.runs) >= self.settings.concurrency:
                jobs.wait(session, job, None)  # in line for a free slot
                continue
            if not self.executor.admits_memory and not self._fits_in_memory(session, job):
                jobs.wait(session, job, WaitReason.memory.value)
                continue
            self._spawn(session, job, encoder_path)

    def _fits_in_memory(self, session: Session, job: Job) -> bool:
        """Whether the job's predicted peak fits in free memory and in the budget left, and, for a
        job that will run on GPUs, whether each of its GPUs has room for its share. A running
        upload validator's predicted peak counts as taken (it may not have allocated yet)."""
        validating = VALIDATORS.reserved_bytes
        needed = job.predicted_peak_bytes or 0
        if needed + validating > psutil.virtual_memory().available - self.settings.memory_margin_bytes:
            return False
        if self.settings.memory_budget_bytes:
            committed = validating + session.exec(select(func.coalesce(func.sum(Job.predicted_peak_bytes), 0))
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

    def _stage2_encoder(self, session: Session, job: Job) -> tuple[bool, Path | None]:
        """Whether a Stage 2 job can start, and the encoder file it starts from."""
        if job.encoder_artifact_id is not None:
            artifact = session.get(Artifact, job.encoder_artifact_id)
        else:
            after = session.get(Job, job.after_job_id)
            if after.status in (JobStatus.failed, JobStatus.cancelled):
                jobs.fail_waiting(session, job, f"Stage 1 job {after.id} {after.status.value}; there is no encoder to "
                                                f"start from.")
                return False, None
            if after.status != JobStatus.succeeded:
                jobs.wait(session, job, WaitReason.dependency.value)
                return False, None
            artifact = encoder_of(session, after.id)
        if artifact is None:
            jobs.fail_waiting(session, job, "The encoder artifact to start from no longer exists.")
            return False, None
        return True, self.store.path_of(artifact.storage_path)

    def _resume_path(self, session: Session, job: Job) -> str | None:
        """The stored file of the job's ``checkpoint_artifact``, if it names one that still exists."""
        if job.checkpoint_artifact_id is None:
            return None
        artifact = session.get(Artifact, job.checkpoint_artifact_id)
        return str(self.store.path_of(artifact.storage_path)) if artifact is not None else None

    def _spawn(self, session: Session, job: Job, encoder_path: Path | None) -> None:
        job_dir = self.job_dir(job.id)
        job_dir.mkdir(parents=True, exist_ok=True)
        token = new_token()
        spec = JobSpec(
            job_id=job.id, stage=job.stage, dataset=job.dataset, config=job.config,
            job_dir=str(job_dir), api_url=self.settings.trainer_url, token=token,
            encoder_path=str(encoder_path) if encoder_path else None,
            cache_dir=str(self.settings.cache_dir.resolve()), attempt=job.attempts + 1,
            resume_from=self._resume_path(session, job), keep_checkpoints=self.settings.keep_checkpoints,
        )
        spec_path = job_dir / SPEC_FILENAME
        # A name of this attempt's own: another server sharing the job folder may be writing its
        # spec for the same job at this moment, and only the claim's winner puts its spec in place.
        partial = job_dir / f".{SPEC_FILENAME}.{token[:12]}.partial"
        try:
            # The spec holds the job's token: readable by this user only.
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(spec.model_dump(), fh, indent=2)
        except OSError:
            partial.unlink(missing_ok=True)  # a full disk: the job stays queued; the next tick tries again
            raise
        # Claim the job before starting its trainer: if a user cancelled it a moment ago, or
        # another server claimed it first, the claim fails and no trainer is started.
        try:
            attempt = jobs.start_attempt(session, job, self.executor.name, token, self.settings.server_name)
        except StaleJob:
            partial.unlink(missing_ok=True)
            return
        log_path = job_dir / LOG_FILENAME
        try:
            os.replace(partial, spec_path)
            self._log_start[job.id] = log_path.stat().st_size if log_path.exists() else 0
            run = self.executor.start(spec_path, log_path, processes=job.config.get("devices", 1),
                                      memory_bytes=job.predicted_peak_bytes or 0)
        except OSError as exc:
            jobs.start_failed(session, job, attempt, f"could not start the trainer: {exc}")
            return
        self.runs[job.id] = run
        jobs.attempt_running(session, attempt, run.handle)
        log.info("job %s: started trainer %s (attempt %s)", job.id, run.handle, attempt.number)
