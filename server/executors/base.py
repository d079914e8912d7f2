"""The executor interface: what the scheduler asks of whatever runs a trainer.

The scheduler decides *which* job runs and *what* an ending means; an executor only starts a
trainer for one attempt, says whether it still runs and how it ended, stops it, and finds it
again after a server restart. Everything an executor knows about one running trainer sits in
its :class:`Run`; the database stores the run's :attr:`Run.handle` (a process id, a batch job
id), which is all :meth:`Executor.reattach` gets back.

The trainer is the same program under every executor: ``python -m trainer run <spec.json>``,
reporting over HTTP, writing ``trainer.log`` in its job directory.
"""

from __future__ import annotations

import signal
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from server.settings import Settings

SIGKILL = getattr(signal, "SIGKILL", 9)
CAUSES = ("out_of_memory", "out_of_time", "preempted", "killed")


@dataclass(frozen=True)
class Exit:
    """How a trainer run ended, as far as its executor can tell; no policy in here.

    Attributes
    ----------
    code : int or None
        The trainer's exit code, negative for a signal (``-9``: SIGKILL); None when it is
        unknown (a re-attached process whose parent was another server process).
    root_cause : int or None
        For a data-parallel run: the exit code of the worker whose failure ended it (torchrun
        itself exits 1 whatever happened), when the launcher reported one.
    cause : str or None
        What a batch system said ended the run, where it knows better than the exit code (one
        of :data:`CAUSES`): 'out_of_memory' (its memory limit), 'out_of_time' (its time limit),
        'preempted' (another job took the allocation), 'killed' (cancelled, node failure: a
        SIGKILL that was *not* the out-of-memory killer). None where only the exit code is
        known (the local executor).
    detail : str or None
        The executor's own words for how the run ended ('Slurm job 8 ended NODE_FAIL, exit code
        0:0'), which a crash is reported with instead of the bare exit code.
    """

    code: int | None
    root_cause: int | None = None
    cause: str | None = None
    detail: str | None = None

    @property
    def effective_code(self) -> int | None:
        """The code that says what happened: the failed worker's when there is one."""
        return self.root_cause if self.root_cause is not None else self.code

    @property
    def signal(self) -> int | None:
        code = self.effective_code
        return -code if code is not None and code < 0 else None


def describe_exit(code: int | None) -> str:
    """'trainer exited with code N (signal S)': the wording a crash is reported with."""
    if code is None:
        return "trainer process disappeared (exit code unknown)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"trainer exited with code {code} (signal {name})"
    return f"trainer exited with code {code}"


def log_tail(path: Path, max_bytes: int, since: int = 0) -> str | None:
    """The last ``max_bytes`` of a trainer log as text, none of it before byte ``since``, or None
    when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(fh.seek(0, 2) - max_bytes, since, 0))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None


def last_log_line(path: Path, max_bytes: int = 4096, since: int = 0) -> str:
    """The last non-empty line a trainer wrote to its log after byte ``since`` (where its attempt
    began: every attempt appends to one log): usually the exception that ended it."""
    lines = (log_tail(path, max_bytes, since) or "").strip().splitlines()
    return lines[-1].strip()[:500] if lines else ""


class Run(ABC):
    """One running trainer, as its executor sees it."""

    handle: str

    @abstractmethod
    def poll(self) -> Exit | None:
        """None while the trainer runs; how it ended once it has."""

    @abstractmethod
    def rss_bytes(self) -> int | None:
        """Resident memory of the trainer's processes, or None where the executor cannot see them
        (then the trainer's own reports are the only figure)."""

    @abstractmethod
    def stop(self) -> None:
        """Ask the trainer to checkpoint and exit (SIGTERM to all its processes)."""

    @abstractmethod
    def kill(self) -> None:
        """End the trainer at once, all its processes."""

    @abstractmethod
    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the trainer to end; True when it has."""

    def pending(self) -> bool:
        """Whether the trainer waits for resources (a batch queue) and has not started: no
        heartbeat is due from it yet."""
        return False


class Executor(ABC):
    """Starts trainers for job attempts and finds them again."""

    name: str
    # Whether Run.rss_bytes measures the trainer's whole process tree. Where it does, that is the
    # memory figure kept; where it cannot (another machine), the trainer's own reports are.
    measures_memory: bool = False
    # Whether the executor admits jobs by their predicted memory itself (a batch system's --mem):
    # then the server's own free-RAM check, which judges the wrong machine, is skipped.
    admits_memory: bool = False
    # Whether trainers keep running when the server shuts down (batch jobs do, and a restarted
    # server re-attaches to them); local trainers are stopped and requeued instead.
    outlives_server: bool = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abstractmethod
    def start(self, spec_path: Path, log_path: Path, processes: int, memory_bytes: int = 0) -> Run:
        """Start ``python -m trainer run spec_path`` (under torchrun when ``processes`` > 1).

        ``memory_bytes`` is the job's predicted peak (0: unknown), for an executor that asks for
        memory (a batch job's ``--mem``); the local executor admitted the job by it already.

        Raises
        ------
        OSError
            When the trainer could not be started; the attempt ends as not started.
        """

    @abstractmethod
    def reattach(self, handle: str, job_dir: Path) -> Run | None:
        """The run named ``handle`` if it is still the trainer of ``job_dir``; None otherwise."""

    def check(self) -> None:
        """Refuse to serve, with a message saying what to fix, when trainers could not work here
        (checked once at server start; nothing to check for the local executor).

        Raises
        ------
        ValueError
            Naming the problem and the setting or requirement that fixes it.
        """
