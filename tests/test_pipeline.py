"""The whole path a user walks: Stage 1, download the encoder, Stage 2 from it; and cancel."""

from __future__ import annotations

import hashlib
import json
import time

import psutil
from safetensors import safe_open

from tests.conftest import BOTH_DATABASES, SQLITE_NOW_POSTGRESQL_IN_CI

STAGE1 = {"preset": "tiny", "steps": 30, "checkpoint_every": 10, "log_every_s": 0.5}
STAGE2 = {"preset": "tiny", "steps": 30, "checkpoint_every": 10, "log_every_s": 0.5}


@SQLITE_NOW_POSTGRESQL_IN_CI
def test_stage1_then_download_then_stage2(server, tmp_path):
    with server.client() as client:
        response = client.post("/api/jobs", json={"stage": "stage1", "dataset": "synthetic", "config": STAGE1})
        assert response.status_code == 201, response.text
        stage1 = response.json()
        assert stage1["status"] in ("queued", "running")
        assert stage1["memory"]["predicted_peak_bytes"] > 0

        # A Stage 2 job queued right away waits for Stage 1 and then starts from its encoder.
        queued_stage2 = client.post("/api/jobs", json={"stage": "stage2", "dataset": "synthetic",
                                                        "config": STAGE2, "after": stage1["id"]}).json()
        stage1 = server.wait_for_job(stage1["id"], {"succeeded"})
        assert stage1["progress"]["step"] == stage1["progress"]["total"] == STAGE1["steps"]
        assert stage1["memory"]["peak_rss_bytes"] > 50 * 1024**2
        assert stage1["attempts"] == 1 and stage1["error"] is None
        assert stage1["metrics"]["loss"] > 0
        events = client.get(f"/api/jobs/{stage1['id']}/events").json()["data"]
        kinds = [event["kind"] for event in events]
        assert kinds[0] == "started" and "progress" in kinds and kinds[-1] == "finished"
        assert any(event["rss_bytes"] for event in events)
        assert "checkpoint" in kinds

        kinds = {artifact["kind"] for artifact in stage1["artifacts"]}
        assert {"encoder", "checkpoint"} <= kinds
        encoder = next(a for a in stage1["artifacts"] if a["kind"] == "encoder")
        checkpoint = next(a for a in stage1["artifacts"] if a["kind"] == "checkpoint")
        assert client.get("/api/artifacts", params={"job_id": stage1["id"], "kind": "encoder"}).json()["count"] == 1

        # Download: length and ETag on the wire, sha256 as recorded, loadable by safetensors alone.
        response = client.get(f"/api/artifacts/{encoder['id']}/download")
        assert response.status_code == 200
        assert int(response.headers["content-length"]) == encoder["size_bytes"] == len(response.content)
        assert response.headers["etag"] == f'"{encoder["sha256"]}"'
        assert hashlib.sha256(response.content).hexdigest() == encoder["sha256"]
        path = tmp_path / encoder["filename"]
        path.write_bytes(response.content)
        with safe_open(str(path), framework="pt") as weights:
            metadata = weights.metadata()
            assert json.loads(metadata["encoder_config"])["name"] == "tiny"
            assert len(list(weights.keys())) > 4

        # A checkpoint is not an encoder: refused, and nothing changes.
        before = client.get("/api/jobs").json()["count"]
        response = client.post("/api/jobs", json={"stage": "stage2", "encoder_artifact": checkpoint["id"]})
        assert response.status_code == 422
        assert f"Artifact {checkpoint['id']} is a checkpoint artifact" in response.json()["detail"]
        assert client.get("/api/jobs").json()["count"] == before

        stage2 = server.wait_for_job(queued_stage2["id"], {"succeeded"})
        assert stage2["progress"]["step"] == STAGE2["steps"]
        assert stage2["memory"]["peak_rss_bytes"] > 50 * 1024**2
        assert {"model", "report", "checkpoint"} <= {a["kind"] for a in stage2["artifacts"]}

        # And a Stage 2 job from the encoder artifact directly (the path of an imported encoder).
        response = client.post("/api/jobs", json={"stage": "stage2", "encoder_artifact": encoder["id"],
                                                  "config": {**STAGE2, "steps": 5}})
        assert response.status_code == 201, response.text
        server.wait_for_job(response.json()["id"], {"succeeded"})


def test_cancel_a_running_job(server):
    with server.client() as client:
        job = client.post("/api/jobs", json={"stage": "stage1", "config": {
            "preset": "tiny", "steps": 100000, "log_every_s": 0.5, "checkpoint_every": 1000}}).json()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = client.get(f"/api/jobs/{job['id']}").json()
            if job["status"] == "running" and job["progress"]["step"] > 0:
                break
            time.sleep(0.3)
        assert job["status"] == "running" and job["progress"]["step"] > 0, job
        spec_path = str((server.data_dir / "jobs" / str(job["id"]) / "spec.json").resolve())
        trainers = [p for p in psutil.process_iter(["cmdline"]) if spec_path in (p.info["cmdline"] or [])]
        assert trainers, "no trainer process found"

        # The trainer's own token cannot register a file outside its job directory.
        token = json.loads((server.data_dir / "jobs" / str(job["id"]) / "spec.json").read_text())["token"]
        for path in ("../../neurolens.db", "/etc/passwd"):
            response = client.post(f"/api/jobs/{job['id']}/artifacts/register", json={"kind": "encoder", "path": path},
                                   headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 422, response.text
            assert "outside the job directory" in response.json()["detail"]
        assert client.get("/api/artifacts").json()["count"] == 0

        response = client.post(f"/api/jobs/{job['id']}/cancel")
        assert response.status_code == 200
        job = server.wait_for_job(job["id"], {"cancelled"}, timeout=60)
        assert job["finished_at"] is not None
        psutil.wait_procs(trainers, timeout=10)
        assert not any(p.is_running() for p in trainers)
        # A finished job cannot be cancelled again.
        response = client.post(f"/api/jobs/{job['id']}/cancel")
        assert response.status_code == 409
        assert "already cancelled" in response.json()["detail"]


def test_cancel_a_queued_job_and_etag(server):
    with server.client() as client:
        blocker = client.post("/api/jobs", json={"stage": "stage1", "config": {"steps": 100000}}).json()
        waiting = client.post("/api/jobs", json={"stage": "stage2", "after": blocker["id"]}).json()
        deadline = time.monotonic() + 10
        while waiting["reason"] != "dependency" and time.monotonic() < deadline:
            time.sleep(0.2)
            waiting = client.get(f"/api/jobs/{waiting['id']}").json()
        assert waiting["status"] == "queued" and waiting["reason"] == "dependency"
        response = client.get(f"/api/jobs/{waiting['id']}")
        etag = response.headers["etag"]
        assert client.get(f"/api/jobs/{waiting['id']}", headers={"If-None-Match": etag}).status_code == 304
        cancelled = client.post(f"/api/jobs/{waiting['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        response = client.get(f"/api/jobs/{waiting['id']}", headers={"If-None-Match": etag})
        assert response.status_code == 200 and response.headers["etag"] != etag
        client.post(f"/api/jobs/{blocker['id']}/cancel")
        server.wait_for_job(blocker["id"], {"cancelled"}, timeout=60)


@BOTH_DATABASES
def test_cancel_right_after_submit_leaves_no_trainer(server):
    """Submit-then-cancel races the scheduler's start of the trainer; the cancel must win."""
    with server.client() as client:
        ids = []
        for _ in range(5):
            job = client.post("/api/jobs", json={"stage": "stage1", "config": {"steps": 100000, "log_every_s": 0.5}}).json()
            client.post(f"/api/jobs/{job['id']}/cancel")
            ids.append(job["id"])
        for job_id in ids:
            server.wait_for_job(job_id, {"cancelled"}, timeout=90)
    jobs_dir = str((server.data_dir / "jobs").resolve())
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = [p for p in psutil.process_iter(["cmdline"]) if jobs_dir in " ".join(p.info["cmdline"] or [])]
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"trainers still running after cancel: {[p.pid for p in left]}"
