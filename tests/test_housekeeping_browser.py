"""Deleting from the dashboard, and its disk figures, in a real Chromium on a real server.

A finished tiny Stage 1 job and a long Stage 2 job running on its encoder artifact: the running
job cannot be deleted (its button is off), the encoder it uses cannot either (the refusal names
the job), and once the Stage 2 job is cancelled both go, each after the user confirms, with the
freed space said. Disk figures show in the header and on the job page.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.conftest import RunningServer, start_server
from tests.results_helpers import PHONE, STAGE1, page_at, screenshot, submit, sync_api
from tests.test_dashboard_browser import DESKTOP, launch_chromium

LONG_STAGE2 = {"preset": "tiny", "steps": 100000, "checkpoint_every": 1000, "log_every_s": 0.2}


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    yield from launch_chromium()


def fits(page: sync_api.Page, width: int) -> None:
    assert page.evaluate("document.documentElement.scrollWidth") <= width


def confirm_each(dialogs: list[str]):
    def accept(dialog: sync_api.Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.accept()
    return accept


@pytest.mark.slow
@pytest.mark.ci
def test_jobs_and_artifacts_are_deleted_from_the_dashboard_after_a_confirmation(tmp_path, browser):
    server: RunningServer = start_server(tmp_path / "data")
    try:
        stage1 = server.wait_for_job(submit(server, {"stage": "stage1", "dataset": "synthetic", "config": STAGE1}),
                                     {"succeeded"}, timeout=600)
        encoder = next(a for a in stage1["artifacts"] if a["kind"] == "encoder")
        stage2_id = submit(server, {"stage": "stage2", "dataset": "synthetic", "encoder_artifact": encoder["id"],
                                    "config": LONG_STAGE2})
        server.wait_for_job(stage2_id, {"running"}, timeout=120)
        dialogs: list[str] = []

        with page_at(browser, server, DESKTOP, f"/#/jobs/{stage1['id']}", on_dialog=confirm_each(dialogs)) as watched:
            page = watched.page
            sync_api.expect(page.get_by_test_id("job-heading")).to_contain_text(f"Job {stage1['id']}")
            sync_api.expect(page.get_by_test_id("system-summary")).to_contain_text("used by NeuroLens")
            sync_api.expect(page.get_by_test_id("job-page-disk")).to_have_text(re.compile(r"^\d[\d.]* (KiB|MiB)$"))
            sync_api.expect(page.get_by_test_id("job-delete")).to_be_enabled()

            # The encoder the running job reads is refused, and the refusal says which job holds it.
            row = page.locator(f'[data-testid="artifact-row"][data-artifact-id="{encoder["id"]}"]')
            row.get_by_test_id("artifact-delete").click()
            error = page.get_by_test_id("job-action-error")
            sync_api.expect(error).to_be_visible()
            sync_api.expect(error).to_contain_text(f"job {stage2_id}")
            assert dialogs and f"artifact {encoder['id']}" in dialogs[-1]
            sync_api.expect(row).to_have_count(1)  # nothing was removed
            fits(page, DESKTOP["width"])
            page.evaluate("window.scrollTo(0, 0)")  # the refusal, under the job's buttons
            screenshot(page, "delete-refused", DESKTOP)

            # A running job has no Delete.
            page.goto(f"/#/jobs/{stage2_id}")
            sync_api.expect(page.get_by_test_id("job-heading")).to_contain_text(f"Job {stage2_id}")
            sync_api.expect(page.get_by_test_id("job-panel-status")).to_contain_text("running")
            sync_api.expect(page.get_by_test_id("job-delete")).to_be_disabled()
            page.get_by_test_id("job-cancel").click()
            server.wait_for_job(stage2_id, {"cancelled"}, timeout=120)
            sync_api.expect(page.get_by_test_id("job-delete")).to_be_enabled(timeout=15_000)

            # Deleted: the page goes back to the list, which no longer has it, and says what was freed.
            page.get_by_test_id("job-delete").click()
            sync_api.expect(page.get_by_test_id("notice")).to_contain_text(f"Deleted job {stage2_id}")
            sync_api.expect(page.get_by_test_id("notice")).to_contain_text("freed")
            sync_api.expect(page.get_by_test_id("jobs-view")).to_be_visible()
            sync_api.expect(page.locator(f'[data-testid="job-row"][data-job-id="{stage2_id}"]')).to_have_count(0)
            assert f"job {stage2_id}" in dialogs[-1]

        with server.client() as client:
            assert client.get(f"/api/jobs/{stage2_id}").status_code == 404
            assert client.get(f"/api/artifacts/{encoder['id']}").status_code == 200  # never deleted

        # On a phone: the job page with its Delete buttons fits, and the encoder now goes.
        with page_at(browser, server, PHONE, f"/#/jobs/{stage1['id']}", on_dialog=confirm_each(dialogs)) as watched:
            page = watched.page
            row = page.locator(f'[data-testid="artifact-row"][data-artifact-id="{encoder["id"]}"]')
            sync_api.expect(row).to_have_count(1)
            fits(page, PHONE["width"])
            screenshot(page, "delete-job-page", PHONE)
            row.get_by_test_id("artifact-delete").click()
            sync_api.expect(page.get_by_test_id("notice")).to_contain_text(f"Deleted artifact {encoder['id']}")
            sync_api.expect(row).to_have_count(0)
            fits(page, PHONE["width"])
        with server.client() as client:
            assert client.get(f"/api/artifacts/{encoder['id']}").status_code == 404
    finally:
        server.stop()
