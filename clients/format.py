"""Plain-text formatting of jobs for the CLI (sizes, durations, progress, status words).

Kept free of rich and httpx so that it is trivially testable and reusable in notebooks.
"""

from __future__ import annotations

from typing import Any

# Why a queued job is not running yet, in the user's words.
REASONS = {
    "dependency": "waiting for its Stage 1 job",
    "memory": "waiting for free memory",
}


def format_bytes(n: int | float | None) -> str:
    """Format a byte count with binary units, e.g. ``1.5 GiB``; ``-`` for ``None``.

    Parameters
    ----------
    n : int, float or None
        Number of bytes.

    Returns
    -------
    str
        The formatted size.
    """
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float | None) -> str:
    """Format seconds as ``45s``, ``3m 05s`` or ``2h 10m``; ``-`` for ``None``.

    Parameters
    ----------
    seconds : float or None
        A duration.

    Returns
    -------
    str
        The formatted duration.
    """
    if seconds is None or seconds < 0:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def format_progress(progress: dict[str, Any] | None, eta: bool = True) -> str:
    """Format a job's progress as ``120/200 (60%), ETA 1m 20s``.

    Parameters
    ----------
    progress : dict or None
        The job's ``progress`` object (``step``, ``total``, ``eta_s``).
    eta : bool
        Append the ETA while the job has steps left.

    Returns
    -------
    str
        The formatted progress, ``-`` before the first report.
    """
    if not progress or not progress.get("total"):
        return "-"
    step, total = progress.get("step") or 0, progress["total"]
    text = f"{step}/{total} ({100 * step / total:.0f}%)"
    if eta and progress.get("eta_s") is not None and step < total:
        text += f", ETA {format_duration(progress['eta_s'])}"
    return text


def format_memory(memory: dict[str, Any] | None, available: int | None = None) -> str:
    """Format a job's memory as ``RSS 410.0 MiB, peak 512.0 MiB, predicted 600.0 MiB``.

    Parameters
    ----------
    memory : dict or None
        The job's ``memory`` object.
    available : int or None
        The machine's available memory in bytes, appended as ``of ... available``.

    Returns
    -------
    str
        The formatted memory line.
    """
    memory = memory or {}
    parts = [f"RSS {format_bytes(memory.get('rss_bytes'))}", f"peak {format_bytes(memory.get('peak_rss_bytes'))}"]
    if memory.get("predicted_peak_bytes"):
        parts.append(f"predicted {format_bytes(memory['predicted_peak_bytes'])}")
    if memory.get("gpu_peak_reserved_bytes"):  # a GPU job: what the CUDA caching allocator held
        parts.append(f"GPU {format_bytes(memory.get('gpu_reserved_bytes'))} reserved, "
                     f"peak {format_bytes(memory['gpu_peak_reserved_bytes'])}")
    text = ", ".join(parts)
    if available:
        text += f" ({format_bytes(available)} available)"
    return text


# The same, in a table cell's few columns.
SHORT_REASONS = {"memory": "memory"}


def short_status_label(job: dict[str, Any]) -> str:
    """:func:`status_label` for a table: ``queued (after 3)``, ``queued (memory)``."""
    status, reason = str(job.get("status", "unknown")), job.get("reason")
    if reason == "dependency" and job.get("after") is not None:
        return f"{status} (after {job['after']})"
    return f"{status} ({SHORT_REASONS.get(reason, reason)})" if reason else status


def status_label(job: dict[str, Any]) -> str:
    """The job's status in words, with the waiting reason when it has one.

    Parameters
    ----------
    job : dict
        A job from the API.

    Returns
    -------
    str
        E.g. ``"queued (waiting for free memory)"`` or ``"failed"``.
    """
    status = str(job.get("status", "unknown"))
    reason = job.get("reason")
    if reason:
        return f"{status} ({REASONS.get(reason, reason)})"
    return status


__all__ = ["REASONS", "format_bytes", "format_duration", "format_memory", "format_progress", "short_status_label",
           "status_label"]
