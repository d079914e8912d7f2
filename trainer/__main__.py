"""Command line: ``python -m trainer run <job dir>/spec.json``.

Runs one job attempt and exits with :data:`~trainer.protocol.EXIT_OK` (training reached its
steps), :data:`~trainer.protocol.EXIT_STOPPED` (a pause or cancel was honoured after a
checkpoint), :data:`~trainer.protocol.EXIT_OUT_OF_TIME` (Slurm's SIGUSR1 before the time limit,
honoured after a checkpoint) or :data:`~trainer.protocol.EXIT_FAILED` (a clean failure,
explained by the last ``error`` event). Any other exit code is a crash. Logging goes to stderr; offline events (empty
``api_url``) go to stdout as JSON lines.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

from pydantic import ValidationError

from trainer.checkpoint import RETENTION, atomic_write_text
from trainer.config import ConfigError
from trainer.distributed import World, shutdown, world_from_env
from trainer.exceptions import TrainerError
from trainer.protocol import EXIT_FAILED, EXIT_OK, EXIT_OUT_OF_TIME, EXIT_STOPPED, OUTCOME_FILENAME, JobSpec
from trainer.reporter import Reporter
from trainer.stages import get_stage, parse_config

log = logging.getLogger("trainer")
EXIT_CRASHED = 1


def read_spec(path: Path) -> JobSpec:
    """Parse a job spec file, with an error that names the file."""
    try:
        return JobSpec.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, ValidationError) as exc:
        raise TrainerError(f"Cannot read job spec {path}: {exc}") from exc


def run(spec_path: Path) -> int:
    """Run the job described by ``spec_path``; returns the process exit code.

    Under torchrun (a data-parallel job) a clean end (ok, stopped, failed) exits 0 on every rank
    and rank 0 writes the real code to :data:`~trainer.protocol.OUTCOME_FILENAME`; a crash still
    exits non-zero, which makes torchrun stop the other ranks.
    """
    try:
        spec = read_spec(spec_path)
        world = world_from_env()
    except TrainerError as exc:  # no spec, so no server to tell: stderr is all there is
        log.error("%s", exc)
        return EXIT_FAILED
    code = run_job(spec, world)
    if not world.distributed or code not in (EXIT_OK, EXIT_FAILED, EXIT_STOPPED, EXIT_OUT_OF_TIME):
        return code
    if world.is_main:
        atomic_write_text(Path(spec.job_dir) / OUTCOME_FILENAME, json.dumps({"exit_code": code}))
    return EXIT_OK


def run_job(spec: JobSpec, world: World) -> int:
    """Run one attempt of ``spec`` as this rank; returns the trainer's own exit code."""
    reporter = Reporter(spec, log_every_s=float(spec.config.get("log_every_s", 2.0) or 2.0),
                        silent=not world.is_main)

    # SIGTERM (and Ctrl-C) become a stop request: checkpoint, then exit like a pause.
    def on_signal(signum: int, _frame: object) -> None:
        log.info("received signal %d; stopping at the next step", signum)
        reporter.stop_requested = reporter.stop_requested or "cancel"

    # SIGUSR1 is Slurm's warning that the time limit is near (sbatch --signal=B:USR1@...): the
    # same checkpoint and stop, but the run ends as out of time, to be continued in a new allocation.
    def on_time_warning(_signum: int, _frame: object) -> None:
        log.info("received SIGUSR1: the time limit is near; checkpointing and stopping at the next step")
        reporter.stop_requested = reporter.stop_requested or "out_of_time"

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if hasattr(signal, "SIGUSR1"):  # not on Windows, where there is no batch system to send it
        signal.signal(signal.SIGUSR1, on_time_warning)

    RETENTION.keep = spec.keep_checkpoints
    with reporter:
        try:
            config = parse_config(spec.stage, spec.config)
            reporter.log_every_s = config.log_every_s
            # No step yet: a resumed run learns its step from its checkpoint, and must not report 0.
            reporter.update(total=config.steps)
            processes = f" in {world.size} processes" if world.distributed else ""
            reporter.event("started", message=f"{spec.stage} attempt {spec.attempt} on {spec.dataset}{processes}")
            # Heartbeats from here on, so that loading a large dataset does not look like a hang.
            reporter.start_heartbeats()
            code = get_stage(spec.stage).load_runner()(spec, config, reporter, world)
            return EXIT_OUT_OF_TIME if code == EXIT_STOPPED and reporter.stop_requested == "out_of_time" else code
        except (TrainerError, ConfigError) as exc:
            log.error("%s", exc)
            reporter.event("error", message=str(exc))
            return EXIT_FAILED
        except Exception as exc:
            if is_disk_full(exc) and world.is_main:
                # Checkpoints are written to a temporary directory and renamed into place, so the
                # newest complete one is intact: pause, and let the user free space and resume.
                message = (f"Disk full while the trainer was writing ({exc}); the newest complete "
                           f"checkpoint is kept. Free some space, then resume the job.")
                log.error("%s", message)
                reporter.event("error", message=message)
                return EXIT_STOPPED
            # A bug or an exhausted machine: report it, then exit as a crash.
            log.error("trainer crashed:\n%s", traceback.format_exc())
            reporter.event("error", message=f"Trainer crashed: {type(exc).__name__}: {exc}")
            return EXIT_CRASHED
        finally:
            shutdown(world)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, raised by Python's own I/O or reported as text by safetensors."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="NeuroLens trainer subprocess.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run one job from its spec.json")
    run_parser.add_argument("spec", type=Path, help="path to the job's spec.json")
    args = parser.parse_args(argv)
    # Before torch allocates anything, so that every large temporary is returned when freed.
    from trainer.memory import release_freed_memory_promptly

    release_freed_memory_promptly()
    rank = os.environ.get("RANK")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s " + (f"[rank {rank}] " if rank else "") + "%(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat is noise
    return run(args.spec)


if __name__ == "__main__":
    sys.exit(main())
