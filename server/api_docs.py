"""The API's own page, ``/docs`` (Swagger UI), from files inside an installed package.

FastAPI's default page loads its scripts from a CDN, which leaves an offline laptop or a cluster
node with a blank page. The package ``fastapi-offline`` ships them (Swagger UI 5, which reads
OpenAPI 3.1); only its files are used here, served by this server. ReDoc is not offered: its
script still fetches its logo from redoc.ly, and one API page is enough.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"
ASSETS_DIR = files("fastapi_offline") / "static"


def add_api_docs(app: FastAPI) -> None:
    """Serve ``/docs`` and its assets; call before the dashboard's catch-all mount."""
    app.mount(ASSETS, StaticFiles(directory=str(ASSETS_DIR)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} API",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS}/favicon.png")
