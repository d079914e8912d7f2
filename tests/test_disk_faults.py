"""A really full disk (a small tmpfs mounted over the job directory, or the whole data
directory with its database) and kills that land while checkpoints are being written."""

from __future__ import annotations

import random
import signal
import subprocess
import time

import pytest
from safetensors import safe_open

from tests.conftest import start_server
from tests.test_faults import resumed_steps, trainer_processes, wait_for_step


def mount_tmpfs(path, size_bytes: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here (needs root): {result.stderr.strip()}")


@pytest.mark.slow
def test_disk_full_while_saving_pauses_and_keeps_the_previous_checkpoint(tmp_path):
    data_dir = tmp_path / "data"
    job_dir = data_dir / "jobs" / "1"
    # Room for two tiny checkpoints (~0.42 MB each) and the log, not for a third being written.
    mount_tmpfs(job_dir, 1_100_000)
    server = start_server(data_dir)
    try:
        with server.client() as client:
            config = {"preset": "tiny", "steps": 200, "checkpoint_every": 10, "log_every_s": 0.5,
                      "probe_words": 0, "val_windows": 16}
            job = client.post("/api/jobs", json={"stage": "stage1", "config": config}).json()
            assert job["id"] == 1
            job = server.wait_for_job(1, {"paused"}, timeout=180)
            assert "Disk full" in job["error"] and "newest complete checkpoint is kept" in job["error"]

            complete = sorted(job_dir.glob("checkpoints/step-*/checkpoint.safetensors"))
            assert complete, "the previous checkpoint must survive"
            with safe_open(str(complete[-1]), framework="pt") as fh:  # intact, loadable
                assert len(list(fh.keys())) > 4
            saved_step = int(complete[-1].parent.name.split("-")[1])

            # Free space (grow the filesystem), resume: it continues from that checkpoint.
            subprocess.run(["mount", "-o", "remount,size=64m", str(job_dir)], check=True)
            assert client.post("/api/jobs/1/resume").status_code == 200
            job = server.wait_for_job(1, {"succeeded"}, timeout=180)
            assert job["progress"]["step"] == 200
            assert resumed_steps(server, 1) == [saved_step]
    finally:
        server.stop()
        subprocess.run(["umount", "-l", str(job_dir)], capture_output=True)


def fill_disk(path) -> None:
    """Write ``path`` until the filesystem under it has no byte left."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError:
            pass
        try:
            while True:
                fh.write(b"\0")
        except OSError:
            pass


@pytest.mark.slow
def test_a_full_disk_under_the_database_too_is_reported_as_a_full_disk_within_seconds(tmp_path):
    """Finding 5: the disk under the database fills as the trainer checkpoints; SQLite cannot
    store the trainer's disk-full report. It is kept in memory and shown at once, and lands (with
    the pause) as soon as the database can write again."""
    data_dir = tmp_path / "data"
    mount_tmpfs(data_dir, 64 * 2**20)
    server = start_server(data_dir)
    filler = data_dir / "filler"
    try:
        with server.client() as client:
            config = {"preset": "tiny", "steps": 100000, "checkpoint_every": 10, "log_every_s": 0.3,
                      "probe_words": 0, "val_windows": 16}
            job = client.post("/api/jobs", json={"stage": "stage1", "config": config}).json()
            wait_for_step(server, job["id"], 12)  # its first checkpoint is on disk
            fill_disk(filler)
            deadline = time.monotonic() + 60
            while "Disk full" not in (client.get(f"/api/jobs/{job['id']}").json()["error"] or ""):
                assert time.monotonic() < deadline, "the full disk was not reported"
                time.sleep(0.2)
            reported = time.monotonic()
            assert "cannot store the trainer's error event" in server.log(), "the database could still write: not the fault"
            # Nothing could be written: the row still says running, and the error came from memory.
            assert client.get(f"/api/jobs/{job['id']}").json()["status"] == "running"

            filler.unlink()
            job = server.wait_for_job(job["id"], {"paused"}, timeout=30)
            assert time.monotonic() - reported < 10
            assert "Disk full" in job["error"] and "outside NeuroLens" not in job["error"]
            assert job["attempt_history"][-1]["outcome"] == "stopped"
            events = client.get(f"/api/jobs/{job['id']}/events", params={"limit": 5000}).json()["data"]
            assert any(e["kind"] == "error" and "Disk full" in e["message"] for e in events)
            assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
    finally:
        server.stop()
        subprocess.run(["umount", "-l", str(data_dir)], capture_output=True)


@pytest.mark.slow
def test_kills_during_checkpoint_writes_never_load_a_torn_checkpoint(tmp_path):
    """A checkpoint every step, and SIGKILLs at random moments: every resume loads a complete one."""
    server = start_server(tmp_path / "data", env={"NEUROLENS_MAX_ATTEMPTS": "6"})
    rng = random.Random(3)
    try:
        with server.client() as client:
            config = {"preset": "tiny", "steps": 60, "checkpoint_every": 1, "log_every_s": 0.3,
                      "probe_words": 0, "val_windows": 16}
            job = client.post("/api/jobs", json={"stage": "stage1", "config": config}).json()
            for kill in range(3):
                wait_for_step(server, job["id"], 8 + 15 * kill)
                time.sleep(rng.uniform(0.0, 0.4))
                for trainer in trainer_processes(server, job["id"]):
                    trainer.send_signal(signal.SIGKILL)
                deadline = time.monotonic() + 60
                while client.get(f"/api/jobs/{job['id']}").json()["attempts"] < kill + 2:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            job = server.wait_for_job(job["id"], {"succeeded"}, timeout=240)
            assert job["progress"]["step"] == 60 and job["attempts"] == 4
            assert len(resumed_steps(server, job["id"])) == 3
            log = (server.data_dir / "jobs" / str(job["id"]) / "trainer.log").read_text()
            assert "Cannot read checkpoint" not in log and "crashed" not in log
    finally:
        server.stop()
