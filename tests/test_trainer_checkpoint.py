"""Atomic checkpoints: layout, rotation, torn directories, validation, exact state round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from trainer import checkpoint as ckpt
from trainer.config import Stage1Config
from trainer.exceptions import CheckpointError
from trainer.training import TrainState, load_training_checkpoint, make_optimizer, save_training_checkpoint


REPO = Path(__file__).resolve().parents[1]
PLAIN_ADAMW = {"optimizer": "adamw", "fused_optimizer": False}
OPTIMIZERS = {"plain-adamw": PLAIN_ADAMW, "fused-adafactor": {}, "fused-adamw": {"optimizer": "adamw"}}


def make(seed: int = 0, config: dict | None = None):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = make_optimizer(list(model.parameters()), Stage1Config(preset="tiny", **(PLAIN_ADAMW if config is None else config)))
    return model, optimizer


def train_steps(model, optimizer, n: int, generator: torch.Generator) -> None:
    for _ in range(n):
        x = torch.randn(5, 4, generator=generator)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_layout_rotation_and_state(tmp_path):
    model, optimizer = make()
    generator = torch.Generator().manual_seed(1)
    for step in (10, 20, 30):
        train_steps(model, optimizer, 1, generator)
        path = save_training_checkpoint(tmp_path, model, optimizer, TrainState(step=step, epoch=1, position=3),
                                        {"mask": generator}, {"stage_config": {"preset": "tiny"}})
    assert path == tmp_path / "checkpoints" / "step-000030" / "checkpoint.safetensors"
    # The default retention keeps the newest three (NEUROLENS_KEEP_CHECKPOINTS).
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000010", "step-000020", "step-000030"]
    assert sorted(os.listdir(path.parent)) == ["checkpoint.safetensors", "state.json"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    state = json.loads((path.parent / "state.json").read_text())
    assert state["step"] == 30 and state["position"] == 3
    with safe_open(str(path), framework="pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
    assert {"model.0.weight", "optim.0.exp_avg", "rng.torch", "rng.mask"} <= keys
    assert json.loads(meta["trainer_state"])["step"] == 30
    assert json.loads(meta["stage_config"]) == {"preset": "tiny"}


def test_torn_and_temporary_directories_are_ignored_and_removed(tmp_path):
    model, optimizer = make()
    good = save_training_checkpoint(tmp_path, model, optimizer, TrainState(step=5), {}, {})
    root = tmp_path / "checkpoints"
    torn = root / "step-000010"
    torn.mkdir()
    (torn / "checkpoint.safetensors").write_bytes(b"\x00" * 100)  # killed mid-write
    leftover = root / ".tmp-step-000015-12345"
    leftover.mkdir()
    (leftover / "checkpoint.safetensors").write_bytes(b"partial")
    assert ckpt.find_latest_checkpoint(tmp_path) == good
    assert not torn.exists() and not leftover.exists()


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_resume_restores_weights_optimizer_and_rng_exactly(tmp_path, kind):
    model, optimizer = make(config=OPTIMIZERS[kind])
    generator = torch.Generator().manual_seed(3)
    train_steps(model, optimizer, 3, generator)
    path = save_training_checkpoint(tmp_path, model, optimizer, TrainState(step=3, losses=[1.0, 0.5]),
                                    {"data": generator}, {})
    train_steps(model, optimizer, 4, generator)
    expected = [p.detach().clone() for p in model.parameters()]

    model2, optimizer2 = make(seed=99, config=OPTIMIZERS[kind])  # different init: all must come from the file
    generator2 = torch.Generator().manual_seed(0)
    state, _ = load_training_checkpoint(path, model2, optimizer2, {"data": generator2})
    assert state.step == 3 and state.losses == [1.0, 0.5]
    train_steps(model2, optimizer2, 4, generator2)
    for a, b in zip(expected, model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if kind.startswith("fused"):
        assert all(p.grad is None for p in model2.parameters())  # each freed right after its step


def test_mismatched_model_is_refused_with_names(tmp_path):
    model, optimizer = make()
    path = save_training_checkpoint(tmp_path, model, optimizer, TrainState(step=1), {}, {})
    other = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    with pytest.raises(CheckpointError, match=r"shape mismatches .*0\.weight"):
        load_training_checkpoint(path, other, make_optimizer(list(other.parameters()), Stage1Config()), {})
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2), torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match=r"missing keys \['3\.bias', '3\.weight'\]"):
        load_training_checkpoint(path, bigger, make_optimizer(list(bigger.parameters()), Stage1Config()), {})


def test_tied_tensors_are_stored_once(tmp_path):
    shared = torch.nn.Parameter(torch.randn(3, 3))
    tensors, aliases = ckpt.dedupe_tensors({"a": shared.data, "b": shared.data, "c": torch.randn(2)})
    assert set(tensors) == {"a", "c"} and aliases == {"b": "a"}


# Each step in a fresh interpreter: one process saves
# a checkpoint of a 256 MiB model, another builds the model and loads the checkpoint into it.
_CHECKPOINT_PEAK = """
import sys
from pathlib import Path
import psutil, torch
from trainer.config import Stage1Config
from trainer.training import TrainState, load_training_checkpoint, make_optimizer, save_training_checkpoint
job, mode = Path(sys.argv[1]), sys.argv[2]
torch.manual_seed(0 if mode == "save" else 1)
model = torch.nn.Linear(8192, 8192, bias=False)  # 256 MiB of float32
optimizer = make_optimizer(list(model.parameters()), Stage1Config(preset="tiny"))  # Adafactor: small state
if mode == "save":
    save_training_checkpoint(job, model, optimizer, TrainState(step=3), {}, {})
    torch.save(model.weight.detach()[:4].clone(), job / "expected.pt")
else:
    before = psutil.Process().memory_info().rss
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM): building the model set it
    state, _ = load_training_checkpoint(next(job.glob("checkpoints/*/checkpoint.safetensors")), model, optimizer, {})
    status = Path("/proc/self/status").read_text()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
    assert state.step == 3 and torch.equal(model.weight[:4], torch.load(job / "expected.pt"))
    print(peak - before, model.weight.numel() * 4)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets the peak through /proc")
def test_resuming_reads_the_weights_into_the_model_without_a_second_copy(tmp_path):
    # Through safe_open the file's mapped pages counted in the resident set until it closed: a
    # resumed large run peaked 1 GB (its weights' size) above a fresh one. Now the weights are
    # read straight into the parameters, and the peak grows by a small part of their size.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    runs = [subprocess.run([sys.executable, "-c", _CHECKPOINT_PEAK, str(tmp_path), mode], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300) for mode in ("save", "load")]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    grown, weights = map(int, runs[1].stdout.split())
    assert grown < 0.25 * weights, f"loading grew the peak by {grown / 2**20:.0f} MiB for {weights / 2**20:.0f} MiB of weights"


def test_a_truncated_checkpoint_is_refused_by_name(tmp_path):
    model, optimizer = make()
    path = save_training_checkpoint(tmp_path, model, optimizer, TrainState(step=1), {}, {})
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 20])
    with pytest.raises(CheckpointError, match=r"truncated inside tensor|Cannot read checkpoint"):
        load_training_checkpoint(path, model, optimizer, {})
    path.write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="too short to be a safetensors file"):
        load_training_checkpoint(path, model, optimizer, {})
