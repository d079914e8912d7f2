"""Two servers on one database: each queued job is claimed by exactly one of them, neither
declares the other's running trainers dead, and a standby takes over when the other stops.

The claim is a compare-and-set on the job's status (:func:`server.jobs.start_attempt`); the
first test races two connections over the same jobs, read as queued by both, on SQLite and on
PostgreSQL. The second runs two real servers on one PostgreSQL database and one shared data
folder (what a standby on a shared filesystem has), with real trainers.
"""

from __future__ import annotations

import signal
import threading
import time

import psutil
import pytest
from sqlmodel import Session, func, select

from server.db import make_engine, upgrade_database
from server.jobs import StaleJob, start_attempt
from server.models import Attempt, Job
from tests.conftest import BOTH_DATABASES, RunningServer, start_server
from tests.test_server_basics import url_of

JOBS = 40
SHORT = {"preset": "tiny", "steps": 2, "batch_size": 8, "log_every_s": 0.3, "probe_words": 0, "val_windows": 16}
LONG = {**SHORT, "steps": 60, "checkpoint_every": 5}


@BOTH_DATABASES
def test_of_two_claims_on_one_queued_job_exactly_one_wins(tmp_path, database):
    url = url_of(database, tmp_path)
    upgrade_database(url)
    engine = make_engine(url)
    with Session(engine) as session:
        session.add_all([Job(stage="stage1", dataset="synthetic", config={}, total=2) for _ in range(JOBS)])
        session.commit()
    engine.dispose()

    both_read = threading.Barrier(2)
    won: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def claim_all(server: str) -> None:
        engine = make_engine(url)
        try:
            with Session(engine) as session:
                queued = session.exec(select(Job).order_by(Job.id)).all()
                both_read.wait(30)  # each has read every job as queued before either claims one
                won[server] = []
                for job in queued:
                    try:
                        start_attempt(session, job, "local", f"token-{server}", server)
                        won[server].append(job.id)
                    except StaleJob:
                        pass
        except BaseException as exc:  # reported below: a thread's failure must fail the test
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=claim_all, args=(name,)) for name in ("http://a", "http://b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert sorted(won["http://a"] + won["http://b"]) == list(range(1, JOBS + 1))  # each exactly once
    engine = make_engine(url)
    with Session(engine) as session:
        assert session.exec(select(func.count()).select_from(Attempt)).one() == JOBS
        owners = {a.job_id: a.server_url for a in session.exec(select(Attempt))}
        assert all(owners[job_id] == server for server, ids in won.items() for job_id in ids)
        assert {job.status.value for job in session.exec(select(Job))} == {"running"}
    engine.dispose()


def attempts(server: RunningServer, job_id: int) -> list[dict]:
    with server.client() as client:
        return client.get(f"/api/jobs/{job_id}").json()["attempt_history"]


def wait_for_step(server: RunningServer, job_id: int, step: int, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    with server.client() as client:
        while time.monotonic() < deadline:
            job = client.get(f"/api/jobs/{job_id}").json()
            if job["status"] == "running" and job["progress"]["step"] >= step:
                return job
            time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached step {step}: {job}")


@pytest.mark.slow
@pytest.mark.ci  # the done-when test for PostgreSQL: two servers, about a minute and a half
def test_two_servers_on_one_postgresql_database_run_each_job_once_and_a_standby_takes_over(
        tmp_path, postgres_cluster):
    database = postgres_cluster.create_database()
    data_dir = tmp_path / "data"  # shared, as a standby's folder on a shared filesystem is
    # A short heartbeat timeout so that a server killed outright is noticed within the test.
    env = {"NEUROLENS_HEARTBEAT_TIMEOUT_S": "20"}
    first = start_server(data_dir, database=database, env=env)
    second = third = None
    try:
        with first.client() as client:
            ids = [client.post("/api/jobs", json={"stage": "stage1", "config": SHORT}).json()["id"] for _ in range(4)]
        wait_for_step(first, ids[0], 0)
        # The second server starts while the first's trainer runs: its start-up recovery must
        # leave that attempt alone (its heartbeat is fresh and it is not the second's).
        second = start_server(data_dir, database=database, env=env)
        for job_id in ids:
            job = first.wait_for_job(job_id, {"succeeded"})
            assert len(job["attempt_history"]) == 1, job["attempt_history"]  # ran exactly once
            assert job["attempt_history"][0]["outcome"] == "succeeded"
        ran_on = {job_id: attempts(first, job_id)[0]["server_url"] for job_id in ids}
        assert set(ran_on.values()) == {first.url, second.url}, ran_on  # both claimed jobs

        # A server stopped cleanly hands its running job back; the standby resumes it.
        with second.client() as client:
            long_id = client.post("/api/jobs", json={"stage": "stage1", "config": LONG}).json()["id"]
        running = wait_for_step(second, long_id, 7)
        owner = first if running["attempt_history"][-1]["server_url"] == first.url else second
        standby = second if owner is first else first
        owner.stop()
        done = standby.wait_for_job(long_id, {"succeeded"}, timeout=240)
        history = done["attempt_history"]
        assert [(a["server_url"], a["outcome"]) for a in history] == [
            (owner.url, "interrupted"), (standby.url, "succeeded")], history
        assert history[1]["start_step"] >= 5  # from the stopped attempt's checkpoint, not from scratch

        # A server killed outright leaves its trainer unable to report: once the heartbeat is
        # older than the timeout, the other server (restarted on the stopped one's port, as a
        # standby would be) kills that trainer and resumes the job itself.
        third = start_server(data_dir, database=database, env=env, port=int(owner.url.rsplit(":", 1)[1]))
        with standby.client() as client:
            orphan_id = client.post("/api/jobs", json={"stage": "stage1", "config": LONG}).json()["id"]
        running = wait_for_step(standby, orphan_id, 7)
        victim, survivor = (standby, third) if running["attempt_history"][-1]["server_url"] == standby.url \
            else (third, standby)
        orphan = psutil.Process(int(running["attempt_history"][-1]["handle"]))
        victim.stop(signal.SIGKILL)
        deadline = time.monotonic() + 120
        while len(attempts(survivor, orphan_id)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        # Two trainers never write one job's checkpoints: the orphan is gone once the new one starts.
        assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
        done = survivor.wait_for_job(orphan_id, {"succeeded"}, timeout=240)
        history = done["attempt_history"]
        assert [(a["server_url"], a["outcome"]) for a in history] == [
            (victim.url, "lost"), (survivor.url, "succeeded")], history
        assert history[1]["start_step"] >= 5
    finally:
        for server in (first, second, third):
            if server is not None:
                server.stop()
