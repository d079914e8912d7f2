"""Retry: a job that failed its retries (or was cancelled) continues from its newest checkpoint
with a fresh retry budget, through a real server and real trainers killed with SIGKILL."""

from __future__ import annotations

import re
import signal
import time

import pytest

from tests.conftest import BOTH_DATABASES, start_server
from tests.test_faults import CHECKPOINT_EVERY, JOB, resumed_steps, trainer_processes, wait_for_step


@pytest.mark.slow
@pytest.mark.ci
@BOTH_DATABASES
def test_a_failed_job_is_retried_from_its_checkpoint_and_keeps_its_history(tmp_path, database):
    server = start_server(tmp_path / "data", env={"NEUROLENS_MAX_ATTEMPTS": "1"}, database=database)
    try:
        with server.client() as client:
            job = client.post("/api/jobs", json=JOB).json()
            # A Stage 2 job waiting on it fails with it, and cannot be retried before it.
            stage2 = client.post("/api/jobs", json={"stage": "stage2", "after": job["id"],
                                                    "config": {"preset": "tiny", "steps": 4}}).json()
            refused = client.post(f"/api/jobs/{job['id']}/retry")
            assert refused.status_code == 409
            # Queued or already running: either is refused, and the refusal says which it is.
            assert re.search(r"is (queued|running); only a failed or cancelled job", refused.json()["detail"])

            reached = wait_for_step(server, job["id"], 22)["progress"]["step"]
            (trainer,) = trainer_processes(server, job["id"])
            trainer.send_signal(signal.SIGKILL)
            failed = server.wait_for_job(job["id"], {"failed"})
            assert "after 1 attempts" in failed["error"]
            events = client.get(f"/api/jobs/{job['id']}/events", params={"limit": 5000}).json()["data"]
            newest_checkpoint = max(e["step"] for e in events if e["kind"] == "checkpoint")
            assert server.wait_for_job(stage2["id"], {"failed"})["error"].startswith(f"Stage 1 job {job['id']} failed")
            refused = client.post(f"/api/jobs/{stage2['id']}/retry")
            assert refused.status_code == 409 and f"retry job {job['id']} first" in refused.json()["detail"]

            retried = client.post(f"/api/jobs/{job['id']}/retry")
            assert retried.status_code == 200, retried.text
            assert retried.json()["status"] in ("queued", "running") and retried.json()["error"] is None
            assert retried.json()["finished_at"] is None
            # The Stage 2 job that failed only because of it is queued again with it.
            assert client.get(f"/api/jobs/{stage2['id']}").json()["status"] == "queued"
            client.post(f"/api/jobs/{stage2['id']}/cancel")

            done = server.wait_for_job(job["id"], {"succeeded"})
            assert done["progress"]["step"] == JOB["config"]["steps"]
            (resumed,) = resumed_steps(server, job["id"])
            # From its newest checkpoint, not from scratch. The trainer runs on between the progress
            # read and the kill, so it may have saved one more checkpoint after `reached`.
            assert reached - CHECKPOINT_EVERY <= resumed <= reached + CHECKPOINT_EVERY
            assert resumed >= newest_checkpoint
            history = done["attempt_history"]
            assert [a["number"] for a in history] == [1, 2]
            assert [a["outcome"] for a in history] == ["out_of_memory", "succeeded"]
            assert history[1]["end_step"] == JOB["config"]["steps"]
            events = client.get(f"/api/jobs/{job['id']}/events", params={"limit": 5000}).json()["data"]
            assert any("retried by a user after 1 attempts" in (e["message"] or "") for e in events)

            # Finished for good: a succeeded job is not retried, and the refusal names what is allowed.
            refused = client.post(f"/api/jobs/{job['id']}/retry")
            assert refused.status_code == 409
            assert refused.json()["detail"] == (f"Job {job['id']} is succeeded; only a failed or cancelled job can be "
                                                f"retried (resume a paused one).")
            assert client.post("/api/jobs/999/retry").status_code == 404
    finally:
        server.stop()


def test_a_cancelled_job_is_retried_and_the_cli_says_so(server):
    with server.client() as client:
        job = client.post("/api/jobs", json={**JOB, "config": {**JOB["config"], "steps": 100000}}).json()
        wait_for_step(server, job["id"], 12)
        assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
        server.wait_for_job(job["id"], {"cancelled"})

    from typer.testing import CliRunner

    from clients.cli import app
    result = CliRunner().invoke(app, ["--server", server.url, "retry", str(job["id"])])
    assert result.exit_code == 0, result.output
    assert f"Job {job['id']}" in result.output
    with server.client() as client:
        deadline = time.monotonic() + 60
        while not resumed_steps(server, job["id"]):  # it continues from its checkpoint
            assert time.monotonic() < deadline, "the retried trainer never said it resumed"
            time.sleep(0.3)
        assert resumed_steps(server, job["id"])[0] >= 10
        client.post(f"/api/jobs/{job['id']}/cancel")
        server.wait_for_job(job["id"], {"cancelled"})
