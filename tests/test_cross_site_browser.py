"""Pages on other origins, in a real Chromium, cannot change a running server (issue 14, finding 1).

An attacker's page is served by a plain ``http.server`` on another local port, once as a
same-site page (127.0.0.1, another port) and once as a cross-site one (``localhost``). It tries
what the issue found working: an HTML form POST that cancels the running job, a ``text/plain``
form POST that uploads an artifact, ``fetch`` POSTs (a no-cors ``text/plain`` pause, a job
without a Content-Type), and ``<img>`` GETs. Without the guard the cancel, the pause and the
upload succeed (checked once by hand, 2026-12-01). A third page is a DNS rebinding: Chromium resolves
``attacker.example`` to 127.0.0.1, so the page's requests reach the server as its own origin and
only the Host check stands in their way.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer, free_port, start_server

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install -e '.[test]')")
from tests.test_dashboard_browser import launch_chromium  # noqa: E402  (skips without chromium)

REBOUND_NAME = "attacker.example"
# The text/plain form below sends exactly this body: "<name>=<value>\r\n".
REPORT_BODY = b'{"stolen": "=1"}\r\n'
JOB_BODY = {"stage": "stage1", "config": {"preset": "tiny", "steps": 5}}


def attack_page(target: str, job_id: int) -> str:
    """HTML that fires every attack at ``target`` and sets its title to "done" when all have run."""
    sha256 = hashlib.sha256(REPORT_BODY).hexdigest()
    return f"""<!doctype html><html><body>
<iframe name="f1"></iframe><iframe name="f2"></iframe><iframe name="f3"></iframe>
<form id="cancel" method="POST" action="{target}/api/jobs/{job_id}/cancel" target="f1"></form>
<form id="upload" method="POST" enctype="text/plain" target="f2"
      action="{target}/api/artifacts?kind=report&sha256={sha256}&filename=stolen.json">
  <input name='{{"stolen": "' value='1"}}'></form>
<form id="create" method="POST" action="{target}/api/jobs" target="f3">
  <input name="stage" value="stage1"></form>
<script>
  const target = {json.dumps(target)};
  const results = {{}};
  const loaded = (name) => new Promise((done) => {{ document.querySelector(`iframe[name=${{name}}]`).onload = done; }});
  const image = (path) => new Promise((done) => {{
    const img = new Image(); img.onload = img.onerror = done; img.src = target + path; document.body.append(img);
  }});
  const attempt = (name, path, init) => fetch(target + path, init)
    .then((r) => {{ results[name] = r.type === "opaque" ? "opaque" : r.status; }})
    .catch((e) => {{ results[name] = "blocked: " + e; }});
  (async () => {{
    const frames = Promise.all([loaded("f1"), loaded("f2"), loaded("f3")]);
    for (const id of ["cancel", "upload", "create"]) document.getElementById(id).submit();
    await Promise.all([
      frames,
      attempt("fetch-create", "/api/jobs", {{method: "POST", mode: "no-cors",
        body: new Blob([{json.dumps(json.dumps(JOB_BODY))}])}}),
      attempt("fetch-pause", "/api/jobs/{job_id}/pause", {{method: "POST", mode: "no-cors",
        headers: {{"Content-Type": "text/plain"}}, body: "{{}}"}}),
      attempt("fetch-read", "/api/jobs", {{}}),
      image("/api/jobs/{job_id}/cancel"),
      image("/api/artifacts/1/download"),
    ]);
    window.results = results;
    document.title = "done";
  }})();
</script></body></html>"""


class AttackerSite:
    """A plain http.server on a free port serving one page, the way any other local app might."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        handler.log_message = lambda *args: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def publish(self, name: str, html: str) -> None:
        (self.root / name).write_text(html)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    # The rebinding: attacker.example resolves to this machine, as after the attacker's DNS flip.
    # Chromium's own Private Network Access check would stop a public page's requests to loopback
    # by itself; Firefox and Safari have none, so it is off here and the server's check is tested.
    yield from launch_chromium((f"--host-resolver-rules=MAP {REBOUND_NAME} 127.0.0.1",
                                "--disable-features=BlockInsecurePrivateNetworkRequests,"
                                "PrivateNetworkAccessSendPreflights,LocalNetworkAccessChecks"))


@pytest.fixture(scope="module")
def running_job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, int]]:
    """One server with one long job, running for the whole module: every test leaves it untouched."""
    server = start_server(tmp_path_factory.mktemp("attacked") / "data")
    try:
        with server.client() as client:
            job = client.post("/api/jobs", json={"stage": "stage1", "config": {
                "preset": "tiny", "steps": 1_000_000, "log_every_s": 0.5}}).json()
        server.wait_for_job(job["id"], {"running"})
        yield server, job["id"]
        with server.client() as client:
            client.post(f"/api/jobs/{job['id']}/cancel")
        server.wait_for_job(job["id"], {"cancelled"}, timeout=60)
    finally:
        server.stop()


def run_page(browser: sync_api.Browser, url: str) -> tuple[dict, list[tuple[str, str, int]]]:
    """Open ``url``, wait for its attacks, return the page's own results and what the server answered."""
    context = browser.new_context()
    try:
        page = context.new_page()
        answered: list[tuple[str, str, int]] = []
        page.on("response", lambda r: answered.append((r.request.method, r.url, r.status)) if "/api/" in r.url else None)
        page.goto(url)
        page.wait_for_function("document.title === 'done'", timeout=30_000)
        return page.evaluate("window.results"), answered
    finally:
        context.close()


def assert_untouched(server: RunningServer, job_id: int) -> None:
    with server.client() as client:
        job = client.get(f"/api/jobs/{job_id}").json()
        assert job["status"] == "running", job
        assert client.get("/api/jobs").json()["count"] == 1  # no job was created
        assert client.get("/api/artifacts").json()["count"] == 0  # no artifact was uploaded
        events = client.get(f"/api/jobs/{job_id}/events", params={"limit": 5000}).json()["data"]
        assert not any("cancel" in (e["message"] or "") or "pause" in (e["message"] or "") for e in events)


@pytest.mark.parametrize("attacker_host", ["127.0.0.1", "localhost"], ids=["same-site", "cross-site"])
def test_a_page_on_another_origin_cannot_cancel_create_or_upload(browser, running_job, tmp_path, attacker_host):
    server, job_id = running_job
    site = AttackerSite(tmp_path)
    try:
        site.publish("attack.html", attack_page(server.url, job_id))
        results, answered = run_page(browser, f"http://{attacker_host}:{site.port}/attack.html")
    finally:
        site.close()
    # Every request that reached the server was refused by the guard; none was served.
    assert answered, "the attacks never reached the server"
    posts = [(method, url, status) for method, url, status in answered if method == "POST"]
    assert len(posts) == 5 and all(status == 403 for _, _, status in posts), answered
    assert all(status in (403, 405) for _, _, status in answered), answered
    # The page could not read the API either: a cross-origin read is refused or opaque to it.
    assert results["fetch-read"] != 200, results
    assert_untouched(server, job_id)


def test_a_rebound_name_reaches_nothing(browser, running_job, tmp_path):
    server, job_id = running_job
    port = server.url.rsplit(":", 1)[1]
    rebound = f"http://{REBOUND_NAME}:{port}"
    context = browser.new_context()
    try:
        page = context.new_page()
        # The attacker's own server served this page under its name before the DNS flip; the
        # requests it makes afterwards go, by that name, to 127.0.0.1 (the resolver rule).
        page.route(f"{rebound}/", lambda route: route.fulfill(content_type="text/html",
                                                               body="<!doctype html><title>rebound</title>"))
        page.goto(f"{rebound}/")
        statuses = page.evaluate("""async (jobId) => {
            const read = await fetch("/api/jobs");
            const cancel = await fetch(`/api/jobs/${jobId}/cancel`, {method: "POST"});
            return {read: read.status, readBody: await read.text(), cancel: cancel.status,
                    detail: (await cancel.json()).detail};
        }""", job_id)
    finally:
        context.close()
    # Same origin as far as the browser knows: only the Host header gives it away.
    assert statuses["read"] == 421 and statuses["cancel"] == 421, statuses
    assert f"does not answer to Host '{REBOUND_NAME}:{port}'" in statuses["detail"]
    assert '"data"' not in statuses["readBody"]
    assert_untouched(server, job_id)


def test_a_foreign_host_header_is_refused_and_loopback_ones_pass(running_job):
    server, job_id = running_job
    port = server.url.rsplit(":", 1)[1]
    for host in (REBOUND_NAME, f"{REBOUND_NAME}:{port}", "127.0.0.1.attacker.example", "localhost.attacker.example",
                 f"localhost:{port}@{REBOUND_NAME}"):
        read = httpx.get(f"{server.url}/api/jobs", headers={"Host": host})
        assert read.status_code == 421, (host, read.text)
        assert "NEUROLENS_ALLOWED_HOSTS" in read.json()["detail"]
        cancel = httpx.post(f"{server.url}/api/jobs/{job_id}/cancel", headers={"Host": host})
        assert cancel.status_code == 421
        assert httpx.get(f"{server.url}/", headers={"Host": host}).status_code == 421  # the dashboard too
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.0.0.2", "LOCALHOST", "app.localhost"):
        assert httpx.get(f"{server.url}/api/jobs/{job_id}", headers={"Host": host}).status_code == 200, host
    assert_untouched(server, job_id)
