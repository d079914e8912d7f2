"""The artifacts service: how a file becomes an artifact.

A file comes in by one of two ways: a client uploads it (its bytes wait in the upload store,
:mod:`server.uploads`, until :func:`verify` passes), or a trainer registers a file it wrote in
its job directory. Either way :func:`add_artifact` gives it its row and puts it into the store
in one transaction; on any failure the row is rolled back and the stored file removed, so the
database and the store never disagree.

An upload becomes an artifact only after three checks pass:

1. the received length equals the declared length;
2. their sha256 equals the declared sha256;
3. the file is what its kind says: a report is a JSON object; the other kinds are safetensors
   files whose header the server checks without torch (:mod:`trainer.artifact_format`), and
   whose tensors ``python -m trainer.validate`` then compares, in a subprocess, with the
   modules the declared config builds (the server never imports torch).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from server import jobs as job_rules
from server.exceptions import InvalidArtifactFile, InvalidInput, PayloadTooLarge, ValidatorCrashed
from server.models import Artifact, ArtifactPublic, Job
from server.storage import ArtifactStore, sha256_of
from trainer.artifact_format import (
    DEFAULT_FILENAMES, ArtifactFormatError, check_declared_size, declared_configs, parse_json, read_header,
)
from trainer.protocol import ArtifactKind

# A report is read whole to parse it; real ones are a few KB.
MAX_REPORT_BYTES = 64 * 1024 * 1024
# A validator imports torch (and transformers for BART) and builds the declared modules on the
# meta device: about 415 MB peak RSS for any encoder, 450 MB with transformers (measured on
# CPU, torch 2.13, see docs/notes/security.md), rounded up. Its time grows with the declared
# size, bounded by the config's limits; the base covers importing torch on a slow laptop.
VALIDATOR_PEAK_BYTES = {ArtifactKind.encoder: 512 * 1024**2, ArtifactKind.checkpoint: 768 * 1024**2,
                        ArtifactKind.model: 768 * 1024**2}
VALIDATE_BASE_TIMEOUT_S = 60.0
VALIDATE_S_PER_PARAMETER = 1e-7  # 1 s per 10M declared parameters
VALIDATE_TIMEOUT_S = 300.0

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


# -- adding ------------------------------------------------------------------------------------

def add_artifact(session: Session, store: ArtifactStore, source: Path, kind: ArtifactKind, filename: str,
                 sha256: str, size: int, *, move: bool = False, job: Job | None = None) -> ArtifactPublic:
    """Give a file an artifact row and put it into the store, all or nothing.

    Blocking (a copy across file systems takes seconds): call it from a worker thread.

    Parameters
    ----------
    source : Path
        The complete file.
    kind, filename, sha256, size
        The artifact's record; ``filename`` is a plain name, already checked.
    move : bool
        ``True`` for a verified upload on the store's file system, moved in by one atomic
        rename; ``False`` for a trainer's file, linked (or copied) so that it stays where it is.
    job : Job, optional
        The job that made the file. Its version is bumped in the same transaction, so that a
        client polling the job with its ETag sees the new artifact.
    """
    artifact = Artifact(job_id=job.id if job is not None else None, kind=kind, filename=filename,
                        size_bytes=size, sha256=sha256, storage_path="")
    session.add(artifact)
    session.flush()
    try:
        place = store.adopt if move else store.add_file
        artifact.storage_path = place(source, artifact.id, filename)
        if job is not None:
            job_rules.touch(job)
            session.add(job)
        session.commit()
    except Exception:
        session.rollback()
        store.remove(f"{artifact.id}/{filename}")
        raise
    session.refresh(artifact)
    return ArtifactPublic.model_validate(artifact, from_attributes=True)


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


# -- verifying an upload -----------------------------------------------------------------------

def check_report(path: Path) -> None:
    size = path.stat().st_size
    if size > MAX_REPORT_BYTES:
        raise InvalidArtifactFile(f"A report is a JSON file of at most {MAX_REPORT_BYTES} bytes; this one has {size}.")
    try:
        report = parse_json(path.read_bytes(), "A report must be a JSON object; this file")
    except ArtifactFormatError as exc:
        raise InvalidArtifactFile(str(exc)) from exc
    if not isinstance(report, dict):
        raise InvalidArtifactFile("A report must be a JSON object.")


def check_header(path: Path, kind: ArtifactKind) -> int:
    """Check what can be checked without torch; return the parameters the file's configs declare.

    The safetensors header must be whole and name ``kind``'s format, and its declared configs
    must pass the job-config rules and fit the file's size, so that no validator ever builds a
    model from a config a job could not have.
    """
    try:
        header = read_header(path)
        header.require_format(kind)
        check_declared_size(header)
        encoder, bart = declared_configs(header)
    except ArtifactFormatError as exc:
        raise InvalidArtifactFile(f"Invalid {kind.value} file: {exc}") from exc
    return encoder.approx_parameters() + (bart.approx_parameters() if bart is not None else 0)


class ValidatorGate:
    """Lets one validator run at a time and tells admission what it may take.

    Validators queue on an asyncio lock in the server's event loop; the scheduler's thread
    reads :attr:`reserved_bytes` (the running one's predicted peak) and counts it like a
    running job's prediction, so a validation never pushes a training into the OOM killer.
    One per process: validators share the machine's memory whatever app they serve.
    """

    def __init__(self) -> None:
        self._turn: asyncio.Lock | None = None
        self._reserved = 0
        self._guard = threading.Lock()

    @property
    def reserved_bytes(self) -> int:
        with self._guard:
            return self._reserved

    @asynccontextmanager
    async def turn(self, predicted_bytes: int) -> AsyncIterator[None]:
        if self._turn is None:
            self._turn = asyncio.Lock()
        async with self._turn:
            with self._guard:
                self._reserved = predicted_bytes
            try:
                yield
            finally:
                with self._guard:
                    self._reserved = 0


VALIDATORS = ValidatorGate()


def validate_timeout_s(declared_parameters: int) -> float:
    """Seconds a validator may take: a base plus a share of the declared size, at most 300."""
    return min(VALIDATE_BASE_TIMEOUT_S + declared_parameters * VALIDATE_S_PER_PARAMETER, VALIDATE_TIMEOUT_S)


async def run_validator(kind: ArtifactKind, path: Path, declared_parameters: int = 0) -> None:
    """Compare the tensors with the declared config in ``python -m trainer.validate``, one
    validator at a time (later ones wait their turn) and within :func:`validate_timeout_s`."""
    async with VALIDATORS.turn(VALIDATOR_PEAK_BYTES[kind]):
        await _run_validator(kind, path, validate_timeout_s(declared_parameters))


async def _run_validator(kind: ArtifactKind, path: Path, timeout_s: float) -> None:
    from server.executors.local import SOURCE_ROOT

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), env.get("PYTHONPATH", "")) if p)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "trainer.validate", kind.value, str(path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(SOURCE_ROOT))
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise ValidatorCrashed(f"Checking the {kind.value} file took longer than {timeout_s:g} s.") from None
    except asyncio.CancelledError:  # the client went away: the checker must not outlive the request
        process.kill()
        await process.wait()
        raise
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
    declared = await run_in_threadpool(check_header, path, kind)
    await run_validator(kind, path, declared)
    return actual_sha, actual_size
