"""The API page, /docs, in a real Chromium with the network beyond the server cut off.

FastAPI's default page loads Swagger UI from a CDN and shows nothing offline. Here every request
the page makes to any other host is aborted (and recorded), so the page must list the API's
operations from this server's files alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import RunningServer

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install -e '.[test]')")
from tests.test_dashboard_browser import DESKTOP, PHONE, launch_chromium, shoot  # noqa: E402  (skips without chromium)


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    yield from launch_chromium()


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_docs_lists_the_operations_with_everything_outside_the_server_blocked(
        server: RunningServer, browser: sync_api.Browser, viewport: dict) -> None:
    own_host = urlsplit(server.url).netloc
    blocked: list[str] = []
    errors: list[str] = []
    page = browser.new_page(viewport=viewport)

    def only_this_server(route: sync_api.Route) -> None:
        if urlsplit(route.request.url).netloc == own_host:
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_this_server)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(f"{server.url}/docs")
    page.wait_for_selector(".opblock", timeout=15_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert "/api/jobs/{job_id}" in paths and "/api/artifacts" in paths and len(paths) >= 10, paths
    assert blocked == [] and errors == []
    width = page.evaluate("document.documentElement.scrollWidth")
    shoot(page, f"docs-{viewport['width']}.png")
    assert width <= viewport["width"], f"/docs is {width} px wide in a {viewport['width']} px window"
    page.close()


def test_docs_names_no_other_host(server: RunningServer) -> None:
    page = httpx.get(f"{server.url}/docs").text
    assert "https://" not in page and "/docs-assets/swagger-ui-bundle.js" in page
    assert httpx.get(f"{server.url}/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert httpx.get(f"{server.url}/redoc").status_code == 404
