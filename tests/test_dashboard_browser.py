"""The dashboard in a real headless Chromium against a real server and real trainers.

Debian's `chromium` is driven through the `playwright` package with ``executable_path`` (never
`playwright install`, which downloads a browser of its own). `make test` installs chromium when it
can; without it these tests are skipped with the reason. Screenshots of the job page go to
`test-artifacts/` (git-ignored) so a person can look at the layout after a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.conftest import REPO_ROOT, RunningServer
from trainer.protocol import PHASES

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install -e '.[test]')")

CHROMIUM = os.environ.get("NEUROLENS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no chromium on PATH (as root, `make test` installs Debian's chromium; or set NEUROLENS_CHROMIUM)",
                allow_module_level=True)

ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"
# Everything that would reach past this machine is off: the page must work with no network.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def launch_chromium(extra_args: tuple[str, ...] = ()) -> Iterator[sync_api.Browser]:
    """Debian's chromium with CHROMIUM_ARGS and ``extra_args``, closed when the generator ends."""
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra_args])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    yield from launch_chromium()


class Watched:
    """A page plus what it did on the wire and in its console, for assertions and failure reports."""

    def __init__(self, page: sync_api.Page, base_url: str) -> None:
        self.page = page
        self.base_url = base_url
        self.responses: list[dict] = []
        self.errors: list[str] = []
        self.requests: list[dict] = []
        page.on("response", self._on_response)
        page.on("request", lambda r: self.requests.append({"url": r.url, "t": time.monotonic()}))
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on("console", self._on_console)

    def _on_console(self, message: sync_api.ConsoleMessage) -> None:
        # Chromium logs every 4xx as "Failed to load resource"; the API's 422s are expected in
        # the form tests, and a missing static asset is caught in _on_response instead.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(f"console: {message.text}")

    def _on_response(self, response: sync_api.Response) -> None:
        self.responses.append({
            "url": response.url, "status": response.status, "method": response.request.method,
            "if_none_match": response.request.headers.get("if-none-match"),
        })
        # Anything not served by our own server would be a CDN or a tracker.
        if not response.url.startswith((self.base_url, "data:")):
            self.errors.append(f"request outside the server: {response.url}")
        elif "/api/" not in response.url and response.status >= 400:
            self.errors.append(f"asset {response.url} answered {response.status}")

    def job_reads(self, job_id: int) -> list[dict]:
        return [r for r in self.responses if r["method"] == "GET" and r["url"].endswith(f"/api/jobs/{job_id}")]


def new_watched_page(browser: sync_api.Browser, server: RunningServer, viewport: dict, path: str = "/",
                     on_dialog=None) -> tuple[sync_api.BrowserContext, Watched]:
    """A fresh browser context and a watched page in it, opened at ``path`` on ``server``."""
    context = browser.new_context(viewport=viewport, accept_downloads=True, base_url=server.url)
    page = context.new_page()
    page.set_default_timeout(30_000)
    if on_dialog is not None:  # before the first request: a server with a token asks at once
        page.on("dialog", on_dialog)
    watched = Watched(page, server.url)
    page.goto(path)
    return context, watched


@pytest.fixture
def open_page(browser, tmp_path) -> Iterator:
    contexts = []
    watched: list[Watched] = []

    def _open(server: RunningServer, viewport: dict = DESKTOP, on_dialog=None) -> Watched:
        context, w = new_watched_page(browser, server, viewport, on_dialog=on_dialog)
        contexts.append(context)
        watched.append(w)
        return w

    try:
        yield _open
        for w in watched:
            assert not w.errors, f"the page reported errors: {w.errors}"
    finally:
        for context in contexts:
            context.close()


JOB_URL = re.compile(r"#/jobs/(\d+)$")


def job_id_of(page: sync_api.Page) -> int:
    """The id in the job page's address, ``#/jobs/<id>``."""
    match = JOB_URL.search(page.url)
    assert match, f"not a job page: {page.url}"
    return int(match.group(1))


def open_new_job(page: sync_api.Page) -> None:
    """Open the "New job" panel (collapsed by default, so the jobs list comes first)."""
    sync_api.expect(page.get_by_test_id("new-job")).to_be_hidden()
    page.get_by_test_id("new-job-toggle").click()
    sync_api.expect(page.get_by_test_id("stage1-form")).to_be_visible()


def status_of(page: sync_api.Page) -> str:
    return page.get_by_test_id("job-status").inner_text()


def wait_for_status(page: sync_api.Page, words: str, timeout_s: float) -> None:
    """Wait until the job panel's status line reads ``words`` (e.g. 'succeeded')."""
    sync_api.expect(page.get_by_test_id("job-status")).to_contain_text(words, timeout=timeout_s * 1000)


def shoot(page: sync_api.Page, name: str) -> Path:
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    path = ARTIFACTS_DIR / name
    page.screenshot(path=str(path), full_page=True)
    return path


STEPS = 120  # part way at a 2 s poll on a fast machine; done in minutes on a loaded 2-core one


def test_stage1_from_the_form_to_a_verified_encoder_download(server, open_page, tmp_path):
    (ARTIFACTS_DIR / "dashboard-job-running.png").unlink(missing_ok=True)
    w = open_page(server)
    page = w.page
    sync_api.expect(page.get_by_test_id("system-summary")).to_contain_text("RAM")
    sync_api.expect(page.get_by_test_id("jobs-empty")).to_be_visible()

    open_new_job(page)
    page.get_by_test_id("stage1-dataset").fill("synthetic")
    page.get_by_test_id("stage1-preset").select_option("tiny")
    # Enough steps that a 2 s poll sees the job part way even on a fast, quiet machine.
    page.get_by_test_id("stage1-steps").fill(str(STEPS))
    page.get_by_test_id("stage1-submit").click()

    # The page opens the new job at its own address; the list gives way to it.
    page.wait_for_url(JOB_URL)
    job_id = job_id_of(page)
    sync_api.expect(page.get_by_test_id("job-heading")).to_have_text(f"Job {job_id} · stage1 on synthetic")
    sync_api.expect(page.get_by_test_id("jobs-view")).to_be_hidden()

    # Watch the progress bar and the memory cell while it trains.
    seen_steps: list[int] = []
    memory_texts: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        value = page.get_by_test_id("job-panel-progress").get_attribute("value")
        seen_steps.append(int(float(value or 0)))
        memory_texts.append(page.get_by_test_id("job-page-memory").inner_text())
        if 0 < seen_steps[-1] < STEPS and not (ARTIFACTS_DIR / "dashboard-job-running.png").exists():
            shoot(page, "dashboard-job-running.png")  # mid-run: progress with ETA, live charts
        if "succeeded" in status_of(page) or "failed" in status_of(page):
            break
        page.wait_for_timeout(500)
    wait_for_status(page, "succeeded", timeout_s=5)
    assert "✓" in status_of(page), "status carries a symbol as well as a colour"
    assert any(0 < step < STEPS for step in seen_steps) or len(set(seen_steps)) >= 3, \
        f"the progress bar never showed the job part way: {sorted(set(seen_steps))}"
    assert seen_steps == sorted(seen_steps), "progress went backwards"
    assert page.get_by_test_id("job-panel-progress").get_attribute("value") == str(STEPS)
    assert page.get_by_test_id("job-panel-progress").get_attribute("max") == str(STEPS)
    # Memory of the trainer against the machine's free RAM, in MiB, while it ran.
    assert any(re.search(r"\d+(\.\d)? MiB now, peak \d+(\.\d)? MiB of \d+(\.\d)? GiB free", text)
               for text in memory_texts), memory_texts
    sync_api.expect(page.get_by_test_id("event-log")).to_contain_text("finished")
    sync_api.expect(page.get_by_test_id("loss-chart")).to_have_attribute("aria-label", re.compile(r"latest loss"))

    # Download the encoder through its link on the page and verify it like a user would.
    with server.client() as client:
        job = client.get(f"/api/jobs/{job_id}").json()
    encoder = next(a for a in job["artifacts"] if a["kind"] == "encoder")
    artifact_row = page.locator(f'tr[data-artifact-id="{encoder["id"]}"]')
    sync_api.expect(artifact_row).to_contain_text(encoder["sha256"])
    with page.expect_download() as info:
        artifact_row.get_by_test_id("artifact-download").click()
    download = info.value
    assert download.suggested_filename == encoder["filename"] == "encoder.safetensors"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    data = saved.read_bytes()
    assert len(data) == encoder["size_bytes"]
    assert hashlib.sha256(data).hexdigest() == encoder["sha256"]
    with safe_open(str(saved), framework="pt") as weights:
        assert json.loads(weights.metadata()["encoder_config"])["name"] == "tiny"

    # The list (the job page's "All jobs" link, then back): one short memory line and the loss.
    page.get_by_test_id("job-close").click()
    row = page.locator(f'tr[data-job-id="{job_id}"]')
    sync_api.expect(row.get_by_test_id("job-memory")).to_have_text(re.compile(r"^peak \d+(\.\d)? MiB$"))
    sync_api.expect(row.get_by_test_id("job-loss")).to_have_text(re.compile(r"^\d+\.\d{4}$"))
    page.go_back()
    sync_api.expect(page.get_by_test_id("job-heading")).to_have_text(f"Job {job_id} · stage1 on synthetic")

    # Cheap polling: the finished job is unchanged, so its reads come back 304 to If-None-Match.
    # So is the jobs listing the page polls beside it.
    already = len(w.responses)
    page.wait_for_timeout(4500)
    later = [r for r in w.responses[already:] if r["method"] == "GET" and re.search(r"/api/jobs(/\d+)?$", r["url"])]
    assert {r["url"] for r in later} == {f"{server.url}/api/jobs", f"{server.url}/api/jobs/{job_id}"}, later
    assert all(r["status"] == 304 and r["if_none_match"] for r in later), later

    # The job page, for a person to look at: desktop and phone width.
    shot = shoot(page, "dashboard-job-desktop.png")
    page.get_by_test_id("job-panel").screenshot(path=str(ARTIFACTS_DIR / "dashboard-job-panel.png"))
    page.set_viewport_size(PHONE)
    page.wait_for_timeout(300)
    # At phone width nothing may be wider than the screen (no sideways scrolling).
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    shoot(page, "dashboard-job-phone.png")
    assert shot.stat().st_size > 10_000


def test_validation_errors_show_next_to_the_field(shared_server, open_page):
    w = open_page(shared_server)
    page = w.page
    with shared_server.client() as client:
        before = client.get("/api/jobs").json()["count"]

    open_new_job(page)
    # The server refuses -1 steps (0 derives them from the data); its message appears under the
    # Steps field, which is marked invalid.
    page.get_by_test_id("stage1-steps").fill("-1")
    page.get_by_test_id("stage1-submit").click()
    error = page.get_by_test_id("stage1-steps-error")
    sync_api.expect(error).to_be_visible()
    sync_api.expect(error).to_contain_text("Invalid steps -1; it must be zero or more.")
    sync_api.expect(error).to_contain_text("⚠")  # not colour alone
    sync_api.expect(page.get_by_test_id("stage1-steps")).to_have_attribute("aria-invalid", "true")
    sync_api.expect(page.get_by_test_id("stage1-steps")).to_be_focused()

    # A dataset path the server does not have: its message goes under Dataset, the steps error clears.
    page.get_by_test_id("stage1-steps").fill("5")
    page.get_by_test_id("stage1-dataset").fill("/no/such/recording.edf")
    page.get_by_test_id("stage1-submit").click()
    sync_api.expect(page.get_by_test_id("stage1-dataset-error")).to_contain_text(
        "Dataset path '/no/such/recording.edf' does not exist on the server.")
    sync_api.expect(page.get_by_test_id("stage1-steps-error")).to_be_hidden()

    # Stage 2 with no Stage 1 job to start from says so next to that choice.
    page.get_by_test_id("stage2-submit").click()
    sync_api.expect(page.get_by_test_id("stage2-after-error")).to_be_visible()
    # The other source: the artifact list (read from the server when chosen) is empty here too.
    page.get_by_test_id("stage2-source-artifact").check()
    sync_api.expect(page.get_by_test_id("stage2-encoder-artifact")).to_be_visible()
    sync_api.expect(page.get_by_test_id("stage2-after")).to_be_hidden()
    page.get_by_test_id("stage2-submit").click()
    sync_api.expect(page.get_by_test_id("stage2-encoder-artifact-error")).to_contain_text("encoder_artifact")
    sync_api.expect(page.get_by_test_id("stage2-after-error")).to_be_hidden()

    with shared_server.client() as client:
        assert client.get("/api/jobs").json()["count"] == before, "a refused form must not create a job"


def test_cancel_a_running_job_with_the_keyboard_only(shared_server, open_page):
    w = open_page(shared_server)
    page = w.page
    # Tab order from the top of the page: skip link, home, "New job"; Enter opens the form and
    # puts focus in it, then the Stage 1 form in reading order.
    order = []
    for _ in range(3):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.dataset.testid || document.activeElement.className"))
    assert order == ["skip-link", "home-link", "new-job-toggle"], order
    page.keyboard.press("Enter")
    order = [page.evaluate("document.activeElement.dataset.testid")]
    for _ in range(3):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.dataset.testid"))
    assert order == ["stage1-dataset", "stage1-preset", "stage1-steps", "stage1-submit"], order
    # The focused control is visibly marked (a 3px outline), not only by the browser's default.
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle + ' ' + "
                            "getComputedStyle(document.activeElement).outlineWidth")
    assert outline == "solid 3px", outline

    # Long enough that it is certainly still running when we cancel it.
    page.get_by_test_id("stage1-steps").focus()
    page.keyboard.press("Control+A")
    page.keyboard.type("100000")
    page.keyboard.press("Enter")
    page.wait_for_url(JOB_URL)
    job_id = job_id_of(page)
    # Focus moves to the job's heading so the next Tab lands in the job page.
    sync_api.expect(page.get_by_test_id("job-heading")).to_be_focused()

    # Back to the list and reopen the job from it, still by keyboard: "All jobs" leads to the
    # Jobs heading, from which Tab passes "New job" to the job's link (rows are redrawn whenever
    # the job changes, as it does while it starts, so this also checks that focus survives a
    # redraw).
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.dataset.testid") == "job-close"
    page.keyboard.press("Enter")
    sync_api.expect(page.get_by_test_id("job-panel")).to_be_hidden()
    sync_api.expect(page.locator("#jobs-heading")).to_be_focused()
    link = page.locator(f'tr[data-job-id="{job_id}"]').get_by_test_id("job-link")
    sync_api.expect(link).to_have_count(1)  # listed since the submit, without waiting for a poll
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    sync_api.expect(link).to_be_focused()
    page.wait_for_timeout(2500)  # at least one poll redraws the table
    sync_api.expect(link).to_be_focused()
    page.keyboard.press("Enter")
    sync_api.expect(page.get_by_test_id("job-heading")).to_be_focused()

    wait_for_status(page, "running", timeout_s=60)
    # The trainer has reported at least once (its own memory, not only the server's prediction).
    sync_api.expect(page.get_by_test_id("job-page-memory")).to_contain_text("now, peak", timeout=60_000)

    # From the heading: Close, Pause, (Resume is disabled so skipped), Cancel.
    stops = []
    for _ in range(3):
        page.keyboard.press("Tab")
        stops.append(page.evaluate("document.activeElement.dataset.testid"))
    assert stops == ["job-close", "job-pause", "job-cancel"], stops
    page.keyboard.press("Enter")

    wait_for_status(page, "cancelled", timeout_s=60)
    assert "⊘" in status_of(page)
    with shared_server.client() as client:
        job = client.get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "cancelled"
    assert job["progress"]["step"] < 100000 and job["finished_at"]
    # Nothing left to stop: all three buttons are disabled, and say so to assistive technology too.
    for action in ("pause", "resume", "cancel"):
        sync_api.expect(page.get_by_test_id(f"job-{action}")).to_be_disabled()
    # ... but it can be retried from its checkpoint.
    sync_api.expect(page.get_by_test_id("job-retry")).to_be_enabled()


def test_polling_slows_down_in_a_hidden_tab(shared_server, open_page):
    w = open_page(shared_server)
    page = w.page
    sync_api.expect(page.get_by_test_id("system-summary")).to_contain_text("RAM")

    def polls_during(ms: int) -> int:
        start = time.monotonic()
        page.wait_for_timeout(ms)
        return sum(1 for r in w.requests if r["t"] >= start and r["url"].endswith("/api/system"))

    def set_hidden(hidden: bool) -> None:
        # Headless Chromium keeps every tab visible, so hide this one the way the browser does:
        # the Page Visibility API reports hidden and fires visibilitychange. The page's own code
        # reacts to it.
        page.evaluate("""(hidden) => {
            if (hidden) {
                Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});
                Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => 'hidden'});
            } else {
                delete document.hidden;
                delete document.visibilityState;
            }
            document.dispatchEvent(new Event('visibilitychange'));
        }""", hidden)

    # Visible: a poll every 2 s (plus the time a poll takes on a busy machine).
    visible = polls_during(6500)
    set_hidden(True)
    page.wait_for_timeout(700)  # a poll already on the wire may finish; it schedules the slow pace
    hidden = polls_during(6500)
    assert visible >= 2 and hidden == 0, (visible, hidden)

    # Coming back polls at once rather than after the rest of the 15 s hidden interval.
    set_hidden(False)
    assert polls_during(1500) >= 1


@pytest.mark.slow
def test_pause_resume_then_stage2_from_the_form(server, open_page):
    w = open_page(server)
    page = w.page
    open_new_job(page)
    page.get_by_test_id("stage1-steps").fill("40")
    page.get_by_test_id("stage1-submit").click()
    page.wait_for_url(JOB_URL)
    stage1_id = job_id_of(page)

    # Pause once it has taken steps: the trainer checkpoints and exits; Resume carries on from there.
    sync_api.expect(page.get_by_test_id("job-panel-progress")).not_to_have_attribute("value", "0", timeout=120_000)
    page.get_by_test_id("job-pause").click()
    wait_for_status(page, "paused", timeout_s=120)
    assert "⏸" in status_of(page)
    sync_api.expect(page.get_by_test_id("job-pause")).to_be_disabled()
    paused_at = int(page.get_by_test_id("job-panel-progress").get_attribute("value"))
    assert 0 < paused_at < 40
    page.get_by_test_id("job-resume").click()
    wait_for_status(page, "succeeded", timeout_s=180)
    with server.client() as client:
        events = client.get(f"/api/jobs/{stage1_id}/events", params={"limit": 5000}).json()["data"]
    # After the resume, no step before the paused one is reported again: it did not start over.
    restart = next(i for i, e in enumerate(events) if e["kind"] == "started" and i > 0)
    # (Reports while the resumed trainer is still loading say step 0; they carry memory only.)
    after_restart = [e["step"] for e in events[restart:] if e["kind"] == "progress" and e["step"]]
    assert after_restart and min(after_restart) >= paused_at, (paused_at, after_restart)

    # Stage 2 from that Stage 1 job, through the form.
    page.get_by_test_id("job-close").click()
    open_new_job(page)
    page.get_by_test_id("stage2-after").select_option(str(stage1_id))
    page.get_by_test_id("stage2-steps").fill("5")
    page.get_by_test_id("stage2-submit").click()
    page.wait_for_url(lambda url: bool(JOB_URL.search(url)) and not url.endswith(f"#/jobs/{stage1_id}"))
    sync_api.expect(page.get_by_test_id("job-heading")).to_contain_text("stage2")
    wait_for_status(page, "succeeded", timeout_s=300)
    sync_api.expect(page.get_by_test_id("artifacts-table")).to_contain_text("model")


@pytest.mark.slow
@pytest.mark.ci  # a minute or more for the trainer on 2 cores; the only check of token mode in a browser
def test_a_server_token_is_asked_for_once_and_sent_with_reads_and_changes(tmp_path, open_page):
    from tests.conftest import start_server

    token = "dashboard-token"
    server = start_server(tmp_path / "data", args=("--token", token))
    try:
        prompts: list[str] = []

        def answer(dialog: sync_api.Dialog) -> None:
            prompts.append(dialog.message)
            dialog.accept(token)

        w = open_page(server, on_dialog=answer)
        page = w.page
        # The first reads (presets, jobs, system) are refused together: one question for all.
        sync_api.expect(page.get_by_test_id("stage1-preset")).to_contain_text("tiny")
        assert len(prompts) == 1 and "access token" in prompts[0], prompts
        open_new_job(page)
        page.get_by_test_id("stage1-steps").fill("3")
        page.get_by_test_id("stage1-submit").click()
        wait_for_status(page, "succeeded", 300)  # the word probe after the last step is slow on a loaded box
        assert len(prompts) == 1
        assert not [r for r in w.responses if r["status"] == 401 and r["method"] != "GET"]
        with server.client() as client:
            job = client.get("/api/jobs").json()["data"][0]
        # A download link cannot carry the token: the page fetches the file with it instead.
        encoder = next(a for a in job["artifacts"] if a["kind"] == "encoder")
        with page.expect_download() as info:
            page.locator(f'tr[data-artifact-id="{encoder["id"]}"]').get_by_test_id("artifact-download").click()
        saved = tmp_path / "downloaded.safetensors"
        info.value.save_as(saved)
        assert info.value.suggested_filename == "encoder.safetensors"
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == encoder["sha256"]
    finally:
        server.stop()


def test_a_declined_token_question_is_not_asked_again_by_every_poll(tmp_path, open_page):
    from tests.conftest import start_server

    server = start_server(tmp_path / "data", args=("--token", "never-given"))
    try:
        prompts: list[str] = []

        def decline(dialog: sync_api.Dialog) -> None:
            prompts.append(dialog.message)
            dialog.dismiss()

        w = open_page(server, on_dialog=decline)
        w.page.wait_for_timeout(6000)  # a few polling rounds
        assert len(prompts) == 1, prompts
        w.errors.clear()  # the refused reads are what this test is about
    finally:
        server.stop()


SCREENS_DIR = REPO_ROOT / "docs" / "screens"
WIDTHS = (DESKTOP, PHONE)


def assert_fits(page: sync_api.Page, what: str) -> None:
    """No sideways scrolling: the document is no wider than the window."""
    width = page.evaluate("document.documentElement.scrollWidth")
    window = page.viewport_size["width"]
    assert width <= window, f"{what}: the page is {width} px wide in a {window} px window"


def at_each_width(page: sync_api.Page, what: str, name: str) -> None:
    """Measure the page at 1280x900 and 390x844 and save the first screen of each to docs/screens/."""
    SCREENS_DIR.mkdir(parents=True, exist_ok=True)
    for viewport in WIDTHS:
        page.set_viewport_size(viewport)
        page.wait_for_timeout(400)  # the charts redraw at the new width
        assert_fits(page, f"{what} at {viewport['width']} px")
        page.screenshot(path=str(SCREENS_DIR / f"{name}-{viewport['width']}.png"))
    page.set_viewport_size(DESKTOP)


def open_job(page: sync_api.Page, job_id: int) -> None:
    page.goto(f"/#/jobs/{job_id}")
    sync_api.expect(page.get_by_test_id("job-heading")).to_contain_text(f"Job {job_id} ·")


def chart_ticks(page: sync_api.Page, chart: str) -> tuple[list[str], list[str]]:
    """The labels of a chart's x and y ticks."""
    root = page.get_by_test_id(chart)
    return (root.locator(".axis-x .tick text").all_text_contents(), root.locator(".axis-y .tick text").all_text_contents())


# Each line segment of the training loss (one per attempt) goes forward in step: never back from
# step 1100 to step 3.
LOSS_LINE_GOES_FORWARD = """() => {
  const path = document.querySelector('#loss-chart .series.train path');
  if (!path) return null;
  return path.getAttribute('d').split('M').filter(Boolean).every((segment) => {
    const xs = segment.split('L').map((point) => Number(point.split(',')[0]));
    return xs.every((x, i) => i === 0 || x >= xs[i - 1]);
  });
}"""


@pytest.mark.slow
@pytest.mark.ci  # the "everything fits" measurements, on tiny jobs: about two minutes
def test_every_view_fits_both_widths_with_readable_charts(tmp_path, open_page):
    from tests.conftest import start_server
    from tests.test_faults import trainer_processes, wait_for_step

    # One attempt only, so the killed trainer below fails its job (with a long error) at once.
    server = start_server(tmp_path / "data", env={"NEUROLENS_MAX_ATTEMPTS": "1"})
    try:
        with server.client() as client:
            # A Stage 1 job paused and resumed (two attempts), then a Stage 2 job on its encoder.
            stage1 = client.post("/api/jobs", json={"stage": "stage1", "dataset": "synthetic", "config": {
                # Steps enough that the pause, heard at the next report, comes before the end.
                "preset": "tiny", "steps": 100, "checkpoint_every": 10, "log_every_s": 0.2, "probe_words": 0,
                "val_windows": 32}}).json()["id"]
            wait_for_step(server, stage1, 6)
            assert client.post(f"/api/jobs/{stage1}/pause").status_code == 200
            server.wait_for_job(stage1, {"paused"})
            assert client.post(f"/api/jobs/{stage1}/resume").status_code == 200
            stage2 = client.post("/api/jobs", json={"stage": "stage2", "after": stage1, "dataset": "synthetic",
                                                    "config": {"preset": "tiny", "steps": 3}}).json()["id"]
            server.wait_for_job(stage2, {"succeeded"}, timeout=400)
            running = client.post("/api/jobs", json={"stage": "stage1", "dataset": "synthetic", "config": {
                "preset": "tiny", "steps": 100000, "log_every_s": 0.2}}).json()["id"]
            wait_for_step(server, running, 2)

        w = open_page(server)
        page = w.page
        # The list comes first: the jobs table starts on the first screen, the forms wait.
        sync_api.expect(page.locator(f'tr.job-row[data-job-id="{running}"]')).to_be_visible()
        assert page.get_by_test_id("jobs-table").bounding_box()["y"] < 200
        sync_api.expect(page.get_by_test_id("new-job")).to_be_hidden()
        memory = page.locator(f'tr[data-job-id="{stage1}"]').get_by_test_id("job-memory")
        # One line: its text lays out as a single box (a wrapped text has one box per line).
        lines = memory.evaluate("(cell) => { const r = document.createRange(); r.selectNodeContents(cell); "
                                "return r.getClientRects().length; }")
        assert lines == 1, f"the memory cell {memory.inner_text()!r} takes {lines} lines"

        # A running job at its own address: status, progress, memory against the prediction and
        # the machine, charts with ticks on both axes.
        open_job(page, running)
        wait_for_status(page, "running", timeout_s=30)
        sync_api.expect(page.get_by_test_id("job-page-memory")).to_contain_text("now, peak", timeout=30_000)
        sync_api.expect(page.get_by_test_id("job-summary")).to_contain_text("Predicted peak")
        # The trainer's phase (it reports each as it enters it), beside the status.
        with server.client() as client:
            assert client.get(f"/api/jobs/{running}").json()["phase"] in PHASES
        shown = page.get_by_test_id("job-panel-status").get_by_test_id("job-phase")
        sync_api.expect(shown).to_have_text(re.compile("|".join(PHASES)))
        sync_api.expect(page.locator("#loss-chart .series.train path")).to_have_count(1, timeout=30_000)
        for chart in ("loss-chart", "memory-chart"):
            xs, ys = chart_ticks(page, chart)
            assert len(xs) >= 2 and len(ys) >= 3, (chart, xs, ys)
        assert any("MiB" in label for label in chart_ticks(page, "memory-chart")[1])
        legend = page.get_by_test_id("memory-legend").inner_text()
        assert "RSS" in legend and "predicted peak" in legend and "GPU" not in legend, legend  # a CPU job
        at_each_width(page, "a running job", "dashboard-job-running")

        # Killed from outside with no retry left: it fails with a long error, shown whole and
        # wrapped inside the list's card.
        (trainer,) = trainer_processes(server, running)
        trainer.kill()
        failed = server.wait_for_job(running, {"failed"})
        assert len(failed["error"]) > 60, failed["error"]
        page.goto("/#/")
        error = page.locator(f'tr[data-job-id="{running}"]').get_by_test_id("job-error-cell")
        sync_api.expect(error).to_contain_text("SIGKILL")
        for viewport in WIDTHS:
            page.set_viewport_size(viewport)
            page.wait_for_timeout(300)
            box, card = error.bounding_box(), page.get_by_test_id("jobs-view").bounding_box()
            assert card["x"] <= box["x"] and box["x"] + box["width"] <= card["x"] + card["width"], (viewport, box, card)
        page.set_viewport_size(DESKTOP)
        at_each_width(page, "the list with a failed job", "dashboard-list")
        open_job(page, running)
        sync_api.expect(page.get_by_test_id("job-error")).to_contain_text("SIGKILL")
        at_each_width(page, "a failed job", "dashboard-job-failed")

        # The finished Stage 2 job: its results section, rendered by verdict.js.
        open_job(page, stage2)
        sync_api.expect(page.locator("#results")).to_be_visible()
        sync_api.expect(page.locator("#results")).to_contain_text("test_bleu1_eeg")
        sync_api.expect(page.get_by_test_id("artifacts-table")).to_contain_text("model.safetensors")
        at_each_width(page, "a finished Stage 2 job", "dashboard-job-stage2")

        # The paused and resumed Stage 1 job: the resume marked on both charts, the pause a gap
        # (a shaded band) in memory, not a ramp; its checkpoints listed as they exist.
        open_job(page, stage1)
        sync_api.expect(page.locator("#loss-chart [data-testid=chart-mark]")).to_contain_text("resumed")
        sync_api.expect(page.locator("#memory-chart [data-testid=chart-band]")).to_have_count(1)
        assert page.locator("#memory-chart .series.rss path").get_attribute("d").count("M") == 2
        # A log axis when the losses span 3x or more (how far the first reported loss is above the
        # rest depends on when the first report came); far from that bound the title must say which.
        with server.client() as client:
            events = client.get(f"/api/jobs/{stage1}/events", params={"limit": 5000}).json()["data"]
        losses = [e["loss"] for e in events if e["step"] is not None and e["loss"] is not None]
        losses += [e["metrics"]["val_loss"] for e in events if e["step"] is not None and "val_loss" in (e["metrics"] or {})]
        title = page.locator("#loss-chart .axis-title").last.text_content()
        span = max(losses) / min(losses)
        if span >= 3.5 or span < 2.5:
            assert title == ("loss (log scale)" if span >= 3.5 else "loss"), (title, span)
        checkpoints = [a for a in client_job(server, stage1)["artifacts"] if a["kind"] == "checkpoint"]
        for art in checkpoints:
            sync_api.expect(page.locator(f'tr[data-artifact-id="{art["id"]}"]')).to_contain_text(art["filename"])
        assert page.evaluate(LOSS_LINE_GOES_FORWARD) is True
        # Two reads of the events at once (a poll and a click used to race) keep each event once.
        count = page.evaluate("""async () => {
            state.events = []; state.lastEventId = 0; state.selectedEtag = null;
            await Promise.all([refreshSelected(), refreshSelected()]);
            return state.events.length;
        }""")
        with server.client() as client:
            assert count == client.get(f"/api/jobs/{stage1}/events", params={"limit": 1}).json()["count"]
        assert page.evaluate(LOSS_LINE_GOES_FORWARD) is True
        page.get_by_test_id("loss-chart").scroll_into_view_if_needed()
        page.locator(".charts").screenshot(path=str(SCREENS_DIR / "dashboard-charts-paused-1280.png"))
        at_each_width(page, "a paused and resumed job", "dashboard-job-resumed")
    finally:
        server.stop()


def client_job(server: RunningServer, job_id: int) -> dict:
    with server.client() as client:
        return client.get(f"/api/jobs/{job_id}").json()
