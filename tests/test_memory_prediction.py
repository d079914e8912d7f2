"""The memory prediction the scheduler admits jobs by, against the measured peaks of real runs.

Each case is a real ``python -m trainer run spec.json`` (offline) for a few optimizer steps on
the synthetic dataset; its peak is the kernel's ``ru_maxrss`` of that child process, read with
``os.wait4`` (start-up, data, every step, the checkpoint, the export and the final evaluation).
:func:`trainer.memory_prediction.predict_peak_bytes` must be within :data:`TOLERANCE` of it.

The synthetic dataset is generated here, once per channel set, into a shared cache, as the
server's ``cache_dir`` holds it for every job: generating it is a one-off per machine, not part
of a job's peak. Preprocessing the recording into the cache does happen inside each run (every
case gets a fresh cache of preprocessed signals), so its memory is part of what is measured.

The tiny case takes a few seconds and runs in the default suite; the larger presets are slow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer_helpers import REPO, write_spec
from trainer.config import CHANNELS_32, CHANNELS_8, Stage1Config
from trainer.memory_prediction import predict_peak_bytes
from trainer.data.recordings import SYNTHETIC_SEED
from trainer.data.synthetic import ensure_synthetic_dataset

TOLERANCE = 0.25
MB = 1e6


# Linux carries a process's peak RSS across exec, and a forked child starts from its parent's:
# a trainer started straight from a pytest process that has grown to 1 GB reports at least 1 GB.
# So a fresh, small interpreter starts the trainer and reports the trainer's own ru_maxrss.
LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measured_peak_bytes(spec_path: Path, timeout: float) -> int:
    """Run the trainer on ``spec_path`` to completion and return its ``ru_maxrss`` in bytes."""
    job_dir = spec_path.parent
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-c", LAUNCHER, str(job_dir / "maxrss"),
               sys.executable, "-m", "trainer", "run", str(spec_path)]
    with open(job_dir / "stdout.jsonl", "wb") as out, open(job_dir / "stderr.log", "wb") as err:
        returncode = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=err, timeout=timeout).returncode
    assert returncode == 0, (job_dir / "stderr.log").read_text()[-3000:]
    peak = int((job_dir / "maxrss").read_text())
    return peak * (1 if sys.platform == "darwin" else 1024)  # KiB on Linux


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("memory-prediction-cache")
    for channels in (CHANNELS_8, CHANNELS_32):
        ensure_synthetic_dataset(cache, "synthetic", SYNTHETIC_SEED, channels)
    return cache


def check_prediction(tmp_path: Path, cache: Path, config: dict, timeout: float = 3600.0) -> None:
    job_cache = tmp_path / "cache"
    shutil.copytree(cache / "datasets", job_cache / "datasets")  # generated data, not preprocessed
    spec = write_spec(tmp_path / "job", "stage1", config, cache_dir=job_cache)
    measured = measured_peak_bytes(spec, timeout)
    predicted = predict_peak_bytes(Stage1Config(**config))
    error = predicted / measured - 1
    print(f"\n{config}: measured {measured / MB:.0f} MB, predicted {predicted / MB:.0f} MB ({error:+.1%})")
    assert abs(error) <= TOLERANCE, (
        f"predicted {predicted / MB:.0f} MB, measured {measured / MB:.0f} MB ({error:+.1%}, allowed "
        f"±{TOLERANCE:.0%})")


# A few steps are enough: the peak is set by the first step (weights, optimizer state, one
# step's activations) and by the end-of-run evaluation, not by how long training goes on.
FEW = {"steps": 3, "checkpoint_every": 3, "log_every_s": 5.0, "warmup_steps": 1}


def test_tiny_default_prediction(tmp_path, shared_cache):
    # The default config, probe included: what `make run` and most tests start.
    check_prediction(tmp_path, shared_cache, {"preset": "tiny", **FEW})


# The larger presets probe 100 words and validate on 32 windows: the probe runs two encoders
# over every word window, and the defaults would take most of the run on a 2-core machine.
@pytest.mark.slow
@pytest.mark.parametrize("config", [
    pytest.param({"preset": "tiny", "optimizer": "adamw", "fused_optimizer": False,
                  "activation_checkpointing": False}, id="tiny-plain-adamw"),
    pytest.param({"preset": "small", "probe_words": 100}, id="small"),
    pytest.param({"preset": "base", "probe_words": 100}, id="base"),
    pytest.param({"preset": "base", "batch_size": 8, "micro_batch_size": 2, "probe_words": 100},
                 id="base-accumulation"),
    pytest.param({"preset": "base", "optimizer": "adamw", "fused_optimizer": False,
                  "activation_checkpointing": False, "probe_words": 100}, id="base-plain-adamw"),
])
def test_stage1_prediction(tmp_path, shared_cache, config):
    check_prediction(tmp_path, shared_cache, {"val_windows": 32, **config, **FEW})
