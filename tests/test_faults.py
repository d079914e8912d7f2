"""Faults, done for real: trainers and servers killed with SIGKILL, pause and resume.

Each test measures what was lost: the step a resumed attempt starts from is read from the
trainer's own log, and must be no more than one checkpoint interval behind the step reached
before the kill.
"""

from __future__ import annotations

import re
import signal
import time

import psutil
import pytest

from tests.conftest import RunningServer, free_port, start_server

CHECKPOINT_EVERY = 10
JOB = {"stage": "stage1", "dataset": "synthetic",
       "config": {"preset": "tiny", "steps": 60, "checkpoint_every": CHECKPOINT_EVERY, "log_every_s": 0.3,
                  # The end-of-run probe and validation are not what these tests are about.
                  "probe_words": 0, "val_windows": 16}}


def trainer_processes(server: RunningServer, job_id: int) -> list[psutil.Process]:
    spec = str((server.data_dir / "jobs" / str(job_id) / "spec.json").resolve())
    return [p for p in psutil.process_iter(["cmdline"]) if spec in (p.info["cmdline"] or [])]


def wait_for_step(server: RunningServer, job_id: int, step: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    with server.client() as client:
        while time.monotonic() < deadline:
            job = client.get(f"/api/jobs/{job_id}").json()
            if job["status"] == "running" and job["progress"]["step"] >= step:
                return job
            assert job["status"] in ("queued", "running"), job
            time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach step {step}")


def resumed_steps(server: RunningServer, job_id: int) -> list[int]:
    log = (server.data_dir / "jobs" / str(job_id) / "trainer.log").read_text()
    return [int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", log)]


def test_killed_trainer_is_restarted_from_its_newest_checkpoint(server):
    with server.client() as client:
        job = client.post("/api/jobs", json=JOB).json()
        reached = wait_for_step(server, job["id"], 2 * CHECKPOINT_EVERY + 2)["progress"]["step"]
        (trainer,) = trainer_processes(server, job["id"])
        trainer.send_signal(signal.SIGKILL)

        job = server.wait_for_job(job["id"], {"succeeded"})
        assert job["attempts"] == 2
        assert job["progress"]["step"] == job["progress"]["total"] == 60
        (resumed_at,) = resumed_steps(server, job["id"])
        assert reached - CHECKPOINT_EVERY <= resumed_at <= reached + CHECKPOINT_EVERY
        assert resumed_at >= 2 * CHECKPOINT_EVERY
        assert {"encoder", "checkpoint"} <= {a["kind"] for a in job["artifacts"]}


def test_a_trainer_that_keeps_crashing_fails_the_job_after_max_attempts(tmp_path):
    server = start_server(tmp_path / "data", env={"NEUROLENS_MAX_ATTEMPTS": "2"})
    try:
        with server.client() as client:
            job = client.post("/api/jobs", json={**JOB, "config": {**JOB["config"], "steps": 100000}}).json()
            for _ in range(2):
                wait_for_step(server, job["id"], 1)
                deadline = time.monotonic() + 30
                while not (trainers := trainer_processes(server, job["id"])) and time.monotonic() < deadline:
                    time.sleep(0.2)
                trainers[0].send_signal(signal.SIGKILL)
                psutil.wait_procs(trainers, timeout=10)
                time.sleep(1.0)  # let the server see this exit before the next attempt starts
            job = server.wait_for_job(job["id"], {"failed"})
            assert job["attempts"] == 2
            assert "signal SIGKILL" in job["error"] and "after 2 attempts" in job["error"]
    finally:
        server.stop()


def test_server_killed_while_a_trainer_runs_reattaches_on_restart(tmp_path):
    port = free_port()
    server = start_server(tmp_path / "data", port=port)
    try:
        with server.client() as client:
            job = client.post("/api/jobs", json={**JOB, "config": {**JOB["config"], "steps": 150}}).json()
        wait_for_step(server, job["id"], 5)
        (trainer,) = trainer_processes(server, job["id"])
        server.stop(signal.SIGKILL)
        time.sleep(1.0)
        assert trainer.is_running(), "the trainer must outlive a crashed server"

        server = start_server(tmp_path / "data", port=port)
        with server.client() as client:
            job = client.get(f"/api/jobs/{job['id']}").json()
        assert job["status"] == "running", job  # re-attached, not restarted
        job = server.wait_for_job(job["id"], {"succeeded"})
        assert job["attempts"] == 1 and resumed_steps(server, job["id"]) == []
        assert job["progress"]["step"] == 150
        assert {"encoder", "checkpoint"} <= {a["kind"] for a in job["artifacts"]}
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.ci  # CI runs it after the default suite (see .ci/run)
def test_server_and_trainer_killed_together_resume_from_checkpoint(tmp_path):
    port = free_port()
    server = start_server(tmp_path / "data", port=port)
    try:
        with server.client() as client:
            job = client.post("/api/jobs", json=JOB).json()
        reached = wait_for_step(server, job["id"], CHECKPOINT_EVERY + 2)["progress"]["step"]
        trainers = trainer_processes(server, job["id"])
        server.stop(signal.SIGKILL)
        for trainer in trainers:
            trainer.send_signal(signal.SIGKILL)
        psutil.wait_procs(trainers, timeout=10)

        server = start_server(tmp_path / "data", port=port)
        job = server.wait_for_job(job["id"], {"succeeded"})
        assert job["attempts"] == 2 and job["progress"]["step"] == 60
        (resumed_at,) = resumed_steps(server, job["id"])
        assert resumed_at >= reached - CHECKPOINT_EVERY
    finally:
        server.stop()


def test_pause_checkpoints_releases_memory_and_resume_continues(server):
    with server.client() as client:
        job = client.post("/api/jobs", json={**JOB, "config": {**JOB["config"], "steps": 40}}).json()
        wait_for_step(server, job["id"], 5)
        trainers = trainer_processes(server, job["id"])
        assert client.post(f"/api/jobs/{job['id']}/pause").status_code == 200
        job = server.wait_for_job(job["id"], {"paused"}, timeout=60)
        paused_at = job["progress"]["step"]
        psutil.wait_procs(trainers, timeout=10)
        assert not any(p.is_running() for p in trainers), "a paused job must release its memory"
        assert job["memory"]["rss_bytes"] is None

        response = client.post(f"/api/jobs/{job['id']}/resume")
        assert response.status_code == 200 and response.json()["status"] == "queued"
        job = server.wait_for_job(job["id"], {"succeeded"})
        assert job["progress"]["step"] == 40
        # The pause wrote a checkpoint at the step it stopped on: nothing was lost.
        assert resumed_steps(server, job["id"]) == [paused_at]
        # Resuming something that is not paused is refused.
        response = client.post(f"/api/jobs/{job['id']}/resume")
        assert response.status_code == 409 and "only a paused job can be resumed" in response.json()["detail"]


@pytest.mark.slow
@pytest.mark.ci  # CI runs it after the default suite (see .ci/run)
def test_killed_stage2_trainer_is_restarted_from_its_newest_checkpoint(tmp_path):
    # One thread per trainer: a tiny Stage 2 in two threads crawls on a loaded 2-core machine.
    server = start_server(tmp_path / "data", env={"OMP_NUM_THREADS": "1"})
    every = 100
    try:
        with server.client() as client:
            stage1 = client.post("/api/jobs", json={**JOB, "config": {**JOB["config"], "steps": 20}}).json()
            job = client.post("/api/jobs", json={
                "stage": "stage2", "after": stage1["id"],
                "config": {"preset": "tiny", "steps": 1200, "batch_size": 16, "lr": 3e-3, "checkpoint_every": every,
                           "log_every_s": 0.3, "max_target_tokens": 16, "bootstrap_samples": 100}}).json()
            reached = wait_for_step(server, job["id"], 2 * every + 10, timeout=300)["progress"]["step"]
            (trainer,) = trainer_processes(server, job["id"])
            trainer.send_signal(signal.SIGKILL)

            job = server.wait_for_job(job["id"], {"succeeded"}, timeout=300)
            assert job["attempts"] == 2
            assert job["progress"]["step"] == job["progress"]["total"] == 1200
            (resumed_at,) = resumed_steps(server, job["id"])
            assert reached - every <= resumed_at <= reached + every and resumed_at >= 2 * every
            assert {"model", "report", "checkpoint"} <= {a["kind"] for a in job["artifacts"]}
            assert job["metrics"]["test_bleu1_eeg_minus_noise_ci_low"] <= job["metrics"]["test_bleu1_eeg_minus_noise"]
    finally:
        server.stop()
