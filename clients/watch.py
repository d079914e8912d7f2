"""Live terminal view of one job for ``neurolens watch``."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from clients.client import TERMINAL_STATUSES, NeuroLensClient
from clients.format import format_bytes, format_duration, status_label

# Free memory changes slowly and /api/system costs the server a psutil call; poll it less often
# than the job itself.
SYSTEM_POLL_S = 5.0


def _fields(job: dict[str, Any], available: int | None) -> dict[str, str]:
    metrics = job.get("metrics") or {}
    memory = job.get("memory") or {}
    loss = metrics.get("loss")
    eta = (job.get("progress") or {}).get("eta_s")
    mem = f"RSS {format_bytes(memory.get('rss_bytes'))} (peak {format_bytes(memory.get('peak_rss_bytes'))}"
    mem += f" of {format_bytes(available)} free)" if available else ")"
    return {
        "loss": f"loss {loss:.4f}" if isinstance(loss, (int, float)) else "loss -",
        "eta": f"ETA {format_duration(eta)}" if eta is not None and job["status"] == "running" else "",
        "mem": mem,
    }


def watch_job(client: NeuroLensClient, job_id: int, console: Console, *, interval: float = 1.0) -> dict[str, Any]:
    """Show a live progress bar for a job until it reaches a terminal status.

    Parameters
    ----------
    client : NeuroLensClient
        An open client.
    job_id : int
        The job to follow.
    console : rich.console.Console
        Where to draw.
    interval : float
        Seconds between job polls (conditional GETs, cheap when nothing changed).

    Returns
    -------
    dict
        The job in its final state.
    """
    job, etag = client.get_job_if_changed(job_id)
    assert job is not None
    available: int | None = None
    last_system = float("-inf")
    columns = (
        TextColumn("[bold]job {task.fields[job_id]}[/] {task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[eta]}"),
        TextColumn("{task.fields[loss]}"),
        TextColumn("{task.fields[mem]}"),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(status_label(job), total=None, job_id=job_id, **_fields(job, available))
        while True:
            if time.monotonic() - last_system >= SYSTEM_POLL_S:
                available = client.system().get("memory_available_bytes")
                last_system = time.monotonic()
            progress = job.get("progress") or {}
            bar.update(task, description=status_label(job), total=progress.get("total") or None,
                       completed=progress.get("step") or 0, **_fields(job, available))
            if job["status"] in TERMINAL_STATUSES:
                return job
            time.sleep(interval)
            fresh, etag = client.get_job_if_changed(job_id, etag)
            if fresh is not None:
                job = fresh
