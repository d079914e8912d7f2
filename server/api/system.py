"""Health, machine resources and the presets a job may name."""

from __future__ import annotations

import os

import psutil
from fastapi import APIRouter
from sqlmodel import func, select

from server import __version__
from server.api.deps import DiskDep, SettingsDep
from server.db import SessionDep
from server.gpus import list_gpus
from server.models import Job, JobStatus
from trainer.config import config_fields
from trainer.stages import STAGES

router = APIRouter(tags=["system"])


@router.get("/health")
def health() -> dict:
    return {"status": "ok", "version": __version__}


@router.get("/system")
def system(session: SessionDep, disk: DiskDep, settings: SettingsDep) -> dict:
    """The machine (memory, CPUs, GPUs, disk), the jobs by status and the executor running them."""
    memory = psutil.virtual_memory()
    by_status = dict(session.exec(select(Job.status, func.count()).where(Job.deleting_at.is_(None))
                                  .group_by(Job.status)).all())

    def count(status: JobStatus) -> int:
        return by_status.get(status, 0)

    return {
        "memory_total_bytes": memory.total,
        "memory_available_bytes": memory.available,
        "cpu_count": os.cpu_count(),
        "gpus": [{"index": g.index, "name": g.name, "memory_total_bytes": g.total_bytes,
                  "memory_used_bytes": g.used_bytes} for g in list_gpus()],
        "running_jobs": count(JobStatus.running),
        "queued_jobs": count(JobStatus.queued),
        "jobs_by_status": {status.value: count(status) for status in JobStatus},
        "executor": settings.executor,
        "disk": disk.totals(),
        "version": __version__,
    }


@router.get("/presets")
def presets() -> dict:
    """Each registered stage (:mod:`trainer.stages`): its presets, config fields, what it is, what
    a job of it starts from and what it produces; for forms and clients."""
    return {
        stage.name: {
            "presets": list(stage.presets), "fields": config_fields(stage.config), "title": stage.title,
            "description": stage.description, "needs_encoder": stage.needs_encoder, "resumable": stage.resumable,
            "produces": list(stage.produces),
        }
        for stage in STAGES.values()
    }
