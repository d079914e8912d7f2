"""Shared helpers for the trainer tests: spec files, subprocess runs, a stand-in job server.

The stand-in server speaks the two trainer endpoints of the HTTP contract (events and artifact
registration) with the standard library, so trainer tests need neither the real server nor a
database; the real server's own tests cover it end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def write_spec(job_dir: Path, stage: str, config: dict[str, Any], *, dataset: str = "synthetic",
               api_url: str = "", cache_dir: Path | None = None, encoder_path: Path | None = None,
               job_id: int = 1, token: str = "secret-token") -> Path:
    job_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "job_id": job_id, "stage": stage, "dataset": dataset, "config": config, "job_dir": str(job_dir),
        "api_url": api_url, "token": token, "cache_dir": str(cache_dir) if cache_dir else None,
        "encoder_path": str(encoder_path) if encoder_path else None,
    }
    path = job_dir / "spec.json"
    path.write_text(json.dumps(spec))
    return path


@dataclass
class TrainerRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def events(self) -> list[dict[str, Any]]:
        """Offline events: the JSON lines on stdout."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]


def run_trainer(spec_path: Path, timeout: float = 300.0, env: dict[str, str] | None = None) -> TrainerRun:
    """``python -m trainer run spec.json`` in a real subprocess (``env``: extra variables)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "trainer", "run", str(spec_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return TrainerRun(proc.returncode, proc.stdout, proc.stderr)


@dataclass
class StandInServer:
    """Records what the trainer posts; asks it to stop once a progress step reaches ``stop_at``."""

    token: str = "secret-token"
    stop_at: int | None = None
    stop: str = "pause"
    events: list[dict[str, Any]] = field(default_factory=list)
    registrations: list[dict[str, Any]] = field(default_factory=list)
    bad_auth: int = 0
    url: str = ""

    def start(self) -> "StandInServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("Authorization") != f"Bearer {owner.token}":
                    owner.bad_auth += 1
                    return self._reply(401, {"detail": "bad token"})
                if self.path.endswith("/events"):
                    owner.events.append(body)
                    stop = None
                    if owner.stop_at is not None and (body.get("step") or 0) >= owner.stop_at:
                        stop = owner.stop
                    return self._reply(200, {"stop": stop})
                if self.path.endswith("/artifacts/register"):
                    owner.registrations.append(body)
                    return self._reply(201, {"id": len(owner.registrations), **body})
                return self._reply(404, {"detail": f"no route {self.path}"})

            def _reply(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
