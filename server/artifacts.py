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
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from server import jobs as job_rules
from server.exceptions import InvalidArtifactFile, InvalidInput, PayloadTooLarge, ValidatorCrashed
from server.models import Artifact, ArtifactPublic, Job
from server.storage import ArtifactStore, sha256_of
from trainer.artifact_format import DEFAULT_FILENAMES, ArtifactFormatError, read_header
from trainer.protocol import ArtifactKind

# A report is read whole to parse it; real ones are a few KB.
MAX_REPORT_BYTES = 64 * 1024 * 1024
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
        report = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArtifactFile(f"A report must be a JSON object; this file is not valid JSON ({exc}).") from exc
    if not isinstance(report, dict):
        raise InvalidArtifactFile("A report must be a JSON object.")


def check_header(path: Path, kind: ArtifactKind) -> None:
    """The file's safetensors header is whole and names ``kind``'s format."""
    try:
        read_header(path).require_format(kind)
    except ArtifactFormatError as exc:
        raise InvalidArtifactFile(str(exc)) from exc


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
    await run_in_threadpool(check_header, path, kind)
    await run_validator(kind, path)
    return actual_sha, actual_size
