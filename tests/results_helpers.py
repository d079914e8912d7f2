"""What the results pages' browser tests share: real finished jobs, and a watched page.

Tiny presets and few steps: a Stage 1 encoder, then a Stage 2 job on it, both through a real
server and real trainer subprocesses, so the pages read what a user's jobs would produce.
Importing this module skips the importing test module where Chromium or playwright is missing
(through tests.test_dashboard_browser, which owns the browser set-up).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.conftest import REPO_ROOT, RunningServer

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install -e '.[test]')")
from tests.test_dashboard_browser import DESKTOP, PHONE, Watched, new_watched_page  # noqa: E402  (skips without chromium)

SCREENS = REPO_ROOT / "docs" / "screens"
WIDTHS = pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])

# Loss reported every 0.2 s (the least the config allows), so even a short run draws a curve.
STAGE1 = {"preset": "tiny", "steps": 24, "batch_size": 8, "probe_words": 0, "val_windows": 16,
          "log_every_s": 0.2, "checkpoint_every": 24}
STAGE2 = {"preset": "tiny", "steps": 12, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2,
          "checkpoint_every": 12, "bootstrap_samples": 50, "log_every_s": 0.2}


def submit(server: RunningServer, body: dict) -> int:
    """POST a job; its id."""
    with server.client() as client:
        response = client.post("/api/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def finished(server: RunningServer, job_id: int) -> dict:
    """The job once it succeeded (fails with the trainer's log otherwise)."""
    return server.wait_for_job(job_id, {"succeeded"}, timeout=600)


def stage1_then_stage2(server: RunningServer, stage1: dict | None = None) -> tuple[dict, dict]:
    """A finished Stage 1 job and a finished Stage 2 job on its encoder."""
    first = submit(server, {"stage": "stage1", "dataset": "synthetic", "config": stage1 or STAGE1})
    second = submit(server, {"stage": "stage2", "dataset": "synthetic", "after": first, "config": STAGE2})
    return finished(server, first), finished(server, second)


@contextmanager
def page_at(browser: sync_api.Browser, server: RunningServer, viewport: dict, path: str = "/",
            on_dialog=None) -> Iterator[Watched]:
    """A new page at ``path`` on ``server``; on leaving, it must have logged no error."""
    context, watched = new_watched_page(browser, server, viewport, path, on_dialog)
    try:
        yield watched
        assert not watched.errors, f"the page reported errors: {watched.errors}"
    finally:
        context.close()


def screenshot(target, name: str, viewport: dict) -> None:
    """Save ``target`` (a page: its first screen; a locator: the element) as docs/screens/<name>-<width>.png."""
    SCREENS.mkdir(parents=True, exist_ok=True)
    target.screenshot(path=str(SCREENS / f"{name}-{'desktop' if viewport is DESKTOP else 'phone'}.png"))
