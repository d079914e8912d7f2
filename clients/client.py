"""Python client for the NeuroLens HTTP API.

A thin, typed layer over :class:`httpx.Client`: one method per endpoint, JSON in and out (jobs,
events and artifacts are plain dicts in the shape the API documents), and every failure
translated into a :mod:`clients.exceptions` error.

Examples
--------
>>> from clients import NeuroLensClient
>>> with NeuroLensClient("http://127.0.0.1:8000") as nl:          # doctest: +SKIP
...     job = nl.submit_job("stage1", "synthetic", {"preset": "tiny", "steps": 200})
...     job = nl.wait_for_job(job["id"], timeout=600)
...     encoder = nl.list_artifacts(job_id=job["id"], kind="encoder")[0]
...     nl.download_artifact(encoder["id"], "encoder.safetensors")
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from clients.exceptions import APIError, ChecksumError, ConnectionError, JobTimeoutError, JobWaitError

DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVER_ENV = "NEUROLENS_SERVER"

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
"""Statuses a job never leaves."""

# Connecting to a local server should be instant; a slow connect means it is not there. Reads get
# longer because a busy SQLite write or a large log tail can take a moment.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(bytes_done, bytes_total)`` while a download streams."""


def resolve_server_url(url: str | None = None) -> str:
    """Pick the server URL: the argument, else ``$NEUROLENS_SERVER``, else the local default.

    Parameters
    ----------
    url : str or None
        An explicit base URL such as ``http://gpu-box:8000``.

    Returns
    -------
    str
        The base URL without a trailing slash.
    """
    chosen = url or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
    if "://" not in chosen:  # "gpu-box:8000" is what people type
        chosen = f"http://{chosen}"
    return chosen.rstrip("/")


class NeuroLensClient:
    """Client for one NeuroLens server.

    Parameters
    ----------
    base_url : str or None
        Server URL; defaults to ``$NEUROLENS_SERVER`` or ``http://127.0.0.1:8000``.
    timeout : httpx.Timeout or float
        Timeouts for every request (a download's read timeout applies per chunk).
    transport : httpx.BaseTransport or None
        Passed to :class:`httpx.Client`, e.g. ``httpx.WSGITransport`` or a retrying transport.

    Notes
    -----
    Use it as a context manager so that the connection pool is closed::

        with NeuroLensClient() as nl:
            print(nl.health())
    """

    def __init__(self, base_url: str | None = None, *, timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = resolve_server_url(base_url)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport,
                                  headers={"Accept": "application/json"})

    # -- plumbing ---------------------------------------------------------------------------

    def __enter__(self) -> "NeuroLensClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying connection pool."""
        self._http.close()

    def __repr__(self) -> str:
        return f"NeuroLensClient({self.base_url!r})"

    def _request(self, method: str, path: str, *, ok: Collection[int] = (), **kwargs: Any) -> httpx.Response:
        """Send one request; raise :class:`APIError` for any 4xx/5xx not listed in ``ok``."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ConnectionError(self.base_url, _describe_transport_error(exc)) from exc
        if response.status_code >= 400 and response.status_code not in ok:
            raise APIError.from_response(response)
        return response

    @contextmanager
    def _stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """Like :meth:`_request` but leaves the body unread, for large downloads."""
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    raise APIError.from_response(response)
                yield response
        except httpx.TransportError as exc:
            raise ConnectionError(self.base_url, _describe_transport_error(exc)) from exc

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # -- server -----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Return ``{"status": "ok", "version": ...}``; raises if the server is unreachable."""
        return self._json("GET", "/api/health")

    def system(self) -> dict[str, Any]:
        """Return the server machine's memory, CPU count and running / queued job counts."""
        return self._json("GET", "/api/system")

    def presets(self) -> dict[str, Any]:
        """Return the presets and config fields of each stage (for forms and ``--set`` help)."""
        return self._json("GET", "/api/presets")

    # -- jobs -------------------------------------------------------------------------------

    def submit_job(self, stage: str, dataset: str = "synthetic", config: dict[str, Any] | None = None, *,
                   after: int | None = None, encoder_artifact: int | None = None) -> dict[str, Any]:
        """Queue a training job.

        Parameters
        ----------
        stage : {"stage1", "stage2"}
            Which stage to train.
        dataset : str
            ``"synthetic"``, ``"synthetic:null"`` or a path on the server's machine.
        config : dict or None
            Stage config, e.g. ``{"preset": "tiny", "steps": 200}``; the server validates it.
        after : int or None
            Stage 2 only: the Stage 1 job whose encoder to start from (it may still be running).
        encoder_artifact : int or None
            Stage 2 only: an encoder artifact id to start from instead.

        Returns
        -------
        dict
            The new job, normally with status ``"queued"``.

        Raises
        ------
        APIError
            422 for an invalid stage, dataset or config; 404 for a missing ``after`` job or
            artifact. ``detail`` names the problem.
        """
        body: dict[str, Any] = {"stage": stage, "dataset": dataset, "config": dict(config or {})}
        if after is not None:
            body["after"] = after
        if encoder_artifact is not None:
            body["encoder_artifact"] = encoder_artifact
        return self._json("POST", "/api/jobs", json=body)

    def get_job(self, job_id: int) -> dict[str, Any]:
        """Return one job.

        Parameters
        ----------
        job_id : int
            The job's id.

        Returns
        -------
        dict
            The job as documented in the HTTP API.
        """
        return self._json("GET", f"/api/jobs/{job_id}")

    def get_job_if_changed(self, job_id: int, etag: str | None = None) -> tuple[dict[str, Any] | None, str | None]:
        """Read a job only if it changed since ``etag`` (a conditional GET).

        Parameters
        ----------
        job_id : int
            The job's id.
        etag : str or None
            The ETag from a previous call; ``None`` always fetches.

        Returns
        -------
        job : dict or None
            The job, or ``None`` when the server answered 304 Not Modified.
        etag : str or None
            The ETag to send next time (unchanged on a 304).
        """
        headers = {"If-None-Match": etag} if etag else {}
        response = self._request("GET", f"/api/jobs/{job_id}", headers=headers)
        if response.status_code == 304:
            return None, etag
        return response.json(), response.headers.get("ETag")

    def list_jobs(self, *, status: str | None = None, stage: str | None = None) -> list[dict[str, Any]]:
        """Return jobs, newest first, optionally filtered by ``status`` and ``stage``."""
        params = {k: v for k, v in (("status", status), ("stage", stage)) if v}
        return self._json("GET", "/api/jobs", params=params)["data"]

    def cancel_job(self, job_id: int) -> dict[str, Any]:
        """Ask a job to stop for good; a running trainer checkpoints first. Returns the job."""
        return self._json("POST", f"/api/jobs/{job_id}/cancel")

    def pause_job(self, job_id: int) -> dict[str, Any]:
        """Ask a running or queued job to checkpoint and pause. Returns the job."""
        return self._json("POST", f"/api/jobs/{job_id}/pause")

    def resume_job(self, job_id: int) -> dict[str, Any]:
        """Put a paused job back in the queue; it continues from its newest checkpoint."""
        return self._json("POST", f"/api/jobs/{job_id}/resume")

    def events(self, job_id: int, *, after_id: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        """Return up to ``limit`` events of a job with ids above ``after_id``, oldest first.

        Parameters
        ----------
        job_id : int
            The job's id.
        after_id : int
            Only events with a larger id; pass the last id seen to read incrementally.
        limit : int
            Page size.

        Returns
        -------
        list of dict
            Events with ``kind`` in started, progress, log, checkpoint, finished, error.
        """
        params = {"after_id": after_id, "limit": limit}
        return self._json("GET", f"/api/jobs/{job_id}/events", params=params)["data"]

    def logs(self, job_id: int, *, tail_bytes: int = 65536) -> str:
        """Return the last ``tail_bytes`` of the job's trainer log as text."""
        response = self._request("GET", f"/api/jobs/{job_id}/logs", params={"tail_bytes": tail_bytes},
                                 headers={"Accept": "text/plain"})
        return response.text

    def wait_for_job(self, job_id: int, statuses: Collection[str] = ("succeeded",), *, timeout: float = 600.0,
                     poll_interval: float = 1.0,
                     on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll a job until its status is one of ``statuses``.

        Parameters
        ----------
        job_id : int
            The job's id.
        statuses : collection of str
            Statuses to wait for, e.g. ``{"running"}`` or ``{"succeeded"}``.
        timeout : float
            Seconds to wait in total.
        poll_interval : float
            Seconds between reads; reads are conditional, so unchanged jobs cost a 304.
        on_update : callable or None
            Called with the job each time it changes.

        Returns
        -------
        dict
            The job, in one of ``statuses``.

        Raises
        ------
        JobWaitError
            The job reached a terminal status that is not in ``statuses`` (e.g. it failed).
        JobTimeoutError
            ``timeout`` passed first.
        """
        wanted = set(statuses)
        deadline = time.monotonic() + timeout
        job: dict[str, Any] | None = None
        etag: str | None = None
        while True:
            fresh, etag = self.get_job_if_changed(job_id, etag)
            if fresh is not None:
                job = fresh
                if on_update is not None:
                    on_update(job)
            assert job is not None  # the first read has no etag, so it always returns the job
            if job["status"] in wanted:
                return job
            if job["status"] in TERMINAL_STATUSES:
                error = f": {job['error']}" if job.get("error") else ""
                raise JobWaitError(f"job {job_id} ended as {job['status']}{error}", job)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise JobTimeoutError(
                    f"job {job_id} is still {job['status']} after {timeout:g} s "
                    f"(waited for {', '.join(sorted(wanted))})", job)
            time.sleep(min(poll_interval, remaining))

    # -- artifacts --------------------------------------------------------------------------

    def list_artifacts(self, *, job_id: int | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """Return artifacts, optionally those of one job and/or one kind (encoder, checkpoint, model, report)."""
        params = {k: v for k, v in (("job_id", job_id), ("kind", kind)) if v is not None}
        return self._json("GET", "/api/artifacts", params=params)["data"]

    def get_artifact(self, artifact_id: int) -> dict[str, Any]:
        """Return one artifact record: id, job_id, kind, filename, size_bytes, sha256, created_at."""
        return self._json("GET", f"/api/artifacts/{artifact_id}")

    def download_artifact(self, artifact_id: int, path: str | os.PathLike[str] | None = None, *,
                          progress: ProgressCallback | None = None, chunk_size: int = 1 << 20) -> Path:
        """Download an artifact and verify it against its recorded sha256.

        The bytes go to ``<path>.part`` first and are renamed into place only after the size and
        sha256 match, so ``path`` never holds a torn or corrupt file.

        Parameters
        ----------
        artifact_id : int
            The artifact's id.
        path : path-like or None
            Destination file, or a directory (existing, or named with a trailing slash) to put
            the artifact's own filename in.
            ``None`` means the artifact's filename in the current directory.
        progress : callable or None
            ``progress(bytes_done, bytes_total)``, called after each chunk.
        chunk_size : int
            Bytes per read.

        Returns
        -------
        pathlib.Path
            Where the verified file now is.

        Raises
        ------
        ChecksumError
            The received bytes do not match the record; the partial file is removed.
        """
        record = self.get_artifact(artifact_id)
        # Only the name part of the server's filename is used, so a record can never write
        # outside the chosen directory.
        own_name = Path(record["filename"]).name or f"artifact-{artifact_id}"
        dest = Path(path) if path is not None else Path.cwd() / own_name
        # "out/" names a directory even before it exists; Path() would drop the slash.
        if dest.is_dir() or str(path).endswith(("/", os.sep)):
            dest = dest / own_name
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")

        hasher = hashlib.sha256()
        # A later version resumes here: hash the existing part file, then request the rest with
        # ``Range: bytes=<offset>-`` and append. Until then every download starts at zero.
        offset = 0
        try:
            done = self._fetch_into(artifact_id, part, offset, hasher, record["size_bytes"], progress, chunk_size)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        actual = hasher.hexdigest()
        if done != record["size_bytes"] or actual != record["sha256"]:
            part.unlink(missing_ok=True)
            got = actual if done == record["size_bytes"] else f"{done} bytes instead of {record['size_bytes']}"
            raise ChecksumError(str(dest), record["sha256"], got)
        os.replace(part, dest)
        return dest

    def _fetch_into(self, artifact_id: int, part: Path, offset: int, hasher: "hashlib._Hash", total: int,
                    progress: ProgressCallback | None, chunk_size: int) -> int:
        """Stream the artifact from byte ``offset`` into ``part``; return the bytes it now holds."""
        headers = {"Accept": "application/octet-stream"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        done = offset
        with self._stream("GET", f"/api/artifacts/{artifact_id}/download", headers=headers) as response:
            with open(part, "ab" if offset else "wb") as out:
                for chunk in response.iter_bytes(chunk_size):
                    out.write(chunk)
                    hasher.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
                out.flush()
                os.fsync(out.fileno())  # the rename below must not publish unflushed bytes
        return done


def _describe_transport_error(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused or host not found"
    return str(exc) or type(exc).__name__


__all__ = ["DEFAULT_SERVER", "NeuroLensClient", "SERVER_ENV", "TERMINAL_STATUSES", "resolve_server_url"]
