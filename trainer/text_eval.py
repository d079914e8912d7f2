"""Stage 2's evaluation: free-running decoding on held-out sentences, against two controls.

Teacher forcing hides a decoder that ignores its input (Jo et al. 2024, "Are EEG-to-Text Models
Working?"), so every score here comes from free-running ``generate()`` on test sentences whose
texts never occur in training. Each score is reported three times:

- ``eeg``: the test sentences' own EEG features;
- ``noise``: Gaussian features with the training features' mean and covariance (in
  distribution up to second moments, across channels, patches and dimensions; empty of
  content), see :func:`matched_noise`;
- ``shuffled``: real EEG features of *other* test sentences (in-distribution in every respect
  but the pairing).

A decoder that uses the EEG beats both controls; one that learned only the language scores the
same on all three. The paired bootstrap interval for (EEG - noise) BLEU-1 says whether the gap
is more than the luck of which sentences are in the test set. The teacher-forced validation
loss is reported too, labelled ``diagnostic``: it is not a decoding score.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from trainer.config import Stage2Config
from trainer.metrics import bleu1, paired_bootstrap, text_metrics
from trainer.models.bridge import EEGToText

FeatureSource = Callable[[np.ndarray], Iterable[np.ndarray]]
"""Given sentence indices, yields their features ``(b, P, F)`` batch by batch, in order."""

DECODE_BATCH = 32
REPORT_EXAMPLES = 10


@torch.no_grad()
def decode(model: EEGToText, tokenizer, batches: Iterable[np.ndarray], config: Stage2Config,
           device: torch.device) -> list[str]:
    """Free-running generation from feature batches (the encoder, if attached, is bypassed)."""
    encoder, model.encoder = model.encoder, None
    model.eval()
    out: list[str] = []
    try:
        for features in batches:
            ids = model.generate(torch.from_numpy(np.ascontiguousarray(features)).to(device),
                                 config.max_target_tokens, config.num_beams)
            out.extend(t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True))
    finally:
        model.encoder = encoder
        model.train()
    return out


@torch.no_grad()
def teacher_forced_loss(model: EEGToText, batches: Iterable[np.ndarray], labels: np.ndarray,
                        device: torch.device) -> float | None:
    """Mean teacher-forced cross-entropy (diagnostic only: the decoder sees the true prefix)."""
    if len(labels) == 0:
        return None
    encoder, model.encoder = model.encoder, None
    model.eval()
    total, seen = 0.0, 0
    try:
        for features in batches:
            y = torch.from_numpy(labels[seen:seen + len(features)]).to(device)
            total += model(torch.from_numpy(np.ascontiguousarray(features)).to(device), y).item() * len(y)
            seen += len(y)
    finally:
        model.encoder = encoder
        model.train()
    return total / len(labels)


def _chunks(array: np.ndarray, size: int) -> Iterable[np.ndarray]:
    for i in range(0, len(array), size):
        yield array[i:i + size]


def matched_noise(train_batches: Iterable[np.ndarray], mean: np.ndarray, n_train: int, count: int,
                  rng: np.random.Generator) -> np.ndarray:
    """``count`` Gaussian feature rows with the training rows' mean and empirical covariance.

    Row i is ``mean + sum_j w_ij (x_j - mean)`` over the training rows ``x_j``, with independent
    ``w_ij ~ N(0, 1/n_train)``: a Gaussian whose covariance is the training features' own, built
    a batch at a time without forming that covariance. Noise with only each feature's mean and
    standard deviation lacks the features' correlations (between channels, patches and
    dimensions); a decoder then meets it out of distribution and writes worse text from it than
    from any EEG, which made EEG look better than noise even where the EEG carries nothing
    (``synthetic:null``). A random mixture of hundreds of sentences' features carries none of them.
    """
    noise = np.zeros((count,) + mean.shape, dtype=np.float32)
    for batch in train_batches:
        weights = (rng.standard_normal((count, len(batch))) / np.sqrt(n_train)).astype(np.float32)
        noise += np.tensordot(weights, batch.astype(np.float32) - mean, axes=1)
    return noise + mean


def evaluate(model: EEGToText, tokenizer, features: FeatureSource, texts: list[str], index: dict[str, np.ndarray],
             labels: np.ndarray, noise_mean: np.ndarray, config: Stage2Config,
             device: torch.device) -> tuple[dict[str, float | int | None], list[dict[str, str]]]:
    """All Stage 2 metrics on the test split, and a few examples for the report.

    Returns
    -------
    metrics : dict
        ``test_<metric>_<input>`` for every metric of :func:`trainer.metrics.text_metrics` and
        input ``eeg``, ``noise``, ``shuffled``; ``test_bleu1_eeg_minus_noise`` with
        ``..._ci_low`` / ``..._ci_high`` (paired bootstrap, 95%); ``val_loss_teacher_forced_diagnostic``.
    examples : list of dict
        Reference and the three predictions of the first test sentences.
    """
    test = index["test"]
    references = [texts[i] for i in test]
    rng = np.random.default_rng(config.seed)
    shuffled_rows = test[np.roll(np.arange(len(test)), 1)] if len(test) > 1 else test  # never its own
    noise = matched_noise(features(index["train"]), noise_mean, len(index["train"]), len(test), rng)
    predictions = {
        "eeg": decode(model, tokenizer, features(test), config, device),
        "noise": decode(model, tokenizer, _chunks(noise, DECODE_BATCH), config, device),
        "shuffled": decode(model, tokenizer, features(shuffled_rows), config, device),
    }
    metrics: dict[str, float | int | None] = {}
    for source, hypotheses in predictions.items():
        metrics.update({f"test_{name}_{source}": value for name, value in text_metrics(hypotheses, references).items()})
    interval = paired_bootstrap(predictions["eeg"], predictions["noise"], references, bleu1,
                                samples=config.bootstrap_samples, seed=config.seed)
    metrics["test_bleu1_eeg_minus_noise"] = interval["diff"]
    metrics["test_bleu1_eeg_minus_noise_ci_low"] = interval["low"]
    metrics["test_bleu1_eeg_minus_noise_ci_high"] = interval["high"]
    metrics["val_loss_teacher_forced_diagnostic"] = teacher_forced_loss(
        model, features(index["val"]), labels[index["val"]], device)
    examples = [{"reference": r, "from_eeg": e, "from_noise": n, "from_shuffled_eeg": s}
                for r, e, n, s in list(zip(references, predictions["eeg"], predictions["noise"],
                                           predictions["shuffled"]))[:REPORT_EXAMPLES]]
    return metrics, examples
