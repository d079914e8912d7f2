"""Artifact uploads (import): resumable upload sessions, verification, and atomic adoption.

An upload's bytes land in ``<artifact store>/.uploads/`` (the store's own file system, so the
final move is an atomic ``os.replace``) and become an artifact only after three checks pass:

1. the received length equals the declared length;
2. their sha256 equals the declared sha256;
3. the file is what its kind says: a report is a JSON object; the other kinds are safetensors
   files whose header this module parses without torch (:func:`read_safetensors_header`), and
   whose tensors ``python -m trainer.validate`` then compares, in a subprocess, with the
   modules the declared config builds (the server never imports torch).

Until then nothing is visible in ``/api/artifacts``, and a failed check deletes the bytes, so a
corrupt or truncated upload leaves the store exactly as it was.

A *session* (``.uploads/<id>/``: ``meta.json`` plus ``data``) survives a dropped connection and
a server restart: the length of ``data`` is the offset already received, and the client
continues from there. A one-shot upload (``POST /api/artifacts``) uses a bare temporary file
instead, deleted whatever goes wrong.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

from server.exceptions import Conflict, InvalidInput, NeuroLensServerError, NotFound
from server.storage import sha256_of
from trainer.protocol import ArtifactKind

log = logging.getLogger(__name__)

UPLOADS_DIRNAME = ".uploads"
DATA_FILENAME = "data"
META_FILENAME = "meta.json"
ONESHOT_PREFIX = "oneshot-"
WRITE_BATCH_BYTES = 1 << 20

# safetensors itself refuses headers above 100 MB; a NeuroLens header (tensor table plus JSON
# configs and a tokenizer) is a few hundred KB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# A report is read whole to parse it; real ones are a few KB.
MAX_REPORT_BYTES = 64 * 1024 * 1024
VALIDATE_TIMEOUT_S = 300.0

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
SAFETENSORS_FORMATS = {
    ArtifactKind.encoder: "neurolens.encoder/1",
    ArtifactKind.model: "neurolens.model/1",
    ArtifactKind.checkpoint: "neurolens.checkpoint/1",
}
DEFAULT_FILENAMES = {
    ArtifactKind.encoder: "encoder.safetensors",
    ArtifactKind.model: "model.safetensors",
    ArtifactKind.checkpoint: "checkpoint.safetensors",
    ArtifactKind.report: "report.json",
}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")


class PayloadTooLarge(NeuroLensServerError):
    status_code = 413


class InsufficientStorage(NeuroLensServerError):
    status_code = 507


class ValidatorCrashed(NeuroLensServerError):
    status_code = 500


class InvalidArtifactFile(InvalidInput):
    """The uploaded bytes are not a valid artifact of the declared kind (422)."""


# -- declared values ---------------------------------------------------------------------------

def check_sha256(value: str) -> str:
    """Lower-case hex sha256, or :class:`InvalidInput` naming the expected form."""
    digest = (value or "").strip().lower()
    if not _SHA256.match(digest):
        raise InvalidInput(f"Invalid sha256 {value!r}; expected 64 hexadecimal digits.")
    return digest


def check_filename(value: str | None, kind: ArtifactKind) -> str:
    """A plain file name for the stored artifact (the kind's default name when none is given).

    Only the last path component is kept and only ``[A-Za-z0-9._-]`` is allowed, so a name can
    never reach outside the artifact's directory or hide as a dot file.
    """
    if not value:
        return DEFAULT_FILENAMES[kind]
    name = value.replace("\\", "/").rsplit("/", 1)[-1]
    if not _SAFE_NAME.match(name):
        raise InvalidInput(f"Invalid filename {value!r}; use letters, digits, '.', '_' and '-' "
                           f"(at most 200, not starting with '.').")
    return name


def check_size(size: int, limit: int) -> int:
    if size < 0:
        raise InvalidInput(f"Invalid size_bytes {size}; expected a non-negative byte count.")
    if size > limit:
        raise PayloadTooLarge(f"Upload of {size} bytes exceeds this server's limit of {limit} bytes "
                              f"(NEUROLENS_MAX_UPLOAD_BYTES).")
    return size


# -- safetensors header (no torch) -------------------------------------------------------------

def read_safetensors_header(path: Path) -> dict[str, str]:
    """Parse and check a safetensors file's header; return its ``__metadata__``.

    The format is an 8-byte little-endian header length, a JSON header mapping each tensor
    name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of
    the header), then the tensor data. Every tensor's byte range must match its dtype and shape,
    lie inside the file, and the ranges must tile the data section exactly: that is what tells a
    truncated or padded file from a whole one.

    Raises
    ------
    InvalidArtifactFile
        With a message that names what is wrong.
    """
    size = path.stat().st_size
    if size < 8:
        raise InvalidArtifactFile(f"Not a safetensors file: {size} bytes is shorter than the 8-byte header length.")
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise InvalidArtifactFile(
                f"Not a safetensors file (or truncated): header length {header_len} does not fit "
                f"in a file of {size} bytes.")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArtifactFile(f"Not a safetensors file: the header is not valid JSON ({exc}).") from exc
    if not isinstance(header, dict):
        raise InvalidArtifactFile("Not a safetensors file: the header is not a JSON object.")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidArtifactFile("Invalid safetensors header: __metadata__ must map names to strings.")
    ranges = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise InvalidArtifactFile(f"Invalid safetensors header entry for tensor {name!r}.") from exc
        if dtype not in DTYPE_BYTES:
            raise InvalidArtifactFile(f"Tensor {name!r} has unknown dtype {dtype!r}.")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidArtifactFile(f"Tensor {name!r} has an invalid shape {shape!r}.")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise InvalidArtifactFile(f"Tensor {name!r} has invalid data offsets {[begin, end]!r}.")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * DTYPE_BYTES[dtype]:
            raise InvalidArtifactFile(f"Tensor {name!r}: {end - begin} bytes do not hold {dtype} {shape}.")
        ranges.append((begin, end, name))
    data_len = size - 8 - header_len
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            raise InvalidArtifactFile(f"Invalid safetensors file: tensor {name!r} starts at {begin}, expected {position}.")
        position = end
    if position != data_len:
        if position > data_len:
            raise InvalidArtifactFile(
                f"Truncated safetensors file: its header describes {position} bytes of tensor data, "
                f"but only {data_len} follow the header.")
        raise InvalidArtifactFile(
            f"Invalid safetensors file: {data_len - position} bytes follow the last tensor.")
    return metadata


def check_report(path: Path) -> None:
    size = path.stat().st_size
    if size > MAX_REPORT_BYTES:
        raise InvalidArtifactFile(f"A report is a JSON file of at most {MAX_REPORT_BYTES} bytes; this one has {size}.")
    try:
        report = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArtifactFile(f"A report must be a JSON object; this file is not valid JSON ({exc}).") from exc
    if not isinstance(report, dict):
        raise InvalidArtifactFile("A report must be a JSON object.")


async def run_validator(kind: ArtifactKind, path: Path) -> None:
    """Compare the tensors with the declared config in ``python -m trainer.validate``."""
    from server.executors.local import SOURCE_ROOT

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), env.get("PYTHONPATH", "")) if p)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "trainer.validate", kind.value, str(path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(SOURCE_ROOT))
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), VALIDATE_TIMEOUT_S)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise ValidatorCrashed(f"Checking the {kind.value} file took longer than {VALIDATE_TIMEOUT_S:g} s.") from None
    lines = stderr.decode(errors="replace").strip().splitlines()
    if process.returncode == 2 and lines:
        raise InvalidArtifactFile(f"Invalid {kind.value} file: {lines[-1]}")
    if process.returncode != 0:
        raise ValidatorCrashed(f"The {kind.value} checker exited with code {process.returncode}: "
                               f"{lines[-1] if lines else '(no output)'}")


async def verify(path: Path, kind: ArtifactKind, sha256: str, size: int | None,
                 received: tuple[str, int] | None = None) -> tuple[str, int]:
    """Run every check on an uploaded file; return its sha256 and size.

    ``received`` is the sha256 and length computed while the bytes streamed in, when one
    hasher saw all of them; it saves reading the file once more. Otherwise the file is hashed.

    Raises
    ------
    InvalidArtifactFile
        Length, digest or content are wrong; the message says which and how.
    """
    from starlette.concurrency import run_in_threadpool

    actual_sha, actual_size = received or await run_in_threadpool(sha256_of, path)
    if size is not None and actual_size != size:
        raise InvalidArtifactFile(f"Upload is truncated or too long: received {actual_size} bytes, declared {size}.")
    if actual_sha != sha256:
        raise InvalidArtifactFile(
            f"sha256 mismatch: the received {actual_size} bytes hash to {actual_sha}, "
            f"but the upload declared {sha256}. The file is corrupt or not the one meant.")
    if kind == ArtifactKind.report:
        await run_in_threadpool(check_report, path)
        return actual_sha, actual_size
    metadata = await run_in_threadpool(read_safetensors_header, path)
    wanted = SAFETENSORS_FORMATS[kind]
    if metadata.get("format") != wanted:
        raise InvalidArtifactFile(
            f"Not a NeuroLens {kind.value} file: its metadata format is {metadata.get('format')!r}, "
            f"expected {wanted!r}.")
    await run_validator(kind, path)
    return actual_sha, actual_size


# -- sessions ----------------------------------------------------------------------------------

@dataclass
class UploadSession:
    id: str
    kind: ArtifactKind
    sha256: str
    size_bytes: int
    filename: str
    created_at: float
    offset: int = 0

    def public(self) -> dict:
        data = asdict(self)
        data["kind"] = self.kind.value
        return data


class UploadStore:
    """Upload sessions and one-shot temporaries under ``<artifact store>/.uploads``.

    Parameters
    ----------
    artifacts_root : Path
        The artifact store's root; uploads live on the same file system so that adopting a
        verified file is one atomic rename.
    expiry_s : float
        Sessions untouched this long are deleted (checked whenever a session is created or
        listed).
    """

    def __init__(self, artifacts_root: Path, expiry_s: float) -> None:
        self.root = artifacts_root / UPLOADS_DIRNAME
        self.root.mkdir(parents=True, exist_ok=True)
        self.expiry_s = expiry_s
        # Sessions receiving bytes right now: a second writer would interleave at wrong offsets.
        self.busy: set[str] = set()
        # Running sha256 of each session whose bytes all arrived while this process ran, with the
        # byte count it has seen; lost on restart, when the file is simply hashed at the end.
        self.hashers: dict[str, tuple[int, "hashlib._Hash"]] = {}
        # No request is running yet, so any one-shot temporary is a leftover of a crash.
        for leftover in self.root.glob(f"{ONESHOT_PREFIX}*"):
            leftover.unlink(missing_ok=True)

    # paths
    def _dir(self, upload_id: str) -> Path:
        if not _UPLOAD_ID.match(upload_id):
            raise NotFound(f"Upload {upload_id!r} not found.")
        return self.root / upload_id

    def data_path(self, upload_id: str) -> Path:
        return self._dir(upload_id) / DATA_FILENAME

    # sessions
    def create(self, kind: ArtifactKind, sha256: str, size: int, filename: str) -> UploadSession:
        self.expire()
        free = shutil.disk_usage(self.root).free
        if size > free:
            raise InsufficientStorage(f"Upload of {size} bytes does not fit: {free} bytes free on the server.")
        session = UploadSession(id=secrets.token_hex(16), kind=kind, sha256=sha256, size_bytes=size,
                                filename=filename, created_at=time.time())
        directory = self.root / session.id
        tmp = self.root / f".tmp-{session.id}"
        tmp.mkdir()
        (tmp / DATA_FILENAME).touch()
        meta = session.public()
        meta.pop("offset")
        (tmp / META_FILENAME).write_text(json.dumps(meta))
        os.replace(tmp, directory)  # a session is complete (meta and data) or absent
        return session

    def get(self, upload_id: str) -> UploadSession:
        directory = self._dir(upload_id)
        try:
            meta = json.loads((directory / META_FILENAME).read_text())
            offset = (directory / DATA_FILENAME).stat().st_size
        except (OSError, ValueError):
            raise NotFound(f"Upload {upload_id} not found (finished, cancelled or expired).") from None
        return UploadSession(id=meta["id"], kind=ArtifactKind(meta["kind"]), sha256=meta["sha256"],
                             size_bytes=meta["size_bytes"], filename=meta["filename"],
                             created_at=meta["created_at"], offset=offset)

    def list(self, sha256: str | None = None) -> list[UploadSession]:
        self.expire()
        found = []
        for directory in self.root.iterdir():
            if _UPLOAD_ID.match(directory.name):
                try:
                    session = self.get(directory.name)
                except NotFound:
                    continue
                if sha256 is None or session.sha256 == sha256:
                    found.append(session)
        return sorted(found, key=lambda s: s.created_at)

    def discard(self, upload_id: str) -> None:
        self.hashers.pop(upload_id, None)
        shutil.rmtree(self._dir(upload_id), ignore_errors=True)

    def expire(self) -> None:
        """Delete sessions untouched for ``expiry_s``.

        Only session directories are considered: a one-shot temporary belongs to a request in
        flight (leftovers of a crash are removed at start-up), and a ``.tmp-`` directory exists
        only inside :meth:`create`.
        """
        cutoff = time.time() - self.expiry_s
        for directory in self.root.iterdir():
            if not _UPLOAD_ID.match(directory.name) or directory.name in self.busy:
                continue
            try:
                touched = directory.stat().st_mtime
            except OSError:
                continue  # removed meanwhile
            try:
                touched = max(touched, (directory / DATA_FILENAME).stat().st_mtime)
            except OSError:
                pass  # a session without data is judged by its directory's age
            if touched < cutoff:
                log.info("removing expired upload %s", directory.name)
                shutil.rmtree(directory, ignore_errors=True)

    async def append(self, session: UploadSession, offset: int, chunks: AsyncIterator[bytes]) -> int:
        """Write ``chunks`` at ``offset`` (which must be the bytes received so far).

        Bytes that arrive before a dropped connection are kept: they are the offset the client
        resumes from. Bytes past the declared size are refused and cut off, keeping what was
        there before this request.

        Returns
        -------
        int
            The new offset.
        """
        from starlette.concurrency import run_in_threadpool

        if session.id in self.busy:
            raise Conflict(f"Upload {session.id} is already receiving data in another request.")
        if offset != session.offset:
            raise Conflict(f"Upload {session.id} has {session.offset} bytes; this request starts at offset "
                           f"{offset}. Continue from Upload-Offset: {session.offset}.")
        self.busy.add(session.id)
        path = self.data_path(session.id)
        seen, hasher = self.hashers.pop(session.id, (0, None))
        if offset == 0:
            hasher = hashlib.sha256()
        elif seen != offset:
            hasher = None  # bytes from before a restart: hash the whole file at the end
        written = 0
        try:
            with open(path, "r+b") as fh:
                fh.seek(offset)
                written = await write_stream(fh, chunks, session.size_bytes - offset,
                                             lambda: PayloadTooLarge(
                                                 f"Upload {session.id} declared {session.size_bytes} bytes; "
                                                 f"this request sends more than the {session.size_bytes - offset} "
                                                 f"still missing. Nothing from it was kept."),
                                             on_overflow=lambda: fh.truncate(offset), hasher=hasher)
                await run_in_threadpool(os.fsync, fh.fileno())
            return offset + written
        except PayloadTooLarge:
            hasher = None  # it saw bytes that were cut off again
            raise
        finally:
            if hasher is not None:
                self.hashers[session.id] = (offset + written, hasher)
            self.busy.discard(session.id)

    def received_digest(self, session: UploadSession) -> tuple[str, int] | None:
        """The sha256 computed while the session's bytes arrived, if one hasher saw them all."""
        seen, hasher = self.hashers.get(session.id, (-1, None))
        if hasher is None or seen != session.offset:
            return None
        return hasher.hexdigest(), seen

    def oneshot_path(self) -> Path:
        return self.root / f"{ONESHOT_PREFIX}{secrets.token_hex(16)}"


async def write_stream(fh, chunks: AsyncIterator[bytes], limit: int, too_large, on_overflow=None,
                       hasher: "hashlib._Hash | None" = None) -> int:
    """Copy an async byte stream into ``fh`` in batches, refusing more than ``limit`` bytes.

    Chunks are gathered into ~1 MB batches and written from a worker thread, so memory stays
    bounded whatever the upload size and the event loop never waits on the disk.

    ``hasher``, if given, is updated with every byte written, in the same worker-thread call.

    Returns
    -------
    int
        Bytes written. If the stream breaks (client disconnect), the bytes received so far are
        written before the error propagates.
    """
    from starlette.concurrency import run_in_threadpool

    def flush(data: bytes) -> None:
        fh.write(data)
        if hasher is not None:
            hasher.update(data)

    written = 0
    batch: list[bytes] = []
    pending = 0
    try:
        async for chunk in chunks:
            if written + pending + len(chunk) > limit:
                batch, pending = [], 0  # none of this request's unwritten bytes are kept
                if on_overflow is not None:
                    await run_in_threadpool(on_overflow)
                raise too_large()
            batch.append(chunk)
            pending += len(chunk)
            if pending >= WRITE_BATCH_BYTES:
                await run_in_threadpool(flush, b"".join(batch))
                written += pending
                batch, pending = [], 0
    finally:
        if pending:
            await run_in_threadpool(flush, b"".join(batch))
            written += pending
    return written
