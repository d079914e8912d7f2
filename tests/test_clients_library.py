"""The Python client against a real server: submit, wait, download with sha256 checks, errors."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import httpx
import pytest

from clients import APIError, ChecksumError, ConnectionError, JobWaitError, NeuroLensClient, NeuroLensError
from clients.exceptions import flatten_detail
from tests.conftest import RunningServer

TINY = {"preset": "tiny", "steps": 10}


def closed_port_url() -> str:
    """A loopback URL nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_train_wait_download_and_verify(server: RunningServer, tmp_path: Path) -> None:
    with NeuroLensClient(server.url) as nl:
        assert nl.health()["status"] == "ok"
        job = nl.submit_job("stage1", "synthetic", TINY)
        assert job["status"] == "queued" and job["stage"] == "stage1"
        seen: list[str] = []
        job = nl.wait_for_job(job["id"], {"succeeded"}, timeout=180, poll_interval=0.3,
                              on_update=lambda j: seen.append(j["status"]))
        assert job["progress"]["step"] == job["progress"]["total"] == 10
        assert seen[-1] == "succeeded"
        assert nl.list_jobs(status="succeeded")[0]["id"] == job["id"]

        # Conditional read: an unchanged job costs a 304 and no body.
        fresh, etag = nl.get_job_if_changed(job["id"])
        assert fresh == nl.get_job(job["id"]) and etag
        assert nl.get_job_if_changed(job["id"], etag) == (None, etag)

        kinds = [e["kind"] for e in nl.events(job["id"])]
        assert kinds[0] == "started" and "finished" in kinds
        assert nl.logs(job["id"]).strip()

        encoder = nl.list_artifacts(job_id=job["id"], kind="encoder")[0]
        assert nl.get_artifact(encoder["id"]) == encoder
        progress: list[tuple[int, int]] = []
        # "out/" does not exist yet; the trailing slash says it is a directory.
        path = nl.download_artifact(encoder["id"], f"{tmp_path / 'out'}/", progress=lambda d, t: progress.append((d, t)))
        assert path == tmp_path / "out" / encoder["filename"]
        data = path.read_bytes()
        assert len(data) == encoder["size_bytes"]
        assert hashlib.sha256(data).hexdigest() == encoder["sha256"]
        assert progress[-1] == (encoder["size_bytes"], encoder["size_bytes"])
        assert not list(path.parent.glob("*.part"))

        # Flip one byte of the stored file: the download must be refused and leave nothing behind.
        stored = [p for p in (server.data_dir / "artifacts").rglob(encoder["filename"])
                  if hashlib.sha256(p.read_bytes()).hexdigest() == encoder["sha256"]]
        assert len(stored) == 1, "expected exactly one stored copy of the encoder"
        corrupt = bytearray(stored[0].read_bytes())
        corrupt[len(corrupt) // 2] ^= 0xFF
        stored[0].write_bytes(bytes(corrupt))
        target = tmp_path / "corrupt.safetensors"
        with pytest.raises(ChecksumError, match="checksum mismatch"):
            nl.download_artifact(encoder["id"], target)
        assert not target.exists() and not target.with_name(target.name + ".part").exists()


def test_api_errors_carry_status_and_one_line_detail(server: RunningServer) -> None:
    with NeuroLensClient(server.url) as nl:
        with pytest.raises(APIError) as bad_preset:
            nl.submit_job("stage1", "synthetic", {"preset": "huge"})
        assert bad_preset.value.status_code == 422
        assert "preset" in bad_preset.value.detail and "\n" not in str(bad_preset.value)

        with pytest.raises(APIError) as bad_stage:
            nl.submit_job("stage3", "synthetic", TINY)
        assert bad_stage.value.status_code == 422 and "stage" in bad_stage.value.detail

        with pytest.raises(APIError) as missing:
            nl.get_job(9999)
        assert missing.value.status_code == 404 and "9999" in missing.value.detail

        with pytest.raises(APIError) as missing_after:
            nl.submit_job("stage2", "synthetic", TINY, after=9999)
        assert missing_after.value.status_code == 404


def test_cancel_running_job_and_refused_transition(server: RunningServer) -> None:
    with NeuroLensClient(server.url) as nl:
        job = nl.submit_job("stage1", "synthetic", {"preset": "tiny", "steps": 100000})
        # Cancel once it runs, so the stop request travels through the trainer's event reply.
        nl.wait_for_job(job["id"], {"running"}, timeout=60, poll_interval=0.2)
        nl.cancel_job(job["id"])
        job = nl.wait_for_job(job["id"], {"cancelled"}, timeout=90, poll_interval=0.3)
        assert job["status"] == "cancelled"
        with pytest.raises(APIError) as refused:
            nl.resume_job(job["id"])
        assert refused.value.status_code == 409
        with pytest.raises(JobWaitError, match="cancelled"):
            nl.wait_for_job(job["id"], {"succeeded"}, timeout=5)


def test_unreachable_server_is_one_clear_error() -> None:
    url = closed_port_url()
    with NeuroLensClient(url, timeout=2) as nl, pytest.raises(ConnectionError) as err:
        nl.list_jobs()
    assert str(err.value).startswith(f"cannot reach server at {url}")
    assert isinstance(err.value, NeuroLensError)


def test_server_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEUROLENS_SERVER", "gpu-box:9000/")
    with NeuroLensClient() as nl:
        assert nl.base_url == "http://gpu-box:9000"
    with NeuroLensClient("https://example.org/neurolens/") as nl:
        assert nl.base_url == "https://example.org/neurolens"


def test_fastapi_validation_detail_is_flattened() -> None:
    # FastAPI's own body validation sends a list of {loc, msg}; users should see one line.
    response = httpx.Response(422, json={"detail": [
        {"loc": ["body", "config", "steps"], "msg": "Input should be a valid integer", "type": "int_parsing"},
        {"loc": ["body", "stage"], "msg": "Field required", "type": "missing"},
    ]})
    err = APIError.from_response(response)
    assert err.detail == "config.steps: Input should be a valid integer; stage: Field required"
    assert str(err) == f"{err.detail} (HTTP 422)"
    assert flatten_detail("line one\nline two") == "line one line two"
    assert APIError.from_response(httpx.Response(502, text="")).detail == "Bad Gateway"
