"""The trainer as the server runs it: ``python -m trainer run spec.json`` in real subprocesses.

One Stage 1 run is shared by the module (it is also the uninterrupted reference for the resume
test). Runs are offline (``api_url`` empty: events on stdout) unless a test needs the stand-in
server for stop requests and artifact registration.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.trainer_helpers import REPO, StandInServer, run_trainer, write_spec
from trainer.protocol import EXIT_FAILED, EXIT_OK, EXIT_STOPPED

STAGE1 = {"preset": "tiny", "steps": 30, "batch_size": 8, "micro_batch_size": 4, "checkpoint_every": 10,
          "warmup_steps": 5, "log_every_s": 0.5, "seed": 3}
STAGE2 = {"preset": "tiny", "steps": 30, "batch_size": 8, "checkpoint_every": 10, "lr": 3e-3,
          "warmup_steps": 5, "log_every_s": 0.5, "max_target_tokens": 16}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, cache_dir):
    job_dir = tmp_path_factory.mktemp("stage1")
    result = run_trainer(write_spec(job_dir, "stage1", STAGE1, cache_dir=cache_dir))
    assert result.returncode == EXIT_OK, result.stderr[-3000:]
    return job_dir, result


def finished(result) -> dict:
    [event] = [e for e in result.events if e["kind"] == "finished"]
    return event


def test_stage1_writes_checkpoints_and_a_standalone_encoder(stage1):
    job_dir, result = stage1
    kinds = [e["kind"] for e in result.events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert [e["message"] for e in result.events if e["kind"] == "checkpoint"] == [
        f"checkpoints/step-0000{s}/checkpoint.safetensors" for s in (10, 20, 30)]
    # The spec's default keep_checkpoints is 3: all three are kept (tests/test_housekeeping.py prunes).
    assert sorted(p.name for p in (job_dir / "checkpoints").iterdir()) == ["step-000010", "step-000020", "step-000030"]
    progress = [e for e in result.events if e["kind"] == "progress"]
    assert progress and all(e["rss_bytes"] > 0 and e["peak_rss_bytes"] >= e["rss_bytes"] for e in progress)

    metrics = finished(result)["metrics"]
    assert metrics["steps"] == 30 and np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["val_loss"])
    assert {"probe_acc", "probe_acc_random_init", "probe_acc_raw", "probe_chance"} <= set(metrics)

    # Loadable with safetensors alone: no NeuroLens import needed to read weights and config.
    with safe_open(str(job_dir / "final" / "encoder.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        names = list(fh.keys())
        weight = fh.get_tensor("temporal.weight")
    assert meta["format"] == "neurolens.encoder/1"
    config = json.loads(meta["encoder_config"])
    assert config["name"] == "tiny" and config["channels"] == ["F3", "Fz", "F4", "C3", "Cz", "C4", "P3", "Pz"]
    assert weight.shape == (config["d_model"], config["patch_samples"])
    assert not any("head" in n or n.startswith(("mlp.", "to_signal")) for n in names)


@pytest.mark.slow
@pytest.mark.ci  # CI runs it after the default suite (see .ci/run)
def test_stop_request_then_resume_continues_the_loss_curve(stage1, tmp_path, cache_dir):
    _, straight = stage1
    server = StandInServer(stop_at=4).start()
    try:
        spec_online = write_spec(tmp_path / "job", "stage1", STAGE1, cache_dir=cache_dir, api_url=server.url)
        stopped = run_trainer(spec_online)
    finally:
        server.close()
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    assert server.bad_auth == 0 and server.events[0]["kind"] == "started"
    [saved] = [e for e in server.events if e["kind"] == "checkpoint"][-1:]
    stop_step = saved["step"]
    assert 4 <= stop_step < 30
    # A pause registers its checkpoint, so the paused run can be moved to another machine.
    assert server.registrations == [{"kind": "checkpoint", "path": f"checkpoints/step-{stop_step:06d}/checkpoint.safetensors"}]

    server = StandInServer().start()  # second attempt: no stop, registrations recorded
    try:
        resumed = run_trainer(write_spec(tmp_path / "job", "stage1", STAGE1, cache_dir=cache_dir,
                                         api_url=server.url))
    finally:
        server.close()
    assert resumed.returncode == EXIT_OK, resumed.stderr[-3000:]
    assert f"at step {stop_step}" in resumed.stderr
    [done] = [e for e in server.events if e["kind"] == "finished"]
    assert done["metrics"]["train_loss"] == pytest.approx(finished(straight)["metrics"]["train_loss"], abs=1e-4)
    assert done["metrics"]["val_loss"] == pytest.approx(finished(straight)["metrics"]["val_loss"], abs=1e-4)
    assert {(r["kind"], r["path"]) for r in server.registrations} == {
        ("encoder", "final/encoder.safetensors"), ("checkpoint", "checkpoints/step-000030/checkpoint.safetensors")}


def test_killed_run_resumes_and_ends_with_the_uninterrupted_loss(stage1, tmp_path, cache_dir):
    """SIGKILL (no chance to checkpoint) after the step-10 checkpoint; the next attempt resumes
    from it and must finish at the configured step with the uninterrupted run's final loss.

    Tolerance 1e-4 absolute: the resumed run repeats the same float operations in the same order
    (weights, optimizer state, data order and RNG all restored), so in practice the losses agree
    to the last bit; the margin only absorbs thread-scheduling differences in reductions.
    """
    _, straight = stage1
    spec = write_spec(tmp_path / "job", "stage1", STAGE1, cache_dir=cache_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "run", str(spec)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("kind") == "checkpoint" and event.get("step") == 10:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL

    resumed = run_trainer(spec)
    assert resumed.returncode == EXIT_OK, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step" in resumed.stderr
    done = finished(resumed)
    assert done["step"] == STAGE1["steps"] == done["metrics"]["steps"]
    assert done["metrics"]["train_loss"] == pytest.approx(finished(straight)["metrics"]["train_loss"], abs=1e-4)
    assert done["metrics"]["val_loss"] == pytest.approx(finished(straight)["metrics"]["val_loss"], abs=1e-4)
    # The word probe ran on the resumed encoder and recorded both sides of the comparison.
    metrics = done["metrics"]
    assert metrics["probe_words"] >= 20 and 0 <= metrics["probe_chance"] <= 1
    assert 0 <= metrics["probe_acc"] <= 1 and 0 <= metrics["probe_acc_random_init"] <= 1


def test_stage2_from_the_stage1_encoder(stage1, tmp_path, cache_dir):
    encoder_path = stage1[0] / "final" / "encoder.safetensors"
    job_dir = tmp_path / "stage2"
    result = run_trainer(write_spec(job_dir, "stage2", STAGE2, cache_dir=cache_dir, encoder_path=encoder_path))
    assert result.returncode == EXIT_OK, result.stderr[-3000:]

    report = json.loads((job_dir / "final" / "report.json").read_text())
    metrics = finished(result)["metrics"]
    assert report["metrics"] == metrics
    for key in ("test_bleu1_eeg", "test_bleu1_noise", "test_bleu1_shuffled", "test_wer_eeg", "test_wer_noise"):
        assert 0.0 <= metrics[key] <= 2.0
    assert metrics["sentences_test"] > 0 and report["examples"]

    # The model file alone rebuilds the encoder, the bridge, BART and the tokenizer and can
    # generate (tests/test_stage2.py does the same where NeuroLens cannot be imported).
    from trainer import standalone

    with safe_open(str(job_dir / "final" / "model.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    assert meta["format"] == "neurolens.model/1" and "def load(" in meta["loader"]
    assert {k.split(".", 1)[0] for k in tensors} == {"encoder", "bridge", "bart"}
    with safe_open(str(encoder_path), framework="pt") as fh:
        torch.testing.assert_close(tensors["encoder.temporal.weight"], fh.get_tensor("temporal.weight"))
    model = standalone.load(str(job_dir / "final" / "model.safetensors"))
    assert len(model.tokenizer) == model.bart.config.vocab_size
    assert model.channels == ["F3", "Fz", "F4", "C3", "Cz", "C4", "P3", "Pz"]
    [text] = model.generate(np.zeros((1, len(model.channels), model.window_samples), np.float32))
    assert isinstance(text, str)


def test_corrupt_recording_fails_cleanly_naming_the_file(tmp_path):
    bad = tmp_path / "data" / "broken.edf"
    bad.parent.mkdir()
    bad.write_bytes(b"0       garbage that is not an EDF header" * 20)
    result = run_trainer(write_spec(tmp_path / "job", "stage1", STAGE1, dataset=str(bad.parent)))
    assert result.returncode == EXIT_FAILED
    [error] = [e for e in result.events if e["kind"] == "error"]
    assert error["message"].startswith(f"Cannot read {bad}")


def test_stage2_refuses_a_file_that_is_not_an_encoder(stage1, tmp_path, cache_dir):
    not_encoder = stage1[0] / "checkpoints" / "step-000030" / "checkpoint.safetensors"
    result = run_trainer(write_spec(tmp_path / "job", "stage2", STAGE2, cache_dir=cache_dir,
                                    encoder_path=not_encoder))
    assert result.returncode == EXIT_FAILED
    [error] = [e for e in result.events if e["kind"] == "error"]
    assert f"{not_encoder} is not a NeuroLens encoder file" in error["message"]


def test_bad_config_fails_with_the_allowed_values(tmp_path):
    result = run_trainer(write_spec(tmp_path / "job", "stage1", {"preset": "huge"}))
    assert result.returncode == EXIT_FAILED
    [error] = [e for e in result.events if e["kind"] == "error"]
    assert "Invalid preset 'huge'; expected 'tiny', 'small', 'base' or 'large'." == error["message"]
