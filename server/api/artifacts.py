"""Artifacts: list, read, download (Range, ETag, digest), and upload (import), resumable.

Download: ``GET /api/artifacts/{id}/download`` streams the file from disk in 1 MB reads with
``Content-Length``, ``Accept-Ranges: bytes``, a strong ``ETag`` (the sha256), ``Repr-Digest``
(RFC 9530) and ``X-Checksum-Sha256``; ``Range`` gives 206 (416 when unsatisfiable) and
``If-Range`` with a stale ETag gives the whole file again.

Upload, in one request: ``POST /api/artifacts?kind=encoder&sha256=<hex>[&filename=...]`` with the
raw file as the body. Verified and stored, it answers 201 with the artifact; any failure, a
dropped connection included, leaves nothing behind.

Upload, resumable (the same checks at the end)::

    POST   /api/artifacts/uploads          {"kind", "sha256", "size_bytes", "filename"} -> 201 session
    GET    /api/artifacts/uploads?sha256=  open sessions (find one to resume after a crash)
    GET    /api/artifacts/uploads/{uid}    the session; "offset" = bytes received so far
    PATCH  /api/artifacts/uploads/{uid}    body = bytes from header Upload-Offset on -> session
    POST   /api/artifacts/uploads/{uid}/complete   verify, store -> 201 artifact
    DELETE /api/artifacts/uploads/{uid}    abandon -> 204

The same sessions speak tus 1.0 at ``/api/tus`` (:mod:`server.api.tus`).
"""

from __future__ import annotations

import base64
import hashlib
import threading
from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field
from sqlmodel import func, select
from starlette.concurrency import run_in_threadpool
from starlette.convertors import StringConvertor, register_url_convertor
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from server import housekeeping
from server import jobs as job_rules
from server.api.deps import ArtifactId, DiskDep, SettingsDep, StoreDep
from server.artifacts import add_artifact, check_filename, check_sha256, check_size, verify
from server.db import SessionDep
from server.exceptions import Conflict, InvalidInput, NotFound, PayloadTooLarge
from server.models import DB_INT_MAX, Artifact, ArtifactPublic, ArtifactsPublic
from server.uploads import UploadSession, UploadStore, raise_if_disk_full, write_stream
from trainer.protocol import ArtifactKind

router = APIRouter(prefix="/artifacts", tags=["artifacts"])

# Documented in the schema only: check_sha256 enforces it with a message of our own (and
# lower-cases the digest).
SHA256_SCHEMA = {"pattern": r"^[0-9a-fA-F]{64}$"}

BINARY_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
ERRORS = {
    404: {"description": "No such artifact or upload"},
    409: {"description": "Upload-Offset differs from the bytes received, or the upload is incomplete"},
    413: {"description": "Larger than the declared size or the server's upload limit"},
    422: {"description": "Bad parameters, or the bytes fail verification (length, sha256, content)"},
}


class ArtifactFileResponse(FileResponse):
    """Starlette's file response with larger reads and JSON bodies for range errors."""

    # Starlette reads 64 KB at a time; 1 MB reads cost far fewer thread hops per GB and still
    # keep the server's memory flat whatever the file size.
    chunk_size = 4 << 20

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Starlette answers a bad Range with a bare text body; every error of this API is JSON
        # with a detail that names the problem, so check the range first, the same way.
        headers = Headers(scope=scope)
        http_range, if_range = headers.get("range"), headers.get("if-range")
        if http_range is not None and self.stat_result is not None and \
                (if_range is None or self._should_use_range(if_range)):
            size = self.stat_result.st_size
            error: JSONResponse | None = None
            try:
                self._parse_range_header(http_range, size)
            except MalformedRangeHeader as exc:
                error = JSONResponse({"detail": f"Malformed Range header {http_range!r}: {exc.content}"}, 400)
            except RangeNotSatisfiable:
                error = JSONResponse({"detail": f"Range {http_range!r} is not satisfiable: the file has {size} bytes."},
                                     416, headers={"Content-Range": f"bytes */{size}"})
            if error is not None:
                return await error(scope, receive, send)
        await super().__call__(scope, receive, send)


class UploadCreate(BaseModel):
    """Body of ``POST /api/artifacts/uploads``."""

    kind: ArtifactKind = Field(description="encoder, checkpoint, model or report.")
    sha256: str = Field(description="Hex sha256 the complete file must have.", json_schema_extra=SHA256_SCHEMA)
    size_bytes: int = Field(ge=0, le=DB_INT_MAX, strict=True, description="Length of the complete file in bytes (at most the "
                                                              "server's NEUROLENS_MAX_UPLOAD_BYTES).")
    filename: str | None = Field(None, description="Stored file name; defaults to the kind's usual name.")


class ArtifactDeleted(BaseModel):
    deleted: int = Field(description="The artifact id deleted.")
    freed_bytes: int = Field(description="Disk bytes freed: 0 when its job's directory still holds the file "
                                         "(a hard link).")
    message: str = Field(description="What was deleted, in words.")


class UploadPublic(BaseModel):
    id: str
    kind: ArtifactKind
    sha256: str
    size_bytes: int
    filename: str
    offset: int = Field(description="Bytes received so far; the next PATCH starts here.")
    created_at: datetime


class UploadsPublic(BaseModel):
    data: list[UploadPublic]
    count: int


_uploads_lock = threading.Lock()


def get_uploads(request: Request) -> UploadStore:
    """The app's upload store, made on first use beside the artifact store."""
    state = request.app.state
    # Sync routes run in worker threads: two first requests must not build two stores (the
    # second would clear the first's one-shot temporaries as crash leftovers).
    with _uploads_lock:
        if getattr(state, "uploads", None) is None:
            state.uploads = UploadStore(state.store.root, state.settings.upload_expiry_s)
    return state.uploads


def get_artifact(session: SessionDep, artifact_id: int) -> Artifact:
    return job_rules.get_artifact(session, artifact_id)


def _public_upload(upload: UploadSession) -> UploadPublic:
    fields = upload.public()
    fields["created_at"] = datetime.fromtimestamp(upload.created_at, timezone.utc)
    return UploadPublic(**fields)


def _declared_length(content_length: str | None) -> int | None:
    if content_length is None:
        return None
    try:
        return int(content_length)
    except ValueError:
        raise InvalidInput(f"Invalid Content-Length {content_length!r}.") from None


# -- uploads (declared before /{artifact_id} so that "uploads" is never read as an id) ----------

@router.post("/uploads", status_code=201, response_model=UploadPublic, responses=ERRORS)
def create_upload(body: UploadCreate, settings: SettingsDep, request: Request) -> UploadPublic:
    """Open a resumable upload: declare the file's kind, sha256 and size, then PATCH its bytes."""
    uploads = get_uploads(request)
    sha256 = check_sha256(body.sha256)
    filename = check_filename(body.filename, body.kind)
    size = check_size(body.size_bytes, settings.max_upload_bytes)
    return _public_upload(uploads.create(body.kind, sha256, size, filename))


@router.get("/uploads", response_model=UploadsPublic)
def list_uploads(
    request: Request,
    sha256: Annotated[str | None, Query(json_schema_extra=SHA256_SCHEMA, description="Only uploads of this file.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=DB_INT_MAX, description="Uploads to skip (paging).")] = 0,
) -> UploadsPublic:
    """Unfinished uploads, oldest first, a page at a time (``count`` is all of them);
    ``sha256`` finds the one to resume for a given file."""
    found, count = get_uploads(request).list(check_sha256(sha256) if sha256 is not None else None, limit, offset)
    return UploadsPublic(data=[_public_upload(s) for s in found], count=count)


@router.get("/uploads/{upload_id}", response_model=UploadPublic, responses=ERRORS)
def read_upload(upload_id: str, request: Request, response: Response) -> UploadPublic:
    """One upload; ``offset`` (also the ``Upload-Offset`` header) is where to continue."""
    upload = get_uploads(request).get(upload_id)
    response.headers["Upload-Offset"] = str(upload.offset)
    return _public_upload(upload)


@router.patch("/uploads/{upload_id}", response_model=UploadPublic, responses=ERRORS, openapi_extra=BINARY_BODY)
async def append_upload(
    upload_id: str, request: Request, response: Response,
    upload_offset: Annotated[int, Header(ge=0, le=DB_INT_MAX, description="Bytes already received: the session's offset.")],
    content_length: Annotated[str | None, Header()] = None,
) -> UploadPublic:
    """Append the body at ``Upload-Offset``. Bytes received before a dropped connection are kept."""
    uploads = get_uploads(request)
    upload = uploads.get(upload_id)
    declared = _declared_length(content_length)
    if declared is not None and upload_offset == upload.offset and upload_offset + declared > upload.size_bytes:
        raise PayloadTooLarge(f"Upload {upload_id} declared {upload.size_bytes} bytes; {declared} more from offset "
                              f"{upload_offset} would go past it.")
    try:
        offset = await uploads.append(upload, upload_offset, request.stream())
    except ClientDisconnect:
        # Nobody is left to answer; what arrived is on disk and is the offset to resume from.
        return _public_upload(uploads.get(upload_id))
    upload.offset = offset
    response.headers["Upload-Offset"] = str(offset)
    return _public_upload(upload)


@router.post("/uploads/{upload_id}/complete", status_code=201, response_model=ArtifactPublic, responses=ERRORS)
async def complete_upload(upload_id: str, request: Request, session: SessionDep,
                          store: StoreDep) -> ArtifactPublic:
    """Verify the received file (length, sha256, content) and store it as an artifact.

    A file that fails verification is deleted with its session: its bytes are known to be wrong,
    so there is nothing to resume.
    """
    return await finish_upload(get_uploads(request), upload_id, session, store)


async def finish_upload(uploads: UploadStore, upload_id: str, session: SessionDep, store: StoreDep) -> ArtifactPublic:
    """Verify a session's complete file and adopt it as an artifact; shared with tus's last PATCH."""
    upload = uploads.get(upload_id)
    if upload_id in uploads.busy:
        raise Conflict(f"Upload {upload_id} is still receiving data.")
    if upload.offset < upload.size_bytes:
        raise Conflict(f"Upload {upload_id} has {upload.offset} of {upload.size_bytes} bytes; "
                       f"send the rest (PATCH from Upload-Offset: {upload.offset}) first.")
    uploads.busy.add(upload_id)
    try:
        path = uploads.data_path(upload_id)
        try:
            sha256, size = await verify(path, upload.kind, upload.sha256, upload.size_bytes,
                                        received=uploads.received_digest(upload))
        except InvalidInput:
            uploads.discard(upload_id)
            raise
        artifact = await run_in_threadpool(add_artifact, session, store, path, upload.kind, upload.filename,
                                           sha256, size, move=True)
        uploads.discard(upload_id)
        return artifact
    finally:
        uploads.busy.discard(upload_id)


@router.delete("/uploads/{upload_id}", status_code=204, responses=ERRORS)
def delete_upload(upload_id: str, request: Request) -> Response:
    """Abandon an upload and delete what it received."""
    uploads = get_uploads(request)
    uploads.get(upload_id)  # 404 for an unknown id
    uploads.discard(upload_id)
    return Response(status_code=204)


@router.post("", status_code=201, response_model=ArtifactPublic, responses=ERRORS, openapi_extra=BINARY_BODY)
async def upload_artifact(
    request: Request, session: SessionDep, store: StoreDep, settings: SettingsDep,
    kind: Annotated[ArtifactKind, Query(description="encoder, checkpoint, model or report.")],
    sha256: Annotated[str, Query(json_schema_extra=SHA256_SCHEMA, description="Hex sha256 the file must have.")],
    filename: Annotated[str | None, Query(description="Stored file name.")] = None,
    content_length: Annotated[str | None, Header()] = None,
) -> ArtifactPublic:
    """Import a file in one request (body = the file). Nothing is kept unless every check passes.

    For large files over unreliable links use the resumable ``/api/artifacts/uploads`` instead.
    """
    digest = check_sha256(sha256)
    name = check_filename(filename, kind)
    declared = _declared_length(content_length)
    uploads = get_uploads(request)
    if declared is not None:  # refused before a single byte is read
        check_size(declared, settings.max_upload_bytes)
        uploads.check_room(declared)
    path = uploads.oneshot_path()
    hasher = hashlib.sha256()
    try:
        with open(path, "wb") as fh:
            limit = settings.max_upload_bytes
            try:
                received = await write_stream(fh, request.stream(), limit, lambda: PayloadTooLarge(
                    f"Upload exceeds this server's limit of {limit} bytes (NEUROLENS_MAX_UPLOAD_BYTES)."),
                    hashers=(hasher,))
            except ClientDisconnect:
                raise InvalidInput("Upload interrupted: the connection closed before the whole body arrived; "
                                   "nothing was stored.") from None
        sha, size = await verify(path, kind, digest, declared, received=(hasher.hexdigest(), received))
        return await run_in_threadpool(add_artifact, session, store, path, kind, name, sha, size, move=True)
    except OSError as exc:  # a full disk is the server's condition (507), not a crash
        raise_if_disk_full(exc, "uploaded file")
        raise
    finally:
        path.unlink(missing_ok=True)


# -- artifacts --------------------------------------------------------------------------------

@router.get("", response_model=ArtifactsPublic)
def list_artifacts(
    session: SessionDep,
    job_id: Annotated[int | None, Query(ge=1, le=DB_INT_MAX)] = None,
    kind: ArtifactKind | None = None,
    sha256: Annotated[str | None, Query(json_schema_extra=SHA256_SCHEMA,
                                        description="Only artifacts with this content.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
    offset: Annotated[int, Query(ge=0, le=DB_INT_MAX, description="Artifacts to skip (paging); `count` is all that match.")] = 0,
) -> ArtifactsPublic:
    query = select(Artifact).where(Artifact.deleting_at.is_(None))
    count_query = select(func.count()).select_from(Artifact).where(Artifact.deleting_at.is_(None))
    if job_id is not None:
        query = query.where(Artifact.job_id == job_id)
        count_query = count_query.where(Artifact.job_id == job_id)
    if kind is not None:
        query = query.where(Artifact.kind == kind)
        count_query = count_query.where(Artifact.kind == kind)
    if sha256 is not None:
        digest = check_sha256(sha256)
        query = query.where(Artifact.sha256 == digest)
        count_query = count_query.where(Artifact.sha256 == digest)
    found = session.exec(query.order_by(Artifact.id.desc()).offset(offset).limit(limit)).all()
    return ArtifactsPublic(data=[ArtifactPublic.model_validate(a, from_attributes=True) for a in found],
                           count=session.exec(count_query).one())


@router.get("/{artifact_id}", response_model=ArtifactPublic)
def read_artifact(artifact_id: ArtifactId, session: SessionDep) -> ArtifactPublic:
    return ArtifactPublic.model_validate(get_artifact(session, artifact_id), from_attributes=True)


class _NotUploads(StringConvertor):
    """Any path segment but ``uploads``: ``/api/artifacts/uploads`` has no DELETE, and ``Allow``
    there must not list this route's; any other bad id still reaches validation (a 422)."""

    regex = "(?!uploads$)[^/]+"


register_url_convertor("artifact_id", _NotUploads())


@router.delete("/{artifact_id:artifact_id}", response_model=ArtifactDeleted)
def delete_artifact(artifact_id: ArtifactId, session: SessionDep, store: StoreDep, disk: DiskDep) -> ArtifactDeleted:
    """Delete an artifact's file and record; 409 names the queued, running or paused jobs that use it."""
    answer = housekeeping.delete_artifact(session, artifact_id, store)
    disk.forget()  # the totals change; a job's figure follows its version, which the deletion bumped
    return ArtifactDeleted(**answer)


# HEAD (length, ETag, digest without the body) is the same handler; kept out of the schema so
# the OpenAPI document has one operation per id.
@router.head("/{artifact_id}/download", response_class=ArtifactFileResponse, include_in_schema=False)
@router.get("/{artifact_id}/download", response_class=ArtifactFileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "Partial content"},
                       416: {"description": "Range not satisfiable"}})
def download_artifact(artifact_id: ArtifactId, session: SessionDep, store: StoreDep) -> FileResponse:
    """The artifact's file, streamed from disk; Range requests resume an interrupted download."""
    artifact = get_artifact(session, artifact_id)
    path = store.path_of(artifact.storage_path)
    if not path.is_file():
        raise NotFound(f"Artifact {artifact_id}'s file is missing from the store.")
    # RFC 9530: the digest of the whole file whatever range is sent, base64 in a byte sequence.
    digest = base64.b64encode(bytes.fromhex(artifact.sha256)).decode()
    return ArtifactFileResponse(
        path,
        stat_result=path.stat(),
        media_type="application/octet-stream",
        filename=artifact.filename,
        headers={"ETag": f'"{artifact.sha256}"', "X-Checksum-Sha256": artifact.sha256,
                 "Repr-Digest": f"sha-256=:{digest}:"},
    )
