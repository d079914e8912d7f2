"""Each attempt of a job is its own record, and only crashes spend the job's retries.

The end-to-end test pauses and resumes a real trainer twice, then SIGKILLs it the way the
out-of-memory killer would, on a server that allows two crashed attempts: the pauses must not
have used up the retry. The unit tests drive :mod:`server.outcomes` (pure functions) directly.
"""

from __future__ import annotations

import signal
import time

import pytest
from sqlmodel import Session

from server import jobs
from server.db import make_engine, upgrade_database
from server.executors.base import Exit
from server.models import AttemptOutcome, Job, JobEvent, JobStatus, WaitReason
from server.outcomes import MAX_IDLE_ALLOCATIONS, Facts, classify, decide
from tests.conftest import BOTH_DATABASES, start_server
from tests.test_faults import trainer_processes
from trainer.protocol import EXIT_FAILED, EXIT_OK, EXIT_OUT_OF_TIME, EXIT_STOPPED

CONFIG = {"preset": "tiny", "steps": 200, "batch_size": 8, "checkpoint_every": 5, "log_every_s": 0.3,
          "probe_words": 0, "val_windows": 16}


def wait_for_status(client, job_id: int, status: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] == status:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never became {status}: {job}")


def wait_for_training(client, job_id: int, attempt: int, steps: int = 2, timeout: float = 120) -> dict:
    """Wait until attempt number ``attempt`` has trained ``steps`` steps past its checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        history = job["attempt_history"]
        if (job["status"] == "running" and len(history) == attempt
                and job["progress"]["step"] >= history[-1]["start_step"] + steps):
            return job
        time.sleep(0.1)
    raise AssertionError(f"attempt {attempt} of job {job_id} never trained: {job}")


@pytest.mark.slow
@pytest.mark.ci  # the done-when test: about a minute, worth it on every submission
@BOTH_DATABASES
def test_pauses_spend_no_retry_and_each_attempt_is_recorded(tmp_path, database):
    server = start_server(tmp_path / "data", env={"NEUROLENS_MAX_ATTEMPTS": "2"}, database=database)
    try:
        with server.client() as client:
            job_id = client.post("/api/jobs", json={"stage": "stage1", "config": CONFIG}).json()["id"]
            for attempt in (1, 2):
                wait_for_training(client, job_id, attempt)
                assert client.post(f"/api/jobs/{job_id}/pause").status_code == 200
                wait_for_status(client, job_id, "paused")
                assert client.post(f"/api/jobs/{job_id}/resume").status_code == 200
            # Killed once it trains (and has been measured), not while it starts up.
            wait_for_training(client, job_id, 3)
            (trainer,) = trainer_processes(server, job_id)
            trainer.send_signal(signal.SIGKILL)  # what the out-of-memory killer sends
            job = server.wait_for_job(job_id, {"succeeded"})
    finally:
        server.stop()

    # Three attempts had started before the kill, more than NEUROLENS_MAX_ATTEMPTS: the kill
    # still got its retry, with the out-of-memory back-off.
    assert job["attempts"] == 4
    assert job["config"]["micro_batch_size"] == 4 and job["config"]["batch_size"] == 8
    history = job["attempt_history"]
    assert [a["number"] for a in history] == [1, 2, 3, 4]
    assert [a["outcome"] for a in history] == ["paused", "paused", "out_of_memory", "succeeded"]
    assert all(a["executor"] == "local" and a["handle"].isdigit() for a in history)
    assert history[2]["exit_code"] == -signal.SIGKILL
    assert "likely out of memory" in history[2]["message"] and "micro_batch_size 4" in history[2]["message"]
    # The kill is explained by what the killed attempt wrote, not by the pause before it.
    assert "pause requested" not in history[2]["message"]
    assert history[3]["exit_code"] == 0 and history[3]["end_step"] == 200
    for earlier, later in zip(history, history[1:]):
        assert earlier["ended_at"] <= later["started_at"]
        # Each attempt resumed from a checkpoint at or after the previous attempt's start.
        assert earlier["start_step"] <= later["start_step"] <= earlier["end_step"]
    assert all(a["peak_rss_bytes"] and a["peak_rss_bytes"] > 50 * 2**20 for a in history)
    # Nothing runs, so nothing is "now"; the job's peak is the largest attempt's.
    assert job["memory"]["rss_bytes"] is None
    assert job["memory"]["peak_rss_bytes"] == max(a["peak_rss_bytes"] for a in history)


def facts(code: int | None, **kwargs) -> Facts:
    return Facts(exit=Exit(code, kwargs.pop("root_cause", None)), **kwargs)


@pytest.mark.parametrize(("given", "outcome"), [
    (facts(EXIT_OK), AttemptOutcome.succeeded),
    (facts(EXIT_OK, stop_request="cancel"), AttemptOutcome.succeeded),  # it finished before it heard
    (facts(EXIT_STOPPED, stop_request="cancel"), AttemptOutcome.cancelled),
    (facts(-9, stop_request="pause", killed_by_us=True), AttemptOutcome.paused),  # ignored the pause: killed
    (facts(EXIT_STOPPED, shutting_down=True), AttemptOutcome.interrupted),
    (facts(EXIT_FAILED), AttemptOutcome.failed),
    (facts(EXIT_STOPPED), AttemptOutcome.stopped),
    (facts(-9), AttemptOutcome.out_of_memory),
    (facts(-9, killed_by_us=True), AttemptOutcome.crashed),  # silent too long: our own kill
    (facts(1, root_cause=-9), AttemptOutcome.out_of_memory),  # one torchrun worker killed by the OS
    (facts(1, root_cause=1), AttemptOutcome.crashed),
    (facts(-11), AttemptOutcome.crashed),
    (facts(None, last_event="finished"), AttemptOutcome.succeeded),  # re-attached: the last event tells
    (facts(None, last_event="error"), AttemptOutcome.failed),
    (facts(None, last_event="progress"), AttemptOutcome.crashed),
    (Facts(exit=None), AttemptOutcome.lost),
])
def test_an_exit_is_classified_before_any_policy(given, outcome):
    assert classify(given) == outcome


def decide_for(given: Facts, *, failures: int = 0, max_attempts: int = 3, **kwargs):
    defaults = {"config": {"batch_size": 8, "micro_batch_size": 8}, "job_error": None, "job_reason": None,
                "attempts": failures + 1}
    return decide(given, failures=failures, max_attempts=max_attempts, **{**defaults, **kwargs})


def test_only_crashes_are_retried_and_they_back_off():
    first = decide_for(facts(-11, log_line="Segmentation fault"))
    assert first.status == JobStatus.queued and first.config is None
    assert first.message.startswith("trainer exited with code -11 (signal SIGSEGV): Segmentation fault; retrying")
    assert first.retry_delay_s == 2.0
    assert decide_for(facts(-11), failures=1).retry_delay_s == 4.0
    assert decide_for(facts(-11), failures=9, max_attempts=20).retry_delay_s == 30.0
    last = decide_for(facts(-11), failures=2)
    assert last.status == JobStatus.failed and last.error.endswith("(after 3 attempts)")


def test_an_out_of_memory_kill_halves_the_micro_batch_and_keeps_the_batch():
    decision = decide_for(facts(-9), config={"batch_size": 12, "micro_batch_size": 12})
    assert decision.config == {"batch_size": 12, "micro_batch_size": 6}
    assert "micro_batch_size 6 and 2 accumulation steps (effective batch 12 kept)" in decision.message
    at_one = decide_for(facts(-9), config={"batch_size": 4, "micro_batch_size": 1})
    assert at_one.status == JobStatus.queued and at_one.config is None


def test_a_kill_of_ours_reports_why_and_stops_are_resumable():
    silent = decide_for(facts(-9, killed_by_us=True, kill_message="no report from the trainer for 130 s; killed"))
    assert silent.outcome == AttemptOutcome.crashed and silent.message.startswith("no report from the trainer")
    disk = decide_for(facts(EXIT_STOPPED), job_error="Disk full while the trainer was writing")
    assert disk.status == JobStatus.paused and disk.error == "Disk full while the trainer was writing"
    guard = decide_for(facts(EXIT_STOPPED, stop_request="pause"), job_error="paused to stay within memory",
                       job_reason=WaitReason.memory.value)
    assert guard.status == JobStatus.paused and guard.reason == "memory"
    assert decide_for(Facts(exit=None)).status == JobStatus.queued


def test_allocations_too_short_for_a_checkpoint_fail_the_job_instead_of_requeueing_forever(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_database(url)
    with Session(make_engine(url)) as session:
        job = Job(stage="stage1", dataset="synthetic", config={"batch_size": 8, "micro_batch_size": 8,
                                                               "checkpoint_every": 50}, total=100)
        session.add(job)
        session.commit()

        def one_allocation(checkpoint_at: int | None):
            attempt = jobs.start_attempt(session, job, "slurm", token=f"t{job.attempts}")
            if checkpoint_at is not None:
                session.add(JobEvent(job_id=job.id, kind="checkpoint", step=checkpoint_at))
                job.step = checkpoint_at
                session.add(job)
                session.commit()
            return jobs.end_attempt(session, job, attempt, Facts(exit=Exit(EXIT_OUT_OF_TIME)), max_attempts=3)

        # An allocation that saved a checkpoint resets the count; idle ones are requeued, up to the limit.
        assert one_allocation(None).status == JobStatus.queued
        assert one_allocation(50).status == JobStatus.queued
        for _ in range(MAX_IDLE_ALLOCATIONS - 1):
            assert one_allocation(None).status == JobStatus.queued
        last = one_allocation(None)
        assert last.status == JobStatus.failed
        assert f"{MAX_IDLE_ALLOCATIONS} batch allocations in a row" in last.error
        assert "too short for 50 steps" in last.error and "checkpoint_every" in last.error
        session.refresh(job)
        assert job.status == JobStatus.failed and job.step == 50  # its checkpoint is kept for a retry
