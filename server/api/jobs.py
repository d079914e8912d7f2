"""Jobs: create, read, stop; and the trainer's side (events, artifact registration)."""

from __future__ import annotations

import hashlib
from typing import Annotated

import psutil
from fastapi import APIRouter, Header, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field
from sqlmodel import func, select

from server import jobs as job_rules
from server import housekeeping
from server.api.deps import DiskDep, JobId, SchedulerDep, SettingsDep, StoreDep, TrainerAttemptDep, TrainerJobDep
from server.artifacts import add_artifact
from server.db import SessionDep
from server.exceptions import InvalidInput, NotFound
from server.models import (
    DB_INT_MAX, ArtifactPublic, Job, JobCreate, JobEvent, JobEventsPublic, JobPublic, JobsPublic, JobStatus,
)
from server.storage import StorageError, resolve_inside, sha256_of
from trainer.artifact_format import CHECKPOINT_DIRNAME, FINAL_DIRNAME, registered_filename
from trainer.config import ConfigError
from trainer.protocol import LOG_FILENAME, ArtifactRegistration, EventReply, TrainerEvent
from trainer.stages import STAGES, get_stage

router = APIRouter(prefix="/jobs", tags=["jobs"])

# The folders of a job directory whose files a trainer may register as artifacts.
REGISTRABLE_DIRS = (CHECKPOINT_DIRNAME, FINAL_DIRNAME)


def etag_of(job: Job) -> str:
    return f'"job-{job.id}-v{job.version}"'


def with_disk(disk: DiskDep, job: Job, public: JobPublic) -> JobPublic:
    """The public job with its ``disk_bytes`` (cached: see server.housekeeping.DiskUsage)."""
    public.disk_bytes = disk.job_bytes(job.id, job.version, [a.id for a in public.artifacts],
                                       running=job.status == JobStatus.running)
    return public


@router.post("", status_code=201, response_model=JobPublic)
def create_job(body: JobCreate, session: SessionDep, scheduler: SchedulerDep, settings: SettingsDep,
               store: StoreDep) -> JobPublic:
    limit = settings.memory_budget_bytes or psutil.virtual_memory().total
    job = job_rules.create_job(session, body, memory_limit_bytes=limit,
                               artifact_path=lambda artifact: store.path_of(artifact.storage_path),
                               dataset_roots=settings.dataset_root_paths,
                               dataset_check_timeout_s=settings.dataset_check_timeout_s)
    scheduler.wake()
    return job_rules.to_public(session, job)


def list_etag_of(found: list[Job], count: int, query: str) -> str:
    """One tag for a whole listing: it changes when any listed job changes or a job is added."""
    versions = ",".join(f"{job.id}:{job.version}" for job in found)
    return '"jobs-' + hashlib.sha256(f"{query}|{count}|{versions}".encode()).hexdigest()[:32] + '"'


@router.get("", response_model=JobsPublic, responses={304: {"description": "Unchanged since the ETag given"}})
def list_jobs(
    session: SessionDep,
    response: Response,
    scheduler: SchedulerDep,
    disk: DiskDep,
    status: JobStatus | None = None,
    stage: Annotated[str | None, Query(json_schema_extra={"enum": list(STAGES)})] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    offset: Annotated[int, Query(ge=0, le=DB_INT_MAX, description="Jobs to skip (paging); `count` is all that match.")] = 0,
    if_none_match: Annotated[str | None, Header()] = None,
):
    query = select(Job).where(Job.deleting_at.is_(None))
    count_query = select(func.count()).select_from(Job).where(Job.deleting_at.is_(None))
    if status is not None:
        query = query.where(Job.status == status)
        count_query = count_query.where(Job.status == status)
    if stage is not None:
        try:
            get_stage(stage)
        except ConfigError as exc:
            raise InvalidInput(str(exc)) from exc
        query = query.where(Job.stage == stage)
        count_query = count_query.where(Job.stage == stage)
    found = session.exec(query.order_by(Job.id.desc()).offset(offset).limit(limit)).all()
    count = session.exec(count_query).one()
    # The dashboard polls this every few seconds for hours; an unchanged listing costs one small
    # query and a 304 instead of every job with its artifacts.
    kept = [job.id for job in found if scheduler.backlog.has(job.id)]
    etag = list_etag_of(found, count, f"{status}|{stage}|{limit}|{offset}|{kept}")
    if if_none_match and etag in [tag.strip() for tag in if_none_match.split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    response.headers["ETag"] = etag
    return JobsPublic(data=[scheduler.backlog.show(with_disk(disk, job, public))
                            for job, public in zip(found, job_rules.to_public_many(session, found))], count=count)


@router.get("/{job_id}", response_model=JobPublic, responses={304: {"description": "Unchanged since the ETag given"}})
def read_job(job_id: JobId, session: SessionDep, response: Response, scheduler: SchedulerDep, disk: DiskDep,
             if_none_match: Annotated[str | None, Header()] = None):
    job = job_rules.get_job(session, job_id)
    # Events the database has not taken yet (a full disk) change what the job shows.
    etag = etag_of(job)[:-1] + ('-kept"' if scheduler.backlog.has(job.id) else '"')
    if if_none_match and etag in [tag.strip() for tag in if_none_match.split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    response.headers["ETag"] = etag
    return scheduler.backlog.show(with_disk(disk, job, job_rules.to_public(session, job)))


class Deleted(BaseModel):
    deleted: int = Field(description="The id deleted.")
    freed_bytes: int = Field(description="Disk bytes the deletion freed (a file still linked elsewhere frees none).")
    kept_artifacts: list[int] = Field(default_factory=list, description="Artifacts of the job kept because other "
                                                                        "jobs use them; they now have no job.")
    message: str = Field(description="What was deleted and kept, in words.")


@router.delete("/{job_id}", response_model=Deleted)
def delete_job(job_id: JobId, session: SessionDep, settings: SettingsDep, store: StoreDep, disk: DiskDep) -> Deleted:
    """Delete a job that is not queued or running (409 names what stops it): its directory,
    events and attempts, and its artifacts but those other jobs use (kept, without a job)."""
    answer = housekeeping.delete_job(session, job_rules.get_job(session, job_id), settings.jobs_dir, store)
    disk.forget(job_id)
    return Deleted(**answer)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: JobId, session: SessionDep, scheduler: SchedulerDep) -> JobPublic:
    job = job_rules.request_stop(session, job_rules.get_job(session, job_id), "cancel")
    scheduler.wake()
    return job_rules.to_public(session, job)


@router.post("/{job_id}/pause", response_model=JobPublic)
def pause_job(job_id: JobId, session: SessionDep) -> JobPublic:
    job = job_rules.request_stop(session, job_rules.get_job(session, job_id), "pause")
    return job_rules.to_public(session, job)


@router.post("/{job_id}/resume", response_model=JobPublic)
def resume_job(job_id: JobId, session: SessionDep, scheduler: SchedulerDep) -> JobPublic:
    job = job_rules.resume(session, job_rules.get_job(session, job_id))
    scheduler.wake()
    return job_rules.to_public(session, job)


@router.post("/{job_id}/retry", response_model=JobPublic)
def retry_job(job_id: JobId, session: SessionDep, scheduler: SchedulerDep) -> JobPublic:
    """Queue a failed or cancelled job again: it resumes from its newest checkpoint, with a fresh retry budget."""
    job = job_rules.retry(session, job_rules.get_job(session, job_id))
    scheduler.wake()
    return job_rules.to_public(session, job)


@router.get("/{job_id}/events", response_model=JobEventsPublic)
def list_events(
    job_id: JobId,
    session: SessionDep,
    after_id: Annotated[int, Query(ge=0, le=DB_INT_MAX, description="Only events with a larger id.")] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> JobEventsPublic:
    """A job's events oldest first, a page at a time: ``count`` is all of them after ``after_id``,
    so a reader whose page holds fewer knows to ask again from the page's last id."""
    job_rules.get_job(session, job_id)
    where = (JobEvent.job_id == job_id, JobEvent.id > after_id)
    events = session.exec(select(JobEvent).where(*where).order_by(JobEvent.id).limit(limit)).all()
    return JobEventsPublic(data=events, count=session.exec(select(func.count()).select_from(JobEvent).where(*where)).one())


LOG_CHUNK_MAX = 1024**2
"""Most bytes one ``offset`` read of a log returns; a follower asks again from where it ended."""


@router.get("/{job_id}/logs", response_class=PlainTextResponse,
            responses={200: {"headers": {"X-Log-Size": {"description": "The log's size in bytes now",
                                                        "schema": {"type": "integer"}}}}})
def read_logs(job_id: JobId, session: SessionDep, settings: SettingsDep,
              tail_bytes: Annotated[int, Query(ge=1, le=16 * 1024**2)] = 65536,
              offset: Annotated[int | None, Query(ge=0, le=DB_INT_MAX, description=(
                  "Return the log's raw bytes from this byte on (at most 1 MiB) instead of its end: "
                  "a follower passes the X-Log-Size of its last read"))] = None) -> Response:
    """The end of a job's trainer log, or (with ``offset``) its bytes from there on.

    ``X-Log-Size`` is the log's size when read, so that ``offset=<that>`` continues exactly
    where this read ended, whatever a byte range cut through (the bytes are sent undecoded).
    """
    job_rules.get_job(session, job_id)
    path = settings.jobs_dir / str(job_id) / LOG_FILENAME
    if not path.exists():
        return PlainTextResponse("", headers={"X-Log-Size": "0"})
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if offset is None:
            fh.seek(max(size - tail_bytes, 0))
            body = fh.read().decode("utf-8", errors="replace").encode()
        else:
            fh.seek(min(offset, size))
            body = fh.read(LOG_CHUNK_MAX)
            size = min(offset, size) + len(body)
    return Response(body, media_type="text/plain; charset=utf-8", headers={"X-Log-Size": str(size)})


# --- The trainer's side: authenticated by the job's own token ---------------------------


@router.post("/{job_id}/events", response_model=EventReply, tags=["trainer"])
def post_event(event: TrainerEvent, job: TrainerJobDep, attempt: TrainerAttemptDep, session: SessionDep,
               scheduler: SchedulerDep, settings: SettingsDep) -> EventReply:
    """A progress report (also the heartbeat); the reply carries a pending stop request."""
    stop = job_rules.report_event(session, scheduler.backlog, job, attempt, event,
                                  reported_rss_is_ground_truth=not scheduler.executor.measures_memory,
                                  max_progress_events=settings.max_progress_events)
    return EventReply(stop=stop)


@router.post("/{job_id}/artifacts/register", status_code=201, response_model=ArtifactPublic, tags=["trainer"])
async def register_artifact(registration: ArtifactRegistration, job: TrainerJobDep, session: SessionDep,
                            settings: SettingsDep, store: StoreDep) -> ArtifactPublic:
    """Add a file the trainer wrote in its job directory to the artifact store."""
    job_dir = settings.jobs_dir / str(job.id)
    try:
        source = resolve_inside(job_dir, registration.path)
    except StorageError as exc:
        raise InvalidInput(str(exc)) from exc
    # Only what training produces: spec.json holds the job's token and the log the machine's
    # paths, and a registered file can be downloaded by anyone who may read artifacts. Checked on
    # the resolved path, so a link placed in checkpoints/ pointing at spec.json is refused too.
    allowed = [(job_dir / name).resolve() for name in REGISTRABLE_DIRS]
    if not any(folder in source.parents for folder in allowed):
        raise InvalidInput(f"A trainer may register only files under {' or '.join(n + '/' for n in REGISTRABLE_DIRS)} "
                           f"of its job directory, not {registration.path!r}.")
    if not source.is_file():
        raise NotFound(f"File {registration.path!r} not found in job {job.id}'s directory.")
    # Hashing and copying a large checkpoint take seconds: keep them off the event loop.
    sha256, size = await run_in_threadpool(sha256_of, source)
    filename = registered_filename(source.relative_to(job_dir.resolve()).as_posix())
    return await run_in_threadpool(add_artifact, session, store, source, registration.kind, filename, sha256, size,
                                   job=job)
