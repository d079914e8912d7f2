"""The compare page (clients/dashboard/compare.html) in a real Chromium, on real finished jobs.

One module-scoped server trains two tiny Stage 1 runs that differ in learning rate and steps,
and a tiny Stage 2 model on the first (real trainer subprocesses). The page is opened at its
own address, ``compare.html?jobs=...``, and through its own picker; a server with a token shows
that the page reads with the dashboard's credentials.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import RunningServer, start_server
from tests.results_helpers import (DESKTOP, PHONE, STAGE1, WIDTHS, finished, page_at, screenshot, stage1_then_stage2,
                                   submit, sync_api)
from tests.test_dashboard_browser import launch_chromium

OTHER_STAGE1 = {**STAGE1, "steps": 16, "checkpoint_every": 16, "lr": 3e-3}
TOKEN = "compare-page-token-0123456789"


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, list[dict]]]:
    server = start_server(tmp_path_factory.mktemp("compare") / "data")
    try:
        other = submit(server, {"stage": "stage1", "dataset": "synthetic", "config": OTHER_STAGE1})
        stage1, stage2 = stage1_then_stage2(server)
        yield server, [stage1, finished(server, other), stage2]
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    yield from launch_chromium()


def steps_with_loss(server: RunningServer, job_id: int) -> list[int]:
    with server.client() as client:
        events = client.get(f"/api/jobs/{job_id}/events", params={"limit": 5000}).json()["data"]
    return sorted({e["step"] for e in events if e["step"] is not None and e["loss"] is not None})


@pytest.mark.slow
@pytest.mark.ci
@WIDTHS
def test_loss_curves_results_and_config_differences_side_by_side(jobs, browser, viewport):
    server, (stage1, other, stage2) = jobs
    ids = [stage1["id"], other["id"], stage2["id"]]
    with page_at(browser, server, viewport, f"/compare.html?jobs={','.join(map(str, ids))}") as watched:
        page = watched.page
        chart = page.get_by_test_id("compare-loss-chart")
        sync_api.expect(chart).to_be_visible()
        # One curve per job, one colour each, each point a step it reported, in step order.
        curves = chart.locator("polyline[data-job-id]")
        assert sorted(int(c.get_attribute("data-job-id")) for c in curves.all()) == sorted(ids)
        assert len({c.get_attribute("stroke") for c in curves.all()}) == 3
        for job in (stage1, other):
            line = chart.locator(f'polyline.curve:not(.val)[data-job-id="{job["id"]}"]')
            xs = [float(p.split(",")[0]) for p in line.get_attribute("points").split()]
            assert len(xs) == len(steps_with_loss(server, job["id"])) and xs == sorted(xs), job["id"]
        # Stage 1's loss falls from ~80 to ~20 while Stage 2's starts near 5: a log axis shows both.
        assert chart.get_attribute("data-scale") == "log"
        assert chart.locator("text.tick").count() >= 6  # ticks on both axes, not only min and max
        legend = page.get_by_test_id("compare-legend-item")
        sync_api.expect(legend).to_have_count(3)
        sync_api.expect(legend.first).to_contain_text(f"Job {stage1['id']} (stage1, tiny) training loss")

        # Results side by side, one column per job in the address's order.
        metrics = page.get_by_test_id("compare-metrics")
        assert metrics.locator("thead th").all_inner_texts()[1:] == [f"● Job {i}" for i in ids]
        loss_row = metrics.locator('tr[data-key="train_loss"] td').all_inner_texts()
        assert loss_row == [f"{j['metrics']['train_loss']:.3f}" for j in (stage1, other, stage2)]
        verdict = metrics.get_by_test_id("compare-verdict").locator("td").all_inner_texts()
        assert verdict[:2] == ["–", "–"] and verdict[2] in {"yes", "no evidence"}

        # The configs' differences first and marked; what is the same is folded.
        config = page.get_by_test_id("compare-config")
        differs = {row.get_attribute("data-key"): row.locator("td").all_inner_texts()
                   for row in config.get_by_test_id("compare-config-diff").all()}
        assert differs["config.lr"] == ["0.001", "0.003", "0.003"]
        assert differs["config.steps"] == ["24", "16", "12"]
        assert differs["stage"] == ["stage1", "stage1", "stage2"]
        assert differs["after"] == ["–", "–", str(stage1["id"])]
        assert "dataset" not in differs  # all three trained on synthetic
        same = config.get_by_test_id("compare-config-same")
        assert same.get_attribute("open") is None
        sync_api.expect(same.locator("summary")).to_contain_text("the same in every job")

        assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
        screenshot(page, "compare", viewport)


@pytest.mark.slow
@pytest.mark.ci
def test_the_picker_chooses_jobs_and_a_bad_address_says_what_is_allowed(jobs, browser):
    server, (stage1, other, _) = jobs
    with page_at(browser, server, PHONE, "/compare.html?jobs=3,x") as watched:
        page = watched.page
        sync_api.expect(page.get_by_test_id("compare-error")).to_have_text(
            '⚠ Invalid job id "x" in ?jobs=; expected job numbers separated by commas, e.g. ?jobs=3,5,8.')
        # Nothing chosen: the picker is open, one box per job; nothing ticked says so.
        picks = page.get_by_test_id("compare-pick")
        sync_api.expect(picks).to_have_count(3)
        page.get_by_test_id("compare-submit").click()
        sync_api.expect(page.get_by_test_id("compare-picker-error")).to_contain_text("Pick at least one job")
        page.locator(f'[data-testid="compare-pick"][value="{other["id"]}"]').check()
        page.locator(f'[data-testid="compare-pick"][value="{stage1["id"]}"]').check()
        page.get_by_test_id("compare-submit").click()
        first, second = sorted((other["id"], stage1["id"]))
        page.wait_for_url(f"**/compare.html?jobs={first},{second}")
        sync_api.expect(page.get_by_test_id("compare-legend-item")).to_have_count(2)
        # A job that is not there is named; the others are still shown.
        page.goto(f"/compare.html?jobs={stage1['id']},999")
        sync_api.expect(page.get_by_test_id("compare-error")).to_have_text("⚠ No job 999 on this server; showing the others.")
        sync_api.expect(page.get_by_test_id("compare-legend-item")).to_have_count(1)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


def test_a_server_with_a_token_is_read_with_the_token_the_user_gives(tmp_path, browser):
    server = start_server(tmp_path / "data", args=("--token", TOKEN))
    try:
        with server.client() as client:
            job = client.post("/api/jobs", json={"stage": "stage1", "dataset": "synthetic",
                                                 "config": {"preset": "tiny", "steps": 100000}}).json()
            client.post(f"/api/jobs/{job['id']}/cancel")
        asked: list[str] = []

        def answer(dialog) -> None:
            asked.append(dialog.message)
            dialog.accept(TOKEN)

        with page_at(browser, server, DESKTOP, f"/compare.html?jobs={job['id']}", on_dialog=answer) as watched:
            sync_api.expect(watched.page.get_by_test_id("compare-legend-item")).to_have_count(1)
            sync_api.expect(watched.page.get_by_test_id("compare-pick")).to_have_count(1)
            assert len(asked) == 1 and "NEUROLENS_TOKEN" in asked[0], asked
            # The first reads were refused (401), then every one carried the token and was answered.
            api = [r for r in watched.responses if "/api/" in r["url"]]
            assert api and api[-1]["status"] == 200 and not [r for r in api if r["status"] not in (200, 401)], api
    finally:
        server.stop()
