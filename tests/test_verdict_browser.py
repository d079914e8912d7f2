"""The Stage 2 verdict panel (clients/dashboard/verdict.js) in a real Chromium, on a real job.

One module-scoped server trains a tiny Stage 1 encoder and a tiny Stage 2 model on it (real
trainer subprocesses); the panel is drawn from that job's JSON and its report artifact, read
through the API the way the dashboard reads. The first test reads the job page's own results
section (``#/jobs/<id>``), which the page redraws on every poll; the second draws the panel into a
box of its own from altered metrics (an interval above zero, a job still running).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, RunningServer, start_server
from tests.results_helpers import PHONE, WIDTHS, page_at, screenshot, stage1_then_stage2, sync_api
from tests.test_dashboard_browser import launch_chromium

# Draws the panel into a box at the top of <main>, from the job as the API returns it (or as
# given: the second argument replaces the job's metrics and artifacts, for the other verdict).
DRAW = """async ([id, replace]) => {
  const job = await (await fetch(`api/jobs/${id}`, {cache: "no-store"})).json();
  Object.assign(job, replace || {});
  let box = document.getElementById("verdict-under-test");
  if (!box) {
    box = document.createElement("section");
    box.id = "verdict-under-test";
    box.className = "card";
    document.querySelector("main").prepend(box);
  }
  await NeuroLens.renderVerdict(box, job);
  return box.childElementCount;
}"""


POLLS_WAITED_MS = 5000  # a few of the job page's polls


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, dict, dict]]:
    server = start_server(tmp_path_factory.mktemp("verdict") / "data")
    try:
        stage1, stage2 = stage1_then_stage2(server)
        with server.client() as client:
            report_id = next(a["id"] for a in stage2["artifacts"] if a["kind"] == "report")
            report = client.get(f"/api/artifacts/{report_id}/download").json()
        yield server, stage2, report
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    yield from launch_chromium()


def expected_sentence(metrics: dict) -> str:
    """The sentence verdict.js builds from the metrics when the report states none."""
    diff, low, high = (metrics[f"test_bleu1_eeg_minus_noise{s}"] for s in ("", "_ci_low", "_ci_high"))
    two = lambda v: f"{v:.2f}".replace("-", "−")  # noqa: E731
    if low > 0:
        return f"Reads the EEG: BLEU-1 from EEG exceeds noise by {two(diff)}, 95% interval {two(low)}–{two(high)}"
    where = "lies below zero" if high < 0 else "includes zero"
    return (f"No evidence that the model reads the EEG: BLEU-1 from EEG minus noise is {two(diff)}, "
            f"95% interval {two(low)}–{two(high)} {where}")


def three(value: float) -> str:
    """A score as the table writes it: three decimals, whole numbers (a WER of 1) as they are."""
    if float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    if value != 0 and abs(value) < 0.001:
        return f"{value:.1e}".replace("e-0", "e-")
    return f"{value:.3f}".replace("-", "−")


def fits(page, selector: str, width: int) -> None:
    """Nothing in ``selector`` reaches past the viewport; wide tables scroll inside their own box."""
    box = page.evaluate("""(sel) => {
      const node = document.querySelector(sel);
      const scrollers = [...node.querySelectorAll(".results-scroll")].map((s) => s.getBoundingClientRect().right);
      return {right: node.getBoundingClientRect().right, scroll: node.scrollWidth, client: node.clientWidth, scrollers};
    }""", selector)
    assert box["right"] <= width and box["scroll"] <= box["client"], box
    assert all(right <= width for right in box["scrollers"]), box


@pytest.mark.slow
@pytest.mark.ci
@WIDTHS
def test_a_finished_stage2_job_reads_at_a_glance(jobs, browser, viewport):
    server, job, report = jobs
    metrics = job["metrics"]
    with page_at(browser, server, viewport, f"/#/jobs/{job['id']}") as watched:
        page = watched.page
        sync_api.expect(page.get_by_test_id("job-heading")).to_contain_text(f"Job {job['id']}")
        box = page.get_by_test_id("results-body")
        sync_api.expect(box.get_by_test_id("verdict-sentence")).to_have_count(1)

        # One sentence first: the report's own when it has one, else built from the interval.
        sentence = box.get_by_test_id("verdict-sentence")
        given = report.get("verdict") or {}
        if given.get("sentence"):
            reads, wanted = bool(given.get("reads_eeg")), given["sentence"][:1].upper() + given["sentence"][1:]
        else:
            reads, wanted = metrics["test_bleu1_eeg_minus_noise_ci_low"] > 0, expected_sentence(metrics)
        sync_api.expect(sentence).to_have_text(("✓ " if reads else "○ ") + wanted)
        assert sentence.get_attribute("data-reads-eeg") == str(reads).lower()
        assert box.locator("> *").first.get_attribute("data-testid") == "verdict-sentence"

        # EEG, noise and shuffled EEG side by side, as the job reported them.
        rows = box.get_by_test_id("verdict-row")
        shown = {rows.nth(i).get_attribute("data-metric"): rows.nth(i).locator("td").all_inner_texts()
                 for i in range(rows.count())}
        for metric in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1_f1", "wer", "distinct"):
            values = [metrics[f"test_{metric}_{source}"] for source in ("eeg", "noise", "shuffled")]
            assert shown[metric][:3] == [three(v) for v in values], (metric, shown[metric])

        # The interval drawn with zero marked, its ends in the picture's description.
        interval = box.get_by_test_id("verdict-interval")
        label = interval.get_attribute("aria-label")
        assert f"{metrics['test_bleu1_eeg_minus_noise_ci_low']:.2f}" in label.replace("−", "-") and "zero is marked" in label
        assert box.get_by_test_id("verdict-zero").count() == 1 and box.get_by_test_id("verdict-bar").count() == 1

        # The report's examples: one row per example, every input's prediction in it.
        examples = box.get_by_test_id("verdict-example")
        sync_api.expect(examples).to_have_count(len(report["examples"]))
        first = examples.first.locator("td").all_inner_texts()
        assert first[0] == report["examples"][0]["reference"]
        assert first[1] == (report["examples"][0]["from_eeg"].strip() or "(empty)")

        # Every raw key, folded until asked for.
        raw = box.get_by_test_id("verdict-raw")
        assert raw.get_attribute("open") is None
        raw.locator("summary").click()
        sync_api.expect(raw.locator("dt")).to_have_count(len(metrics))

        # Redrawn on every poll by the job page: an unchanged job leaves the DOM alone.
        page.evaluate("document.querySelector('#results-body table').dataset.mark = 'kept'")
        page.wait_for_timeout(POLLS_WAITED_MS)
        assert page.evaluate("document.querySelector('#results-body table').dataset.mark") == "kept"

        fits(page, "#results-body", viewport["width"])
        raw.locator("summary").click()  # folded again for the picture
        screenshot(box, "verdict", viewport)


@pytest.mark.slow
@pytest.mark.ci
def test_an_interval_above_zero_reads_the_eeg_and_a_missing_report_is_said(jobs, browser):
    server, job, _ = jobs
    with page_at(browser, server, PHONE) as watched:
        page = watched.page
        sync_api.expect(page.get_by_test_id("system-summary")).to_contain_text("RAM")
        # The same job's metrics with the interval of a model that reads its input, and no report.
        metrics = {**job["metrics"], "test_bleu1_eeg_minus_noise": 0.09, "test_bleu1_eeg_minus_noise_ci_low": 0.06,
                   "test_bleu1_eeg_minus_noise_ci_high": 0.12, "test_retrieval_top1_eeg": 0.2,
                   "test_retrieval_top1_noise": 0.01, "test_retrieval_top1_shuffled": 0.012,
                   "test_retrieval_top1_chance": 0.0123}
        page.evaluate(DRAW, [job["id"], {"metrics": metrics, "artifacts": []}])
        box = page.locator("#verdict-under-test")
        sync_api.expect(box.get_by_test_id("verdict-sentence")).to_have_text(
            "✓ Reads the EEG: BLEU-1 from EEG exceeds noise by 0.09, 95% interval 0.06–0.12")
        assert box.get_by_test_id("verdict-sentence").get_attribute("data-reads-eeg") == "true"
        assert "above" in box.get_by_test_id("verdict-bar").get_attribute("class")
        # Rows of the newer metrics appear when present, with chance beside them.
        retrieval = box.locator('[data-testid="verdict-row"][data-metric="retrieval_top1"]')
        assert retrieval.locator("td").all_inner_texts() == ["0.200", "0.010", "0.012", "chance 0.012"]
        assert retrieval.locator("td").first.get_attribute("class") == "num best"  # EEG beats both controls
        sync_api.expect(box.get_by_test_id("verdict-examples-missing")).to_have_text(
            "No examples: the job published no report.")
        fits(page, "#verdict-under-test", PHONE["width"])

        # A job still training has no verdict yet, and says so rather than "no evidence".
        page.evaluate(DRAW, [job["id"], {"status": "running", "metrics": {"loss": 4.2}, "artifacts": []}])
        sync_api.expect(box.get_by_test_id("verdict-sentence")).to_have_text(
            "○ No verdict yet: the test set is decoded once the job has trained (it is running).")
        sync_api.expect(box.get_by_test_id("verdict-row")).to_have_count(0)


def test_the_dashboard_loads_the_verdict_script_and_links_to_compare():
    html = (Path(REPO_ROOT) / "clients" / "dashboard" / "index.html").read_text()
    assert '<script src="verdict.js"' in html and 'href="results.css"' in html and 'href="compare.html"' in html
