"""The dashboard: served by the server at /, self-contained, and wired to its own markup."""

from __future__ import annotations

import re
from pathlib import Path

import clients
from tests.conftest import RunningServer

DASHBOARD = Path(clients.__file__).parent / "dashboard"
FILES = ("index.html", "app.js", "charts.js", "verdict.js", "style.css")


def test_server_serves_the_dashboard(server: RunningServer) -> None:
    with server.client() as http:
        index = http.get("/")
        assert index.status_code == 200 and "text/html" in index.headers["content-type"]
        assert 'data-testid="jobs-table"' in index.text
        for name in FILES[1:]:
            response = http.get(f"/{name}")
            assert response.status_code == 200, name
            assert response.content == (DASHBOARD / name).read_bytes()


def test_no_network_at_run_time() -> None:
    # No CDN, fonts or absolute API hosts: the page must work offline and behind a path prefix.
    for name in FILES:
        # The SVG namespace is a name that createElementNS needs, never fetched.
        text = (DASHBOARD / name).read_text().replace('"http://www.w3.org/2000/svg"', "")
        assert not re.search(r"https?://", text), f"{name} refers to a remote URL"
        assert "fetch(\"/" not in text and "fetch('/" not in text, f"{name} uses an absolute API path"
    html = (DASHBOARD / "index.html").read_text()
    assert 'href="style.css"' in html
    for name in FILES[1:-1]:
        assert re.search(rf'<script src="{name}"', html), f"index.html does not load {name}"


def test_scripts_only_query_test_ids_and_ids_that_exist() -> None:
    html = (DASHBOARD / "index.html").read_text()
    script = (DASHBOARD / "app.js").read_text()
    for testid in re.findall(r'\[data-testid="([\w-]+)"\]', script):
        assert f'data-testid="{testid}"' in html, f"app.js looks for data-testid={testid!r}, not in index.html"
    for element_id in re.findall(r'getElementById\("([\w-]+)"\)', script):
        assert f'id="{element_id}"' in html, f"app.js looks for #{element_id}, not in index.html"


def test_every_form_field_has_a_label_and_an_error_slot() -> None:
    html = (DASHBOARD / "index.html").read_text()
    for stage, fields in (("stage1", ("dataset", "preset", "steps")),
                          ("stage2", ("after", "encoder_artifact", "dataset", "preset", "steps"))):
        for field in fields:
            assert f'<label for="{stage}-{field}">' in html, f"{stage}-{field} has no label"
            assert f'id="{stage}-{field}-error"' in html, f"{stage}-{field} has no error slot"
        assert f'data-testid="{stage}-submit"' in html


def test_the_jobs_listing_answers_304_until_a_job_changes(server: RunningServer) -> None:
    # The dashboard polls GET /api/jobs every two seconds for hours; unchanged, it must be cheap.
    with server.client() as http:
        first = http.get("/api/jobs")
        etag = first.headers["etag"]
        again = http.get("/api/jobs", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.headers["etag"] == etag and again.content == b""
        # Another filter is another listing, with its own tag.
        assert http.get("/api/jobs", params={"stage": "stage1"}).headers["etag"] != etag

        job = http.post("/api/jobs", json={"stage": "stage1", "dataset": "synthetic",
                                           "config": {"preset": "tiny", "steps": 100000}}).json()
        try:
            changed = http.get("/api/jobs", headers={"If-None-Match": etag})
            assert changed.status_code == 200 and changed.json()["count"] == 1
            etag = changed.headers["etag"]
            assert http.get("/api/jobs", headers={"If-None-Match": etag}).status_code in (200, 304)
        finally:
            http.post(f"/api/jobs/{job['id']}/cancel")
        # A status change of a listed job changes the tag too.
        server.wait_for_job(job["id"], {"cancelled"})
        assert http.get("/api/jobs", headers={"If-None-Match": etag}).status_code == 200
