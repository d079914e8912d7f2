"""The CUDA path (issue 8): skipped where torch sees no GPU, which includes CI.

Run on a GPU machine with ``pytest -m "" tests/test_cuda.py``. A checkpoint written on the CPU
must resume on CUDA and the reverse; float32 is used for the comparison so that only kernel
differences separate the curves (bfloat16 autocast, the CUDA default, is exercised by the job
test through the server).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_distributed import CONFIG, step_losses
from tests.trainer_helpers import run_trainer, write_spec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
# CPU and CUDA kernels sum in different orders; over 3 steps of a tiny model that stays far below this.
CROSS_DEVICE_RTOL = 1e-3


def run_on(job_dir: Path, cache: Path, device: str, resume_from: Path | None = None) -> None:
    spec = write_spec(job_dir, "stage1", {**CONFIG, "device": device, "precision": "float32"}, cache_dir=cache)
    if resume_from is not None:
        (job_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copytree(resume_from, job_dir / "checkpoints" / resume_from.name)
    run = run_trainer(spec)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"on {'cuda:0' if device == 'cuda' else 'cpu'}" in run.stderr


def test_a_cpu_checkpoint_resumes_on_cuda_and_back(tmp_path):
    cache = tmp_path / "cache"
    run_on(tmp_path / "cpu", cache, "cpu")
    run_on(tmp_path / "cuda", cache, "cuda")
    run_on(tmp_path / "cpu_then_cuda", cache, "cuda", resume_from=tmp_path / "cpu" / "checkpoints" / "step-000003")
    run_on(tmp_path / "cuda_then_cpu", cache, "cpu", resume_from=tmp_path / "cuda" / "checkpoints" / "step-000003")
    for resumed, reference in (("cpu_then_cuda", "cpu"), ("cuda_then_cpu", "cuda"), ("cuda", "cpu")):
        got, want = step_losses(tmp_path / resumed), step_losses(tmp_path / reference)
        assert got == pytest.approx(want, rel=CROSS_DEVICE_RTOL), (resumed, got, want)


def test_a_gpu_job_reports_cuda_memory_through_the_api(server):
    config = {**CONFIG, "device": "auto", "steps": 30, "log_every_s": 0.2}
    with server.client() as client:
        system = client.get("/api/system").json()
        if shutil.which("nvidia-smi"):
            assert system["gpus"] and system["gpus"][0]["memory_total_bytes"] > 0
        job_id = client.post("/api/jobs", json={"stage": "stage1", "dataset": "synthetic", "config": config}).json()["id"]
    job = server.wait_for_job(job_id, {"succeeded"}, timeout=300)
    memory = job["memory"]
    assert memory["gpu_peak_reserved_bytes"] >= memory["gpu_peak_allocated_bytes"] > 0
    with server.client() as client:
        events = client.get(f"/api/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    assert any(e["gpu_allocated_bytes"] for e in events)
    log = (server.data_dir / "jobs" / str(job_id) / "trainer.log").read_text()
    assert "on cuda:0, autocast to torch.bfloat16" in log, log[-2000:]
    print(json.dumps({"gpu_job_memory": memory}))
