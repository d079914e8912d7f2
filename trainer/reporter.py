"""Events from the trainer to the job server, heartbeats from a background thread.

The trainer talks to the server over HTTP only (see :mod:`trainer.protocol`). Progress events
are sent by a daemon thread every ``log_every_s`` seconds, so heartbeats keep flowing while a
single optimizer step takes minutes; the training loop only updates the latest numbers. The
server's reply may carry a stop request, which sets :attr:`Reporter.stop_requested`; the loop
checks it between optimizer steps.

A server that is briefly unreachable must never end a run: failed sends are retried quietly
and then dropped. With an empty ``api_url`` the reporter is offline: events are printed to
stdout as JSON lines and artifact registration is skipped. In a data-parallel run only rank 0
speaks: the other ranks' reporters are ``silent`` and send nothing at all.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

import httpx

from trainer.memory import gpu_memory, peak_rss_bytes, rss_bytes
from trainer.protocol import ArtifactKind, ArtifactRegistration, EventReply, JobSpec, TrainerEvent

log = logging.getLogger(__name__)

# Short timeouts: a hung server must not stall a heartbeat for long. Registration can take
# longer because the server hashes the file before it answers.
EVENT_TIMEOUT = httpx.Timeout(10.0, connect=3.0)
REGISTER_TIMEOUT = httpx.Timeout(120.0, connect=3.0)


class Reporter:
    """Sends :class:`TrainerEvent` objects for one job and collects stop requests.

    Parameters
    ----------
    spec : JobSpec
        The job being run; gives the server URL, job id and token.
    log_every_s : float
        Seconds between progress events sent by the background thread.
    retry_s : float
        How long an important event (started, checkpoint, finished, error) or an artifact
        registration is retried before it is given up with a warning.
    silent : bool
        Send nothing (a data-parallel rank other than 0); stop requests then come from signals
        and from rank 0 through :func:`trainer.distributed.agree_on_stop`.
    """

    def __init__(self, spec: JobSpec, log_every_s: float = 2.0, retry_s: float = 30.0,
                 silent: bool = False) -> None:
        self.spec = spec
        self.log_every_s = log_every_s
        self.retry_s = retry_s
        self.silent = silent
        self.offline = not spec.api_url or silent
        self.stop_requested: str | None = None
        self._latest: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: httpx.Client | None = None
        if not self.offline:
            self._client = httpx.Client(
                base_url=spec.api_url.rstrip("/"),
                headers={"Authorization": f"Bearer {spec.token}"},
                timeout=EVENT_TIMEOUT,
            )

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_heartbeats(self) -> None:
        """Start the background thread that sends ``progress`` events."""
        if self._thread is None and not self.silent:
            self._thread = threading.Thread(target=self._heartbeat_loop, name="reporter", daemon=True)
            self._thread.start()

    def stop_heartbeats(self) -> None:
        """Stop the heartbeat thread, waiting for a send in flight to finish."""
        self._halt.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=EVENT_TIMEOUT.read or 10.0)
            self._thread = None

    def close(self) -> None:
        """Stop the heartbeat thread and close the HTTP client."""
        self.stop_heartbeats()
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- what the training loop calls -------------------------------------------------------------
    def update(self, **fields: Any) -> None:
        """Record the latest step, total, loss, lr and samples_per_s for the next heartbeat."""
        with self._lock:
            self._latest.update({k: v for k, v in fields.items() if v is not None})

    def progress(self) -> None:
        """Send a ``progress`` event now with the latest numbers and fresh memory readings."""
        with self._lock:
            latest = dict(self._latest)
        self.send(TrainerEvent(kind="progress", **latest), retry=False)

    def event(self, kind: str, *, retry: bool = True, **fields: Any) -> None:
        """Send an event of ``kind`` (``started``, ``log``, ``checkpoint``, ``phase``, ``finished``, ``error``)."""
        if kind in ("finished", "error"):
            # The last word: no heartbeat may arrive after it (the server reads the last event
            # of a re-attached trainer to learn how it ended).
            self.stop_heartbeats()
        with self._lock:
            base = {k: self._latest.get(k) for k in ("step", "total")}
        base.update(fields)
        self.send(TrainerEvent(kind=kind, **base), retry=retry)

    def register(self, kind: ArtifactKind | str, path: str) -> dict[str, Any] | None:
        """Ask the server to add ``path`` (relative to the job dir) to its artifact store.

        Returns the artifact JSON, or ``None`` offline or when the server could not be reached.
        """
        body = ArtifactRegistration(kind=ArtifactKind(kind), path=path)
        if self.silent:
            return None
        if self.offline:
            log.info("offline: not registering %s artifact %s", body.kind.value, path)
            return None
        url = f"/api/jobs/{self.spec.job_id}/artifacts/register"
        response = self._post(url, body.model_dump(mode="json"), retry=True, timeout=REGISTER_TIMEOUT)
        return response.json() if response is not None else None

    # -- transport --------------------------------------------------------------------------------
    def send(self, event: TrainerEvent, *, retry: bool = True) -> None:
        """Send one event; on the reply's stop request, set :attr:`stop_requested`."""
        if self.silent:
            return
        event.rss_bytes = rss_bytes()
        # Read after the RSS, which the peak's own reading of it may find lower (pages freed
        # meanwhile, as after the final evaluation); the peak is never below the RSS reported.
        event.peak_rss_bytes = max(peak_rss_bytes(), event.rss_bytes)
        for key, value in gpu_memory().items():
            setattr(event, key, value)
        payload = event.model_dump(mode="json", exclude_none=True)
        if self.offline:
            # stdout carries only these JSON lines; logging goes to stderr.
            sys.stdout.write(json.dumps(payload) + "\n")
            sys.stdout.flush()
            return
        response = self._post(f"/api/jobs/{self.spec.job_id}/events", payload, retry=retry)
        if response is None:
            return
        try:
            reply = EventReply.model_validate(response.json())
        except ValueError:
            log.warning("unexpected reply to %s event: %r", event.kind, response.text[:200])
            return
        if reply.stop is not None and self.stop_requested is None:
            log.info("server asked the trainer to %s", reply.stop.value)
            self.stop_requested = reply.stop.value

    def _post(self, url: str, payload: dict[str, Any], *, retry: bool,
              timeout: httpx.Timeout = EVENT_TIMEOUT) -> httpx.Response | None:
        assert self._client is not None
        deadline = time.monotonic() + (self.retry_s if retry else 0.0)
        delay = 0.5
        while True:
            try:
                response = self._client.post(url, json=payload, timeout=timeout)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    return response
                # A 4xx will not get better by retrying (bad token, unknown job): say so once.
                if 400 <= response.status_code < 500:
                    log.warning("POST %s answered %s: %s", url, response.status_code, response.text[:200])
                    return None
                problem = f"HTTP {response.status_code}"
            if time.monotonic() + delay > deadline:
                log.debug("giving up POST %s: %s", url, problem)
                if retry:
                    log.warning("server unreachable, dropped POST %s (%s)", url, problem)
                return None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _heartbeat_loop(self) -> None:
        while not self._halt.wait(self.log_every_s):
            try:
                self.progress()
            except Exception:  # the heartbeat must never take the run down
                log.exception("progress event failed")
