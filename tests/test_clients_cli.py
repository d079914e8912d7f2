"""The ``neurolens`` CLI against a real server, through typer's CliRunner."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from typer.testing import CliRunner

from clients.cli import app
from tests.conftest import REPO_ROOT, RunningServer

runner = CliRunner()


def cli(server_url: str, *args: str):
    # --server is always explicit so a NEUROLENS_SERVER in the developer's shell cannot leak in.
    return runner.invoke(app, ["--server", server_url, *args])


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got {result.stderr!r}"
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


def test_submit_watch_status_download(server: RunningServer, tmp_path: Path) -> None:
    submitted = cli(server.url, "submit", "stage1", "--preset", "tiny", "--steps", "10", "--set", "seed=3", "-q")
    assert submitted.exit_code == 0, submitted.output
    job_id = int(submitted.stdout.strip())

    listed = cli(server.url, "jobs")
    assert listed.exit_code == 0, listed.output
    assert "stage1" in listed.stdout and str(job_id) in listed.stdout

    watched = cli(server.url, "watch", str(job_id), "--interval", "0.3")
    assert watched.exit_code == 0, watched.output
    assert f"Job {job_id} succeeded." in watched.stdout

    status = cli(server.url, "status", str(job_id))
    assert status.exit_code == 0, status.output
    assert "succeeded" in status.stdout and "10/10" in status.stdout and "encoder" in status.stdout

    with server.client() as http:
        job = http.get(f"/api/jobs/{job_id}").json()
    assert job["config"]["seed"] == 3
    encoder = next(a for a in job["artifacts"] if a["kind"] == "encoder")
    out = tmp_path / "encoder.safetensors"
    downloaded = cli(server.url, "download", str(encoder["id"]), "-o", str(out))
    assert downloaded.exit_code == 0, downloaded.output
    assert "verified" in downloaded.stdout
    assert hashlib.sha256(out.read_bytes()).hexdigest() == encoder["sha256"]

    logs = cli(server.url, "logs", str(job_id))
    assert logs.exit_code == 0 and logs.stdout.strip()

    listed_artifacts = cli(server.url, "artifacts", "--job", str(job_id))
    assert listed_artifacts.exit_code == 0 and "encoder" in listed_artifacts.stdout

    # A finished job cannot be paused: the server's 409 becomes one line and exit 1.
    refused = cli(server.url, "pause", str(job_id))
    assert refused.exit_code == 1
    assert "409" in one_error_line(refused)


def test_submit_with_bad_preset_prints_one_line(server: RunningServer) -> None:
    result = cli(server.url, "submit", "stage1", "--preset", "huge")
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "preset" in line and "'huge'" in line and "tiny" in line


def test_submit_passes_devices_and_checkpoint_artifact_to_the_server(server: RunningServer) -> None:
    result = cli(server.url, "submit", "stage1", "--devices", "3")
    assert result.exit_code == 1 and "Invalid devices 3; it must divide batch_size 8" in one_error_line(result)
    result = cli(server.url, "submit", "stage1", "--checkpoint-artifact", "4242")
    assert result.exit_code == 1 and "Artifact 4242 named in 'checkpoint_artifact' not found" in one_error_line(result)


def test_bad_set_syntax_is_a_usage_error(server: RunningServer) -> None:
    result = cli(server.url, "submit", "stage1", "--set", "no-equals-sign")
    assert result.exit_code == 2
    assert "key=value" in result.output


def test_missing_job_and_empty_lists(server: RunningServer) -> None:
    assert "No jobs." in cli(server.url, "jobs").stdout
    assert "No artifacts." in cli(server.url, "artifacts").stdout
    result = cli(server.url, "status", "4242")
    assert result.exit_code == 1
    assert "4242" in one_error_line(result)


def test_closed_port_says_cannot_reach() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = cli(f"http://127.0.0.1:{port}", "jobs")
    assert result.exit_code == 1
    assert f"cannot reach server at http://127.0.0.1:{port}" in one_error_line(result)


def test_console_script_entry_point_runs_without_traceback() -> None:
    # Through main() and a real interpreter, as `neurolens` runs: the env var picks the server.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-c", "from clients.cli import main; main()", "jobs"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        env={"NEUROLENS_SERVER": f"127.0.0.1:{port}", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: cannot reach server at http://127.0.0.1:{port} "
                                   "(connection refused or host not found)")


def test_serve_runs_a_server_with_the_given_flags(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data_dir = tmp_path / "served"
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir)],
        cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
        # The flags must win over the environment.
        env={**os.environ, "NEUROLENS_PORT": "1", "NEUROLENS_DATA_DIR": str(tmp_path / "wrong")},
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError(f"serve did not come up:\n{(tmp_path / 'serve.log').read_text()}")
        assert (data_dir / "neurolens.db").exists()
        assert not (tmp_path / "wrong").exists()
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def test_serve_rejects_a_bad_port_in_one_line() -> None:
    result = runner.invoke(app, ["serve", "--port", "70000"])
    assert result.exit_code == 1
    assert "port" in one_error_line(result)


def test_download_by_job_and_kind_and_checkpoints_named_by_step(server: RunningServer, tmp_path: Path) -> None:
    submitted = cli(server.url, "submit", "stage1", "--preset", "tiny", "--steps", "6", "--set", "probe_words=0", "-q")
    job_id = int(submitted.stdout.strip())
    assert cli(server.url, "watch", str(job_id), "--interval", "0.3").exit_code == 0
    with server.client() as http:
        artifacts = {a["kind"]: a for a in http.get("/api/artifacts", params={"job_id": job_id}).json()["data"]}
    assert artifacts["checkpoint"]["filename"] == "checkpoint-step-000006.safetensors"
    assert artifacts["encoder"]["filename"] == "encoder.safetensors"

    downloaded = cli(server.url, "download", "--job", str(job_id), "--kind", "encoder", "-o", str(tmp_path) + "/")
    assert downloaded.exit_code == 0, downloaded.output
    assert hashlib.sha256((tmp_path / "encoder.safetensors").read_bytes()).hexdigest() == artifacts["encoder"]["sha256"]

    missing = cli(server.url, "download", "--job", str(job_id), "--kind", "model")
    assert missing.exit_code == 1
    assert one_error_line(missing) == f"error: job {job_id} has no model artifact (it has: checkpoint, encoder)"
    both = cli(server.url, "download", "1", "--job", str(job_id), "--kind", "encoder")
    assert both.exit_code == 2 and "not both" in both.stderr


@pytest.mark.slow
@pytest.mark.ci
def test_delete_asks_unless_yes_and_status_is_labelled_within_80_columns(server: RunningServer) -> None:
    from tests.test_cli_terminal import neurolens_in_terminal

    with server.client() as http:
        running = http.post("/api/jobs", json={"stage": "stage1", "config": {
            "preset": "tiny", "steps": 400, "probe_words": 0, "log_every_s": 0.2}}).json()["id"]
        waiting = http.post("/api/jobs", json={"stage": "stage2", "after": running,
                                               "config": {"preset": "tiny"}}).json()["id"]
        deadline = time.monotonic() + 120
        while (lambda job: job.get("phase") != "training" or not job["metrics"].get("samples_per_s"))(
                http.get(f"/api/jobs/{running}").json()):
            assert time.monotonic() < deadline, "the job never reported its training phase"
            time.sleep(0.3)

    shown = cli(server.url, "status", str(running))
    assert shown.exit_code == 0, shown.output
    assert re.search(r"Phase +training", shown.stdout) and re.search(r"Disk +[\d.]+ KiB", shown.stdout), shown.stdout
    assert "samples_per_s" not in shown.stdout and "Samples per second" in shown.stdout, shown.stdout

    summary = neurolens_in_terminal(server, "status")
    assert max(len(line) for line in summary) <= 80, summary
    text = "\n".join(summary)
    for label in ("Executor", "local", "Memory", "available of", "Disk", "free; NeuroLens takes", "Jobs"):
        assert label in text, summary
    assert "1 queued, 1 running" in text, summary
    raw = cli(server.url, "status", "--json")
    assert raw.exit_code == 0 and set(json.loads(raw.stdout)["disk"]) == {
        "used_bytes", "free_bytes", "jobs_bytes", "artifacts_bytes"}

    refused = cli(server.url, "delete", "job", str(running), "--yes")
    assert refused.exit_code == 1 and "running; cancel it first" in one_error_line(refused)
    assert "cancelled" in cli(server.url, "cancel", str(waiting)).stdout
    kept = runner.invoke(app, ["--server", server.url, "delete", "job", str(waiting)], input="n\n")
    assert kept.exit_code == 1 and f"Delete job {waiting} (stage2, cancelled)" in kept.stdout, kept.output
    assert one_error_line(kept) == "error: nothing deleted."
    deleted = runner.invoke(app, ["--server", server.url, "delete", "job", str(waiting)], input="y\n")
    assert deleted.exit_code == 0 and f"Job {waiting} deleted;" in deleted.stdout, deleted.output
    again = cli(server.url, "delete", "job", str(waiting), "--yes")
    assert again.exit_code == 1 and f"Job {waiting} not found" in one_error_line(again)
    missing = cli(server.url, "delete", "artifact", "999", "--yes")
    assert missing.exit_code == 1 and "Artifact 999 not found" in one_error_line(missing)
    cli(server.url, "cancel", str(running))
