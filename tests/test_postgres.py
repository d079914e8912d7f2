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
from tests.test_faults import wait_for_step
from tests.test_server_basics import url_of

JOBS = 40
SHORT = {"preset": "tiny", "steps": 2, "batch_size": 8, "log_every_s": 0.3, "probe_words": 0, "val_windows": 16}
LONG = {**SHORT, "steps": 30, "checkpoint_every": 3}


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


@BOTH_DATABASES
def test_a_claim_on_a_read_from_before_another_servers_whole_attempt_is_refused(tmp_path, database):
    """Queued, run elsewhere, queued again: the status matches once more, but the attempt number
    read before is taken; the claim fails cleanly (StaleJob) and a fresh read claims it."""
    from server.jobs import end_attempt
    from server.outcomes import Facts

    url = url_of(database, tmp_path)
    upgrade_database(url)
    engine = make_engine(url)
    with Session(engine) as stale, Session(engine) as other:
        job = Job(stage="stage1", dataset="synthetic", config={}, total=2)
        stale.add(job)
        stale.commit()
        stale.refresh(job)  # read here as queued, with no attempts yet
        elsewhere = other.get(Job, job.id)
        end_attempt(other, elsewhere, start_attempt(other, elsewhere, "local", "t1", "http://b"), Facts(exit=None), 3)
        assert elsewhere.status.value == "queued" and elsewhere.attempts == 1
        with pytest.raises(StaleJob):
            start_attempt(stale, job, "local", "t2", "http://a")
        stale.refresh(job)
        assert start_attempt(stale, job, "local", "t3", "http://a").number == 2
        assert [a.server_url for a in stale.exec(select(Attempt).order_by(Attempt.number))] == ["http://b", "http://a"]
    engine.dispose()


def attempts(server: RunningServer, job_id: int) -> list[dict]:
    with server.client() as client:
        return client.get(f"/api/jobs/{job_id}").json()["attempt_history"]


@pytest.mark.slow
@pytest.mark.ci  # the done-when test for PostgreSQL: three servers in turn, two to four minutes
def test_two_servers_on_one_postgresql_database_run_each_job_once_and_a_standby_takes_over(
        tmp_path, postgres_cluster):
    """A runs the long job; B, started meanwhile, must leave it alone and runs the short ones.
    A stops cleanly, and C starts on its port: whichever of B and C is free resumes the long job,
    and is then killed outright, so its trainer cannot report: once the heartbeat is stale the
    other kills that trainer and resumes the job."""
    database = postgres_cluster.create_database()
    data_dir = tmp_path / "data"  # shared, as a standby's folder on a shared filesystem is
    # A short heartbeat timeout so that a server killed outright is noticed within the test.
    env = {"NEUROLENS_HEARTBEAT_TIMEOUT_S": "20"}
    a = start_server(data_dir, database=database, env=env)
    b = c = None
    try:
        with a.client() as client:
            long_id = client.post("/api/jobs", json={"stage": "stage1", "config": LONG}).json()["id"]
            wait_for_step(a, long_id, 0, timeout=180)
            short_ids = [client.post("/api/jobs", json={"stage": "stage1", "config": SHORT}).json()["id"]
                         for _ in range(3)]
        b = start_server(data_dir, database=database, env=env)
        first_short = b.wait_for_job(short_ids[0], {"succeeded"})
        assert first_short["attempt_history"][0]["server_url"] == b.url
        running = wait_for_step(a, long_id, 4, timeout=180)  # past its checkpoint at step 3
        assert [x["server_url"] for x in running["attempt_history"]] == [a.url]  # B left it alone

        a.stop()  # a clean stop hands the running job back to the queue
        c = start_server(data_dir, database=database, env=env, port=int(a.url.rsplit(":", 1)[1]))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            history = attempts(b, long_id)
            if len(history) == 2 and history[1]["handle"]:
                break
            time.sleep(0.2)
        victim, survivor = (b, c) if history[1]["server_url"] == b.url else (c, b)
        assert history[1]["server_url"] == victim.url, history
        orphan = psutil.Process(int(history[1]["handle"]))
        wait_for_step(b, long_id, history[1]["start_step"] + 3, timeout=180)
        victim.stop(signal.SIGKILL)  # its trainer lives on, reporting to no one
        deadline = time.monotonic() + 120
        while len(attempts(survivor, long_id)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        # Two trainers never write one job's checkpoints: the orphan is gone once the new one starts.
        assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
        assert f"no heartbeat from server {victim.url}" in survivor.log()

        done = survivor.wait_for_job(long_id, {"succeeded"}, timeout=240)
        history = done["attempt_history"]
        assert [(x["server_url"], x["outcome"]) for x in history] == [
            (a.url, "interrupted"), (victim.url, "lost"), (survivor.url, "succeeded")], history
        assert history[1]["start_step"] >= 3 and history[2]["start_step"] > history[1]["start_step"]
        for job_id in short_ids:
            job = survivor.wait_for_job(job_id, {"succeeded"})
            assert [x["outcome"] for x in job["attempt_history"]] == ["succeeded"], job  # ran exactly once
    finally:
        for server in (a, b, c):
            if server is not None:
                server.stop()
