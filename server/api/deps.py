"""Dependencies shared by the routers: the database session, the app's services, trainer auth."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Path, Request

from server.db import SessionDep
from server.exceptions import Unauthorized
from server.housekeeping import DiskUsage
from server.jobs import get_job, hash_token, open_attempt
from server.models import DB_INT_MAX, Attempt, Job
from server.scheduler import Scheduler
from server.settings import Settings
from server.storage import ArtifactStore


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_scheduler(request: Request) -> Scheduler:
    return request.app.state.scheduler


def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


def get_disk(request: Request) -> DiskUsage:
    return request.app.state.disk


# Ids beyond the database's integer range are refused by validation (422), not by a crash.
JobId = Annotated[int, Path(ge=1, le=DB_INT_MAX, description="A job id.")]
ArtifactId = Annotated[int, Path(ge=1, le=DB_INT_MAX, description="An artifact id.")]

SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SchedulerDep = Annotated[Scheduler, Depends(get_scheduler)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
DiskDep = Annotated[DiskUsage, Depends(get_disk)]


def trainer_attempt(job_id: JobId, session: SessionDep,
                    authorization: Annotated[str | None, Header()] = None) -> Attempt:
    """The running attempt whose trainer token the request carries; any other token is refused."""
    get_job(session, job_id)
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(f"Reporting for job {job_id} needs 'Authorization: Bearer <trainer token>'.")
    attempt = open_attempt(session, job_id)
    if attempt is None or not attempt.token_sha256 or not secrets.compare_digest(hash_token(token),
                                                                                 attempt.token_sha256):
        raise Unauthorized(f"This token may not report for job {job_id}.")
    return attempt


def trainer_job(attempt: Annotated[Attempt, Depends(trainer_attempt)], session: SessionDep) -> Job:
    """The job of the running attempt whose trainer token the request carries."""
    return get_job(session, attempt.job_id)


TrainerAttemptDep = Annotated[Attempt, Depends(trainer_attempt)]
TrainerJobDep = Annotated[Job, Depends(trainer_job)]
