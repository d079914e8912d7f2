"""The machine's NVIDIA GPUs as ``nvidia-smi`` reports them, for admission and ``/api/system``.

The server never imports torch (a test checks it: torch alone costs the server hundreds of MB
and seconds at start-up), so it asks the driver's own command-line tool. A machine without
``nvidia-smi`` has no GPU as far as admission is concerned; a GPU job there still runs if torch
finds one, it is only not counted.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

QUERY = ["--query-gpu=index,name,memory.total,memory.used", "--format=csv,noheader,nounits"]
CACHE_S = 2.0  # the scheduler asks every tick; nvidia-smi takes tens of milliseconds
MIB = 1024 * 1024


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_bytes: int
    used_bytes: int

    @property
    def free_bytes(self) -> int:
        return max(self.total_bytes - self.used_bytes, 0)


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """GPUs from ``nvidia-smi --query-gpu=index,name,memory.total,memory.used`` CSV lines."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            gpus.append(Gpu(int(parts[0]), parts[1], int(float(parts[2]) * MIB), int(float(parts[3]) * MIB)))
        except ValueError:  # "[N/A]" on some virtual GPUs: skip what cannot be counted
            continue
    return gpus


_lock = threading.Lock()
_cached: tuple[float, list[Gpu]] = (0.0, [])


def list_gpus() -> list[Gpu]:
    """The GPUs visible now (cached for a moment); empty without nvidia-smi or a driver."""
    global _cached
    with _lock:
        stamp, gpus = _cached
        if time.monotonic() - stamp < CACHE_S:
            return gpus
        binary = shutil.which("nvidia-smi")
        gpus = []
        if binary:
            try:
                done = subprocess.run([binary, *QUERY], capture_output=True, text=True, timeout=10)
                if done.returncode == 0:
                    gpus = parse_nvidia_smi(done.stdout)
            except (OSError, subprocess.SubprocessError):
                gpus = []
        _cached = (time.monotonic(), gpus)
        return gpus
