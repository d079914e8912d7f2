"""MultiView encoder: shapes, channel masking, SSL loss, and real parameter counts per preset."""

from __future__ import annotations

import pytest
import torch

from trainer.config import EncoderConfig
from trainer.models.multiview import (MultiViewEncoder, SSLHead, count_parameters, decorrelation_penalty,
                                      random_token_mask)

TINY = EncoderConfig.from_name("tiny")


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return MultiViewEncoder(TINY).eval()


def test_forward_and_embed_shapes(encoder):
    x = torch.randn(3, len(TINY.channels), TINY.window_samples)
    c, p, d = len(TINY.channels), TINY.n_patches, TINY.d_model
    assert encoder(x).shape == (3, 2 * c * p, d)
    assert encoder.embed(x).shape == (3, p, d)


def test_missing_channels_do_not_influence_the_output(encoder):
    x = torch.randn(2, 8, TINY.window_samples)
    present = torch.ones(2, 8, dtype=torch.bool)
    present[:, [0, 5]] = False
    changed = x.clone()
    changed[:, [0, 5]] = 1000.0  # garbage where channels are absent
    with torch.no_grad():
        a, b = encoder.embed(x, present), encoder.embed(changed, present)
        unmasked = encoder.embed(changed)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, unmasked)


def test_ssl_loss_backpropagates_and_masks_tokens(encoder):
    head = SSLHead(TINY)
    x = torch.randn(4, 8, TINY.window_samples)
    present = torch.ones(4, 8, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    token_mask = random_token_mask(4, TINY, 0.5, generator)
    assert token_mask.shape == (4, 8, TINY.n_patches)
    assert token_mask.sum(dim=(1, 2)).tolist() == [32] * 4
    encoder.train()
    loss, parts = head(encoder, x, present, token_mask, agreement_weight=0.1)
    loss.backward()
    assert set(parts) == {"signal", "spectrum", "agreement", "decorrelation"}
    assert encoder.temporal.weight.grad is not None and encoder.mask_token.grad is not None


def test_decorrelation_penalty_is_zero_for_white_states_only():
    generator = torch.Generator().manual_seed(0)
    white = torch.randn(20000, 16, generator=generator)
    assert decorrelation_penalty(white).item() < 0.01
    mixed = white @ (torch.eye(16) + torch.ones(16, 16))  # every dimension shares one component
    assert decorrelation_penalty(mixed).item() > 10.0
    collapsed = torch.zeros(100, 16)  # no spread at all: the variance term is at its largest
    assert decorrelation_penalty(collapsed).item() == pytest.approx(0.99, abs=0.01)
    # Its gradient whitens: a few steps on a linear map of correlated states lower it tenfold.
    states = torch.randn(2000, 16, generator=generator) @ torch.randn(16, 16, generator=generator) / 4
    mix = torch.eye(16, requires_grad=True)
    optimizer = torch.optim.Adam([mix], lr=0.01)
    start = decorrelation_penalty(states @ mix).item()
    for _ in range(200):
        optimizer.zero_grad()
        decorrelation_penalty(states @ mix).backward()
        optimizer.step()
    assert decorrelation_penalty(states @ mix).item() < start / 10


@pytest.mark.parametrize("name", list(EncoderConfig.PRESETS))
def test_parameter_estimate_matches_real_count(name):
    config = EncoderConfig.from_name(name)
    with torch.device("meta"):  # no memory is allocated, even for the 265M-parameter preset
        real = count_parameters(MultiViewEncoder(config))
        head = count_parameters(SSLHead(config))
    assert abs(config.approx_parameters() - real) / real < 0.10
    if name == "large":
        assert 250e6 <= real <= 290e6
        assert 0.5e6 < head < 2e6
