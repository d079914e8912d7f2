"""The server on its own: start-up, schema, health, validation of bad input (no training needed)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import pytest

from server.db import alembic_config, upgrade_database
from tests.conftest import BOTH_DATABASES, BOTH_SHARED_DATABASES, REPO_ROOT


def url_of(database: str, tmp_path) -> str:
    """The ``database`` fixture's URL, or a SQLite file in ``tmp_path`` for 'sqlite'."""
    return database or f"sqlite:///{tmp_path / 'db.sqlite'}"


def table_names(url: str) -> set[str]:
    from sqlalchemy import create_engine, inspect

    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_server_does_not_import_torch_or_the_client_library():
    # httpx is the clients' (and the trainer's): the server only serves the dashboard's files.
    code = ("import sys, server.app, server.__main__; "
            "print(' '.join(m for m in ('torch', 'httpx', 'clients') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", "server imports " + result.stdout


@BOTH_DATABASES
def test_migrations_build_and_remove_the_schema(tmp_path, database):
    from alembic import command

    url = url_of(database, tmp_path)
    upgrade_database(url)
    assert {"job", "attempt", "jobevent", "artifact", "alembic_version"} <= table_names(url)
    command.downgrade(alembic_config(url), "base")
    assert table_names(url) == {"alembic_version"}
    upgrade_database(url)  # and back up again (PostgreSQL: the enum types went with their tables)


def test_the_attempts_migration_keeps_a_running_trainer_reattachable(tmp_path):
    """Jobs from before attempt records get one row per attempt; the newest holds what the job
    row held (pid, token, heartbeat, peak), and a downgrade puts it back."""
    from alembic import command

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    command.upgrade(alembic_config(url), "0003")
    db = sqlite3.connect(tmp_path / "db.sqlite")
    db.execute("INSERT INTO job (id, stage, dataset, config, status, step, total, metrics, attempts, pid, "
               "token_sha256, last_heartbeat_at, attempt_start_step, peak_rss_bytes, version, created_at) VALUES "
               "(1, 'stage1', 'synthetic', '{}', 'running', 40, 60, '{}', 2, 4242, 'abc', "
               "'2026-12-01 10:00:00.000000', 30, 123456, 1, '2026-12-01 09:00:00.000000')")
    db.commit()
    upgrade_database(url)
    rows = db.execute("SELECT number, handle, token_sha256, start_step, ended_at IS NULL, peak_rss_bytes, message "
                      "FROM attempt WHERE job_id = 1 ORDER BY number").fetchall()
    assert rows == [(1, None, None, 0, 0, None, "recorded before NeuroLens kept attempts"),
                    (2, "4242", "abc", 30, 1, 123456, None)]
    command.downgrade(alembic_config(url), "0003")
    assert db.execute("SELECT pid, token_sha256, attempt_start_step, peak_rss_bytes FROM job").fetchall() == [
        (4242, "abc", 30, 123456)]


@BOTH_DATABASES
def test_migrations_match_the_models(tmp_path, database):
    """The schema Alembic builds is the one the SQLModel tables describe (nothing forgotten)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine
    from sqlmodel import SQLModel

    import server.models  # noqa: F401  (registers the tables)

    url = url_of(database, tmp_path)
    upgrade_database(url)
    engine = create_engine(url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    engine.dispose()
    assert differences == []


@BOTH_DATABASES
def test_byte_counts_past_32_bits_are_stored_and_peaks_taken_in_portable_sql(tmp_path, database):
    """PostgreSQL's INTEGER is 32-bit, and two-argument max() is SQLite's only: a trainer of 5 GB,
    sampled twice, keeps its figures and its peak on both databases."""
    from sqlmodel import Session

    from server.db import make_engine
    from server.jobs import record_memory_sample, start_attempt
    from server.models import Artifact, Attempt, Job

    url = url_of(database, tmp_path)
    upgrade_database(url)
    engine = make_engine(url)
    with Session(engine) as session:
        job = Job(stage="stage1", dataset="synthetic", config={}, total=100, predicted_peak_bytes=6 * 10**9)
        session.add(job)
        session.commit()
        attempt = start_attempt(session, job, "local", "token", "http://127.0.0.1:1")
        record_memory_sample(session, attempt, 5 * 10**9)
        record_memory_sample(session, attempt, 4 * 10**9)
        session.add(Artifact(kind="model", filename="m", size_bytes=3 * 2**31, sha256="0" * 64, storage_path="m"))
        session.commit()
        stored = session.get(Attempt, attempt.id)
        session.refresh(stored)
        assert (stored.rss_bytes, stored.peak_rss_bytes) == (4 * 10**9, 5 * 10**9)
        assert stored.server_url == "http://127.0.0.1:1"
    engine.dispose()


@BOTH_DATABASES
def test_health_system_presets_and_docs(server, database):
    with server.client() as client:
        assert client.get("/api/health").json()["status"] == "ok"
        system = client.get("/api/system").json()
        assert system["memory_total_bytes"] >= system["memory_available_bytes"] > 0
        assert system["cpu_count"] >= 1 and system["running_jobs"] == 0
        presets = client.get("/api/presets").json()
        assert presets["stage1"]["presets"] == ["tiny", "small", "base", "large"]
        assert "steps" in {field["name"] for field in presets["stage2"]["fields"]}
        assert client.get("/docs").status_code == 200
        assert "/api/jobs" in client.get("/openapi.json").json()["paths"]
    # The database lives in the data directory by default.
    assert (server.data_dir / "neurolens.db").exists() == (database == "")


BAD_JOBS = [
    ({"stage": "stage3"}, 422, "Invalid stage 'stage3'; expected 'stage1' or 'stage2'."),
    ({"stage": "stage1", "config": {"preset": "huge"}}, 422, "Invalid preset 'huge'"),
    ({"stage": "stage1", "config": {"steps": 2.5}}, 422, "Invalid steps 2.5; expected a whole number."),
    ({"stage": "stage1", "config": {"steps": -5}}, 422, "Invalid steps -5"),
    ({"stage": "stage1", "config": {"steps": "many"}}, 422, "Invalid steps 'many'"),
    ({"stage": "stage1", "config": {"stepz": 10}}, 422, "Unknown config key 'stepz' for stage1"),
    ({"stage": "stage1", "config": {"batch_size": 8, "micro_batch_size": 3}}, 422, "must divide batch_size"),
    ({"stage": "stage1", "config": {"batch_size": 8, "devices": 3}}, 422, "Invalid devices 3; it must divide batch_size 8"),
    ({"stage": "stage1", "config": {"batch_size": 8, "devices": 2, "micro_batch_size": 3}}, 422,
     "it must divide the per-process batch 4 (batch_size 8 / devices 2)"),
    ({"stage": "stage1", "config": {"devices": 0}}, 422, "Invalid devices 0; it must be greater than zero."),
    ({"stage": "stage1", "config": {"precision": "fp16"}}, 422, "Invalid precision 'fp16'"),
    ({"stage": "stage1", "config": {"device": "tpu"}}, 422, "Invalid device 'tpu'"),
    ({"stage": "stage2", "after": 1, "config": {"devices": 2}}, 422, "Stage 2 trains in one process"),
    ({"stage": "stage1", "dataset": "/no/such/recordings"}, 422, "Dataset path '/no/such/recordings' does not exist"),
    ({"stage": "stage1", "dataset": "synthetic:other"}, 422, "Invalid dataset 'synthetic:other'"),
    ({"stage": "stage2"}, 422, "needs exactly one of 'after'"),
    ({"stage": "stage2", "after": 999}, 404, "Job 999 named in 'after' not found."),
    # Past PostgreSQL's 32-bit INTEGER: ids are BIGINT there.
    ({"stage": "stage2", "after": 2**62}, 404, f"Job {2**62} named in 'after' not found."),
    ({"stage": "stage2", "encoder_artifact": 999}, 404, "Artifact 999 named in 'encoder_artifact' not found."),
    ({"stage": "stage1", "after": 1}, 422, "apply to stage2 jobs only"),
]


@BOTH_SHARED_DATABASES
@pytest.mark.parametrize(("body", "status", "message"), BAD_JOBS, ids=[m[:30] for _, _, m in BAD_JOBS])
def test_bad_job_requests_are_refused_and_change_nothing(shared_server, body, status, message):
    with shared_server.client() as client:
        before = client.get("/api/jobs").json()
        response = client.post("/api/jobs", json=body)
        assert response.status_code == status, response.text
        assert message in response.json()["detail"]
        after = client.get("/api/jobs").json()
        assert after["count"] == before["count"]
        assert [job["id"] for job in after["data"]] == [job["id"] for job in before["data"]]


@BOTH_SHARED_DATABASES
def test_unknown_ids_are_404_with_a_message(shared_server):
    with shared_server.client() as client:
        for job_id in (42, 2**40):
            for path in (f"/api/jobs/{job_id}", f"/api/jobs/{job_id}/events", f"/api/artifacts/{job_id}",
                         f"/api/artifacts/{job_id}/download"):
                response = client.get(path)
                assert response.status_code == 404
                assert f"{job_id} not found" in response.json()["detail"]
            assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 404


@BOTH_DATABASES
def test_trainer_endpoints_refuse_callers_without_the_job_token(server, tmp_path):
    with server.client() as client:
        job = client.post("/api/jobs", json={"stage": "stage1", "config": {"steps": 1}}).json()
        response = client.post(f"/api/jobs/{job['id']}/events", json={"kind": "progress", "step": 1})
        assert response.status_code == 401
        response = client.post(f"/api/jobs/{job['id']}/events", json={"kind": "progress"},
                               headers={"Authorization": "Bearer not-the-token"})
        assert response.status_code == 401
        assert "may not report for job" in response.json()["detail"]
        response = client.post(f"/api/jobs/{job['id']}/artifacts/register", json={"kind": "encoder", "path": "x"},
                               headers={"Authorization": "Bearer not-the-token"})
        assert response.status_code == 401


def test_the_eta_is_measured_from_the_first_reported_step_not_from_start_up(tmp_path):
    """Start-up (3 s here: data preparation, building the model) is not training speed."""
    from sqlmodel import Session

    from server.db import make_engine
    from server.jobs import record_event, start_attempt
    from server.models import Job
    from trainer.protocol import TrainerEvent

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_database(url)
    with Session(make_engine(url)) as session:
        job = Job(stage="stage1", dataset="synthetic", config={}, total=100)
        session.add(job)
        session.commit()
        attempt = start_attempt(session, job, "local", "token")
        record_event(session, job, attempt, TrainerEvent(kind="started", total=100))
        time.sleep(3.0)
        record_event(session, job, attempt, TrainerEvent(step=1))
        assert job.eta_s is None  # one step gives no rate yet
        time.sleep(0.3)
        record_event(session, job, attempt, TrainerEvent(step=3))
        # 2 steps in about 0.3 s: about 15 s for the 97 left. Counting start-up would say over 100 s.
        assert job.eta_s is not None and job.eta_s < 50, job.eta_s
