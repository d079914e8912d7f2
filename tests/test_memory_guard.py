"""Memory safety against a live server: refusal, admission by budget, pause near the allowance,
and the out-of-memory back-off (the operating system's SIGKILL, sent here by the test)."""

from __future__ import annotations

import signal
import time

from tests.conftest import start_server
from trainer.memory_prediction import predict_peak_bytes
from trainer.stages import parse_config
from tests.test_faults import trainer_processes, wait_for_step

MB = 1024**2
TINY = {"preset": "tiny", "log_every_s": 0.5, "probe_words": 0, "val_windows": 16}


def test_a_job_larger_than_the_budget_is_refused(tmp_path):
    server = start_server(tmp_path / "data", env={"NEUROLENS_MEMORY_BUDGET_BYTES": str(300 * MB)})
    try:
        with server.client() as client:
            response = client.post("/api/jobs", json={"stage": "stage1", "config": TINY})
            assert response.status_code == 422
            assert "predicted to need" in response.json()["detail"]
            assert "0.29 GB NeuroLens may use here" in response.json()["detail"]
            assert client.get("/api/jobs").json()["count"] == 0
    finally:
        server.stop()


def test_jobs_wait_for_memory_within_the_budget(tmp_path):
    # Room for one tiny job's predicted peak (~0.59 GB) but not two, with two slots free.
    env = {"NEUROLENS_MEMORY_BUDGET_BYTES": str(800 * MB), "NEUROLENS_CONCURRENCY": "2"}
    server = start_server(tmp_path / "data", env=env)
    try:
        with server.client() as client:
            first = client.post("/api/jobs", json={"stage": "stage1", "config": {**TINY, "steps": 30}}).json()
            second = client.post("/api/jobs", json={"stage": "stage1", "config": {**TINY, "steps": 30}}).json()
            wait_for_step(server, first["id"], 1)
            second = client.get(f"/api/jobs/{second['id']}").json()
            assert second["status"] == "queued" and second["reason"] == "memory", second
            server.wait_for_job(first["id"], {"succeeded"})
            second = server.wait_for_job(second["id"], {"succeeded"})
            assert second["reason"] is None
    finally:
        server.stop()


def test_a_trainer_nearing_its_allowance_is_paused_not_killed(tmp_path):
    # A budget just above the predicted peak admits the job; the real trainer (torch and MNE
    # loaded, about 0.45 GB before it trains) soon passes 60% of it.
    budget = predict_peak_bytes(parse_config("stage1", TINY)) + 20 * MB
    env = {"NEUROLENS_MEMORY_BUDGET_BYTES": str(budget), "NEUROLENS_MEMORY_PAUSE_SHARE": "0.6"}
    server = start_server(tmp_path / "data", env=env)
    try:
        with server.client() as client:
            job = client.post("/api/jobs", json={"stage": "stage1", "config": {**TINY, "steps": 100000}}).json()
            job = server.wait_for_job(job["id"], {"paused"}, timeout=120)
            assert job["reason"] == "memory"
            assert "paused to stay within memory" in job["error"]
            assert trainer_processes(server, job["id"]) == []
            checkpoints = list((server.data_dir / "jobs" / str(job["id"]) / "checkpoints").glob("step-*"))
            assert checkpoints, "a pause must checkpoint first"
            events = client.get(f"/api/jobs/{job['id']}/events").json()["data"]
            assert any("paused to stay within memory" in (e["message"] or "") for e in events)
    finally:
        server.stop()


def test_killed_by_the_os_retries_with_half_the_micro_batch(server):
    with server.client() as client:
        config = {**TINY, "steps": 40, "batch_size": 8, "checkpoint_every": 10}
        job = client.post("/api/jobs", json={"stage": "stage1", "config": config}).json()
        wait_for_step(server, job["id"], 12)
        (trainer,) = trainer_processes(server, job["id"])
        trainer.send_signal(signal.SIGKILL)  # exactly what the out-of-memory killer sends

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            job = client.get(f"/api/jobs/{job['id']}").json()
            if job["attempts"] == 2:
                break
            time.sleep(0.2)
        assert job["config"]["micro_batch_size"] == 4 and job["config"]["batch_size"] == 8
        job = server.wait_for_job(job["id"], {"succeeded"})
        assert job["progress"]["step"] == 40 and job["attempts"] == 2
        messages = [e["message"] or "" for e in client.get(f"/api/jobs/{job['id']}/events").json()["data"]]
        note = next(m for m in messages if "likely out of memory" in m)
        assert "signal SIGKILL" in note
        assert "micro_batch_size 4 and 2 accumulation steps (effective batch 8 kept)" in note
