"""A throwaway PostgreSQL 15 cluster for the tests: Debian's binaries, a temporary folder, a free port.

``initdb`` refuses to run as root, so as root the cluster belongs to the ``postgres`` user, in a
folder of its own under /tmp (pytest's temporary folders are root's, mode 0700, which that user
cannot enter). Each test that wants a database gets a fresh, empty one (:meth:`create_database`),
so tests never see each other's rows; the cluster is stopped and its folder removed at the end.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from itertools import count
from pathlib import Path

PG_BIN = Path(os.environ.get("NEUROLENS_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"


def missing_reason() -> str | None:
    """Why no cluster can be started here, or ``None`` when one can."""
    if not (PG_BIN / "initdb").exists():
        return (f"PostgreSQL 15 binaries not found in {PG_BIN} (apt-get install postgresql-15, or set "
                f"NEUROLENS_PG_BIN)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root, and there is no {PG_USER!r} user to run initdb as (it refuses root)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    return None


class PostgresCluster:
    """One ``postgres`` server on 127.0.0.1:``port``, trusting local connections (tests only)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="neurolens-pg-"))
        self.data = self.root / "data"
        self._names = count(1)
        self._as_root = os.geteuid() == 0
        if self._as_root:
            entry = pwd.getpwnam(PG_USER)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def _run(self, *command: str, timeout: float = 60) -> None:
        prefix = ("runuser", "-u", PG_USER, "--") if self._as_root else ()
        result = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")

    def start(self) -> "PostgresCluster":
        # fsync off: a test cluster need not survive a power cut, and it makes initdb and every
        # commit far faster on a loaded machine.
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", PG_USER, "--auth=trust",
                  "--locale=C.UTF-8", "--encoding=UTF8", "--no-sync")
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
                   f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                  "-o", options, "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        try:
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass  # never started, or already gone; the folder goes either way
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database's SQLAlchemy URL."""
        import psycopg

        name = f"test_{os.getpid()}_{next(self._names)}_{int(time.time() * 1000) % 100000}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={PG_USER} dbname=postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""
