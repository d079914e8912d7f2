"""The FastAPI application: routers, error mapping, dashboard, and the scheduler's lifetime."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlmodel import Session, func, select

from server import __version__
from server.api import artifacts, jobs, system, tus
from server.api_docs import add_api_docs
from server.db import make_engine, upgrade_database
from server.exceptions import NeuroLensServerError
from server.housekeeping import DiskUsage, finish_deletions
from server.jobs import create_job
from server.models import Job, JobCreate
from server.origin_guard import OriginGuardMiddleware, methods_taken
from server.scheduler import Scheduler
from server.security import RequestLimitMiddleware, TokenMiddleware
from server.settings import Settings
from server.storage import ArtifactStore
from trainer.stages import STAGES

log = logging.getLogger("neurolens")

# Found without importing `clients`, whose __init__ loads the HTTP client library (httpx) the
# server has no use for: find_spec locates a top-level package without running it.
DASHBOARD_DIR = Path(importlib.util.find_spec("clients").submodule_search_locations[0]).resolve() / "dashboard"

# The demo pipeline `make run` queues on a fresh data directory, one job per stage in this order:
# real training, a few minutes. Stage 2 has the settings tests/test_stage2.py shows learning with
# (tiny BART from scratch wants a high lr).
DEMO_CONFIGS = {
    "stage1": {"preset": "tiny", "steps": 2000, "checkpoint_every": 250},
    "stage2": {"preset": "tiny", "steps": 2000, "batch_size": 16, "lr": 3e-3, "max_target_tokens": 16,
               "checkpoint_every": 250},
}


class ErrorMessage(BaseModel):
    """Every error this API sends: one sentence naming the problem, or FastAPI's list of field
    errors for a request that fails validation."""

    detail: str | list[dict[str, Any]]


# Documented on every operation, so that a client (and schemathesis) knows each error's shape.
# The schema is inline (not a model) so that it stays JSON on routes whose success is text.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"schema": ErrorMessage.model_json_schema()}}}
    for code, text in {
        400: "Malformed header (Range, Content-Length)", 401: "Token missing or wrong",
        403: "A change (or an /api read) a browser marks as sent from another site or origin",
        404: "No such job, artifact or upload",
        409: "The request does not fit the resource's state", 413: "Body over the request or upload limit",
        415: "A body of another type than the operation takes (JSON; raw bytes for uploads)",
        421: "A Host header this server does not answer to (DNS rebinding)",
        422: "Invalid value: the detail names it and what is allowed", 507: "Not enough free disk on the server",
    }.items()}
# A request HTTP itself cannot parse (a malformed Content-Length) is refused by uvicorn, in text.
ERROR_RESPONSES[400]["content"]["text/plain"] = {"schema": {"type": "string"}}


def api_router() -> APIRouter:
    router = APIRouter(prefix="/api", responses=ERROR_RESPONSES)
    router.include_router(system.router)
    router.include_router(jobs.router)
    router.include_router(artifacts.router)
    router.include_router(tus.router)
    return router


def queue_demo(engine) -> None:
    """Queue the demo pipeline on synthetic EEG, once: only into an empty database. A stage that
    needs an encoder runs after the job before it."""
    with Session(engine) as session:
        if session.exec(select(func.count()).select_from(Job)).one():
            return
        queued: list[Job] = []
        for stage, config in DEMO_CONFIGS.items():
            after = queued[-1].id if STAGES[stage].needs_encoder else None
            queued.append(create_job(session, JobCreate(stage=stage, dataset="synthetic", config=config, after=after)))
        log.info("demo queued: %s", ", then ".join(f"{job.stage} job {job.id}" for job in queued))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    settings.check_exposure()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.resolved_database_url
        upgrade_database(url)
        engine = make_engine(url)
        store = ArtifactStore(settings.artifacts_dir)
        finish_deletions(engine, settings.jobs_dir, store)  # those a stop cut short, before anything reads
        app.state.disk = DiskUsage(settings.data_dir, settings.jobs_dir, store)
        scheduler = Scheduler(settings, engine, store)
        app.state.settings, app.state.engine, app.state.store, app.state.scheduler = settings, engine, store, scheduler
        if settings.demo:
            queue_demo(engine)
        scheduler.start()
        log.info("NeuroLens %s serving %s with data in %s", __version__, settings.public_url,
                 settings.data_dir.resolve())
        try:
            yield
        finally:
            scheduler.shutdown()
            engine.dispose()

    app = FastAPI(
        title="NeuroLens",
        version=__version__,
        summary="Checkpointing job server for two-stage EEG-to-text training.",
        lifespan=lifespan,
        docs_url=None,  # served by add_api_docs, without a CDN
        redoc_url=None,  # see server/api_docs.py
    )

    @app.exception_handler(NeuroLensServerError)
    async def _known_error(_request: Request, exc: NeuroLensServerError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status_code)

    @app.exception_handler(405)
    async def _method_not_allowed(request: Request, _exc: Exception) -> JSONResponse:
        # Starlette's Allow names the methods of the first route on the path only; a path such
        # as /api/jobs has one route per method.
        allowed = methods_taken(app.router, request.scope)
        if not allowed and request.url.path.startswith("/api/"):
            # Only the dashboard's static Mount answered: no endpoint lives at this path.
            return JSONResponse({"detail": f"No endpoint {request.url.path}; the API is listed at /docs."},
                                status_code=404)
        if not allowed:
            allowed = ["GET", "HEAD"]  # a dashboard file
        return JSONResponse({"detail": f"Method {request.method} not allowed here; use {', '.join(allowed)}."},
                            status_code=405, headers={"Allow": ", ".join(allowed)})

    app.add_middleware(RequestLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(TokenMiddleware, token=settings.token)
    # Outermost: a foreign page or Host is refused before anything else looks at the request.
    app.add_middleware(OriginGuardMiddleware, bind_host=settings.host, allowed_hosts=settings.allowed_host_names,
                       router=app.router)
    app.include_router(api_router())
    add_api_docs(app)
    if DASHBOARD_DIR.is_dir():
        app.mount("/", StaticFiles(directory=DASHBOARD_DIR, html=True), name="dashboard")
    return app


def serve(settings: Settings) -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Access logs are off by default: heartbeats and dashboard polls would bury everything else.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                access_log=settings.access_log)
