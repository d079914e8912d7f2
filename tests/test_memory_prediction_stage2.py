"""The Stage 2 branch of ``predict_peak_bytes`` against real trainer runs.

Each run is ``python -m trainer run spec.json`` in its own process; its peak RSS is the kernel's
``ru_maxrss`` for that child (``os.wait4``), covering the whole job: data, feature caching,
training, evaluation and export. Slow: a Stage 1 encoder and several Stage 2 runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.trainer_helpers import REPO, run_trainer, write_spec
from trainer.config import EncoderConfig, Stage2Config
from trainer.memory_prediction import predict_peak_bytes
from trainer.protocol import EXIT_OK

pytestmark = pytest.mark.slow

STAGE1 = {"preset": "tiny", "steps": 10, "batch_size": 8, "probe_words": 0, "val_windows": 16, "log_every_s": 5.0}
CASES = {
    "tiny": {"preset": "tiny", "steps": 20, "batch_size": 16, "max_target_tokens": 16},
    "tiny-unfrozen": {"preset": "tiny", "steps": 20, "unfreeze_steps": 10, "batch_size": 16, "max_target_tokens": 16},
    "small": {"preset": "small", "steps": 4, "batch_size": 8, "optimizer": "adafactor", "max_target_tokens": 16},
}


def peak_rss_of_run(spec) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with open(spec.parent / "stderr.log", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "trainer", "run", str(spec)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == EXIT_OK, (spec.parent / "stderr.log").read_text()[-3000:]
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    job_dir = tmp_path_factory.mktemp("stage1")
    result = run_trainer(write_spec(job_dir, "stage1", STAGE1, cache_dir=cache), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == EXIT_OK, result.stderr[-3000:]
    return job_dir / "final" / "encoder.safetensors", cache


@pytest.mark.parametrize("case", list(CASES))
def test_stage2_peak_is_within_25_percent_of_the_prediction(case, encoder, tmp_path):
    encoder_path, cache = encoder
    config = {**CASES[case], "checkpoint_every": 1000, "log_every_s": 5.0, "bootstrap_samples": 50}
    measured = peak_rss_of_run(write_spec(tmp_path / "job", "stage2", config, cache_dir=cache,
                                          encoder_path=encoder_path))
    predicted = predict_peak_bytes(Stage2Config(**config), EncoderConfig.from_name("tiny"))
    print(json.dumps({"case": case, "measured": measured, "predicted": predicted}))
    assert abs(measured - predicted) <= 0.25 * predicted, (case, measured, predicted)
