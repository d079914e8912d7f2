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
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from tests.postgres import PostgresCluster

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
                 args: tuple[str, ...] = (), database: str = "") -> RunningServer:
    """Start `python -m server` on a free port and wait until /api/health answers.

    ``database`` is the server's database URL (the :func:`database` fixture's); empty means
    SQLite in ``data_dir``.
    """
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"server-{port}.log"
    full_env = {**os.environ, "NEUROLENS_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1",
                "NEUROLENS_DATABASE_URL": database}
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


# --- databases: SQLite by default; a test or module parametrized with BOTH_DATABASES runs on each --


DATABASES = ("sqlite", "postgresql")
# Runs a test once per database: its `database` (or `shared_database`) fixture gives the URL.
BOTH_DATABASES = pytest.mark.parametrize("database", DATABASES, indirect=True)
BOTH_SHARED_DATABASES = pytest.mark.parametrize("shared_database", DATABASES, indirect=True, scope="module")
# For a test of the default suite that is worth a PostgreSQL run in CI only (minutes, not seconds).
SQLITE_NOW_POSTGRESQL_IN_CI = pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgresql", marks=(pytest.mark.slow, pytest.mark.ci))], indirect=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator["PostgresCluster"]:
    """One throwaway PostgreSQL 15 cluster for the whole session (tests/postgres.py)."""
    from tests.postgres import PostgresCluster, missing_reason

    reason = missing_reason()
    if reason:
        pytest.skip(f"no PostgreSQL for the tests: {reason}")
    cluster = PostgresCluster(free_port()).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _database_url(request: pytest.FixtureRequest) -> str:
    kind = getattr(request, "param", "sqlite")
    if kind == "sqlite":
        return ""  # the server's default: a file in its data directory
    if kind != "postgresql":
        raise ValueError(f"Invalid database {kind!r}; expected one of {DATABASES}.")
    return request.getfixturevalue("postgres_cluster").create_database()


@pytest.fixture
def database(request: pytest.FixtureRequest) -> str:
    """URL of a fresh empty database for this test's server ('' = SQLite in its data dir)."""
    return _database_url(request)


@pytest.fixture(scope="module")
def shared_database(request: pytest.FixtureRequest) -> str:
    """The same as :func:`database`, for the module's :func:`shared_server`."""
    return _database_url(request)


@pytest.fixture
def server(tmp_path: Path, database: str) -> Iterator[RunningServer]:
    """A fresh server with its own database and data directory."""
    running = start_server(tmp_path / "data", database=database)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory, shared_database: str) -> Iterator[RunningServer]:
    """One server for a whole module of tests that do not depend on each other's jobs."""
    running = start_server(tmp_path_factory.mktemp("shared") / "data", database=shared_database)
    try:
        yield running
    finally:
        running.stop()
