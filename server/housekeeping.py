"""Housekeeping: deleting jobs and artifacts with their files, and what the data takes on disk.

A deletion has three steps, each safe to repeat: :mod:`server.jobs` marks the rows (and
refuses what is still in use), then the files are removed here, then the rows go. A server
stopped between the steps finishes them at its next start (:func:`finish_deletions`).

Disk figures count each file once: an artifact a trainer registered is a hard link to the file
in its job directory (:mod:`server.storage`), so a naive sum would count every checkpoint
twice. Walks are bounded (:data:`MAX_ENTRIES`) and cached (:class:`DiskUsage`), since the
dashboard polls the job list every few seconds.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session

from server import jobs as job_rules
from server.models import Job
from server.storage import ArtifactStore

log = logging.getLogger("neurolens.housekeeping")

MAX_ENTRIES = 20_000
"""Most directory entries one walk visits; a job directory holds a few dozen."""


def walk_files(root: Path, limit: int = MAX_ENTRIES) -> Iterator[tuple[str, os.stat_result]]:
    """``(path, lstat)`` of every regular file under ``root`` (links not followed), at most
    ``limit`` entries visited; nothing for a root that does not exist."""
    stack, seen = [str(root)], 0
    while stack and seen < limit:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:  # gone meanwhile (a checkpoint rotated away), or not a directory
            continue
        for entry in entries:
            seen += 1
            if seen > limit:
                break
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                stack.append(entry.path)
            elif stat.S_ISREG(info.st_mode):
                yield entry.path, info


def unique_bytes(roots: Iterable[Path], seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes the files under ``roots`` take, each inode once (``seen`` carries inodes already
    counted elsewhere, and gains these)."""
    seen = set() if seen is None else seen
    total = 0
    for root in roots:
        for _, info in walk_files(root):
            key = (info.st_dev, info.st_ino)
            if key not in seen:
                seen.add(key)
                total += info.st_size
    return total


def freed_by_removing(roots: Iterable[Path]) -> int:
    """Bytes removing every file under ``roots`` frees: an inode's bytes count only when all of
    its links are among them (a checkpoint also linked as a kept artifact frees nothing)."""
    links: dict[tuple[int, int], list] = {}
    for root in roots:
        for path, info in walk_files(root):
            entry = links.setdefault((info.st_dev, info.st_ino), [info.st_nlink, info.st_size, set()])
            entry[2].add(path)
    return sum(size for nlink, size, paths in links.values() if len(paths) >= nlink)


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# --- deleting ---------------------------------------------------------------------------------


def delete_job(session: Session, job: Job, jobs_dir: Path, store: ArtifactStore) -> dict[str, Any]:
    """Delete a finished or paused job: its directory, its artifacts' files (but those other jobs
    use, kept detached), then its rows. Raises :class:`~server.exceptions.Conflict` while it or
    a job that waits on it may run.

    Returns
    -------
    dict
        ``{"deleted": id, "freed_bytes": n, "kept_artifacts": [ids], "message": str}``.
    """
    job_id = job.id  # read now: the row is gone once dropped
    kept = job_rules.mark_job_deleting(session, job)
    freed = _remove_job_files(session, job_id, jobs_dir, store)
    job_rules.drop_job(session, job_id)
    message = f"Job {job_id} deleted; {freed} bytes freed."
    if kept:
        message += (f" Artifact{'s' if len(kept) > 1 else ''} {', '.join(map(str, kept))} kept (other jobs use "
                    f"{'them' if len(kept) > 1 else 'it'}), now without a job.")
    return {"deleted": job_id, "freed_bytes": freed, "kept_artifacts": kept, "message": message}


def _remove_job_files(session: Session, job_id: int, jobs_dir: Path, store: ArtifactStore) -> int:
    job_dir = jobs_dir / str(job_id)
    folders = [store.root / str(a.id) for a in job_rules.deleting_artifacts_of(session, job_id)]
    freed = freed_by_removing([job_dir, *folders])
    for folder in folders:
        _remove_tree(folder)
    _remove_tree(job_dir)
    return freed


def delete_artifact(session: Session, artifact_id: int, store: ArtifactStore) -> dict[str, Any]:
    """Delete an artifact's file, then its row. Raises :class:`~server.exceptions.Conflict` while a
    queued, running or paused job uses it.

    Returns
    -------
    dict
        ``{"deleted": id, "freed_bytes": n, "message": str}``; freed is 0 for a file that is
        also in its job's directory (a hard link: the job still has it).
    """
    artifact = job_rules.get_artifact(session, artifact_id)
    job_id = artifact.job_id  # read now: the row is gone once dropped
    named = job_rules.mark_artifact_deleting(session, artifact)
    folder = store.root / str(artifact_id)
    freed = freed_by_removing([folder])
    _remove_tree(folder)
    job_rules.drop_artifact(session, artifact_id)
    message = f"Artifact {artifact_id} deleted; {freed} bytes freed."
    if freed == 0 and job_id is not None:
        message += f" Its file is still in job {job_id}'s directory (a hard link); deleting the job frees it."
    if named:
        message += f" Job{'s' if len(named) > 1 else ''} {', '.join(map(str, named))} no longer name it."
    return {"deleted": artifact_id, "freed_bytes": freed, "message": message}


def finish_deletions(engine: Engine, jobs_dir: Path, store: ArtifactStore) -> None:
    """Finish the deletions a stopped server left marked (at start-up, before the scheduler)."""
    with Session(engine) as session:
        job_ids, artifacts = job_rules.pending_deletions(session)
        for job_id in job_ids:
            log.info("finishing the deletion of job %s", job_id)
            _remove_job_files(session, job_id, jobs_dir, store)
            job_rules.drop_job(session, job_id)
        for artifact in artifacts:
            log.info("finishing the deletion of artifact %s", artifact.id)
            _remove_tree(store.root / str(artifact.id))
            job_rules.drop_artifact(session, artifact.id)


# --- disk usage -------------------------------------------------------------------------------


class DiskUsage:
    """Cached disk figures for ``/api/system`` and each job's ``disk_bytes``.

    A job's figure is walked again when its version changed (for a running job, whose version
    changes every report, only once :attr:`min_age_s` passed), or after :attr:`max_age_s` in any
    case (a file changed outside NeuroLens); the totals at most every :attr:`min_age_s`.
    """

    def __init__(self, data_dir: Path, jobs_dir: Path, store: ArtifactStore, *, min_age_s: float = 5.0,
                 max_age_s: float = 300.0) -> None:
        self.data_dir, self.jobs_dir, self.store = data_dir, jobs_dir, store
        self.min_age_s, self.max_age_s = min_age_s, max_age_s
        self._lock = threading.Lock()
        self._jobs: dict[int, tuple[int, float, int]] = {}  # id -> (version, when, bytes)
        self._totals: tuple[float, dict[str, int]] | None = None

    def job_bytes(self, job_id: int, version: int, artifact_ids: Iterable[int], *, running: bool = False) -> int:
        """Bytes of the job's directory and its artifacts' files, each file once; a job not
        ``running`` (its version changes rarely) is walked again at every change."""
        now = time.monotonic()
        with self._lock:
            cached = self._jobs.get(job_id)
        if cached is not None:
            seen_version, when, size = cached
            age = now - when
            if age < self.max_age_s and (seen_version == version or (running and age < self.min_age_s)):
                return size
        size = unique_bytes([self.jobs_dir / str(job_id), *(self.store.root / str(i) for i in artifact_ids)])
        with self._lock:
            self._jobs[job_id] = (version, now, size)
        return size

    def forget(self, job_id: int | None = None) -> None:
        """Drop the cached totals (files went), and ``job_id``'s figure if given."""
        with self._lock:
            if job_id is not None:
                self._jobs.pop(job_id, None)
            self._totals = None

    def totals(self) -> dict[str, int]:
        """``used_bytes`` and ``free_bytes`` of the data directory's file system; ``artifacts_bytes``
        (every artifact file once) and ``jobs_bytes`` (job-directory files that are not artifacts:
        logs, checkpoints not registered), so that the two add up to what NeuroLens takes."""
        now = time.monotonic()
        with self._lock:
            if self._totals is not None and now - self._totals[0] < self.min_age_s:
                return dict(self._totals[1])
        seen: set[tuple[int, int]] = set()
        artifacts = unique_bytes([self.store.root], seen)
        jobs = unique_bytes([self.jobs_dir], seen)
        usage = shutil.disk_usage(self.data_dir)
        figures = {"used_bytes": usage.used, "free_bytes": usage.free, "jobs_bytes": jobs, "artifacts_bytes": artifacts}
        with self._lock:
            self._totals = (now, figures)
        return dict(figures)
