"""The Slurm executor: each attempt is one batch job, submitted with ``sbatch``.

The server runs on a login node; the trainer runs on a compute node, reads its spec from the job
directory and reports over HTTP to ``NEUROLENS_PUBLIC_URL``, so the data folder must be one both
sides share (:meth:`SlurmExecutor.check` submits a test job at start to make sure).

Only Slurm's own commands are used, and not ``sacct``: many clusters, and our CI cluster, run
without accounting. ``scontrol show job`` gives the state and exit code while slurmctld keeps the
job (``MinJobAge``, 300 s by default); a job gone from it ended long ago, and the job's last
event says how. A :class:`SlurmRun`'s handle is the Slurm job id, which is all a restarted server
needs to find it again: batch jobs outlive the server.

Time limits: the batch job asks for SIGUSR1 ``NEUROLENS_SLURM_SIGNAL_S`` before its limit
(``--signal=B:USR1@…``, to the batch shell, which is the trainer: the script ``exec``s it). The
trainer checkpoints and exits with :data:`~trainer.protocol.EXIT_OUT_OF_TIME`; the scheduler
queues the job again and the next attempt, a new batch job, resumes from that checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path

from server.executors.base import Executor, Exit, Run
from server.executors.local import SOURCE_ROOT, outcome_code, trainer_command
from server.settings import Settings
from trainer.protocol import OUTCOME_FILENAME, SPEC_FILENAME

log = logging.getLogger("neurolens.slurm")

BATCH_SCRIPT = "slurm-batch.sh"
# States in which the job has not ended (Slurm's JOB_STATE_BASE values and flags squeue shows).
PENDING_STATES = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
ENDED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                          "PREEMPTED", "BOOT_FAIL", "DEADLINE"})
# What an ended state says beyond the exit code (see base.Exit.cause).
CAUSES = {"OUT_OF_MEMORY": "out_of_memory", "TIMEOUT": "out_of_time", "DEADLINE": "out_of_time",
          "PREEMPTED": "preempted", "CANCELLED": "killed", "NODE_FAIL": "killed", "BOOT_FAIL": "killed"}
COMMAND_TIMEOUT_S = 30.0
_FIELD = re.compile(r"(\w+)=(\S*)")


class SlurmError(OSError):
    """A Slurm command failed; an OSError so that a failed submission ends the attempt as not started."""


def slurm_command(args: list[str], timeout: float = COMMAND_TIMEOUT_S, env: dict[str, str] | None = None,
                  stdin: str | None = None) -> str:
    """Run one Slurm client command (``stdin`` its input, if any) and return its stdout.

    Raises
    ------
    SlurmError
        When the command is missing, times out or fails; the message carries its stderr.
    """
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, input=stdin or "")
    except FileNotFoundError as exc:
        raise SlurmError(f"{args[0]} not found: the slurm executor needs Slurm's client commands on PATH "
                         f"(run the server on a login node, or set NEUROLENS_EXECUTOR=local)") from exc
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"{' '.join(args[:2])} did not answer within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise SlurmError(f"{' '.join(args[:3])} failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return done.stdout


def show_job(job_id: str) -> dict[str, str] | None:
    """``scontrol show job``'s fields of one job, or None when slurmctld no longer knows it.

    Raises
    ------
    SlurmError
        When slurmctld cannot be asked (it is down, or restarting): nothing is known then.
    """
    try:
        out = slurm_command(["scontrol", "--oneliner", "show", "job", job_id])
    except SlurmError as exc:
        if "Invalid job id" in str(exc):
            return None
        raise
    # One line per job; a requeued or array job can show more, the first is this id.
    line = out.strip().splitlines()[0] if out.strip() else ""
    return dict(_FIELD.findall(line)) if line else None


def exit_of(fields: dict[str, str]) -> Exit:
    """How an ended job went: ``ExitCode=code:signal`` (a signal as a negative code), and what
    its state says that the code cannot (an out-of-memory kill, the time limit, a cancel)."""
    state = fields.get("JobState", "")
    code_text, _, signal_text = fields.get("ExitCode", "").partition(":")
    try:
        code, sig = int(code_text), int(signal_text or 0)
    except ValueError:
        code, sig = None, 0
    if sig:
        code = -sig
    if code == 0 and state != "COMPLETED":
        # A job ended by its node, a cancel before it started or a boot failure reports 0:0;
        # that is no success. Unknown: the job's last event decides (see outcomes.Facts.code).
        code = None
    detail = f"Slurm job {fields.get('JobId', '?')} ended {state}, exit code {fields.get('ExitCode', '?')}"
    return Exit(code, cause=CAUSES.get(state), detail=detail)


def memory_request_mb(predicted_bytes: int, margin_bytes: int) -> int | None:
    """The ``--mem`` request in MB for a predicted peak, or None (Slurm's DefMemPerCPU) when the
    prediction is unknown."""
    if predicted_bytes <= 0:
        return None
    return math.ceil((predicted_bytes + margin_bytes) / 2**20)


class SlurmExecutor(Executor):
    name = "slurm"
    # Remote processes: the trainer's own reports of its process tree are the memory figures.
    measures_memory = False
    admits_memory = True
    outlives_server = True

    def start(self, spec_path: Path, log_path: Path, processes: int, memory_bytes: int = 0) -> "SlurmRun":
        job_dir = spec_path.parent
        script = job_dir / BATCH_SCRIPT
        write_batch_script(script, spec_path, processes, self.settings)
        # As locally: under torchrun a clean end exits 0 whatever happened; rank 0 leaves the code.
        outcome_path = job_dir / OUTCOME_FILENAME if processes > 1 else None
        if outcome_path is not None:
            outcome_path.unlink(missing_ok=True)
        options = self.sbatch_options(read_slurm_options(spec_path), processes, memory_bytes)
        args = ["sbatch", "--parsable", f"--job-name=neurolens-{job_dir.name}", f"--output={log_path}",
                "--open-mode=append", f"--chdir={job_dir}", "--no-requeue", *options, str(script)]
        # The server's token stays with the server (sbatch exports the submitting environment).
        env = {k: v for k, v in os.environ.items() if k not in ("NEUROLENS_TOKEN", "NEUROLENS_TOKEN_FILE")}
        out = slurm_command(args, env=env)
        job_id = out.strip().split(";")[0]  # "id" or "id;cluster"
        if not job_id.isdigit():
            raise SlurmError(f"sbatch answered {out.strip()[:200]!r}, not a job id")
        log.info("submitted %s as Slurm job %s (%s)", script, job_id, " ".join(options))
        return SlurmRun(job_id, self.settings.slurm_poll_s, outcome_path)

    def sbatch_options(self, job: dict, processes: int, memory_bytes: int) -> list[str]:
        """sbatch options: the job's ``slurm`` config over the NEUROLENS_SLURM_* defaults, the
        memory request from the predicted peak, and the time-limit warning."""
        settings = self.settings
        options = [f"--signal=B:USR1@{settings.slurm_signal_s}"]
        if (mb := memory_request_mb(memory_bytes, settings.slurm_memory_margin_bytes)) is not None:
            options.append(f"--mem={mb}M")
        for name, flag, default in (("partition", "--partition", settings.slurm_partition),
                                    ("time", "--time", settings.slurm_time), ("gres", "--gres", settings.slurm_gres)):
            if value := job.get(name, default):
                options.append(f"{flag}={value}")
        # A data-parallel job's torchrun is one task with a core per process (see write_batch_script).
        cpus = job.get("cpus", settings.slurm_cpus) or (processes if processes > 1 else 0)
        if cpus:
            options.append(f"--cpus-per-task={cpus}")
        options += shlex.split(settings.slurm_extra) + list(job.get("extra", []))
        return options

    def reattach(self, handle: str, job_dir: Path) -> "SlurmRun | None":
        """The Slurm job ``handle`` if it is still (or was) the batch job of ``job_dir``."""
        if not handle.isdigit():
            return None
        try:
            fields = show_job(handle)
        except SlurmError as exc:
            log.warning("cannot ask Slurm about job %s (%s); treating its trainer as gone", handle, exc)
            return None
        if fields is None or Path(fields.get("Command", "")) != job_dir / BATCH_SCRIPT:
            return None
        try:
            devices = json.loads((job_dir / SPEC_FILENAME).read_text(encoding="utf-8"))["config"].get("devices", 1)
        except (OSError, ValueError, KeyError, AttributeError):
            devices = 1
        return SlurmRun(handle, self.settings.slurm_poll_s, job_dir / OUTCOME_FILENAME if devices > 1 else None)

    def check(self) -> None:
        """Submit a test job that writes a file in the data folder, and refuse to start unless the
        file is there afterwards: trainers on compute nodes write checkpoints to that folder."""
        timeout = self.settings.slurm_check_timeout_s
        if timeout <= 0:
            return
        data_dir = self.settings.data_dir.resolve()
        probe = data_dir / f".slurm-check-{uuid.uuid4().hex}"
        script = f"#!/bin/sh\nhostname > {shlex.quote(str(probe))}\n"
        options = self.sbatch_options({}, 1, 0)[1:]  # the partition and extras jobs get, no warning signal
        try:
            job_id = _submit_and_wait(script, options, data_dir, timeout)
        except SlurmError as exc:
            raise ValueError(f"The slurm executor cannot run a test job: {exc}.") from exc
        try:
            node = probe.read_text().strip()
        except OSError:
            raise ValueError(
                f"The data folder {data_dir} is not writable from a Slurm job: test job {job_id} ran but left no file "
                f"there. With NEUROLENS_EXECUTOR=slurm, NEUROLENS_DATA_DIR must be a folder the compute nodes share "
                f"with this machine (the same path on both), writable by the jobs' user.") from None
        probe.unlink(missing_ok=True)
        log.info("Slurm test job %s on node %s wrote to %s: the data folder is shared", job_id, node, data_dir)


def _submit_and_wait(script: str, options: list[str], data_dir: Path, timeout: float) -> str:
    """Submit ``script`` (its text on stdin) and wait until it ends; returns its job id.

    ``sbatch --wait`` would hold a connection to slurmctld for the whole wait; polling the job
    is what the executor does anyway, and lets the wait end with a cancel.
    """
    out = slurm_command(["sbatch", "--parsable", "--job-name=neurolens-check", "--time=5", "--output=/dev/null",
                         f"--chdir={data_dir}", *options], stdin=script)
    job_id = out.strip().split(";")[0]
    run = SlurmRun(job_id, poll_s=0.5)
    if not run.wait(timeout):
        run.kill()
        raise SlurmError(f"test job {job_id} did not finish within {timeout:.0f} s (NEUROLENS_SLURM_CHECK_TIMEOUT_S; "
                         f"0 skips the check)")
    return job_id


def read_slurm_options(spec_path: Path) -> dict:
    """The job config's ``slurm`` options (checked when the job was created)."""
    config = json.loads(spec_path.read_text(encoding="utf-8")).get("config", {})
    return dict(config.get("slurm") or {})


def write_batch_script(script: Path, spec_path: Path, processes: int, settings: Settings) -> None:
    """The batch script: the local executor's trainer command, so that Slurm's signals (the
    time-limit USR1, a cancel's TERM) reach the trainer.

    One process is ``exec``ed: the batch shell *is* the trainer. ``devices`` > 1 runs torchrun as
    one ``srun`` task with the job's CPUs; torchrun ignores USR1 (it would die of it), and the
    batch shell, which Slurm's ``B:`` warning reaches, passes it to every process of that step,
    so each worker checkpoints. How the run ended is rank 0's ``outcome.json``.
    """
    command = shlex.join(trainer_command(spec_path, processes))
    lines = [
        "#!/bin/bash",
        f"# NeuroLens job {spec_path.parent.name}: written by server/executors/slurm.py for each attempt.",
        "export PYTHONUNBUFFERED=1",
        f"export PYTHONPATH={shlex.quote(str(SOURCE_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
        'echo "slurm job $SLURM_JOB_ID on $(hostname) started $(date -u +%FT%TZ)" >&2',
        "# A warning that comes before the trainer installs its handler must not end the job (USR1's",
        "# default action); ignored until then, the job ends at its limit (SIGTERM: a checkpoint too).",
        "trap '' USR1",
    ]
    if processes <= 1:
        lines.append(f"exec {command}")
    else:
        inner = shlex.quote(f"trap '' USR1; exec {command}")
        lines += [
            f"srun --ntasks=1 --nodes=1 --cpus-per-task=${{SLURM_CPUS_PER_TASK:-{processes}}} bash -c {inner} &",
            "step=$!",
            "trap 'scancel --signal=USR1 \"$SLURM_JOB_ID.0\"' USR1",
            "# wait returns early when the trap runs; wait again until srun has really ended.",
            'while :; do wait "$step"; code=$?; kill -0 "$step" 2>/dev/null || break; done',
            'exit "$code"',
        ]
    partial = script.with_name(f".{script.name}.partial")
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    partial.chmod(0o700)
    os.replace(partial, script)


class SlurmRun(Run):
    """One batch job, known by its Slurm job id; its state is read at most every ``poll_s``."""

    def __init__(self, job_id: str, poll_s: float, outcome_path: Path | None = None) -> None:
        self.handle = job_id
        self.poll_s = poll_s
        self.outcome_path = outcome_path
        self._read_at = 0.0
        self._state = "PENDING"
        self._exit: Exit | None = None
        self._warned_at = 0.0

    def _refresh(self, force: bool = False) -> None:
        if self._exit is not None or (not force and time.monotonic() - self._read_at < self.poll_s):
            return
        self._read_at = time.monotonic()
        try:
            fields = show_job(self.handle)
        except SlurmError as exc:  # slurmctld is down or busy: nothing is known, so it still runs
            if time.monotonic() - self._warned_at > 60:
                self._warned_at = time.monotonic()
                log.warning("cannot read Slurm job %s: %s", self.handle, exc)
            return
        if fields is None:
            self._exit = Exit(None)  # purged after MinJobAge: ended; its last event says how
            return
        self._state = fields.get("JobState", "")
        if self._state in ENDED_STATES:
            self._exit = exit_of(fields)
            if self.outcome_path is not None and (self.outcome_path.exists() or self._exit.code == 0):
                # torchrun exits 0 after a clean end (or non-zero when a signal reached it first):
                # rank 0's file says how the run ended.
                self._exit = replace(self._exit, code=outcome_code(self.outcome_path))
            log.info("Slurm job %s ended %s, exit code %s", self.handle, self._state, fields.get("ExitCode"))

    def poll(self) -> Exit | None:
        self._refresh()
        return self._exit

    def pending(self) -> bool:
        self._refresh()
        return self._exit is None and self._state in PENDING_STATES

    def rss_bytes(self) -> int | None:
        return None  # another machine: the trainer's reports carry its memory

    def stop(self) -> None:
        """SIGTERM to the batch shell (the trainer): checkpoint and exit. A job still waiting in
        the queue has nothing to checkpoint and is cancelled."""
        if self.pending():
            self._scancel([])
        else:
            self._scancel(["--batch", "--signal=TERM"])

    def kill(self) -> None:
        self._scancel(["--full", "--signal=KILL"])
        self._scancel([])

    def _scancel(self, options: list[str]) -> None:
        try:
            slurm_command(["scancel", *options, self.handle])
        except SlurmError as exc:
            log.warning("scancel %s: %s", self.handle, exc)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._refresh(force=True)
            if self._exit is not None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0.01)))


__all__ = ["BATCH_SCRIPT", "SlurmExecutor", "SlurmRun", "exit_of", "memory_request_mb"]
