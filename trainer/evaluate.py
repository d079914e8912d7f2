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


@torch.no_grad()
def embed_windows(encoder: MultiViewEncoder, x: np.ndarray, mask: np.ndarray, batch: int = 64,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """``encoder.embed`` over many windows in batches; returns ``(n, P, D)`` float32."""
    encoder.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch])).to(device)
        mb = torch.from_numpy(np.ascontiguousarray(mask[i:i + batch])).to(device)
        out.append(encoder.embed(xb, mb).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.config.n_patches, encoder.config.d_model), np.float32)


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


def _ridge_fit(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    return np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)


def ridge_probe_accuracy(features: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None) -> float:
    """Held-out accuracy of a ridge-regression classifier (one-hot targets).

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
        xs = [np.hstack([(features[r] - mean) / std, np.ones((r.sum(), 1))]) for r in (train_rows, eval_rows)]
        return xs[0], xs[1], np.eye(labels.max() + 1)[labels[train_rows]]

    fit_rows = ~test & ~inner
    x_fit, x_inner, y_fit = prepare(fit_rows, inner)
    scores = [(np.argmax(x_inner @ _ridge_fit(x_fit, y_fit, r), axis=1) == labels[inner]).mean() for r in PROBE_RIDGES]
    ridge = PROBE_RIDGES[int(np.argmax(scores))]
    x_train, x_test, y_train = prepare(~test, test)
    return float((np.argmax(x_test @ _ridge_fit(x_train, y_train, ridge), axis=1) == labels[test]).mean())


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
    """A word probe halfway: the inputs, and the trained encoder's features (see :func:`word_probe`)."""

    config: EncoderConfig
    x: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    n_patches: int
    trained: np.ndarray


def word_probe_start(encoder: MultiViewEncoder, recordings: list[Recording], device: torch.device | str = "cpu",
                     max_words: int = PROBE_MAX_WORDS) -> ProbeRun | None:
    """First half of :func:`word_probe`: the trained encoder's features. ``None`` without words.

    Splitting the probe lets Stage 1 release the trained encoder before
    :func:`word_probe_finish` builds the random-init one, so two encoders never coexist.
    """
    config = encoder.config
    x, mask, labels, groups = word_probe_data(recordings, config, max_words)
    if len(labels) < 20:
        return None
    k = min(config.n_patches, math.ceil(PROBE_RESPONSE_S * config.sfreq / config.patch_samples))
    trained = probe_features(encoder, x, mask, k, device=device)
    encoder.train()
    return ProbeRun(config, x, mask, labels, groups, k, trained)


def word_probe_finish(run: ProbeRun, device: torch.device | str = "cpu") -> dict[str, float]:
    """Second half of :func:`word_probe`: the random-init and raw-signal baselines, and the scores."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)
        random_encoder = MultiViewEncoder(run.config).to(device)
    random_features = probe_features(random_encoder, run.x, run.mask, run.n_patches, device=device)
    del random_encoder
    test = run.groups % 4 == 3
    raw = run.x[:, :, :run.n_patches * run.config.patch_samples].reshape(len(run.x), -1)
    return {
        "probe_words": int(len(run.labels)),
        "probe_acc": ridge_probe_accuracy(run.trained, run.labels, run.groups),
        "probe_acc_random_init": ridge_probe_accuracy(random_features, run.labels, run.groups),
        "probe_acc_raw": ridge_probe_accuracy(raw, run.labels, run.groups),
        "probe_chance": float(np.bincount(run.labels[test]).max() / max(1, test.sum())),
    }


def word_probe(encoder: MultiViewEncoder, recordings: list[Recording], device: torch.device | str = "cpu",
               max_words: int = PROBE_MAX_WORDS) -> dict[str, float] | None:
    """Linear-probe word identity from frozen token states of word-onset windows.

    The features are the per-channel states of the patches covering the first half second after
    the onset (:func:`probe_features`). The same probe runs on a randomly initialised encoder of
    the same architecture and on the raw signal of that half second, so the trained number can
    be read against both: an encoder whose training helps scores above its random init.

    Returns
    -------
    dict or None
        ``probe_words``, ``probe_acc`` (trained), ``probe_acc_random_init``, ``probe_acc_raw``
        (the raw signal), ``probe_chance`` (share of the most frequent word among the held-out
        ones); ``None`` if fewer than 20 usable word annotations exist.
    """
    run = word_probe_start(encoder, recordings, device, max_words)
    return None if run is None else word_probe_finish(run, device)
