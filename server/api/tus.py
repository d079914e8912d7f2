"""tus 1.0 resumable uploads: the core protocol with the creation, checksum and termination
extensions (https://tus.io/protocols/resumable-upload), so stock clients (tuspy, tus-js-client,
Uppy) import artifacts.

::

    OPTIONS /api/tus            -> 204 Tus-Version, Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm
    POST    /api/tus           Upload-Length, Upload-Metadata: kind, sha256[, filename] -> 201 Location
    HEAD    /api/tus/{uid}     -> Upload-Offset, Upload-Length (Cache-Control: no-store)
    PATCH   /api/tus/{uid}     application/offset+octet-stream from Upload-Offset [Upload-Checksum]
                                         -> 204 Upload-Offset; the last one verifies and stores the artifact
    DELETE  /api/tus/{uid}     -> 204

A tus upload is one of our upload sessions (:mod:`server.uploads`): the same files on disk, the
same listing (``GET /api/artifacts/uploads``), the same disk reservation and expiry. What tus
lacks, the metadata carries: ``kind`` and ``sha256`` (hex) of the whole file are required, so the
server's end-to-end check of the file stays; ``filename`` is optional, other keys (tus-js-client's
``filetype``) are ignored. tus has no "complete" call: the PATCH that brings the offset to the
length runs the checks of ``POST /api/artifacts/uploads/{uid}/complete`` and answers 204 with
``NeuroLens-Artifact-Id``, or 422 naming what failed (the session is then gone, its bytes known bad).

Every answer carries ``Tus-Resumable: 1.0.0``; a request without it (OPTIONS aside) is 412 with
``Tus-Version``. A malformed header is 400, a wrong offset 409, a PATCH of another media type
415, a length over ``NEUROLENS_MAX_UPLOAD_BYTES`` 413, a checksum that does not match 460 (the
body is not kept). The origin guard and the token apply as to every ``/api`` route.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from server.api.deps import SettingsDep, StoreDep
from server.artifacts import check_filename, check_sha256, check_size
from server.db import SessionDep
from server.exceptions import BadRequest, InvalidInput, NeuroLensServerError, PayloadTooLarge, TusVersionUnsupported
from server.models import DB_INT_MAX
from trainer.protocol import ArtifactKind

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,checksum,termination"
TUS_CONTENT_TYPE = "application/offset+octet-stream"
# tuspy sends sha1 (its only choice); sha256 is what we ask of others. Both are in hashlib.
CHECKSUM_ALGORITHMS = ("sha256", "sha1")
ARTIFACT_ID_HEADER = "NeuroLens-Artifact-Id"


class TusRoute(APIRoute):
    """A route that answers tus-style: ``Tus-Resumable`` on every response, errors included.

    The app's error handler knows nothing of tus headers; catching our errors here keeps tus in
    this module.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def tus_handler(request: Request) -> Response:
            try:
                response = await handler(request)
            except NeuroLensServerError as exc:
                response = JSONResponse({"detail": str(exc)}, status_code=exc.status_code)
                if isinstance(exc, TusVersionUnsupported):
                    response.headers["Tus-Version"] = TUS_VERSION
            response.headers["Tus-Resumable"] = TUS_VERSION
            return response

        return tus_handler


router = APIRouter(prefix="/tus", tags=["artifacts"], route_class=TusRoute)

TUS_ERRORS = {
    400: {"description": "A malformed tus header (Upload-Length, Upload-Offset, Upload-Metadata, Upload-Checksum)"},
    409: {"description": "Upload-Offset differs from the bytes received"},
    412: {"description": "Tus-Resumable missing or not 1.0.0"},
    460: {"description": "Upload-Checksum does not match the body; nothing was kept"},
}


def _require_tus(request: Request) -> None:
    version = request.headers.get("tus-resumable")
    if version != TUS_VERSION:
        given = f"'Tus-Resumable: {version}'" if version is not None else "no Tus-Resumable header"
        raise TusVersionUnsupported(f"This is a tus {TUS_VERSION} endpoint and the request has {given}; "
                                    f"send 'Tus-Resumable: {TUS_VERSION}'.")


def _integer_header(request: Request, name: str, limit: int = DB_INT_MAX) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return None
    if not value.strip().isdigit() or int(value) > limit:
        raise BadRequest(f"Invalid {name} {value!r}; expected a byte count from 0 to {limit}.")
    return int(value)


def parse_metadata(header: str | None) -> dict[str, str]:
    """``Upload-Metadata: kind ZW5jb2Rlcg==,sha256 ...`` -> ``{"kind": "encoder", ...}`` (UTF-8 values)."""
    found: dict[str, str] = {}
    for pair in (header or "").split(","):
        if not pair.strip():
            continue
        key, _, value = pair.strip().partition(" ")
        if key in found:
            raise BadRequest(f"Upload-Metadata names {key!r} twice.")
        try:
            found[key] = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise BadRequest(f"Upload-Metadata value of {key!r} is not base64 of UTF-8 text.") from None
    return found


def parse_checksum(header: str | None) -> tuple["hashlib._Hash", bytes] | None:
    """``Upload-Checksum: sha256 <base64>`` -> a fresh hasher and the digest to match."""
    if header is None:
        return None
    algorithm, _, value = header.strip().partition(" ")
    if algorithm.lower() not in CHECKSUM_ALGORITHMS:
        raise BadRequest(f"Upload-Checksum algorithm {algorithm!r} is not supported; use one of "
                         f"{', '.join(CHECKSUM_ALGORITHMS)} (Tus-Checksum-Algorithm).")
    hasher = hashlib.new(algorithm.lower())
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except binascii.Error:
        digest = b""
    if len(digest) != hasher.digest_size:
        raise BadRequest(f"Upload-Checksum {header!r} is not a base64 {algorithm} digest "
                         f"({hasher.digest_size} bytes).")
    return hasher, digest


def _offset_headers(upload) -> dict[str, str]:
    return {"Upload-Offset": str(upload.offset), "Upload-Length": str(upload.size_bytes), "Cache-Control": "no-store"}


@router.options("", status_code=204, include_in_schema=False)
@router.options("/{upload_id}", status_code=204, include_in_schema=False)
def tus_options(settings: SettingsDep) -> Response:
    """What this tus server offers (OPTIONS needs no Tus-Resumable)."""
    return Response(status_code=204, headers={
        "Tus-Version": TUS_VERSION, "Tus-Extension": TUS_EXTENSIONS,
        "Tus-Max-Size": str(settings.max_upload_bytes), "Tus-Checksum-Algorithm": ",".join(CHECKSUM_ALGORITHMS)})


@router.get("", include_in_schema=False)
def tus_collection_get() -> Response:
    """405, not the dashboard's 404: the static files at "/" would otherwise take this path."""
    return JSONResponse({"detail": "Method GET not allowed here; use OPTIONS, POST (tus creation). "
                                   "Unfinished uploads are listed at GET /api/artifacts/uploads."},
                        status_code=405, headers={"Allow": "OPTIONS, POST"})


@router.post("", status_code=201, responses=TUS_ERRORS)
def tus_create(request: Request, settings: SettingsDep) -> Response:
    """tus creation: ``Upload-Length`` and ``Upload-Metadata`` (``kind``, ``sha256`` hex, optional
    ``filename``) -> 201 with ``Location``, the upload's URL."""
    from server.api.artifacts import get_uploads

    _require_tus(request)
    if request.headers.get("upload-defer-length") is not None:
        raise BadRequest("Upload-Defer-Length is not supported (no creation-defer-length extension); "
                         "send Upload-Length.")
    if (_integer_header(request, "content-length") or 0) > 0:
        raise BadRequest("This server does not take the file with the creation request (no "
                         "creation-with-upload extension); POST with an empty body, then PATCH.")
    length = _integer_header(request, "upload-length")
    if length is None:
        raise BadRequest("Upload-Length is required: the size of the whole file in bytes.")
    size = check_size(length, settings.max_upload_bytes)
    metadata = parse_metadata(request.headers.get("upload-metadata"))
    missing = [key for key in ("kind", "sha256") if key not in metadata]
    if missing:
        raise BadRequest(f"Upload-Metadata lacks {' and '.join(missing)}: give kind (one of "
                         f"{', '.join(k.value for k in ArtifactKind)}) and sha256 (hex) of the whole file, "
                         f"base64-encoded, e.g. 'kind ZW5jb2Rlcg==,sha256 <base64 of the hex digest>'.")
    try:
        kind = ArtifactKind(metadata["kind"])
    except ValueError:
        raise InvalidInput(f"Invalid kind {metadata['kind']!r} in Upload-Metadata; expected one of "
                           f"{', '.join(k.value for k in ArtifactKind)}.") from None
    if size == 0:
        raise InvalidInput("Upload-Length is 0: an empty file is no artifact of any kind.")
    upload = get_uploads(request).create(kind, check_sha256(metadata["sha256"]), size,
                                         check_filename(metadata.get("filename"), kind))
    return Response(status_code=201, headers={"Location": f"{request.url.path.rstrip('/')}/{upload.id}",
                                              "Upload-Offset": "0"})


@router.head("/{upload_id}", responses=TUS_ERRORS)
def tus_head(upload_id: str, request: Request) -> Response:
    """Where to continue: ``Upload-Offset`` (bytes held) and ``Upload-Length``."""
    from server.api.artifacts import get_uploads

    _require_tus(request)
    return Response(status_code=200, headers=_offset_headers(get_uploads(request).get(upload_id)))


@router.patch("/{upload_id}", status_code=204, responses=TUS_ERRORS)
async def tus_patch(upload_id: str, request: Request, session: SessionDep, store: StoreDep) -> Response:
    """Append the body at ``Upload-Offset``; the PATCH that completes the file verifies it and
    stores the artifact (``NeuroLens-Artifact-Id``)."""
    from server.api.artifacts import finish_upload, get_uploads

    _require_tus(request)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != TUS_CONTENT_TYPE:
        return JSONResponse({"detail": f"A tus PATCH takes 'Content-Type: {TUS_CONTENT_TYPE}', "
                                       f"not {request.headers.get('content-type')!r}."}, status_code=415)
    offset = _integer_header(request, "upload-offset")
    if offset is None:
        raise BadRequest("Upload-Offset is required: the bytes the server holds (HEAD gives it).")
    checksum = parse_checksum(request.headers.get("upload-checksum"))
    uploads = get_uploads(request)
    upload = uploads.get(upload_id)
    declared = _integer_header(request, "content-length")
    if declared is not None and offset == upload.offset and offset + declared > upload.size_bytes:
        raise PayloadTooLarge(f"Upload {upload_id} has Upload-Length {upload.size_bytes}; {declared} more bytes "
                              f"from offset {offset} would go past it.")
    try:
        upload.offset = await uploads.append(upload, offset, request.stream(), checksum)
    except ClientDisconnect:
        return Response(status_code=204)  # nobody is left to answer; HEAD tells where to resume
    headers = _offset_headers(upload)
    if upload.offset == upload.size_bytes:
        artifact = await finish_upload(uploads, upload_id, session, store)
        headers[ARTIFACT_ID_HEADER] = str(artifact.id)
    return Response(status_code=204, headers=headers)


@router.delete("/{upload_id}", status_code=204, responses=TUS_ERRORS)
def tus_delete(upload_id: str, request: Request) -> Response:
    """tus termination: abandon the upload and delete what it received."""
    from server.api.artifacts import get_uploads

    _require_tus(request)
    uploads = get_uploads(request)
    uploads.get(upload_id)  # 404 for an unknown id
    uploads.discard(upload_id)
    return Response(status_code=204)
