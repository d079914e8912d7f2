"""The fused optimizer: same updates as a plain loop, gradients freed at once, accumulation."""

from __future__ import annotations

import pytest
import torch

from trainer.config import Stage1Config
from trainer.memory import FusedOptimizer, release_freed_memory_promptly
from trainer.training import make_optimizer


def model_and_batches(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    generator = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randn(4, 6, generator=generator) for _ in range(12)]
    return model, batches


def loss_of(model, x):
    return model(x).pow(2).mean()


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
def test_fused_accumulation_matches_a_plain_loop(optimizer):
    accumulation = 3
    plain_model, batches = model_and_batches()
    fused_model, _ = model_and_batches()
    plain = make_optimizer(list(plain_model.parameters()),
                           Stage1Config(optimizer=optimizer, fused_optimizer=False))
    fused = make_optimizer(list(fused_model.parameters()),
                           Stage1Config(optimizer=optimizer, accumulate_dtype="float32"))
    assert isinstance(fused, FusedOptimizer) and not isinstance(plain, FusedOptimizer)
    for step in range(len(batches) // accumulation):
        plain.zero_grad(), fused.zero_grad()
        for micro in range(accumulation):
            x = batches[step * accumulation + micro]
            (loss_of(plain_model, x) / accumulation).backward()
            fused.start_micro_batch(last=micro == accumulation - 1)
            (loss_of(fused_model, x) / accumulation).backward()
        plain.step()  # the same update, with no global clipping on either side
        fused.step()
    for a, b in zip(plain_model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in fused_model.parameters())


def test_bfloat16_accumulation_stays_close():
    exact, batches = model_and_batches()
    lean, _ = model_and_batches()
    opt_exact = make_optimizer(list(exact.parameters()), Stage1Config(accumulate_dtype="float32"))
    opt_lean = make_optimizer(list(lean.parameters()), Stage1Config(accumulate_dtype="bfloat16"))
    for model, opt in ((exact, opt_exact), (lean, opt_lean)):
        for step in range(3):
            opt.zero_grad()
            for micro in range(4):
                opt.start_micro_batch(last=micro == 3)
                (loss_of(model, batches[step * 4 + micro]) / 4).backward()
            opt.step()
    start, _ = model_and_batches()
    for a, b, s in zip(exact.parameters(), lean.parameters(), start.parameters()):
        moved = (a - s).abs().max()
        assert (a - b).abs().max() < 0.05 * moved  # bf16 rounding: a few percent of the update


def test_at_most_one_gradient_exists_at_a_time():
    model, batches = model_and_batches()
    params = list(model.parameters())
    alive: list[int] = []
    # Registered before the optimizer's hooks, so it runs first and sees the gradient that the
    # optimizer is about to consume, plus any that it failed to free.
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _p: alive.append(sum(q.grad is not None for q in params)))
    optimizer = make_optimizer(params, Stage1Config())
    before = [p.detach().clone() for p in params]
    loss_of(model, batches[0]).backward()
    optimizer.step()
    assert alive and max(alive) == 1
    assert all(not torch.equal(a, b) for a, b in zip(before, params))


def test_state_dict_round_trip_and_lr():
    model, batches = model_and_batches()
    optimizer = make_optimizer(list(model.parameters()), Stage1Config(optimizer="adamw"))
    loss_of(model, batches[0]).backward()
    for group in optimizer.param_groups:
        group["lr"] = 0.5
    state = optimizer.state_dict()
    assert len(state["param_groups"]) == 4 and all(g["lr"] == 0.5 for g in state["param_groups"])
    assert set(state["state"]) == {0, 1, 2, 3} and "exp_avg" in state["state"][0]
    other, _ = model_and_batches(seed=5)
    restored = make_optimizer(list(other.parameters()), Stage1Config(optimizer="adamw"))
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.optimizers[2].state_dict()["state"][0]["exp_avg"],
                               state["state"][2]["exp_avg"])
    with pytest.raises(ValueError, match="3 parameter groups"):
        restored.load_state_dict({"state": {}, "param_groups": state["param_groups"][:3]})


def test_heap_tuning_is_safe_to_call():
    assert release_freed_memory_promptly() in (True, False)
