"""Resident memory of this process: current and peak, in bytes.

The server samples the whole process tree itself; these numbers are what the trainer reports
about itself in its progress events.
"""

from __future__ import annotations

import sys

import psutil

_PROCESS = psutil.Process()


def rss_bytes() -> int:
    """Current resident set size of this process in bytes."""
    return int(_PROCESS.memory_info().rss)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes since it started.

    Linux reports ``ru_maxrss`` in KiB and macOS in bytes; Windows has no ``getrusage`` but
    psutil exposes the peak working set as ``peak_wset``.
    """
    if sys.platform == "win32":
        info = _PROCESS.memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    # The current RSS can exceed a stale ru_maxrss sample by a page or two; never report less.
    return max(int(peak) * scale, rss_bytes())
