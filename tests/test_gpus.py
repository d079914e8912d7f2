"""What the server reads of the machine's GPUs (nvidia-smi's CSV), and how a trainer is launched."""

from __future__ import annotations

import sys
from pathlib import Path

from server.gpus import MIB, Gpu, parse_nvidia_smi
from server.executors.local import trainer_command
from server.scheduler import uses_gpu


def test_nvidia_smi_lines_become_gpus_and_unreadable_ones_are_skipped():
    text = "0, NVIDIA H100 80GB HBM3, 81559, 4\n1, NVIDIA H100 80GB HBM3, 81559, 70000\n2, vGPU, [N/A], [N/A]\n"
    gpus = parse_nvidia_smi(text)
    assert gpus == [Gpu(0, "NVIDIA H100 80GB HBM3", 81559 * MIB, 4 * MIB),
                    Gpu(1, "NVIDIA H100 80GB HBM3", 81559 * MIB, 70000 * MIB)]
    assert gpus[1].free_bytes == (81559 - 70000) * MIB
    assert parse_nvidia_smi("") == []


def test_auto_uses_a_gpu_only_where_one_is_seen():
    gpu = [Gpu(0, "x", 1, 0)]
    assert uses_gpu({"device": "auto"}, gpu) and not uses_gpu({"device": "auto"}, [])
    assert uses_gpu({"device": "cuda"}, []) and not uses_gpu({"device": "cpu"}, gpu)
    assert uses_gpu({}, gpu)  # configs stored before `device` defaulted to auto


def test_more_than_one_device_launches_through_torchrun():
    spec = Path("/jobs/7/spec.json")
    assert trainer_command(spec) == [sys.executable, "-m", "trainer", "run", str(spec)]
    assert trainer_command(spec, 4) == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node", "4", "-m", "trainer", "run", str(spec)]


def test_the_root_cause_of_a_torchrun_failure_is_read_from_its_report(tmp_path):
    from server.executors.local import torchrun_root_cause

    log = tmp_path / "trainer.log"
    log.write_text("step 5\n[1]:\n  exitcode  : -15 (pid: 10)  (SIGTERM)\nRoot Cause (first observed failure):\n"
                   "[0]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 11)  (SIGKILL)\n")
    assert torchrun_root_cause(log) == -9
    log.write_text("Traceback: ValueError\n")
    assert torchrun_root_cause(log) is None
    assert torchrun_root_cause(tmp_path / "missing.log") is None
