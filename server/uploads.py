"""The upload store: resumable upload sessions and one-shot temporaries, before verification.

An upload's bytes land in ``<artifact store>/.uploads/`` (the store's own file system, so the
final move is an atomic ``os.replace``) and become an artifact only once
:func:`server.artifacts.verify` has passed and :func:`server.artifacts.add_artifact` has moved
them in. Until then nothing is visible in ``/api/artifacts``, and a failed check deletes the
bytes, so a corrupt or truncated upload leaves the store exactly as it was.

A *session* (``.uploads/<id>/``: ``meta.json`` plus ``data``) survives a dropped connection and
a server restart: the length of ``data`` is the offset already received, and the client
continues from there. A one-shot upload (``POST /api/artifacts``) uses a bare temporary file
instead, deleted whatever goes wrong.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator
import errno
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from server.exceptions import ChecksumMismatch, Conflict, InsufficientStorage, NotFound, PayloadTooLarge
from trainer.protocol import ArtifactKind

log = logging.getLogger(__name__)

UPLOADS_DIRNAME = ".uploads"
DATA_FILENAME = "data"
META_FILENAME = "meta.json"
ONESHOT_PREFIX = "oneshot-"
WRITE_BATCH_BYTES = 1 << 20

_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
# Open sessions at once; each holds a folder and a promise of disk space.
MAX_SESSIONS = 1000
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def raise_if_disk_full(exc: OSError, what: str) -> None:
    """Answer a full disk with 507 naming what could not be written; other errors are not ours."""
    if exc.errno in DISK_FULL_ERRNOS:
        raise InsufficientStorage(f"The server's disk is full: the {what} could not be written. "
                                  f"Free disk space on the server and try again.") from exc


def _last_touched(directory: Path) -> float:
    """When a session last changed: its data's modification time, else its folder's."""
    for path in (directory / DATA_FILENAME, directory):
        try:
            return path.stat().st_mtime
        except OSError:
            continue
    return 0.0


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

    The sessions on disk are read once, at start; after that an in-memory index answers
    listings, disk reservations and expiry without scanning the folder.

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
        # Sync routes run in worker threads: creating, listing and discarding share the index.
        self._lock = threading.Lock()
        self._sessions: dict[str, UploadSession] = {}
        self._touched: dict[str, float] = {}
        # No request is running yet, so any one-shot temporary or half-made session is a
        # leftover of a crash.
        for leftover in self.root.glob(f"{ONESHOT_PREFIX}*"):
            leftover.unlink(missing_ok=True)
        for leftover in self.root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for directory in self.root.iterdir():
            if _UPLOAD_ID.match(directory.name):
                try:
                    session = self.get(directory.name)
                except NotFound:
                    continue
                self._sessions[session.id] = session
                self._touched[session.id] = _last_touched(directory)

    # paths
    def _dir(self, upload_id: str) -> Path:
        if not _UPLOAD_ID.match(upload_id):
            raise NotFound(f"Upload {upload_id!r} not found.")
        return self.root / upload_id

    def data_path(self, upload_id: str) -> Path:
        return self._dir(upload_id) / DATA_FILENAME

    # disk
    def reserved_bytes(self) -> int:
        """Bytes the open sessions have declared but not yet received: promised disk."""
        with self._lock:
            return sum(max(s.size_bytes - s.offset, 0) for s in self._sessions.values())

    def check_room(self, size: int) -> None:
        """Refuse (507) ``size`` more bytes unless they fit beside what open sessions still await."""
        free = shutil.disk_usage(self.root).free
        reserved = self.reserved_bytes()
        if size + reserved > free:
            promised = f", {reserved} of them promised to unfinished uploads" if reserved else ""
            raise InsufficientStorage(f"Upload of {size} bytes does not fit: {free} bytes free on the server"
                                      f"{promised}. Finish or delete uploads (GET /api/artifacts/uploads), "
                                      f"or free disk space.")

    # sessions
    def create(self, kind: ArtifactKind, sha256: str, size: int, filename: str) -> UploadSession:
        self.expire()
        with self._lock:
            if len(self._sessions) >= MAX_SESSIONS:
                raise InsufficientStorage(f"{len(self._sessions)} uploads are unfinished, the most this server "
                                          f"keeps; finish or delete some (GET /api/artifacts/uploads) first.")
        self.check_room(size)
        session = UploadSession(id=secrets.token_hex(16), kind=kind, sha256=sha256, size_bytes=size,
                                filename=filename, created_at=time.time())
        directory = self.root / session.id
        tmp = self.root / f".tmp-{session.id}"
        try:
            tmp.mkdir()
            (tmp / DATA_FILENAME).touch()
            meta = session.public()
            meta.pop("offset")
            (tmp / META_FILENAME).write_text(json.dumps(meta))
            os.replace(tmp, directory)  # a session is complete (meta and data) or absent
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise_if_disk_full(exc, f"upload session of {size} bytes")
            raise
        with self._lock:
            self._sessions[session.id] = session
            self._touched[session.id] = session.created_at
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

    def list(self, sha256: str | None = None, limit: int = 100, offset: int = 0) -> tuple[list[UploadSession], int]:
        """One page of the open sessions, oldest first, and how many there are in all."""
        self.expire()
        with self._lock:
            found = sorted((s for s in self._sessions.values() if sha256 is None or s.sha256 == sha256),
                           key=lambda s: s.created_at)
        return [replace(s) for s in found[offset:offset + limit]], len(found)

    def discard(self, upload_id: str) -> None:
        with self._lock:
            self._sessions.pop(upload_id, None)
            self._touched.pop(upload_id, None)
        self.hashers.pop(upload_id, None)
        shutil.rmtree(self._dir(upload_id), ignore_errors=True)

    def expire(self) -> None:
        """Delete sessions untouched for ``expiry_s`` (by the index's times: no folder scan).

        A session receiving bytes is never expired; a one-shot temporary is not a session.
        """
        cutoff = time.time() - self.expiry_s
        with self._lock:
            expired = [upload_id for upload_id, touched in self._touched.items()
                       if touched < cutoff and upload_id not in self.busy]
        for upload_id in expired:
            log.info("removing expired upload %s", upload_id)
            self.discard(upload_id)

    def _received(self, upload_id: str, offset: int) -> None:
        """Record in the index that a session now holds ``offset`` bytes."""
        with self._lock:
            if upload_id in self._sessions:
                self._sessions[upload_id].offset = offset
                self._touched[upload_id] = time.time()

    async def append(self, session: UploadSession, offset: int, chunks: AsyncIterator[bytes],
                     checksum: "tuple[hashlib._Hash, bytes] | None" = None) -> int:
        """Write ``chunks`` at ``offset`` (which must be the bytes received so far).

        Bytes that arrive before a dropped connection are kept: they are the offset the client
        resumes from. Bytes past the declared size are refused and cut off, keeping what was
        there before this request.

        ``checksum`` (tus's Upload-Checksum: a fresh hasher and the digest the request's body
        must have) makes the request all or nothing: a body that hashes otherwise, or that
        breaks off before its end, is cut off again and :class:`ChecksumMismatch` (460) or the
        break is raised.

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
        # The whole file's hash as it was before this request, for a body that is refused.
        before = hasher.copy() if hasher is not None and checksum is not None else None
        hashers = tuple(h for h in (hasher, checksum[0] if checksum else None) if h is not None)
        written = 0
        try:
            with open(path, "r+b") as fh:
                fh.seek(offset)

                def cut_off() -> None:
                    fh.truncate(offset)

                try:
                    written = await write_stream(fh, chunks, session.size_bytes - offset,
                                                 lambda: PayloadTooLarge(
                                                     f"Upload {session.id} declared {session.size_bytes} bytes; "
                                                     f"this request sends more than the {session.size_bytes - offset} "
                                                     f"still missing. Nothing from it was kept."),
                                                 on_overflow=cut_off, hashers=hashers)
                except (PayloadTooLarge, OSError):
                    raise
                except BaseException:  # the body broke off: with a checksum, none of it can be trusted
                    if checksum is not None:
                        await run_in_threadpool(cut_off)
                        written, hasher = 0, before
                    raise
                if checksum is not None and checksum[0].digest() != checksum[1]:
                    await run_in_threadpool(cut_off)
                    written, hasher = 0, before
                    name = checksum[0].name
                    raise ChecksumMismatch(
                        f"Upload-Checksum mismatch: the {name} of this request's body is "
                        f"{base64.b64encode(checksum[0].digest()).decode()}, the header says "
                        f"{base64.b64encode(checksum[1]).decode()}. Nothing from it was kept; "
                        f"resend it from Upload-Offset: {offset}.")
                await run_in_threadpool(os.fsync, fh.fileno())
            return offset + written
        except PayloadTooLarge:
            hasher = None  # it saw bytes that were cut off again
            raise
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                hasher = None
                # What this request wrote may be torn; the client resends it from the old offset.
                with open(path, "r+b") as fh:
                    fh.truncate(offset)
            raise_if_disk_full(exc, f"upload {session.id}'s bytes from offset {offset}")
            raise
        finally:
            if hasher is not None:
                self.hashers[session.id] = (offset + written, hasher)
            try:
                self._received(session.id, path.stat().st_size)
            except OSError:
                pass  # discarded meanwhile
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
                       hashers: "tuple[hashlib._Hash, ...]" = ()) -> int:
    """Copy an async byte stream into ``fh`` in batches, refusing more than ``limit`` bytes.

    Chunks are gathered into ~1 MB batches and written from a worker thread, so memory stays
    bounded whatever the upload size and the event loop never waits on the disk.

    ``hashers`` (the whole file's running sha256, a chunk's checksum) are updated with every
    byte written, in the same worker-thread call.

    Returns
    -------
    int
        Bytes written. If the stream breaks (client disconnect), the bytes received so far are
        written before the error propagates.
    """
    from starlette.concurrency import run_in_threadpool

    def flush(chunks: list[bytes]) -> None:
        # The chunks as they came (uvicorn's 64-256 KiB pieces): joining them first would copy
        # every byte once more, and both writing and hashing take them one by one at the same cost.
        fh.writelines(chunks)
        for hasher in hashers:
            for chunk in chunks:
                hasher.update(chunk)

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
                await run_in_threadpool(flush, batch)
                written += pending
                batch, pending = [], 0
    finally:
        if pending:
            await run_in_threadpool(flush, batch)
            written += pending
    return written
