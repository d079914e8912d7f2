"""What the end of an attempt means: classify how the trainer ended, then apply the policy.

rq's worker does the same in two steps, and so do we. :func:`classify` reads the facts (the
executor's :class:`~server.executors.base.Exit`, the stop request the attempt carried, whether
this server killed it, the trainer's last event) and names the :class:`AttemptOutcome`;
:func:`decide` turns that outcome into the job's next status, whether it is retried, with what
back-off, and the words the job and its attempt keep. Both are pure: :mod:`server.jobs` writes
the result in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.executors.base import SIGKILL, Exit, describe_exit
from server.models import AttemptOutcome, JobStatus, WaitReason
from trainer.protocol import EXIT_FAILED, EXIT_OK, EXIT_OUT_OF_TIME, EXIT_STOPPED

# The longest a crashed job waits before its retry: a crash loop must not spin the CPU.
MAX_RETRY_DELAY_S = 30.0
# Allocations in a row that ended by their time limit before a new checkpoint: the limit is too
# short for one checkpoint interval, and requeueing would wait in Slurm's queue forever.
MAX_IDLE_ALLOCATIONS = 3
LOST_MESSAGE = "server restarted while the trainer ran; resuming from the newest checkpoint"


@dataclass(frozen=True)
class Facts:
    """What is known about an attempt when it ends.

    Attributes
    ----------
    exit : Exit or None
        How the executor saw the run end; None when the server restarted and found no run.
    stop_request : str or None
        'pause' or 'cancel' when one had been asked of the attempt.
    killed_by_us : bool
        This server killed the trainer (silent too long, or slow to honour a stop).
    kill_message : str or None
        Why this server killed it.
    last_event : str or None
        The kind of the job's last event ('finished', 'error', ...): how a re-attached run,
        whose exit code is lost, ended.
    shutting_down : bool
        The server itself stopped the trainer because it is shutting down.
    log_line : str
        The last line of the trainer's log, usually the exception that ended a crash.
    """

    exit: Exit | None
    stop_request: str | None = None
    killed_by_us: bool = False
    kill_message: str | None = None
    last_event: str | None = None
    shutting_down: bool = False
    log_line: str = ""

    @property
    def code(self) -> int | None:
        if self.exit is None:
            return None
        if self.exit.code is None:  # re-attached: the last event says how it ended
            return {"finished": EXIT_OK, "error": EXIT_FAILED}.get(self.last_event or "")
        return self.exit.code


@dataclass(frozen=True)
class Decision:
    """The job's next state after an attempt ended."""

    outcome: AttemptOutcome
    status: JobStatus
    message: str
    error: str | None = None
    reason: str | None = None
    config: dict[str, Any] | None = None
    retry_delay_s: float = 0.0


def classify(facts: Facts) -> AttemptOutcome:
    """Name how an attempt ended, before any policy."""
    if facts.exit is None:
        return AttemptOutcome.lost
    code = facts.code
    if code == EXIT_OK:
        return AttemptOutcome.succeeded
    if facts.stop_request == "cancel":
        return AttemptOutcome.cancelled
    if facts.stop_request == "pause":
        return AttemptOutcome.paused
    if facts.shutting_down:
        return AttemptOutcome.interrupted
    if code == EXIT_FAILED:
        return AttemptOutcome.failed
    # The allocation ended: the trainer honoured the time-limit warning (or a preemption's
    # SIGTERM, with a checkpoint), or the batch system ended it at the limit before it could
    # (then it resumes from its newest periodic checkpoint).
    if code == EXIT_OUT_OF_TIME or facts.exit.cause in ("out_of_time", "preempted"):
        return AttemptOutcome.out_of_time
    if code == EXIT_STOPPED:
        return AttemptOutcome.stopped
    if facts.exit.cause == "out_of_memory":
        return AttemptOutcome.out_of_memory
    effective = facts.exit.root_cause if facts.exit.root_cause is not None else code
    # A SIGKILL we did not send is the out-of-memory killer, unless a batch system says it was
    # its own cancel, preemption or node failure: a crash, retried without the memory back-off.
    if effective == -SIGKILL and not facts.killed_by_us and facts.exit.cause != "killed":
        return AttemptOutcome.out_of_memory
    return AttemptOutcome.crashed


def halved_micro_batch(config: dict) -> int | None:
    """The next smaller micro-batch that still divides each process's batch, or None at 1."""
    batch, micro = config["batch_size"] // config.get("devices", 1), config["micro_batch_size"]
    for candidate in range(micro // 2, 0, -1):
        if batch % candidate == 0:
            return candidate
    return None


def decide(facts: Facts, *, config: dict[str, Any], job_error: str | None, job_reason: str | None,
           attempts: int, failures: int, max_attempts: int, idle_allocations: int = 0) -> Decision:
    """The job's next state after an attempt ended as ``facts`` say.

    Parameters
    ----------
    config : dict
        The job's config (the out-of-memory retry halves its micro-batch).
    job_error, job_reason : str or None
        The job's error (an ``error`` event's text, a memory-guard message) and wait reason now.
    attempts : int
        Attempts started so far, this one included.
    failures : int
        Earlier attempts that spent a retry. Pauses, cancels, restarts and shutdowns spend none.
    max_attempts : int
        Crashed attempts after which the job fails.
    idle_allocations : int
        Attempts in a row, this one included, that ended by their time limit with no step
        checkpointed beyond the one they started from.
    """
    outcome = classify(facts)
    if outcome == AttemptOutcome.succeeded:
        return Decision(outcome, JobStatus.succeeded, "training reached its steps")
    if outcome == AttemptOutcome.cancelled:
        return Decision(outcome, JobStatus.cancelled, "cancelled as asked, after a checkpoint")
    if outcome == AttemptOutcome.paused:
        # "memory" when the memory guard asked for the pause: the job says why it waits.
        return Decision(outcome, JobStatus.paused, job_error if job_reason == WaitReason.memory.value and job_error
                        else "paused as asked, after a checkpoint", reason=job_reason)
    if outcome == AttemptOutcome.interrupted:
        return Decision(outcome, JobStatus.queued, "the server shut down; resumes at its next start")
    if outcome == AttemptOutcome.lost:
        return Decision(outcome, JobStatus.queued, LOST_MESSAGE, error=LOST_MESSAGE)
    if outcome == AttemptOutcome.failed:
        error = job_error or "trainer failed; see its log"
        return Decision(outcome, JobStatus.failed, error, error=error)
    if outcome == AttemptOutcome.out_of_time and idle_allocations >= MAX_IDLE_ALLOCATIONS:
        error = (f"{idle_allocations} batch allocations in a row ended at their time limit before a new checkpoint; "
                 f"the time limit is too short for {config.get('checkpoint_every', 'one checkpoint interval of')} "
                 f"steps: raise the executor's time limit or lower checkpoint_every")
        return Decision(outcome, JobStatus.failed, error, error=error)
    if outcome == AttemptOutcome.out_of_time:
        # Not a failure: the allocation ended. Queued again at once, spending no retry.
        return Decision(outcome, JobStatus.queued, "the batch job's allocation ended (time limit or preemption); "
                                                   "continuing in a new one from the newest checkpoint")
    if outcome == AttemptOutcome.stopped:
        # Stopped without a request of ours: the trainer said why (a full disk), or a signal from
        # outside NeuroLens asked it to end. Either way it checkpointed: resumable.
        error = job_error or "trainer was stopped from outside NeuroLens"
        return Decision(outcome, JobStatus.paused, error, error=error)
    return _crash(facts, outcome, config, attempts, failures, max_attempts)


def _crash(facts: Facts, outcome: AttemptOutcome, config: dict[str, Any], attempts: int, failures: int,
           max_attempts: int) -> Decision:
    """A crash or an out-of-memory kill: retried from the newest checkpoint while retries last."""
    code = facts.code
    reason = (facts.kill_message if facts.killed_by_us and facts.kill_message
              else facts.exit.detail if facts.exit is not None and facts.exit.detail else describe_exit(code))
    if facts.log_line:
        reason = f"{reason}: {facts.log_line}"
    if facts.exit is not None and facts.exit.root_cause is not None:
        reason = f"a torchrun worker: {describe_exit(facts.exit.root_cause)}"
    if failures + 1 >= max_attempts:
        error = f"{reason} (after {attempts} attempts)"
        return Decision(outcome, JobStatus.failed, error, error=error)
    retry, new_config = "retrying from the newest checkpoint", None
    if outcome == AttemptOutcome.out_of_memory and (smaller := halved_micro_batch(config)) is not None:
        new_config = {**config, "micro_batch_size": smaller}
        accumulation = config["batch_size"] // config.get("devices", 1) // smaller
        retry = (f"likely out of memory; {retry} with micro_batch_size {smaller} and {accumulation} "
                 f"accumulation steps (effective batch {config['batch_size']} kept)")
    message = f"{reason}; {retry}"
    return Decision(outcome, JobStatus.queued, message, error=message, config=new_config,
                    retry_delay_s=min(2.0 ** (failures + 1), MAX_RETRY_DELAY_S))
