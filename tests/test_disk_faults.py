"""A really full disk (a small tmpfs mounted over the job directory) and kills that land while
checkpoints are being written."""

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
