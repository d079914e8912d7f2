"""The Slurm executor against a real one-node Slurm cluster (tests/slurm_cluster.py).

Through the server with ``NEUROLENS_EXECUTOR=slurm``: a Stage 1 -> Stage 2 pipeline; a job whose
steps need several allocations of a one-minute time limit (Slurm's SIGUSR1 before the limit,
checkpoint, a new batch job, every step done once); an outside ``scancel``; a server restart
while a batch job runs. The fast tests check the job's ``slurm`` options (a 422 naming the
problem), how Slurm's job states map to outcomes, and the start-up refusal when the jobs cannot
write the data folder.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from server.executors.base import SIGKILL, Exit
from server.executors.slurm import SlurmExecutor, exit_of, memory_request_mb
from server.models import AttemptOutcome
from server.outcomes import Facts, classify, decide
from server.settings import Settings
from tests.conftest import BOTH_DATABASES, REPO_ROOT, RunningServer, free_port, start_server
from tests.slurm_cluster import cancel_jobs_under, jobs_under, slurm_cluster  # noqa: F401 (a fixture)
from tests.trainer_helpers import run_trainer, write_spec
from trainer.protocol import EXIT_OUT_OF_TIME, EXIT_STOPPED

STAGE1 = {"preset": "tiny", "steps": 12, "batch_size": 8, "checkpoint_every": 4, "log_every_s": 0.5,
          "probe_words": 0, "val_windows": 16}
STAGE2 = {"preset": "tiny", "steps": 8, "batch_size": 8, "checkpoint_every": 4, "log_every_s": 0.5,
          "max_target_tokens": 16}


@pytest.fixture
def slurm_dir(slurm_cluster, tmp_path: Path) -> Iterator[Path]:  # noqa: F811 (the fixture above)
    """A data folder for one test; whatever batch jobs it left in Slurm are cancelled after it."""
    try:
        yield tmp_path
    finally:
        cancel_jobs_under(tmp_path)


def slurm_server(tmp_path: Path, database: str = "", **env: str) -> RunningServer:
    return start_server(tmp_path / "data", env={"NEUROLENS_EXECUTOR": "slurm", "NEUROLENS_SLURM_POLL_S": "0.5",
                                                 **env}, database=database)


def slurm_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], capture_output=True, text=True).stdout
    return next((field.split("=", 1)[1] for field in out.split() if field.startswith("JobState=")), "")


def wait_for(predicate, what: str, timeout: float = 180.0, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def training_attempt(client, job_id: int, number: int, steps: int = 2) -> dict:
    """The job once attempt ``number`` has trained ``steps`` steps past where it started."""
    def trained():
        job = client.get(f"/api/jobs/{job_id}").json()
        history = job["attempt_history"]
        if (job["status"] == "running" and len(history) == number
                and job["progress"]["step"] >= history[-1]["start_step"] + steps):
            return job
        return None
    return wait_for(trained, f"attempt {number} of job {job_id} to train")


def at(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def first_progress_s(attempt: dict, events: list[dict]) -> float | None:
    """Seconds from an attempt's submission (sbatch) to its trainer's first progress event (None
    when it reported none: a last attempt with a step or two left)."""
    start = at(attempt["started_at"])
    reported = [at(e["created_at"]) for e in events if e["kind"] == "progress" and at(e["created_at"]) >= start]
    return min(reported) - start if reported else None


# --- without a cluster -----------------------------------------------------------------------


@pytest.mark.parametrize("slurm, problem", [
    ({"time": "an hour"}, "Invalid slurm.time 'an hour'"),
    ({"partition": "gpu; rm -rf /"}, "Invalid slurm.partition"),
    ({"cpus": 0}, "Invalid slurm.cpus 0"),
    ({"extra": ["--mem=100G"]}, "NeuroLens sets --mem itself"),
    ({"extra": "--account=lab"}, "Invalid slurm.extra"),
    ({"nodes": 2}, "Unknown slurm option 'nodes'"),
    ("gpu", "Invalid slurm 'gpu'"),
])
def test_bad_slurm_options_are_a_422_naming_them(shared_server, slurm, problem):
    with shared_server.client() as client:
        before = client.get("/api/jobs").json()["count"]
        response = client.post("/api/jobs", json={"stage": "stage1", "config": {**STAGE1, "slurm": slurm}})
        assert response.status_code == 422, response.text
        assert problem in str(response.json()["detail"])
        assert client.get("/api/jobs").json()["count"] == before


def test_sbatch_options_come_from_the_job_over_the_settings():
    executor = SlurmExecutor(Settings(slurm_partition="cpu", slurm_time="30", slurm_extra="--account=lab --qos=low",
                                      slurm_signal_s=120))
    options = executor.sbatch_options({"time": "1-00:00:00", "gres": "gpu:1", "extra": ["--constraint=a100"]},
                                      processes=1, memory_bytes=2**30)
    assert options == ["--signal=B:USR1@120", f"--mem={1024 + 512}M", "--partition=cpu", "--time=1-00:00:00",
                       "--gres=gpu:1", "--account=lab", "--qos=low", "--constraint=a100"]
    # Unknown predicted memory: no --mem (the cluster's DefMemPerCPU); two processes: two CPUs.
    assert memory_request_mb(0, 512 * 2**20) is None
    assert "--cpus-per-task=2" in executor.sbatch_options({}, processes=2, memory_bytes=0)


@pytest.mark.parametrize("state, exit_code, outcome", [
    ("COMPLETED", "0:0", AttemptOutcome.succeeded),
    ("FAILED", f"{EXIT_OUT_OF_TIME}:0", AttemptOutcome.out_of_time),   # honoured the USR1 warning
    ("TIMEOUT", "0:15", AttemptOutcome.out_of_time),                   # ended at the limit before that
    ("PREEMPTED", f"{EXIT_STOPPED}:0", AttemptOutcome.out_of_time),    # checkpointed on the preemption's TERM
    ("CANCELLED", f"{EXIT_STOPPED}:0", AttemptOutcome.stopped),        # an outside scancel, honoured: paused
    ("CANCELLED", "0:9", AttemptOutcome.crashed),                      # scancel -s KILL: not the OOM killer
    ("NODE_FAIL", "0:0", AttemptOutcome.crashed),                      # 0:0 is no success here
    ("FAILED", "0:9", AttemptOutcome.out_of_memory),                   # a SIGKILL Slurm does not explain
    ("OUT_OF_MEMORY", "0:9", AttemptOutcome.out_of_memory),
])
def test_slurm_job_states_map_to_the_local_executors_outcomes(state, exit_code, outcome):
    ended = exit_of({"JobState": state, "ExitCode": exit_code})
    assert classify(Facts(exit=ended)) == outcome
    config = {"batch_size": 8, "micro_batch_size": 8}
    decision = decide(Facts(exit=ended), config=config, job_error=None, job_reason=None, attempts=1, failures=0,
                      max_attempts=3)
    if outcome == AttemptOutcome.out_of_time:  # requeued at once, no retry spent, no back-off
        assert decision.status.value == "queued" and decision.retry_delay_s == 0 and not outcome.spends_retry
    if outcome == AttemptOutcome.out_of_memory:
        assert decision.config == {**config, "micro_batch_size": 4}
    if state == "CANCELLED" and exit_code == "0:9":
        assert decision.status.value == "queued" and decision.config is None  # retried, no memory back-off
    assert classify(Facts(exit=Exit(-SIGKILL, cause="killed"), killed_by_us=False)) == AttemptOutcome.crashed


def test_the_server_refuses_slurm_without_its_commands(tmp_path):
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "server", "--port", str(port), "--data-dir", str(tmp_path / "data")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": str(tmp_path), "NEUROLENS_EXECUTOR": "slurm"})
    assert done.returncode == 2
    assert "sbatch not found" in done.stderr and "NEUROLENS_EXECUTOR=local" in done.stderr


@pytest.mark.parametrize("extra, problem", [
    ("--account='lab", "cannot split it into sbatch options"),
    ("job.sh", "expected sbatch options only"),
])
def test_the_server_refuses_bad_default_sbatch_options(tmp_path, extra, problem):
    done = subprocess.run([sys.executable, "-m", "server", "--port", str(free_port()), "--data-dir", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": str(tmp_path), "NEUROLENS_EXECUTOR": "slurm", "NEUROLENS_SLURM_EXTRA": extra})
    assert done.returncode == 2
    assert "invalid slurm_extra" in done.stderr and problem in done.stderr


# --- on the cluster --------------------------------------------------------------------------


def test_the_server_refuses_a_data_folder_the_jobs_cannot_write(slurm_dir):
    """The jobs run as `nobody` here, who cannot write in the test's (root's) folder: what a data
    folder the compute nodes do not share looks like from the server."""
    data = slurm_dir / "data"
    data.mkdir()
    data.chmod(0o755)
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "server", "--port", str(port), "--data-dir", str(data)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "NEUROLENS_EXECUTOR": "slurm",
                               "NEUROLENS_SLURM_EXTRA": "--uid=nobody"})
    assert done.returncode == 2, done.stderr
    assert f"The data folder {data.resolve()} is not writable from a Slurm job" in done.stderr
    assert "NEUROLENS_DATA_DIR must be a folder the compute nodes share" in done.stderr


@pytest.mark.slow
@pytest.mark.ci
@BOTH_DATABASES
def test_a_pipeline_runs_on_slurm(slurm_dir, database):
    server = slurm_server(slurm_dir, database)
    try:
        with server.client() as client:
            stage1 = client.post("/api/jobs", json={"stage": "stage1", "config": STAGE1}).json()
            stage2 = client.post("/api/jobs", json={"stage": "stage2", "config": STAGE2, "after": stage1["id"]}).json()
            stage2 = server.wait_for_job(stage2["id"], {"succeeded"}, timeout=300)
            stage1 = client.get(f"/api/jobs/{stage1['id']}").json()
            events = client.get(f"/api/jobs/{stage1['id']}/events", params={"limit": 1000}).json()["data"]
    finally:
        server.stop()
    first = first_progress_s(stage1["attempt_history"][0], events)
    assert first is not None, "the Stage 1 trainer reported no progress"
    print(f"sbatch to the first progress event: {first:.1f} s")
    for job in (stage1, stage2):
        assert job["status"] == "succeeded"
        (attempt,) = job["attempt_history"]
        assert attempt["executor"] == "slurm" and attempt["handle"].isdigit() and attempt["outcome"] == "succeeded"
        # Ran as that batch job, and reported its own memory (the server cannot see the node's).
        log = (server.data_dir / "jobs" / str(job["id"]) / "trainer.log").read_text()
        assert f"slurm job {attempt['handle']} on " in log
        assert job["memory"]["peak_rss_bytes"] > 50 * 2**20
    assert {"model", "report"} <= {a["kind"] for a in stage2["artifacts"]}


def steps_for_three_allocations(tmp_path: Path) -> int:
    """Enough steps that two one-minute allocations cannot train them, on this machine now.

    Slurm checks time limits every 30 s, so with SIGUSR1 40 s before a one-minute limit the
    first allocation trains at most 50 s minus the trainer's start-up, and each next one about
    27 s minus it (it starts a few seconds after the check that signalled the one before). A
    tiny Stage 1 step takes 0.15 to 1 s on the shared 2-core machines, so the count is measured:
    a short trainer run gives the start-up and the step rate.
    """
    spec = write_spec(tmp_path / "calibration", "stage1", {**STAGE1, "steps": 15, "checkpoint_every": 1000},
                      cache_dir=tmp_path / "data" / "cache")
    started = time.monotonic()
    run = run_trainer(spec)
    assert run.returncode == 0, run.stderr[-2000:]
    rates = sorted(e["samples_per_s"] / STAGE1["batch_size"] for e in run.events if e.get("samples_per_s"))
    start_up = time.monotonic() - started - 15 / rates[len(rates) // 2]
    trainable_s = max(50 - start_up, 5) + max(27 - start_up, 3)
    steps = math.ceil(trainable_s * rates[len(rates) // 2])
    print(f"calibration: start-up {start_up:.1f} s, {rates[len(rates) // 2]:.2f} steps/s -> {steps} steps")
    return steps


@pytest.mark.slow
@pytest.mark.ci
@BOTH_DATABASES
def test_a_job_needing_several_allocations_does_every_step_once(slurm_dir, database):
    """One-minute allocations, SIGUSR1 40 s before the end (Slurm's timers make that 20 to 50 s
    in); each allocation trains some steps, checkpoints on the signal and ends out of time, and
    the next batch job continues from exactly there."""
    steps = steps_for_three_allocations(slurm_dir)
    server = slurm_server(slurm_dir, database, NEUROLENS_SLURM_SIGNAL_S="40")
    config = {**STAGE1, "steps": steps, "checkpoint_every": 1000, "slurm": {"time": 1}}
    try:
        with server.client() as client:
            job_id = client.post("/api/jobs", json={"stage": "stage1", "config": config}).json()["id"]
            job = server.wait_for_job(job_id, {"succeeded"}, timeout=540)
            events = client.get(f"/api/jobs/{job_id}/events", params={"limit": 2000}).json()["data"]
    finally:
        server.stop()
    history = job["attempt_history"]
    # What a checkpoint-and-requeue costs: from the signal's checkpoint to the next batch job's
    # first trained step, against an uninterrupted step.
    for before, after in zip(history, history[1:]):
        stop = max(at(e["created_at"]) for e in events if e["kind"] == "checkpoint" and e["step"] == before["end_step"])
        # The first report of a step trained after it; a last attempt with only a few steps left
        # may report nothing before its `finished` event.
        trained = [at(e["created_at"]) for e in events if e["kind"] in ("progress", "finished")
                   and (e["step"] or 0) > after["start_step"] and at(e["created_at"]) > stop]
        first = first_progress_s(after, events)
        print(f"attempt {before['number']} -> {after['number']}: checkpoint at step {before['end_step']} to the next "
              f"trained step {min(trained) - stop:.1f} s (sbatch to first progress {first:.1f} s)"
              if trained and first is not None else "(no step reported after it before the job finished)")
    assert len(history) >= 3, history
    assert [a["outcome"] for a in history] == ["out_of_time"] * (len(history) - 1) + ["succeeded"]
    # Checkpointed on the USR1 warning, or (Slurm's timers are coarse: the warning can be missed)
    # on the SIGTERM that ends the job at its limit; TIMEOUT still says out of time.
    assert all(a["exit_code"] in (EXIT_OUT_OF_TIME, EXIT_STOPPED) for a in history[:-1])
    assert any(a["exit_code"] == EXIT_OUT_OF_TIME for a in history[:-1])
    assert len({a["handle"] for a in history}) == len(history)  # a new batch job each time
    # Each attempt starts where the one before checkpointed, and trained nothing after that
    # checkpoint: every step was done once.
    checkpoints = [e["step"] for e in events if e["kind"] == "checkpoint"]
    assert checkpoints == sorted(set(checkpoints)) and checkpoints[-1] == steps
    for before, after in zip(history, history[1:]):
        assert before["end_step"] == after["start_step"] and before["end_step"] in checkpoints
    assert history[0]["start_step"] == 0 and history[-1]["end_step"] == steps


@pytest.mark.slow
@pytest.mark.ci
@BOTH_DATABASES
def test_an_outside_scancel_and_a_node_failure_map_to_the_local_statuses(slurm_dir, database):
    """A plain scancel (SIGTERM) is a stop from outside: checkpointed and paused, as a SIGTERM is
    locally. A node failure kills the job; Slurm says it was no out-of-memory kill, so it is a
    crash: retried (once the node is back), micro-batch kept."""
    server = slurm_server(slurm_dir, database)
    config = {**STAGE1, "steps": 400, "checkpoint_every": 2}
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    try:
        with server.client() as client:
            job_id = client.post("/api/jobs", json={"stage": "stage1", "config": config}).json()["id"]
            job = training_attempt(client, job_id, 1)
            subprocess.run(["scancel", job["attempt_history"][0]["handle"]], check=True)
            job = server.wait_for_job(job_id, {"paused"}, timeout=120)
            assert job["attempt_history"][0]["outcome"] == "stopped"
            assert "stopped from outside NeuroLens" in job["error"]
            assert client.post(f"/api/jobs/{job_id}/resume").status_code == 200
            training_attempt(client, job_id, 2)
            try:
                subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=neurolens test"],
                               check=True)
                job = wait_for(lambda: (j := client.get(f"/api/jobs/{job_id}").json())["attempts"] >= 3 and j,
                               "the retry after the node failure", timeout=120)
            finally:
                # (ReturnToService=2 may have brought it back already; then this has nothing to do)
                subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
            training_attempt(client, job_id, 3, steps=1)
            assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 200
            job = server.wait_for_job(job_id, {"cancelled"}, timeout=120)
    finally:
        server.stop()
    history = job["attempt_history"]
    assert [a["outcome"] for a in history] == ["stopped", "crashed", "cancelled"], history
    assert history[1]["message"].startswith("Slurm job ") and "ended NODE_FAIL" in history[1]["message"]
    assert "retrying from the newest checkpoint" in history[1]["message"]
    assert job["config"]["micro_batch_size"] == STAGE1["batch_size"]  # no out-of-memory back-off


@pytest.mark.slow
@pytest.mark.ci
@BOTH_DATABASES
def test_a_restarted_server_reattaches_to_its_batch_job(slurm_dir, database):
    server = slurm_server(slurm_dir, database)
    config = {**STAGE1, "steps": 30}
    try:
        with server.client() as client:
            job_id = client.post("/api/jobs", json={"stage": "stage1", "config": config}).json()["id"]
            handle = training_attempt(client, job_id, 1)["attempt_history"][0]["handle"]
    finally:
        server.stop()  # a clean shutdown: batch jobs run on without the server
    assert slurm_state(handle) == "RUNNING"
    # On the same address: the trainer reports to the URL in its spec.
    port = int(server.url.rsplit(":", 1)[1])
    server = start_server(server.data_dir, port=port, env={"NEUROLENS_EXECUTOR": "slurm",
                                                          "NEUROLENS_SLURM_POLL_S": "0.5"}, database=database)
    try:
        assert f"job {job_id}: re-attached to trainer {handle}" in server.log()
        job = server.wait_for_job(job_id, {"succeeded"}, timeout=240)
    finally:
        server.stop()
    (attempt,) = job["attempt_history"]
    assert attempt["handle"] == handle and attempt["outcome"] == "succeeded"
    assert handle not in jobs_under(slurm_dir) or slurm_state(handle) == "COMPLETED"


@pytest.mark.slow
def test_two_processes_train_under_srun_and_honour_the_time_warning(slurm_dir):
    """`devices: 2`: torchrun as one srun task with two CPUs, two gloo processes on one node. The
    time-limit warning, delivered the way Slurm delivers it (USR1 to the batch shell), passes
    through srun and torchrun to the workers: checkpointed, out of time, continued."""
    server = slurm_server(slurm_dir)
    try:
        with server.client() as client:
            job_id = client.post("/api/jobs", json={"stage": "stage1", "config": {**STAGE1, "steps": 40,
                                                                                  "devices": 2}}).json()["id"]
            job = training_attempt(client, job_id, 1)
            subprocess.run(["scancel", "--batch", "--signal=USR1", job["attempt_history"][0]["handle"]], check=True)
            job = server.wait_for_job(job_id, {"succeeded"}, timeout=300)
    finally:
        server.stop()
    first, second = job["attempt_history"]
    assert first["outcome"] == "out_of_time" and first["exit_code"] == EXIT_OUT_OF_TIME, first
    assert second["start_step"] == first["end_step"] > 0 and second["outcome"] == "succeeded"
    log = (server.data_dir / "jobs" / str(job_id) / "trainer.log").read_text()
    assert "[rank 1]" in log  # the second process trained too
