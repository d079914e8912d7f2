"""Moving work between machines: interrupted downloads resumed with curl and the CLI, and a
trained encoder carried from one real server to another that trains Stage 2 from it."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clients import NeuroLensClient
from clients.cli import app
from tests.conftest import RunningServer, start_server

runner = CliRunner()
CURL = shutil.which("curl")


def cli(server_url: str, *args: str):
    return runner.invoke(app, ["--server", server_url, *args])


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kill_curl_half_way(url: str, part: Path, total: int) -> None:
    """Start a rate-limited curl and SIGKILL it once it has written between 20% and 80% of the file."""
    process = subprocess.Popen([CURL, "-sS", "--limit-rate", "4M", "-o", str(part), url])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if part.is_file() and part.stat().st_size >= total // 5:
                break
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    assert total // 5 <= part.stat().st_size <= total * 4 // 5, part.stat().st_size


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_interrupted_download_resumes_with_curl_and_with_the_cli(server: RunningServer, tmp_path: Path) -> None:
    # A large report (any JSON object is one) stands in for a big file: it is checked without torch.
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"rows": ["%08d eeg-to-text" % i for i in range(1_000_000)]}))
    total = report.stat().st_size
    with NeuroLensClient(server.url) as client:
        artifact = client.upload_artifact(report, "report")
    url = f"{server.url}/api/artifacts/{artifact['id']}/download"

    # curl: killed half-way, then `curl -C -` asks for the rest (206) and the whole matches.
    by_curl = tmp_path / "curl.json"
    kill_curl_half_way(url, by_curl, total)
    resumed = subprocess.run([CURL, "-sS", "-C", "-", "-o", str(by_curl), "-w", "%{http_code}", url],
                             capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == "206"
    assert sha256_file(by_curl) == artifact["sha256"]

    # The CLI continues the .part file a killed client left behind, and verifies the result.
    by_cli = tmp_path / "cli.json"
    kill_curl_half_way(url, by_cli.with_name("cli.json.part"), total)
    result = cli(server.url, "download", str(artifact["id"]), "-o", str(by_cli))
    assert result.exit_code == 0, result.output
    assert "Resumed at" in result.stdout and "verified" in result.stdout
    assert sha256_file(by_cli) == artifact["sha256"]
    assert not by_cli.with_name("cli.json.part").exists()

    # A partial file that is not a prefix of the artifact is detected and the download redone.
    garbage = tmp_path / "garbage.json"
    garbage.with_name("garbage.json.part").write_bytes(b"x" * (total // 2))
    result = cli(server.url, "download", str(artifact["id"]), "-o", str(garbage))
    assert result.exit_code == 0, result.output
    assert sha256_file(garbage) == artifact["sha256"]


def test_a_download_cut_off_by_the_servers_death_keeps_its_bytes_and_resumes(tmp_path: Path) -> None:
    """The client's own reader (http.client into two buffers, hashed and written by a worker):
    a server killed mid-body leaves a .part of exactly the bytes reported, continued later."""
    from clients.exceptions import ConnectionError as ClientConnectionError

    report = tmp_path / "report.json"
    report.write_text(json.dumps({"rows": ["%08d eeg-to-text" % i for i in range(600_000)]}))  # ~12 MB
    total = report.stat().st_size
    data_dir = tmp_path / "data"
    first = start_server(data_dir)
    try:
        with NeuroLensClient(first.url) as client:
            artifact = client.upload_artifact(report, "report")

            def kill_at_a_quarter(done: int, _total: int) -> None:
                if done >= total // 4 and first.process.poll() is None:
                    first.process.kill()
                    first.process.wait(10)

            target = tmp_path / "out.json"
            with pytest.raises(ClientConnectionError, match=r"download interrupted at byte (\d+)") as caught:
                client.download_artifact(artifact["id"], target, progress=kill_at_a_quarter, chunk_size=1 << 20)
    finally:
        first.stop()
    held = int(re.search(r"byte (\d+)", str(caught.value)).group(1))
    part = target.with_name("out.json.part")
    assert total // 4 <= held < total and part.stat().st_size == held
    assert part.read_bytes() == report.read_bytes()[:held]
    assert not target.exists()

    second = start_server(data_dir)
    try:
        seen: list[int] = []
        with NeuroLensClient(second.url) as client:
            path = client.download_artifact(artifact["id"], target, progress=lambda done, _t: seen.append(done))
        assert seen[0] == held  # continued from the .part, not from zero
        assert path == target and sha256_file(target) == artifact["sha256"] and not part.exists()
    finally:
        second.stop()


@pytest.mark.slow
@pytest.mark.ci  # CI runs it after the default suite (see .ci/run)
def test_stage1_here_transfer_the_encoder_then_stage2_there(tmp_path: Path) -> None:
    laptop = start_server(tmp_path / "laptop")
    gpu_box = start_server(tmp_path / "gpu-box")
    try:
        config = {"preset": "tiny", "steps": 10, "checkpoint_every": 5, "log_every_s": 0.5}
        with laptop.client() as client:
            stage1 = client.post("/api/jobs", json={"stage": "stage1", "config": config}).json()
        stage1 = laptop.wait_for_job(stage1["id"], {"succeeded"})
        encoder = next(a for a in stage1["artifacts"] if a["kind"] == "encoder")

        # An earlier transfer died after a third of the file reached the GPU box ...
        with laptop.client() as client:
            encoder_bytes = client.get(f"/api/artifacts/{encoder['id']}/download").content
        with NeuroLensClient(gpu_box.url) as target:
            session = target.open_upload("encoder", encoder["sha256"], encoder["size_bytes"], encoder["filename"])
            third = len(encoder_bytes) // 3
            target.send_upload_bytes(session["id"], 0, third, iter([encoder_bytes[:third]]))

        # ... and the whole move is one command, which continues that upload from its offset.
        result = cli(laptop.url, "transfer", str(encoder["id"]), "--to", gpu_box.url)
        assert result.exit_code == 0, result.output
        assert f"copied to {gpu_box.url}" in " ".join(result.stdout.split())
        with gpu_box.client() as client:
            assert client.get("/api/artifacts/uploads").json()["count"] == 0  # the session was finished
            imported = client.get("/api/artifacts", params={"kind": "encoder"}).json()["data"]
            assert len(imported) == 1
            imported = imported[0]
            assert imported["sha256"] == encoder["sha256"] and imported["job_id"] is None
            response = client.post("/api/jobs", json={"stage": "stage2", "encoder_artifact": imported["id"],
                                                      "config": config})
            assert response.status_code == 201, response.text
        stage2 = gpu_box.wait_for_job(response.json()["id"], {"succeeded"})
        assert stage2["progress"]["step"] == config["steps"]
        assert {"model", "report"} <= {a["kind"] for a in stage2["artifacts"]}

        # Again: the target already holds it, nothing is sent.
        again = cli(laptop.url, "transfer", str(encoder["id"]), "--to", gpu_box.url)
        assert again.exit_code == 0 and "nothing sent" in again.stdout

        # And the Stage 2 model comes back the other way, checked as a model on arrival.
        model = next(a for a in stage2["artifacts"] if a["kind"] == "model")
        with NeuroLensClient(gpu_box.url) as source, NeuroLensClient(laptop.url) as target:
            back, copied = source.transfer_artifact(model["id"], target)
        assert copied and back["sha256"] == model["sha256"] and back["kind"] == "model"

        # A target that is down is one clear line, not a traceback.
        dead = cli(laptop.url, "transfer", str(encoder["id"]), "--to", "http://127.0.0.1:9")
        assert dead.exit_code == 1 and dead.stderr.startswith("error: cannot reach server at http://127.0.0.1:9")
    finally:
        laptop.stop()
        gpu_box.stop()
