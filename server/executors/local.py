"""The local executor: trainers as processes on the server's own machine.

Each trainer runs in its own process group (so a stop reaches it and any workers it started,
and a Ctrl-C in the server's terminal does not), as one process or ``devices`` processes under
torchrun. A :class:`LocalRun` wraps either a child this server started (``Popen``, which gives
the exit code) or a trainer found alive at start-up after a server restart (re-attached through
psutil; its exit code is unknown, so the job service reads the job's last event instead).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil

import server
from server.executors.base import SIGKILL, Executor, Exit, Run, log_tail
from trainer.protocol import OUTCOME_FILENAME

IS_WINDOWS = sys.platform == "win32"
# The trainer must import `trainer` even when NeuroLens runs from a source checkout.
SOURCE_ROOT = Path(server.__file__).resolve().parent.parent


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


def outcome_code(path: Path) -> int:
    """Rank 0's exit code of a data-parallel run (see trainer.protocol.OUTCOME_FILENAME); a
    torchrun that exited 0 without one ended abnormally (1)."""
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["exit_code"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1


def trainer_command(spec_path: Path, processes: int = 1) -> list[str]:
    """The command line of a trainer: one process, or ``processes`` under torchrun.

    ``python -m torch.distributed.run`` is what the ``torchrun`` script runs; calling it through
    the server's own interpreter guarantees the workers use the same environment, with or
    without a ``torchrun`` on PATH.
    """
    trainer = ["-m", "trainer", "run", str(spec_path)]
    if processes <= 1:
        return [sys.executable, *trainer]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            *trainer]


class LocalExecutor(Executor):
    name = "local"
    measures_memory = True

    def start(self, spec_path: Path, log_path: Path, processes: int, memory_bytes: int = 0) -> "LocalRun":
        return LocalRun.spawn(spec_path, log_path, processes)

    def reattach(self, handle: str, job_dir: Path) -> "LocalRun | None":
        return LocalRun.reattach(int(handle), job_dir) if handle.isdigit() else None


class LocalRun(Run):
    def __init__(self, pid: int, popen: subprocess.Popen | None = None, outcome_path: Path | None = None,
                 log_path: Path | None = None) -> None:
        self.pid = pid
        self.handle = str(pid)
        self.popen = popen
        self._process = psutil.Process(pid)
        # Data-parallel runs exit 0 through torchrun after any clean end; rank 0 leaves the real
        # code in this file (see trainer.protocol.OUTCOME_FILENAME).
        self.outcome_path = outcome_path
        # Where torchrun reports which worker failed first (data-parallel runs only).
        self.log_path = log_path

    @classmethod
    def spawn(cls, spec_path: Path, log_path: Path, processes: int = 1) -> "LocalRun":
        # The server's token stays with the server: a trainer reports with its own job token, and
        # whatever the trainer starts (workers, torchrun) should not inherit the server's.
        env = {key: value for key, value in os.environ.items() if key not in ("NEUROLENS_TOKEN", "NEUROLENS_TOKEN_FILE")}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), env.get("PYTHONPATH", "")) if p)
        kwargs: dict = {}
        if IS_WINDOWS:
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            # Its own session and process group: a stop reaches the trainer and any workers it
            # started, and a Ctrl-C in the server's terminal does not reach the trainer.
            kwargs["start_new_session"] = True
        outcome_path = spec_path.parent / OUTCOME_FILENAME if processes > 1 else None
        if outcome_path is not None:
            outcome_path.unlink(missing_ok=True)  # a stale one from an earlier attempt must not be read
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                trainer_command(spec_path, processes),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=spec_path.parent, env=env, **kwargs,
            )
        return cls(popen.pid, popen, outcome_path, log_path if processes > 1 else None)

    @classmethod
    def reattach(cls, pid: int, job_dir: Path) -> "LocalRun | None":
        """The trainer of ``job_dir`` if process ``pid`` is still it (pids get reused)."""
        try:
            process = psutil.Process(pid)
            cmdline = " ".join(process.cmdline())
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        if "trainer" not in cmdline or str(job_dir) not in cmdline:
            return None
        return cls(pid)

    def poll(self) -> Exit | None:
        if self.popen is not None:
            code = self.popen.poll()
            if code is None:
                return None
            if code == 0 and self.outcome_path is not None:
                code = self._outcome()
            root_cause = torchrun_root_cause(self.log_path) if code == 1 and self.log_path is not None else None
            return Exit(code, root_cause)
        try:
            finished = not self._process.is_running() or self._process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            finished = True
        return Exit(None) if finished else None

    def _outcome(self) -> int:
        return outcome_code(self.outcome_path)

    def rss_bytes(self) -> int | None:
        """Resident memory of the trainer and every process it started, in bytes."""
        try:
            processes = [self._process, *self._process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def stop(self) -> None:
        self.signal_group(signal.SIGTERM)

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the trainer's whole process tree.

        On POSIX that is its process group plus any descendant that left it: torchrun starts
        each worker in a session of its own.
        """
        try:
            descendants = self._process.children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        try:
            if IS_WINDOWS:
                for process in [*descendants, self._process]:
                    process.kill() if sig == SIGKILL else process.terminate()
                return
            os.killpg(self.pid, sig)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
        for process in descendants:
            try:
                if os.getpgid(process.pid) != self.pid:
                    process.send_signal(sig)
            except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
                pass

    def kill(self) -> None:
        self.signal_group(SIGKILL)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to end; True when it has."""
        try:
            if self.popen is not None:
                self.popen.wait(timeout)
            else:
                self._process.wait(timeout)
            return True
        except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
            return False
        except psutil.NoSuchProcess:
            return True
