"""Malformed inputs against a real server (issue 14, finding 2): each one is answered with the
right 4xx and a message that names the problem, the keep-alive connection survives it, and
nothing that was stored before changes."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer, start_server
from tests.test_artifacts_upload import encoder_file, sha256, store_snapshot, upload, with_encoder_config  # noqa: F401
from trainer.artifact_format import read_header

INT64_MAX = 2**63 - 1
MAX_PROGRESS_EVENTS = 100


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the module, keeping few progress events so that thinning shows quickly."""
    running = start_server(tmp_path_factory.mktemp("shared") / "data",
                           env={"NEUROLENS_MAX_PROGRESS_EVENTS": str(MAX_PROGRESS_EVENTS)})
    try:
        yield running
    finally:
        running.stop()


def safetensors_with_raw_header(raw: bytes) -> bytes:
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def assert_refused(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    detail = json.dumps(response.json()["detail"])
    for fragment in fragments:
        assert fragment in detail, (fragment, detail)


def test_a_safetensors_header_nested_2000_levels_is_a_422(shared_server: RunningServer) -> None:
    data = safetensors_with_raw_header(b"[" * 2000 + b"]" * 2000)
    before = store_snapshot(shared_server)
    with shared_server.client() as client:
        assert_refused(upload(client, data, "encoder", sha256(data)), 422, "nests too deeply")
        assert client.get("/api/health").status_code == 200  # the same connection still serves
    assert store_snapshot(shared_server) == before


def test_a_report_nested_200000_levels_is_a_422(shared_server: RunningServer) -> None:
    data = b'{"a":' * 200_000 + b"1" + b"}" * 200_000
    before = store_snapshot(shared_server)
    with shared_server.client() as client:
        assert_refused(upload(client, data, "report", sha256(data)), 422, "report", "nests too deeply")
        assert client.get("/api/health").status_code == 200
    assert store_snapshot(shared_server) == before


BAD_ENCODER_CONFIGS = [
    ({"patch_samples": 0}, "patch_samples 0"),
    ({"n_heads": 0}, "n_heads 0"),
    ([1, 2], "expected a JSON object"),
    ({"d_model": -64}, "d_model -64"),
]


def test_encoder_configs_a_job_could_not_have_are_refused_before_any_model_is_built(
        shared_server: RunningServer, encoder_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from trainer.validate import main as validate

    base = json.loads(read_header(encoder_file).metadata["encoder_config"])
    before = store_snapshot(shared_server)
    with shared_server.client() as client:
        for change, message in BAD_ENCODER_CONFIGS:
            declared = {**base, **change} if isinstance(change, dict) else change
            data = with_encoder_config(encoder_file, declared)
            started = time.monotonic()
            response = upload(client, data, "encoder", sha256(data))
            # The validator subprocess alone takes seconds to import torch: this answer came first.
            assert time.monotonic() - started < 1.5, change
            assert_refused(response, 422, "invalid encoder_config", message)
            assert client.get("/api/health").status_code == 200

            # The validator run by hand says the same and exits 2 (invalid), never 1 (crashed).
            path = tmp_path / "bad.safetensors"
            path.write_bytes(data)
            assert validate(["encoder", str(path)]) == 2
            assert message in capsys.readouterr().err
    assert store_snapshot(shared_server) == before


def test_a_dataset_path_component_over_255_bytes_is_a_422(shared_server: RunningServer) -> None:
    with shared_server.client() as client:
        count = client.get("/api/jobs").json()["count"]
        response = client.post("/api/jobs", json={"stage": "stage1", "dataset": "/tmp/" + "e" * 300,
                                                  "config": {"preset": "tiny"}})
        assert_refused(response, 422, "300 bytes", "at most 255 bytes")
        response = client.post("/api/jobs", json={"stage": "stage1", "dataset": "/x" * 2100})
        assert_refused(response, 422, "dataset")
        assert client.get("/api/jobs").json()["count"] == count


@pytest.fixture(scope="module")
def running_job(shared_server: RunningServer) -> Iterator[tuple[int, str]]:
    """A long tiny Stage 1 job, running, with its trainer's token (read from its spec)."""
    with shared_server.client() as client:
        job = client.post("/api/jobs", json={"stage": "stage1", "config": {
            "preset": "tiny", "steps": 100000, "log_every_s": 0.5, "checkpoint_every": 100000}}).json()
        shared_server.wait_for_job(job["id"], {"running"}, timeout=60)
        spec = shared_server.data_dir / "jobs" / str(job["id"]) / "spec.json"
        deadline = time.monotonic() + 30
        while not spec.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        yield job["id"], json.loads(spec.read_text())["token"]
        client.post(f"/api/jobs/{job['id']}/cancel")
        shared_server.wait_for_job(job["id"], {"cancelled"}, timeout=60)


def test_events_after_an_id_beyond_the_database_range_is_a_422(shared_server: RunningServer,
                                                               running_job: tuple[int, str]) -> None:
    job_id, _ = running_job
    with shared_server.client() as client:
        response = client.get(f"/api/jobs/{job_id}/events", params={"after_id": 2**63})
        assert_refused(response, 422, "after_id", str(INT64_MAX))
        assert client.get(f"/api/jobs/{job_id}/events", params={"after_id": INT64_MAX}).json()["count"] == 0


def test_a_trainer_event_with_a_step_beyond_the_database_range_is_a_422(shared_server: RunningServer,
                                                                        running_job: tuple[int, str]) -> None:
    job_id, token = running_job
    auth = {"Authorization": f"Bearer {token}"}
    with shared_server.client() as client:
        for field in ("step", "total", "rss_bytes"):
            response = client.post(f"/api/jobs/{job_id}/events", headers=auth, json={"kind": "log", field: 2**63})
            assert_refused(response, 422, field, str(INT64_MAX))
        response = client.post(f"/api/jobs/{job_id}/events", headers=auth, json={"kind": "log", "message": "still here"})
        assert response.status_code == 200, response.text
        assert client.get(f"/api/jobs/{job_id}").json()["status"] == "running"


def test_progress_events_are_thinned_so_a_long_jobs_log_stays_bounded(shared_server: RunningServer,
                                                                      running_job: tuple[int, str]) -> None:
    job_id, token = running_job
    auth = {"Authorization": f"Bearer {token}"}
    with shared_server.client() as client:
        for i in range(3 * MAX_PROGRESS_EVENTS):
            kind = "log" if i % 50 == 0 else "progress"
            response = client.post(f"/api/jobs/{job_id}/events", headers=auth,
                                   json={"kind": kind, "message": f"marker {i}" if kind == "log" else None})
            assert response.status_code == 200, response.text
        events, after = [], 0
        while batch := client.get(f"/api/jobs/{job_id}/events", params={"after_id": after, "limit": 5000}).json()["data"]:
            events += batch
            after = batch[-1]["id"]
    progress = [e for e in events if e["kind"] == "progress"]
    assert MAX_PROGRESS_EVENTS // 2 <= len(progress) <= MAX_PROGRESS_EVENTS
    # Every other kind of event is kept; so are the first progress event and the newest ones.
    assert [e["message"] for e in events if e["kind"] == "log" and (e["message"] or "").startswith("marker")] == \
        [f"marker {i}" for i in range(0, 3 * MAX_PROGRESS_EVENTS, 50)]
    ids = [e["id"] for e in progress]
    assert ids == sorted(ids) and ids[-1] == max(e["id"] for e in events if e["kind"] == "progress")


def mount_tmpfs(path: Path, size_bytes: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here (needs root): {result.stderr.strip()}")


def test_a_one_shot_upload_on_a_full_disk_is_a_507(tmp_path: Path, encoder_file: Path) -> None:
    artifacts = tmp_path / "data" / "artifacts"
    mount_tmpfs(artifacts, 128 * 1024)  # smaller than the 291 KB encoder
    server = start_server(tmp_path / "data")
    try:
        data = encoder_file.read_bytes()
        with server.client() as client:
            # Declared: refused before a byte is read. Streamed without a length: the disk fills.
            assert_refused(upload(client, data, "encoder", sha256(data)), 507, "does not fit")
            streamed = client.post("/api/artifacts", params={"kind": "encoder", "sha256": sha256(data)},
                                   content=iter([data[i:i + 65536] for i in range(0, len(data), 65536)]))
            assert_refused(streamed, 507, "disk is full")
            assert client.get("/api/artifacts").json()["count"] == 0
        assert not [p for p in artifacts.rglob("*") if p.is_file()]
    finally:
        server.stop()
        subprocess.run(["umount", "-l", str(artifacts)], capture_output=True)


def test_log_every_s_below_its_floor_is_a_422(shared_server: RunningServer) -> None:
    with shared_server.client() as client:
        count = client.get("/api/jobs").json()["count"]
        response = client.post("/api/jobs", json={"stage": "stage1", "config": {"preset": "tiny", "log_every_s": 0.001}})
        assert_refused(response, 422, "log_every_s 0.001", "at least 0.2")
        assert client.get("/api/jobs").json()["count"] == count
