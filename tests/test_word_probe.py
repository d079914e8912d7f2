"""The Stage 1 word probe: its ridge classifier, its bootstrap interval, and the recorded result."""

from __future__ import annotations

from pathlib import Path

import mne
import numpy as np
import pytest

from tests.trainer_helpers import run_trainer, write_spec
from trainer.config import CHANNELS_8
from trainer.data.synthetic import WRITERS, _pink_noise, generate_raw
from trainer.evaluate import _ridge_predict, centroid_probe_hits, paired_bootstrap_interval, ridge_probe_hits


def test_dual_ridge_equals_primal_ridge():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((40, 3))
    for n_features in (25, 300):  # primal form below 40 features, dual above
        x, x_eval = rng.standard_normal((40, n_features)), rng.standard_normal((7, n_features))
        primal = x_eval @ np.linalg.solve(x.T @ x + 10.0 * np.eye(n_features), x.T @ y)
        np.testing.assert_allclose(_ridge_predict(x, y, x_eval, 10.0), primal, rtol=1e-8, atol=1e-10)


def test_probe_reads_a_class_signal_and_not_noise():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), 30)
    groups = np.arange(len(labels))
    centres = rng.standard_normal((10, 50))
    informative = centres[labels] + 0.5 * rng.standard_normal((len(labels), 50))
    noise = rng.standard_normal((len(labels), 50))
    assert ridge_probe_hits(informative, labels, groups).mean() > 0.9
    assert ridge_probe_hits(noise, labels, groups).mean() < 0.3
    assert centroid_probe_hits(informative, labels, groups).mean() > 0.9
    assert centroid_probe_hits(noise, labels, groups).mean() < 0.3


def test_centroid_probe_reads_geometry_that_a_ridge_fit_undoes():
    # Word signal in a few directions, buried under large noise in the others. The ridge probe
    # standardises each feature, so scaling the word directions up changes nothing for it;
    # nearest centres see the difference: that is the representation's geometry.
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(8), 40)
    groups = np.arange(len(labels))
    signal = np.zeros((len(labels), 60))
    signal[:, :4] = rng.standard_normal((8, 4))[labels] + 0.3 * rng.standard_normal((len(labels), 4))
    buried = signal + np.hstack([np.zeros((len(labels), 4)), 5.0 * rng.standard_normal((len(labels), 56))])
    lifted = buried * np.r_[np.full(4, 10.0), np.ones(56)]
    np.testing.assert_array_equal(ridge_probe_hits(buried, labels, groups), ridge_probe_hits(lifted, labels, groups))
    assert centroid_probe_hits(lifted, labels, groups).mean() - centroid_probe_hits(buried, labels, groups).mean() > 0.25


def test_paired_bootstrap_interval_brackets_the_difference():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(100), 4)
    better = rng.random(400) < 0.8
    worse = rng.random(400) < 0.5
    low, high = paired_bootstrap_interval(better, worse, groups)
    assert low < better.mean() - worse.mean() < high
    assert low > 0.15 and high < 0.45
    same_low, same_high = paired_bootstrap_interval(worse, worse, groups)
    assert same_low == same_high == 0.0


# -- the recorded result of a real Stage 1 run ------------------------------------------------------
PROBE_STEPS = 300
CLEAR_MARGIN = 0.05  # accuracy points of nearest-centre word identity over the random-init encoder
# The default synthetic responses (30-60 uV per component over 10 uV of background) saturate
# every per-channel readout (~0.97 for trained, random-init and raw alike), so no encoder can be
# told apart on them. The probe is tested where it can discriminate: the same generator with
# 36 uV more background (its own pink noise, another seed), the response-to-background ratio
# of the generator's earlier 8-16 uV version.
EXTRA_BACKGROUND = 3.6


def weak_response_dataset(folder: Path) -> Path:
    raw = generate_raw(CHANNELS_8, seed=0, n_sentences=120)
    data = raw.get_data() + EXTRA_BACKGROUND * 1e-6 * _pink_noise(
        np.random.default_rng(99), len(CHANNELS_8), raw.n_times, raw.info["sfreq"])
    noisier = mne.io.RawArray(data, raw.info, verbose="error").set_annotations(raw.annotations)
    folder.mkdir(parents=True)
    WRITERS["fif"](noisier, folder)
    return folder


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "Issue 3 is open on this point: on 2026-11-26 the trained encoder's gain over random init was "
    "+0.055 and +0.043 (95% intervals -0.012..+0.120 and -0.018..+0.107), not clear of zero. "
    "strict: the day the objective earns the margin, this test fails as XPASS and the marker goes."))
@pytest.mark.parametrize("seed", [0, 1])
def test_stage1_tiny_encoder_groups_words_better_than_random_init(tmp_path, seed):
    # A real trainer run; the probe runs at its end and is recorded in the finished event's
    # metrics. The random-init encoder has the same architecture and a fixed seed; the
    # interval resamples held-out sentences.
    dataset = weak_response_dataset(tmp_path / "weak")
    spec = write_spec(tmp_path / "job", "stage1", {"preset": "tiny", "steps": PROBE_STEPS, "seed": seed,
                                                   "checkpoint_every": PROBE_STEPS},
                      dataset=str(dataset), cache_dir=tmp_path / "cache")
    result = run_trainer(spec, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    [finished] = [e for e in result.events if e["kind"] == "finished"]
    m = finished["metrics"]
    print(f"\nseed {seed}: nearest-centre {m['probe_centroid_acc']:.3f} trained vs "
          f"{m['probe_centroid_acc_random_init']:.3f} random init (gain interval "
          f"{m['probe_centroid_gain_ci95_low']:+.3f} .. {m['probe_centroid_gain_ci95_high']:+.3f}), raw "
          f"{m['probe_centroid_acc_raw']:.3f}; ridge {m['probe_acc']:.3f} vs {m['probe_acc_random_init']:.3f}; "
          f"chance {m['probe_chance']:.3f}; {m['probe_test_words']} held-out words")
    assert m["probe_centroid_acc"] - m["probe_centroid_acc_random_init"] >= CLEAR_MARGIN
    assert m["probe_centroid_gain_ci95_low"] > 0
