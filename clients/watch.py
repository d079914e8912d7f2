"""Live terminal view of one job for ``neurolens watch``."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from clients.client import TERMINAL_STATUSES, NeuroLensClient
from clients.format import busy_phase, format_bytes, format_duration, format_progress, status_label

# Free memory changes slowly and /api/system costs the server a psutil call; poll it less often
# than the job itself.
SYSTEM_POLL_S = 5.0


def _fields(job: dict[str, Any], available: int | None, wide: bool) -> dict[str, str]:
    metrics = job.get("metrics") or {}
    memory = job.get("memory") or {}
    loss = metrics.get("loss")
    eta = (job.get("progress") or {}).get("eta_s")
    if wide:
        mem = f"RSS {format_bytes(memory.get('rss_bytes'))} (peak {format_bytes(memory.get('peak_rss_bytes'))}"
        mem += f" of {format_bytes(available)} free)" if available else ")"
    else:  # 80 columns: the peak is the figure that decides whether a job fits
        mem = f"peak {format_bytes(memory.get('peak_rss_bytes'))}"
    return {
        "loss": f"loss {loss:.4f}" if isinstance(loss, (int, float)) else "loss -",
        "eta": f"ETA {format_duration(eta)}" if eta is not None and job["status"] == "running" else "",
        "mem": mem,
    }


def _described(job: dict[str, Any]) -> str:
    """The bar's word: the status, or what a running trainer does besides steps (``probing``)."""
    return busy_phase(job) or status_label(job)


WIDE_COLUMNS = 110
"""Terminal width from which the live line shows RSS and free memory beside the peak."""


def watch_job(client: NeuroLensClient, job_id: int, console: Console, *, interval: float = 1.0) -> dict[str, Any]:
    """Follow a job until it reaches a terminal status: a live bar on a terminal, else plain lines.

    Parameters
    ----------
    client : NeuroLensClient
        An open client.
    job_id : int
        The job to follow.
    console : rich.console.Console
        Where to draw. When it is not a terminal (a pipe, a log file, a notebook cell), one plain
        line is printed per change of the job instead of a bar redrawn in place.
    interval : float
        Seconds between job polls (conditional GETs, cheap when nothing changed).

    Returns
    -------
    dict
        The job in its final state.
    """
    if not console.is_terminal:
        return _print_lines(client, job_id, console, interval)
    job, etag = client.get_job_if_changed(job_id)
    assert job is not None
    available: int | None = None
    last_system = float("-inf")
    wide = console.width >= WIDE_COLUMNS
    columns = (
        TextColumn("[bold]job {task.fields[job_id]}[/] {task.description}"),
        BarColumn(bar_width=24 if wide else 10),
        MofNCompleteColumn(),
        TextColumn("{task.fields[eta]}"),
        TextColumn("{task.fields[loss]}"),
        TextColumn("{task.fields[mem]}"),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(_described(job), total=None, job_id=job_id, **_fields(job, available, wide))
        while True:
            if wide and time.monotonic() - last_system >= SYSTEM_POLL_S:
                available = client.system().get("memory_available_bytes")
                last_system = time.monotonic()
            progress = job.get("progress") or {}
            bar.update(task, description=_described(job), total=progress.get("total") or None,
                       completed=progress.get("step") or 0, **_fields(job, available, wide))
            if job["status"] in TERMINAL_STATUSES:
                return job
            time.sleep(interval)
            fresh, etag = client.get_job_if_changed(job_id, etag)
            if fresh is not None:
                job = fresh


def _print_lines(client: NeuroLensClient, job_id: int, console: Console, interval: float) -> dict[str, Any]:
    """A line per new status, step or loss, e.g. ``job 3 running 120/200 (60%), ETA 1m 20s, loss 0.1234,
    peak 512.0 MiB`` (memory alone changes every report, and would fill a log with lines)."""
    etag: str | None = None
    job: dict[str, Any] | None = None
    last: tuple = ()
    while True:
        fresh, etag = client.get_job_if_changed(job_id, etag)
        job = fresh or job
        assert job is not None
        fields = _fields(job, None, wide=False)
        line = ", ".join(part for part in (f"job {job_id} {status_label(job)} {format_progress(job.get('progress'))}",
                                           busy_phase(job), fields["loss"], fields["mem"]) if part)
        seen = (status_label(job), busy_phase(job), (job.get("progress") or {}).get("step"), fields["loss"])
        if seen != last:
            console.print(line, soft_wrap=True, markup=False)
            last = seen
        if job["status"] in TERMINAL_STATUSES:
            return job
        time.sleep(interval)
