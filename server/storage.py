"""The artifact store: one directory per artifact under ``<data dir>/artifacts``.

Files are addressed by artifact id, never by a name from a request, so nothing a client sends can
point outside the store. A file enters the store complete: it is linked (or copied to a hidden
temporary name and renamed) into place before its database row is committed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

CHUNK_BYTES = 1024 * 1024


class StorageError(Exception):
    """A file could not be added to or found in the store."""


def sha256_of(path: Path) -> tuple[str, int]:
    """Return the hex sha256 and size of ``path``, reading it in bounded memory."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def resolve_inside(root: Path, relative: str) -> Path:
    """Resolve ``relative`` under ``root``, refusing anything that escapes it."""
    root = root.resolve()
    candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        raise StorageError(f"Path {relative!r} is outside the job directory.")
    return candidate


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path_of(self, storage_path: str) -> Path:
        return resolve_inside(self.root, storage_path)

    def add_file(self, source: Path, artifact_id: int, filename: str) -> str:
        """Put ``source`` into the store as ``<artifact_id>/<filename>``; return its storage path.

        A hard link costs nothing and keeps the file alive when the trainer rotates its
        checkpoints away; across file systems the file is copied under a temporary name first.
        """
        if not source.is_file():
            raise StorageError(f"File {source} does not exist.")
        directory = self.root / str(artifact_id)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / filename
        try:
            os.link(source, target)
        except OSError:
            partial = directory / f".{filename}.partial"
            shutil.copyfile(source, partial)
            os.replace(partial, target)
        return f"{artifact_id}/{filename}"

    def adopt(self, source: Path, artifact_id: int, filename: str) -> str:
        """Move ``source`` (a verified upload on the store's file system) to ``<artifact_id>/<filename>``.

        ``os.replace`` is atomic, so the artifact's file is either absent or complete.
        """
        directory = self.root / str(artifact_id)
        directory.mkdir(parents=True, exist_ok=True)
        os.replace(source, directory / filename)
        return f"{artifact_id}/{filename}"

    def remove(self, storage_path: str) -> None:
        path = self.path_of(storage_path)
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:
            pass
