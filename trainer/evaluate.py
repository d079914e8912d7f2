"""Metrics and baselines: linear word probe for Stage 1, BLEU-1 and WER for Stage 2."""

from __future__ import annotations

import math
from collections import Counter

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
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows starting at word onsets and their word labels (for recordings with word annotations).

    Returns
    -------
    x : ndarray
        ``(n, C, T)`` windows.
    mask : ndarray
        ``(n, C)`` channel masks.
    labels : ndarray
        ``(n,)`` integer word ids (words seen at least twice).
    """
    items = [(rec, w) for rec in recordings for w in rec.words]
    counts = Counter(w.text for _, w in items)
    items = [(rec, w) for rec, w in items if counts[w.text] >= 2][:max_words]
    vocab = {t: i for i, t in enumerate(sorted({w.text for _, w in items}))}
    if not items:
        empty = np.zeros((0,), np.int64)
        return np.zeros((0, len(config.channels), config.window_samples), np.float32), np.zeros((0, len(config.channels)), bool), empty
    x = np.stack([cut(rec, int(round(w.onset_s * config.sfreq)), config.window_samples) for rec, w in items])
    mask = np.stack([rec.present for rec, _ in items])
    return x, mask, np.asarray([vocab[w.text] for _, w in items])


def ridge_probe_accuracy(features: np.ndarray, labels: np.ndarray, ridge: float = 1.0) -> float:
    """Held-out accuracy of a ridge-regression classifier (one-hot targets).

    Every fourth sample is held out, so the split is deterministic and spread over the recording.
    """
    test = np.arange(len(labels)) % 4 == 3
    x_train, x_test = features[~test], features[test]
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    x_train = np.hstack([x_train, np.ones((len(x_train), 1))])
    x_test = np.hstack([x_test, np.ones((len(x_test), 1))])
    targets = np.eye(labels.max() + 1)[labels[~test]]
    weights = np.linalg.solve(x_train.T @ x_train + ridge * np.eye(x_train.shape[1]), x_train.T @ targets)
    return float((np.argmax(x_test @ weights, axis=1) == labels[test]).mean())


def word_probe(encoder: MultiViewEncoder, recordings: list[Recording], device: torch.device | str = "cpu",
               max_words: int = PROBE_MAX_WORDS) -> dict[str, float] | None:
    """Linear-probe word identity from frozen embeddings of word-onset windows.

    The features are the embeddings of the patches covering the first half second after the
    onset, concatenated. Compare against the same probe on a randomly initialised encoder of the
    same architecture: a trained encoder that helps scores above it.

    Returns
    -------
    dict or None
        ``probe_words``, ``probe_acc`` (trained), ``probe_acc_random_init``, ``probe_chance``
        (share of the most frequent word); ``None`` if no word annotations exist.
    """
    config = encoder.config
    x, mask, labels = word_probe_data(recordings, config, max_words)
    if len(labels) < 20:
        return None
    k = min(config.n_patches, math.ceil(PROBE_RESPONSE_S * config.sfreq / config.patch_samples))

    def features(model: MultiViewEncoder) -> np.ndarray:
        return embed_windows(model, x, mask, device=device)[:, :k].reshape(len(x), -1)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)
        random_encoder = MultiViewEncoder(config).to(device)
    test = np.arange(len(labels)) % 4 == 3
    return {
        "probe_words": int(len(labels)),
        "probe_acc": ridge_probe_accuracy(features(encoder), labels),
        "probe_acc_random_init": ridge_probe_accuracy(features(random_encoder), labels),
        "probe_chance": float(np.bincount(labels[test]).max() / max(1, test.sum())),
    }


# -- text metrics ------------------------------------------------------------------------------------
def bleu1(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU-1: clipped unigram precision times the brevity penalty (whitespace tokens)."""
    matched = hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        h, r = hyp.split(), ref.split()
        matched += sum((Counter(h) & Counter(r)).values())
        hyp_len += len(h)
        ref_len += len(r)
    if hyp_len == 0:
        return 0.0
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * matched / hyp_len


def _edit_distance(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def wer(hypotheses: list[str], references: list[str]) -> float:
    """Corpus word error rate: word edit distance over reference words."""
    errors = sum(_edit_distance(h.split(), r.split()) for h, r in zip(hypotheses, references))
    return errors / max(1, sum(len(r.split()) for r in references))
