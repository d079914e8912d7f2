"""Shared fixtures: real servers on free ports, in their own processes, on temporary data dirs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    """A `python -m server` process listening on ``url`` with its data in ``data_dir``."""

    url: str
    data_dir: Path
    process: subprocess.Popen
    log_path: Path
    token: str = ""  # the server's token, sent by client() unless it is told otherwise

    def client(self, *, authenticated: bool = True, **kwargs) -> httpx.Client:
        headers = kwargs.pop("headers", {})
        if self.token and authenticated:
            headers = {"Authorization": f"Bearer {self.token}", **headers}
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30.0), headers=headers, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_job(self, job_id: int, statuses: set[str], timeout: float = 180.0) -> dict:
        """Poll the job until its status is one of ``statuses``; fail with the server log otherwise."""
        deadline = time.monotonic() + timeout
        job: dict = {}
        with self.client() as client:
            while time.monotonic() < deadline:
                job = client.get(f"/api/jobs/{job_id}").json()
                if job["status"] in statuses:
                    return job
                if job["status"] in {"failed", "cancelled", "succeeded"} - statuses:
                    break
                time.sleep(0.3)
        job_log = self.data_dir / "jobs" / str(job_id) / "trainer.log"
        trainer_log = job_log.read_text(errors="replace")[-4000:] if job_log.exists() else "(no trainer log)"
        raise AssertionError(
            f"job {job_id} is {job.get('status')!r}, wanted {sorted(statuses)}; job={job}\n"
            f"--- trainer log ---\n{trainer_log}\n--- server log ---\n{self.log()[-4000:]}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_server(data_dir: Path, *, port: int | None = None, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> RunningServer:
    """Start `python -m server` on a free port and wait until /api/health answers."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"server-{port}.log"
    full_env = {**os.environ, "NEUROLENS_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    full_env.update(env or {})
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), *args],
            cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
        )
    token = args[args.index("--token") + 1] if "--token" in args else full_env.get("NEUROLENS_TOKEN", "")
    server = RunningServer(f"http://127.0.0.1:{port}", data_dir, process, log_path, token)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/api/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise AssertionError(f"server did not become healthy:\n{server.log()}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    """A fresh server with its own SQLite file and data directory."""
    running = start_server(tmp_path / "data")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for a whole module of tests that do not depend on each other's jobs."""
    running = start_server(tmp_path_factory.mktemp("shared") / "data")
    try:
        yield running
    finally:
        running.stop()
