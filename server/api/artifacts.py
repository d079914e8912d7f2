"""Artifacts: list, read, download (streamed from disk with length, ETag and Range)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from sqlmodel import func, select

from server.api.deps import ArtifactId, StoreDep
from server.db import SessionDep
from server.exceptions import NotFound
from server.models import DB_INT_MAX, Artifact, ArtifactPublic, ArtifactsPublic
from trainer.protocol import ArtifactKind

router = APIRouter(prefix="/artifacts", tags=["artifacts"])


def get_artifact(session: SessionDep, artifact_id: int) -> Artifact:
    artifact = session.get(Artifact, artifact_id)
    if artifact is None:
        raise NotFound(f"Artifact {artifact_id} not found.")
    return artifact


@router.get("", response_model=ArtifactsPublic)
def list_artifacts(
    session: SessionDep,
    job_id: Annotated[int | None, Query(ge=1, le=DB_INT_MAX)] = None,
    kind: ArtifactKind | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> ArtifactsPublic:
    query = select(Artifact)
    count_query = select(func.count()).select_from(Artifact)
    if job_id is not None:
        query = query.where(Artifact.job_id == job_id)
        count_query = count_query.where(Artifact.job_id == job_id)
    if kind is not None:
        query = query.where(Artifact.kind == kind)
        count_query = count_query.where(Artifact.kind == kind)
    found = session.exec(query.order_by(Artifact.id.desc()).limit(limit)).all()
    return ArtifactsPublic(data=[ArtifactPublic.model_validate(a, from_attributes=True) for a in found],
                           count=session.exec(count_query).one())


@router.get("/{artifact_id}", response_model=ArtifactPublic)
def read_artifact(artifact_id: ArtifactId, session: SessionDep) -> ArtifactPublic:
    return ArtifactPublic.model_validate(get_artifact(session, artifact_id), from_attributes=True)


@router.get("/{artifact_id}/download", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "Partial content"}})
def download_artifact(artifact_id: ArtifactId, session: SessionDep, store: StoreDep) -> FileResponse:
    """The artifact's file, streamed from disk; Range requests resume an interrupted download."""
    artifact = get_artifact(session, artifact_id)
    path = store.path_of(artifact.storage_path)
    if not path.is_file():
        raise NotFound(f"Artifact {artifact_id}'s file is missing from the store.")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=artifact.filename,
        headers={"ETag": f'"{artifact.sha256}"', "X-Checksum-Sha256": artifact.sha256},
    )
