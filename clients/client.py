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

import codecs
import hashlib
import http.client
import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from clients.exceptions import APIError, ChecksumError, ConnectionError, JobTimeoutError, JobWaitError

DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVER_ENV = "NEUROLENS_SERVER"
# The server's access token (needed for changes when the server listens beyond loopback).
TOKEN_ENV = "NEUROLENS_TOKEN"

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

    def __init__(self, base_url: str | None = None, *, token: str | None = None,
                 timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = resolve_server_url(base_url)
        headers = {"Accept": "application/json"}
        token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._transport = transport
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport, headers=headers)

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
                   after: int | None = None, encoder_artifact: int | None = None,
                   checkpoint_artifact: int | None = None) -> dict[str, Any]:
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
        checkpoint_artifact : int or None
            Stage 1 only: resume from this checkpoint artifact (e.g. one transferred from a
            smaller machine) and train on to ``config["steps"]``.

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
        if checkpoint_artifact is not None:
            body["checkpoint_artifact"] = checkpoint_artifact
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

    def _every_page(self, path: str, params: dict[str, Any], page_size: int) -> list[dict[str, Any]]:
        """Every item of a paged listing (``data`` a page, ``count`` all that match), read page by page."""
        items: list[dict[str, Any]] = []
        while True:
            page = self._json("GET", path, params={**params, "limit": page_size, "offset": len(items)})
            items.extend(page["data"])
            if not page["data"] or len(items) >= page["count"]:
                return items

    def list_jobs(self, *, status: str | None = None, stage: str | None = None) -> list[dict[str, Any]]:
        """Return every job, newest first, optionally filtered by ``status`` and ``stage``."""
        params = {k: v for k, v in (("status", status), ("stage", stage)) if v}
        return self._every_page("/api/jobs", params, page_size=200)

    def cancel_job(self, job_id: int) -> dict[str, Any]:
        """Ask a job to stop for good; a running trainer checkpoints first. Returns the job."""
        return self._json("POST", f"/api/jobs/{job_id}/cancel")

    def pause_job(self, job_id: int) -> dict[str, Any]:
        """Ask a running or queued job to checkpoint and pause. Returns the job."""
        return self._json("POST", f"/api/jobs/{job_id}/pause")

    def resume_job(self, job_id: int) -> dict[str, Any]:
        """Put a paused job back in the queue; it continues from its newest checkpoint."""
        return self._json("POST", f"/api/jobs/{job_id}/resume")

    def retry_job(self, job_id: int) -> dict[str, Any]:
        """Queue a failed or cancelled job again from its newest checkpoint, with a fresh retry budget."""
        return self._json("POST", f"/api/jobs/{job_id}/retry")

    def delete_job(self, job_id: int) -> dict[str, Any]:
        """Delete a job that is not queued or running, with its files and the artifacts no other
        job uses. Returns ``{"deleted", "freed_bytes", "kept_artifacts", "message"}``."""
        return self._json("DELETE", f"/api/jobs/{job_id}")

    def delete_artifact(self, artifact_id: int) -> dict[str, Any]:
        """Delete an artifact no queued, running or paused job uses. Returns
        ``{"deleted", "freed_bytes", "message"}``."""
        return self._json("DELETE", f"/api/artifacts/{artifact_id}")

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

    def follow_logs(self, job_id: int, *, tail_bytes: int = 65536, poll_interval: float = 1.0) -> Iterator[str]:
        """Yield the end of a job's log, then what it gains, until the job has ended and all is read.

        Reads continue from the byte the last one ended at (the ``X-Log-Size`` header), and are
        decoded incrementally, so that a character cut between two reads comes out whole.
        """
        response = self._request("GET", f"/api/jobs/{job_id}/logs", params={"tail_bytes": tail_bytes},
                                 headers={"Accept": "text/plain"})
        yield response.text
        offset = int(response.headers.get("X-Log-Size", 0))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            # The status is read before the log, so that a job seen ended has nothing left to write.
            ended = self.get_job(job_id)["status"] in TERMINAL_STATUSES
            while True:
                chunk = self._request("GET", f"/api/jobs/{job_id}/logs", params={"offset": offset},
                                      headers={"Accept": "text/plain"})
                offset = int(chunk.headers.get("X-Log-Size", offset))
                if not chunk.content:
                    break
                yield decoder.decode(chunk.content)
            if ended:
                yield decoder.decode(b"", final=True)
                return
            time.sleep(poll_interval)

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
        """Return every artifact, newest first, optionally those of one job and/or one kind (encoder, checkpoint, model, report)."""
        params = {k: v for k, v in (("job_id", job_id), ("kind", kind)) if v is not None}
        return self._every_page("/api/artifacts", params, page_size=500)

    def get_artifact(self, artifact_id: int) -> dict[str, Any]:
        """Return one artifact record: id, job_id, kind, filename, size_bytes, sha256, created_at."""
        return self._json("GET", f"/api/artifacts/{artifact_id}")

    def download_artifact(self, artifact_id: int, path: str | os.PathLike[str] | None = None, *,
                          progress: ProgressCallback | None = None, chunk_size: int = 4 << 20,
                          resume: bool = True) -> Path:
        """Download an artifact, resuming a partial file, and verify it against its recorded sha256.

        The bytes go to ``<path>.part`` first and are renamed into place only after the size and
        sha256 match, so ``path`` never holds a torn or corrupt file. A ``.part`` file left by an
        interrupted download (by this client, by ``curl -o``, by anything) is continued with
        ``Range: bytes=<its size>-`` and ``If-Range: <ETag>``, so a changed file on the server is
        sent whole instead of spliced onto old bytes.

        Parameters
        ----------
        artifact_id : int
            The artifact's id.
        path : path-like or None
            Destination file, or a directory (existing, or named with a trailing slash) to put
            the artifact's own filename in.
            ``None`` means the artifact's filename in the current directory.
        progress : callable or None
            ``progress(bytes_done, bytes_total)``, called once before the transfer (with the
            bytes already on disk when resuming) and after each chunk.
        chunk_size : int
            Bytes per read.
        resume : bool
            Continue an existing ``.part`` file; ``False`` starts from zero.

        Returns
        -------
        pathlib.Path
            Where the verified file now is.

        Raises
        ------
        ChecksumError
            The received bytes do not match the record, also after one fresh retry when a
            resumed file turned out wrong; the partial file is removed.
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
        total = record["size_bytes"]

        offset = part.stat().st_size if resume and part.is_file() else 0
        if offset > total:  # not a prefix of this artifact, whatever it is
            offset = 0
        while True:
            hasher = hashlib.sha256()
            if offset:
                _hash_prefix(part, offset, hasher)
            if progress is not None:
                progress(offset, total)
            done = offset
            try:
                if offset < total or total == 0:
                    done = self._fetch_into(artifact_id, part, offset, hasher, total, progress, chunk_size,
                                            etag=f'"{record["sha256"]}"')
            except ChecksumError:
                raise
            except BaseException:
                # An interrupted download keeps its bytes: they are where the next try resumes.
                if not resume:
                    part.unlink(missing_ok=True)
                raise
            actual = hasher.hexdigest() if done >= 0 else ""
            if done == total and actual == record["sha256"]:
                break
            part.unlink(missing_ok=True)
            if offset:  # the old partial file was not a prefix of this artifact: start afresh once
                offset = 0
                continue
            got = actual if done == total else f"{done} bytes instead of {total}"
            raise ChecksumError(str(dest), record["sha256"], got)
        os.replace(part, dest)
        return dest

    def _fetch_into(self, artifact_id: int, part: Path, offset: int, hasher: "hashlib._Hash", total: int,
                    progress: ProgressCallback | None, chunk_size: int, etag: str | None = None) -> int:
        """Stream the artifact from byte ``offset`` into ``part``; return the bytes it now holds.

        If the server ignores the range (a 200 instead of 206, e.g. because ``If-Range`` did not
        match), the file is rewritten from zero and ``hasher`` is reset accordingly.
        """
        headers = {"Accept": "application/octet-stream"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if etag:
                headers["If-Range"] = etag
        with self._body(f"/api/artifacts/{artifact_id}/download", headers, chunk_size) as (status, chunks):
            if offset and status != 206:
                offset = 0
                hasher.__init__()  # type: ignore[misc]  # a fresh sha256: the whole file follows
            with open(part, "r+b" if offset else "wb") as out:
                out.seek(offset)
                out.truncate()
                try:
                    done = _write_and_hash(chunks, out, hasher, offset, total, progress)
                except _Interrupted as exc:
                    out.flush()
                    raise ConnectionError(self.base_url, f"download interrupted at byte {exc.done}: "
                                                         f"{exc.reason}") from exc.__cause__
                out.flush()
                os.fsync(out.fileno())  # the rename after verification must not publish unflushed bytes
        return done

    @contextmanager
    def _body(self, path: str, headers: dict[str, str], chunk_size: int) -> Iterator[tuple[int, Iterator[memoryview]]]:
        """GET ``path`` and give its status and its body as buffers of ``chunk_size`` bytes.

        httpx hands a body over in 64 KiB pieces, each copied twice on the way (h11's buffer,
        then the chunker): about 300 MB/s on loopback, a third of a file copy. The standard
        library's :mod:`http.client` reads a response straight from the socket into a buffer
        we own (``readinto``), so a large body costs one copy and a few calls per MiB. Two
        buffers alternate: one fills while the other is hashed and written
        (:func:`_write_and_hash`), so each ``memoryview`` is valid until the next but one.
        A client built on a custom ``transport`` (no socket) streams through httpx instead.
        """
        # The bytes as stored: http.client decodes no Content-Encoding, and the sha256 is of them.
        merged = httpx.Headers(self._http.headers)  # case-insensitive: ours replace the client's
        merged.update({"Accept-Encoding": "identity", **headers})
        headers = dict(merged.items())
        if self._transport is not None:
            with self._stream("GET", path, headers=headers) as response:
                yield response.status_code, (memoryview(c) for c in response.iter_bytes(chunk_size))
            return
        url = self._http.base_url.join(path)
        timeout = self._http.timeout.read or DEFAULT_TIMEOUT.read
        if url.scheme == "https":
            import ssl

            import certifi

            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                url.host, url.port, timeout=timeout, context=ssl.create_default_context(cafile=certifi.where()))
        else:
            connection = http.client.HTTPConnection(url.host, url.port, timeout=timeout)
        try:
            try:
                connection.request("GET", url.raw_path.decode("ascii"), headers=headers)
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise ConnectionError(self.base_url, _describe_socket_error(exc)) from exc
            if response.status >= 400:
                body = response.read()
                raise APIError.from_response(httpx.Response(
                    response.status, headers=response.getheaders(), content=body,
                    request=httpx.Request("GET", url)))

            def chunks() -> Iterator[memoryview]:
                buffers = (memoryview(bytearray(chunk_size)), memoryview(bytearray(chunk_size)))
                turn = 0
                try:
                    while n := response.readinto(buffers[turn]):
                        yield buffers[turn][:n]
                        turn ^= 1
                except (OSError, http.client.HTTPException) as exc:
                    raise _Interrupted(_describe_socket_error(exc)) from exc
                # http.client reports a connection closed before Content-Length as a plain end.
                if response.length:
                    raise _Interrupted(f"the server closed the connection {response.length} bytes before the end")

            yield response.status, chunks()
        finally:
            connection.close()

    # -- uploads ----------------------------------------------------------------------------

    def list_uploads(self, *, sha256: str | None = None) -> list[dict[str, Any]]:
        """Return the server's unfinished uploads, optionally only those for content ``sha256``."""
        params = {"sha256": sha256} if sha256 else {}
        return self._json("GET", "/api/artifacts/uploads", params=params)["data"]

    def get_upload(self, upload_id: str) -> dict[str, Any]:
        """Return one upload session; its ``offset`` is the number of bytes the server holds."""
        return self._json("GET", f"/api/artifacts/uploads/{upload_id}")

    def open_upload(self, kind: str, sha256: str, size_bytes: int, filename: str | None = None, *,
                    reuse: bool = True) -> dict[str, Any]:
        """Open an upload session, or find an unfinished one for the same file to resume.

        Parameters
        ----------
        kind : {"encoder", "checkpoint", "model", "report"}
            What the file is; the server checks its content against it.
        sha256 : str
            Hex digest the complete file must have.
        size_bytes : int
            Length of the complete file.
        filename : str or None
            Name to store it under.
        reuse : bool
            Continue an open session with the same kind, digest, size and name if there is one.

        Returns
        -------
        dict
            The session: ``id``, ``offset`` and the declared values.
        """
        if reuse:
            for session in self.list_uploads(sha256=sha256):
                if (session["kind"], session["size_bytes"]) == (kind, size_bytes) and \
                        (filename is None or session["filename"] == filename):
                    return session
        body: dict[str, Any] = {"kind": kind, "sha256": sha256, "size_bytes": size_bytes}
        if filename:
            body["filename"] = filename
        return self._json("POST", "/api/artifacts/uploads", json=body)

    def send_upload_bytes(self, upload_id: str, offset: int, length: int, chunks: Iterable[bytes]) -> dict[str, Any]:
        """PATCH ``length`` bytes (``chunks``) onto an upload session at ``offset``; return the session."""
        headers = {"Upload-Offset": str(offset), "Content-Length": str(length),
                   "Content-Type": "application/octet-stream"}
        # The body may take minutes; only a stalled write or a silent server should time out.
        return self._json("PATCH", f"/api/artifacts/uploads/{upload_id}", content=chunks, headers=headers,
                          timeout=httpx.Timeout(DEFAULT_TIMEOUT.read, connect=DEFAULT_TIMEOUT.connect,
                                                read=None if length > 0 else DEFAULT_TIMEOUT.read))

    def complete_upload(self, upload_id: str) -> dict[str, Any]:
        """Ask the server to verify the received file and store it; returns the new artifact.

        Raises
        ------
        APIError
            422 when the bytes fail verification (length, sha256, content); the message says
            which. The session is gone then: its bytes are known to be wrong.
        """
        # Verification hashes the file and builds the model's shapes in a subprocess.
        return self._json("POST", f"/api/artifacts/uploads/{upload_id}/complete",
                          timeout=httpx.Timeout(600.0, connect=DEFAULT_TIMEOUT.connect))

    def delete_upload(self, upload_id: str) -> None:
        """Abandon an upload session and let the server delete its bytes."""
        self._request("DELETE", f"/api/artifacts/uploads/{upload_id}")

    def upload_artifact(self, path: str | os.PathLike[str], kind: str, *, sha256: str | None = None,
                        filename: str | None = None, progress: ProgressCallback | None = None,
                        chunk_size: int = 4 << 20, retries: int = 5) -> dict[str, Any]:
        """Import a file as an artifact, resuming where an earlier attempt stopped.

        The upload goes through a resumable session: an unfinished session for the same file
        (found by its sha256) is continued from the offset the server already holds, and a
        dropped connection is retried from the new offset up to ``retries`` times.

        Parameters
        ----------
        path : path-like
            The file to send.
        kind : {"encoder", "checkpoint", "model", "report"}
            What the file is.
        sha256 : str or None
            The digest the file must have. The server checks the received bytes against it and
            refuses a mismatch. ``None`` hashes the file here first.
        filename : str or None
            Name to store it under; defaults to the file's own name.
        progress : callable or None
            ``progress(bytes_done, bytes_total)``.
        chunk_size : int
            Bytes per read.
        retries : int
            Reconnections allowed after dropped connections.

        Returns
        -------
        dict
            The new artifact (``job_id`` is ``None`` for an imported file).
        """
        source = Path(path)
        size = source.stat().st_size
        digest = sha256.lower() if sha256 else _hash_prefix(source, size, hashlib.sha256()).hexdigest()
        session = self.open_upload(kind, digest, size, filename or source.name)

        def read_from(offset: int) -> Iterator[bytes]:
            with open(source, "rb") as fh:
                fh.seek(offset)
                done = offset
                while chunk := fh.read(chunk_size):
                    yield chunk
                    done += len(chunk)
                    if progress is not None:
                        progress(done, size)

        return self._push(session, size, read_from, retries)

    def _push(self, session: dict[str, Any], size: int, read_from: Callable[[int], Iterator[bytes]],
              retries: int) -> dict[str, Any]:
        """Send the missing bytes of an upload session, reconnecting after drops, then complete it."""
        failures = 0
        offset = session["offset"]
        while offset < size:
            try:
                session = self.send_upload_bytes(session["id"], offset, size - offset, read_from(offset))
                offset = session["offset"]
            except (ConnectionError, APIError) as exc:
                # 409: another offset than ours (an earlier attempt's bytes arrived after all).
                if isinstance(exc, APIError) and exc.status_code != 409:
                    raise
                failures += 1
                if failures > retries:
                    raise
                time.sleep(min(0.5 * 2 ** (failures - 1), 10.0))
                offset = self._refresh_offset(session["id"])
        return self.complete_upload(session["id"])

    def _refresh_offset(self, upload_id: str) -> int:
        return self.get_upload(upload_id)["offset"]

    def transfer_artifact(self, artifact_id: int, target: "NeuroLensClient", *,
                          progress: ProgressCallback | None = None, chunk_size: int = 1 << 20,
                          retries: int = 5) -> tuple[dict[str, Any], bool]:
        """Copy an artifact from this server to ``target``, streaming, without a local file.

        The download's body is fed straight into the target's upload session; after a dropped
        connection on either side the copy continues from the offset the target holds, with a
        ``Range`` request to this server. The target verifies the sha256 on record here and the
        file's content before it stores anything.

        Parameters
        ----------
        artifact_id : int
            The artifact's id on this server.
        target : NeuroLensClient
            A client for the receiving server.
        progress : callable or None
            ``progress(bytes_done, bytes_total)``.
        chunk_size : int
            Bytes per read.
        retries : int
            Reconnections allowed after dropped connections.

        Returns
        -------
        artifact : dict
            The artifact on the target server.
        copied : bool
            ``False`` when the target already held an artifact of this kind and content, which
            is then returned and nothing is sent.
        """
        record = self.get_artifact(artifact_id)
        existing = target._json("GET", "/api/artifacts", params={"sha256": record["sha256"], "kind": record["kind"]})
        if existing["data"]:
            return existing["data"][0], False
        session = target.open_upload(record["kind"], record["sha256"], record["size_bytes"], record["filename"])
        etag = f'"{record["sha256"]}"'

        def read_from(offset: int) -> Iterator[bytes]:
            headers = {"Accept": "application/octet-stream", "Range": f"bytes={offset}-", "If-Range": etag}
            done = offset
            with self._stream("GET", f"/api/artifacts/{artifact_id}/download", headers=headers) as response:
                if response.status_code != 206 and offset:
                    raise ChecksumError(f"artifact {artifact_id}", record["sha256"], "a changed file (If-Range)")
                try:
                    for chunk in response.iter_bytes(chunk_size):
                        yield chunk
                        done += len(chunk)
                        if progress is not None:
                            progress(done, record["size_bytes"])
                except httpx.TransportError as exc:
                    # Raised as our error so that the target's request does not take the blame.
                    raise ConnectionError(self.base_url, _describe_transport_error(exc)) from exc

        return target._push(session, record["size_bytes"], read_from, retries), True


class _Interrupted(Exception):
    """A body stopped before its end; ``done`` is set to the bytes written when it is caught."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.done = 0


def _write_and_hash(chunks: Iterator[memoryview], out: Any, hasher: "hashlib._Hash", done: int, total: int,
                    progress: ProgressCallback | None) -> int:
    """Hash and write each buffer in a worker thread while the next one is read; return ``done``
    plus the bytes written.

    sha256 and ``write`` release the GIL on large buffers, so reading the socket, hashing and
    writing overlap on two cores. A buffer is handed on only after the previous one is
    finished with, which is what lets :meth:`NeuroLensClient._body` reuse two buffers.
    """
    def consume(view: memoryview) -> None:
        hasher.update(view)
        out.write(view)

    with ThreadPoolExecutor(1, thread_name_prefix="neurolens-download") as pool:
        pending: Future[None] | None = None
        pending_bytes = 0
        try:
            for view in chunks:
                if pending is not None:
                    pending.result()
                    done += pending_bytes
                    if progress is not None:
                        progress(done, total)
                pending, pending_bytes = pool.submit(consume, view), len(view)
        except httpx.TransportError as exc:  # the httpx path (custom transport)
            error = _Interrupted(_describe_transport_error(exc))
            error.__cause__ = exc
            raise _finish(pending, error, done, pending_bytes) from exc
        except _Interrupted as exc:
            raise _finish(pending, exc, done, pending_bytes) from exc.__cause__
        if pending is not None:
            pending.result()
            done += pending_bytes
            if progress is not None:
                progress(done, total)
    return done


def _finish(pending: "Future[None] | None", error: _Interrupted, done: int, length: int) -> _Interrupted:
    """Let the buffer in hand reach the file (it is the resume point) and count it into ``error``."""
    if pending is not None:
        pending.result()
        done += length
    error.done = done
    return error


def _hash_prefix(path: Path, length: int, hasher: "hashlib._Hash", chunk_size: int = 4 << 20) -> "hashlib._Hash":
    """Feed the first ``length`` bytes of ``path`` to ``hasher``, in bounded memory."""
    with open(path, "rb") as fh:
        remaining = length
        while remaining > 0 and (chunk := fh.read(min(chunk_size, remaining))):
            hasher.update(chunk)
            remaining -= len(chunk)
    return hasher


def _describe_socket_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused or host not found"
    return str(exc) or type(exc).__name__


def _describe_transport_error(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused or host not found"
    return str(exc) or type(exc).__name__


__all__ = ["DEFAULT_SERVER", "NeuroLensClient", "SERVER_ENV", "TERMINAL_STATUSES", "TOKEN_ENV", "resolve_server_url"]
