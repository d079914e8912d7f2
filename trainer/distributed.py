"""Data-parallel training across the processes ``torchrun`` starts, and device choice.

A job with ``config.devices: N > 1`` is launched by the server as
``python -m torch.distributed.run --standalone --nproc_per_node N -m trainer run spec.json``
(``torch.distributed.run`` is the module behind the ``torchrun`` command; running it with the
server's own interpreter keeps the trainer in the same environment). torchrun sets ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` for each worker; :func:`world_from_env` reads them, and
everything else in the trainer asks the resulting :class:`World` what it may do:

- every rank draws the same global batch (same seed, same :class:`~trainer.training.DataOrder`)
  and trains on its own contiguous slice of it, so N processes see exactly the samples one
  process would, and gradients averaged by DistributedDataParallel equal the one-process ones;
- only rank 0 reports to the server, writes checkpoints and registers artifacts;
- a stop request (which reaches rank 0 in an event reply, or any rank as SIGTERM) is agreed on
  by all ranks between optimizer steps with one all-reduce, so they all stop at the same step.

Because nothing about a checkpoint depends on the number of processes (weights and optimizer
state are identical on every rank; data order is global), a checkpoint written by one process
resumes under N and back.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from trainer.exceptions import TrainerError

log = logging.getLogger(__name__)

# A rank that waits longer than this in a collective has lost its peers (one crashed).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
_STOP_CODES = {None: 0, "pause": 1, "out_of_time": 2, "cancel": 3}


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel trainer processes."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that reports, checkpoints and registers artifacts."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The :class:`World` torchrun describes in the environment (one process without it)."""
    try:
        return World(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                     size=int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError as exc:
        raise TrainerError(f"Invalid torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE): {exc}") from exc


def pick_device(name: str, world: World = World()) -> torch.device:
    """Resolve the config's ``device`` ('auto', 'cpu', 'cuda') to this process's torch device.

    Under torchrun each CUDA process takes the GPU of its local rank.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainerError("Invalid device 'cuda': no CUDA device is available; use 'cpu' or 'auto'.")
    if world.local_rank >= torch.cuda.device_count():
        raise TrainerError(f"Invalid devices {world.size}: this machine has {torch.cuda.device_count()} "
                           f"CUDA device(s), so local rank {world.local_rank} has none.")
    return torch.device("cuda", world.local_rank)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype forward passes autocast to, or None for plain float32.

    'auto' means bfloat16 on a CUDA device that has it and float32 on the CPU: on the CPUs we
    measured (bench/throughput.py) bfloat16 autocast made Stage 1 slower, not faster.
    """
    if precision == "float32":
        return None
    if precision == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainerError(f"Invalid precision 'bfloat16': {torch.cuda.get_device_name(device)} does not support it.")
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast forward passes to ``dtype`` on ``device``; a no-op for ``None`` (float32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def init(world: World, device: torch.device) -> None:
    """Join the process group (NCCL between GPUs, gloo between CPU processes)."""
    if not world.distributed:
        return
    die_with_parent()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    log.info("rank %d of %d joined the %s process group on %s", world.rank, world.size, backend, device)


def shutdown(world: World) -> None:
    """Leave the process group after every rank is done with it (idempotent)."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when torchrun's agent dies.

    torchrun starts each worker in a session of its own, so a SIGKILL of the agent (by the
    out-of-memory killer, or by the server) would otherwise leave workers training, and a retry
    would then run beside them. Elsewhere this is a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):
        log.warning("could not set a parent-death signal; a killed torchrun may leave this worker behind")


def agree_on_stop(world: World, requested: str | None, device: torch.device) -> str | None:
    """The stop request every rank acts on: the strongest any rank has seen (cancel > out of time > pause)."""
    if not world.distributed:
        return requested
    code = torch.tensor([_STOP_CODES[requested]], dtype=torch.int32, device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    return {v: k for k, v in _STOP_CODES.items()}[int(code.item())]


def mean_over_ranks(value: float, world: World, device: torch.device) -> float:
    """The mean of a per-rank scalar (a loss) over all ranks."""
    if not world.distributed:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item()) / world.size


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank (e.g. which checkpoint all ranks resume from).

    Values go through pickle between our own ranks only, never from a request.
    """
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


@contextlib.contextmanager
def main_first(world: World) -> Iterator[None]:
    """Run the block on rank 0 first, then on the others.

    For work that fills a shared cache (the synthetic dataset, preprocessed recordings): rank 0
    writes it while the others wait, and they then find it ready instead of racing to write it.
    """
    if world.distributed and not world.is_main:
        dist.barrier()
    yield
    if world.distributed and world.is_main:
        dist.barrier()
