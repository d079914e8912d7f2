"""Stage 1's evaluation: the linear word probe and its baselines (Stage 2's is :mod:`trainer.text_eval`)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from trainer.config import EncoderConfig
from trainer.data.recordings import Recording, cut
from trainer.models.multiview import MultiViewEncoder

PROBE_MAX_WORDS = 1500
PROBE_RESPONSE_S = 0.5  # the part of a window after a word onset that the probe looks at
# The probe runs two encoders (trained, random init) forward over each word's window. It may
# use this share of the training run's compute, and never less than PROBE_FREE_FLOP (a minute
# or so of a laptop core pair), which a tiny or small encoder's 1500 words fit in.
PROBE_COMPUTE_SHARE = 0.1
PROBE_FREE_FLOP = 2e12
PROBE_MIN_WORDS = 100


def probe_word_budget(config: EncoderConfig, steps: int, batch_size: int, requested: int) -> int:
    """How many word windows the end-of-run probe may use: ``requested`` or fewer, so that its
    forward passes cost at most :data:`PROBE_COMPUTE_SHARE` of the training run's.

    A forward pass costs about 2 x parameters x tokens per window, a training sample about 6 x
    that (forward, backward); the tokens cancel in the share, but not in the free floor. A large
    encoder's 1500 words cost as much as ~125 training steps of batch 8: more than half of a
    200-step run, spent at "100%".
    """
    tokens = 2 * len(config.channels) * config.n_patches  # two views
    forward_flop = 2.0 * config.approx_parameters() * tokens
    budget = max(PROBE_COMPUTE_SHARE * 3 * forward_flop * steps * batch_size, PROBE_FREE_FLOP)
    return min(requested, max(PROBE_MIN_WORDS, int(budget // (2 * forward_flop))))


def word_probe_data(recordings: list[Recording], config: EncoderConfig, max_words: int = PROBE_MAX_WORDS
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Windows starting at word onsets, their word labels and sentence groups.

    Returns
    -------
    x : ndarray
        ``(n, C, T)`` windows.
    mask : ndarray
        ``(n, C)`` channel masks.
    labels : ndarray
        ``(n,)`` integer word ids (words seen at least twice).
    groups : ndarray
        ``(n,)`` sentence number of each word (words outside any sentence get their own), so
        that a split can keep whole sentences, and the windows they overlap, on one side.
    """
    items = []
    for rec in recordings:
        sentences = sorted(rec.sentences, key=lambda s: s.onset_s)
        for w in rec.words:
            inside = [i for i, s in enumerate(sentences) if s.onset_s - 1e-3 <= w.onset_s <= s.onset_s + s.duration_s]
            items.append((rec, w, (id(rec), inside[0] if inside else f"word-{w.onset_s}")))
    counts = Counter(w.text for _, w, _ in items)
    items = [item for item in items if counts[item[1].text] >= 2][:max_words]
    vocab = {t: i for i, t in enumerate(sorted({w.text for _, w, _ in items}))}
    if not items:
        empty = np.zeros((0,), np.int64)
        return (np.zeros((0, len(config.channels), config.window_samples), np.float32),
                np.zeros((0, len(config.channels)), bool), empty, empty)
    x = np.stack([cut(rec, int(round(w.onset_s * config.sfreq)), config.window_samples) for rec, w, _ in items])
    mask = np.stack([rec.present for rec, _, _ in items])
    group_ids = {g: i for i, g in enumerate(dict.fromkeys(g for _, _, g in items))}
    return (x, mask, np.asarray([vocab[w.text] for _, w, _ in items]),
            np.asarray([group_ids[g] for _, _, g in items]))


PROBE_RIDGES = (1.0, 10.0, 100.0, 1000.0)


def _ridge_predict(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge regression's predictions for ``x_eval``, in whichever form has the smaller system.

    The primal form solves a (features x features) system; the dual form (the same weights,
    ``x.T (x x.T + ridge I)^-1 y``) an (samples x samples) one. Per-channel token states are
    wide (32 channels x 2 patches x 1024 dims = 65536 for the large preset) while a probe has at
    most ``probe_words`` samples, so the primal Gram matrix alone would take 34 GB there.
    """
    n, d = x_train.shape
    if d <= n:
        gram = (x_train.T @ x_train).astype(np.float64)
        weights = np.linalg.solve(gram + ridge * np.eye(d), x_train.T.astype(np.float64) @ y_train)
        return x_eval @ weights
    gram = (x_train @ x_train.T).astype(np.float64)
    alpha = np.linalg.solve(gram + ridge * np.eye(n), y_train)
    return (x_eval @ x_train.T).astype(np.float64) @ alpha


def ridge_probe_hits(features: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Per held-out sample, whether a ridge-regression classifier (one-hot targets) got it right.

    Every fourth sentence group is held out (every fourth sample without groups): windows of
    words in one sentence overlap in time, so splitting inside a sentence would let the probe
    see test signal in training. The ridge strength is chosen from :data:`PROBE_RIDGES` on a
    further held-out fifth of the training groups, never on the test set.
    """
    groups = np.arange(len(labels)) if groups is None else groups
    test = groups % 4 == 3
    inner = (groups % 5 == 1) & ~test

    def prepare(train_rows: np.ndarray, eval_rows: np.ndarray) -> tuple[np.ndarray, ...]:
        mean, std = features[train_rows].mean(0), features[train_rows].std(0) + 1e-6
        # Kept in the features' float32: for the wide features of the large preset a float64
        # copy of every split would cost a gigabyte; the small systems are solved in float64.
        xs = [np.hstack([(features[r] - mean) / std, np.ones((r.sum(), 1), features.dtype)])
              for r in (train_rows, eval_rows)]
        return xs[0], xs[1], np.eye(labels.max() + 1)[labels[train_rows]]

    fit_rows = ~test & ~inner
    x_fit, x_inner, y_fit = prepare(fit_rows, inner)
    scores = [(np.argmax(_ridge_predict(x_fit, y_fit, x_inner, r), axis=1) == labels[inner]).mean()
              for r in PROBE_RIDGES]
    del x_fit, x_inner
    ridge = PROBE_RIDGES[int(np.argmax(scores))]
    x_train, x_test, y_train = prepare(~test, test)
    return np.argmax(_ridge_predict(x_train, y_train, x_test, ridge), axis=1) == labels[test]


def centroid_probe_hits(features: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Per held-out sample, whether its nearest word centre (by cosine) is its own word.

    The same split as :func:`ridge_probe_hits`. Features are centred on the training mean and
    scaled to unit length; a word's centre is the mean of its training samples; a held-out
    sample takes the word whose centre has the largest dot product with it. Nothing is fitted,
    so this reads the encoder's geometry (do windows of one word lie together?), where the ridge
    fit can undo any invertible linear map of the input, and so scores a random-init encoder,
    a near-invertible projection of the signal, much like the signal itself.
    """
    groups = np.arange(len(labels)) if groups is None else groups
    test = groups % 4 == 3
    unit = features - features[~test].mean(0)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True) + 1e-12
    n_words = labels.max() + 1
    sums = np.zeros((n_words, unit.shape[1]), np.float64)
    np.add.at(sums, labels[~test], unit[~test])
    centres = sums / np.maximum(np.bincount(labels[~test], minlength=n_words), 1)[:, None]
    return np.argmax(unit[test] @ centres.T, axis=1) == labels[test]


PROBE_BOOTSTRAP = 2000


def paired_bootstrap_interval(hits_a: np.ndarray, hits_b: np.ndarray, groups: np.ndarray, seed: int = 0,
                              replicates: int = PROBE_BOOTSTRAP) -> tuple[float, float]:
    """95% interval of accuracy(a) - accuracy(b) over the same held-out samples.

    Whole sentence groups are resampled (words of one sentence share overlapping signal, so
    they are not independent), ``replicates`` times with a fixed seed.
    """
    ids, index = np.unique(groups, return_inverse=True)
    diff_sum = np.bincount(index, weights=hits_a.astype(float) - hits_b.astype(float), minlength=len(ids))
    count = np.bincount(index, minlength=len(ids)).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(len(ids), size=(replicates, len(ids)))
    diffs = diff_sum[draws].sum(1) / count[draws].sum(1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)


@torch.no_grad()
def probe_features(encoder: MultiViewEncoder, x: np.ndarray, mask: np.ndarray, n_patches: int, batch: int = 64,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """Per-channel token states of the first ``n_patches`` patches, averaged over the two views.

    Pooling over channels (what :meth:`MultiViewEncoder.embed` does for Stage 2) throws away the
    scalp pattern that tells words apart; the probe keeps one vector per (channel, patch).
    """
    encoder.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch])).to(device)
        mb = torch.from_numpy(np.ascontiguousarray(mask[i:i + batch])).to(device)
        states = encoder.states(xb, mb)[:, :, :, :n_patches]           # (B, V, C, k, D)
        out.append(states.mean(dim=1).flatten(1).float().cpu().numpy())
    return np.concatenate(out)


@dataclass
class ProbeRun:
    """A word probe halfway: the inputs, and the trained encoder's features (see :func:`word_probe_start`)."""

    config: EncoderConfig
    x: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    n_patches: int
    trained: np.ndarray
    batch: int = 64


def word_probe_start(encoder: MultiViewEncoder, recordings: list[Recording], device: torch.device | str = "cpu",
                     max_words: int = PROBE_MAX_WORDS, batch: int = 64) -> ProbeRun | None:
    """Linear-probe word identity from frozen token states of word-onset windows, first half:
    the trained encoder's features. ``None`` if fewer than 20 usable word annotations exist.

    The features are the per-channel states of the patches covering the first half second after
    the onset (:func:`probe_features`). :func:`word_probe_finish` runs the same probe on a
    randomly initialised encoder of the same architecture and on the raw signal of that half
    second, so the trained number can be read against both: an encoder whose training helps
    scores above its random init. Splitting the probe lets Stage 1 release the trained encoder
    before :func:`word_probe_finish` builds the random-init one, so two encoders never coexist.
    ``batch`` windows go through an encoder at a time: Stage 1 passes its micro-batch size,
    which it already holds activations for (64 windows of the base preset's 512 tokens would
    need gigabytes of attention scores).
    """
    config = encoder.config
    x, mask, labels, groups = word_probe_data(recordings, config, max_words)
    if len(labels) < 20:
        return None
    k = min(config.n_patches, math.ceil(PROBE_RESPONSE_S * config.sfreq / config.patch_samples))
    trained = probe_features(encoder, x, mask, k, batch=batch, device=device)
    encoder.train()
    return ProbeRun(config, x, mask, labels, groups, k, trained, batch)


def word_probe_finish(run: ProbeRun, device: torch.device | str = "cpu") -> dict[str, float]:
    """Second half of the probe (:func:`word_probe_start`): the random-init and raw-signal
    baselines, and the scores.

    Returns
    -------
    dict
        ``probe_words`` (``probe_test_words`` of them held out); for the ridge probe
        (``probe_``) and the nearest-centre probe (``probe_centroid_``, :func:`centroid_probe_hits`):
        ``..._acc`` (trained), ``..._acc_random_init``, ``..._acc_raw`` (the raw signal),
        ``..._gain_ci95_low`` / ``..._gain_ci95_high`` (95% paired bootstrap interval of trained
        minus random-init accuracy, resampling held-out sentences); ``probe_chance`` (share of
        the most frequent word among the held-out ones).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)
        random_encoder = MultiViewEncoder(run.config).to(device)
    random_features = probe_features(random_encoder, run.x, run.mask, run.n_patches, batch=run.batch, device=device)
    del random_encoder
    test = run.groups % 4 == 3
    raw = run.x[:, :, :run.n_patches * run.config.patch_samples].reshape(len(run.x), -1)
    metrics: dict[str, float] = {"probe_words": int(len(run.labels)), "probe_test_words": int(test.sum())}
    for name, probe in (("probe", ridge_probe_hits), ("probe_centroid", centroid_probe_hits)):
        trained_hits = probe(run.trained, run.labels, run.groups)
        random_hits = probe(random_features, run.labels, run.groups)
        low, high = paired_bootstrap_interval(trained_hits, random_hits, run.groups[test])
        metrics.update({f"{name}_acc": float(trained_hits.mean()),
                        f"{name}_acc_random_init": float(random_hits.mean()),
                        f"{name}_gain_ci95_low": low, f"{name}_gain_ci95_high": high,
                        f"{name}_acc_raw": float(probe(raw, run.labels, run.groups).mean())})
    metrics["probe_chance"] = float(np.bincount(run.labels[test]).max() / max(1, test.sum()))
    return metrics

