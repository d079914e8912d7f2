"""Trainer processes: start one in its own process group, watch it, measure it, stop it.

A :class:`TrainerProcess` wraps either a child this server started (``Popen``, which gives the
exit code) or a trainer found alive at start-up after a server restart (re-attached through
psutil; its exit code is unknown, so the caller reads the job's last event instead).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

import server
from trainer.protocol import OUTCOME_FILENAME

IS_WINDOWS = sys.platform == "win32"
# The trainer must import `trainer` even when NeuroLens runs from a source checkout.
SOURCE_ROOT = Path(server.__file__).resolve().parent.parent


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


class TrainerProcess:
    def __init__(self, pid: int, popen: subprocess.Popen | None = None, outcome_path: Path | None = None) -> None:
        self.pid = pid
        self.popen = popen
        self._process = psutil.Process(pid)
        # Data-parallel runs exit 0 through torchrun after any clean end; rank 0 leaves the real
        # code in this file (see trainer.protocol.OUTCOME_FILENAME).
        self.outcome_path = outcome_path

    @classmethod
    def spawn(cls, spec_path: Path, log_path: Path, processes: int = 1) -> "TrainerProcess":
        env = dict(os.environ)
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
        return cls(popen.pid, popen, outcome_path)

    @classmethod
    def reattach(cls, pid: int, job_dir: Path) -> "TrainerProcess | None":
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

    def poll(self) -> tuple[bool, int | None]:
        """(finished, exit code); the code is None for a re-attached process."""
        if self.popen is not None:
            code = self.popen.poll()
            if code == 0 and self.outcome_path is not None:
                code = self._outcome()
            return code is not None, code
        try:
            finished = not self._process.is_running() or self._process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            finished = True
        return finished, None

    def _outcome(self) -> int:
        """Rank 0's exit code; a torchrun that exited 0 without one ended abnormally (1)."""
        try:
            return int(json.loads(self.outcome_path.read_text(encoding="utf-8"))["exit_code"])
        except (OSError, ValueError, KeyError, TypeError):
            return 1

    def tree_rss_bytes(self) -> int | None:
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
                    process.kill() if sig == getattr(signal, "SIGKILL", 9) else process.terminate()
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
        self.signal_group(getattr(signal, "SIGKILL", signal.SIGTERM))

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
