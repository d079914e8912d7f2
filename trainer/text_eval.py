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

Beside the generated text, three more readings of the same test split:

- retrieval (:func:`retrieval_scores`): for each test sentence's features, every distinct test
  text ranked by the decoder's mean token log-likelihood (mean, so that short texts do not
  win by length); top-1 / top-5 accuracy from EEG, noise and shuffled EEG, and a permutation
  p-value of EEG against re-paired EEG (:func:`trainer.metrics.retrieval_permutation_p`);
- content-word BLEU-1 / ROUGE-1 (:func:`trainer.metrics.content_metrics`);
- the length-only control (:mod:`trainer.controls`).
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import numpy as np
import torch

from transformers.models.bart.modeling_bart import shift_tokens_right

from trainer.config import Stage2Config
from trainer.controls import length_only_predictions
from trainer.metrics import (bleu1, content_metrics, paired_bootstrap, retrieval_hits, retrieval_permutation_p,
                             rouge1, text_metrics)
from trainer.models.bridge import EEGToText

FeatureSource = Callable[[np.ndarray], Iterable[np.ndarray]]
"""Given sentence indices, yields their features ``(b, P, F)`` batch by batch, in order."""

DECODE_BATCH = 32
REPORT_EXAMPLES = 10
RETRIEVAL_MAX = 200
"""Most test sentences a retrieval score matrix covers: its cost grows with the square."""
RETRIEVAL_MIN = 20
"""Fewest test sentences a compute budget may cap retrieval to (chance is then 5%)."""
RETRIEVAL_BUDGET = {"cpu": 5e11, "accelerator": 1e14}
"""Multiply-adds one retrieval matrix may cost (decoder parameters x tokens x pairs). The tiny
preset stays far below it at 200 sentences; ``small`` on a CPU is capped at about 23 (its
decoder ran 6 GMAC/s on a loaded 2-core machine: some 80 s), on a GPU not at all."""
RETRIEVAL_NOISE_ROWS = 40
"""Most matched-noise rows scored against the candidates (the noise control's top-k is over
these): half the EEG rows, at least :data:`RETRIEVAL_MIN`."""
RETRIEVAL_PERMUTATIONS = 1000
RETRIEVAL_LOGITS = 2**22
"""Logit elements (pairs x tokens x vocabulary) per decoder pass: 16 MB in float32 (larger passes
were no faster on the tiny preset's CPU runs, and cost memory on big vocabularies)."""


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


@torch.no_grad()
def retrieval_scores(model: EEGToText, batches: Iterable[np.ndarray], candidates: np.ndarray,
                     device: torch.device) -> np.ndarray:
    """Mean token log-likelihood of every candidate text given each feature row, teacher-forced.

    Parameters
    ----------
    model : EEGToText
        The trained model (the encoder, if attached, is bypassed: the batches are features).
    batches : iterable of ndarray
        Feature batches ``(b, P, F)``; ``n`` rows in all.
    candidates : ndarray
        ``(m, T)`` token ids of the candidate texts, ``-100`` past each text's end.

    Returns
    -------
    ndarray
        ``(n, m)`` float64 scores. BART's encoder runs once per feature row; the decoder runs
        on (row, candidate) pairs, as many per pass as :data:`RETRIEVAL_LOGITS` allows.
    """
    encoder, model.encoder = model.encoder, None
    model.eval()
    labels = torch.from_numpy(candidates).to(device)
    labels = labels[:, :max(1, int((labels != -100).sum(1).max()))]  # no column past the longest text
    valid = labels != -100
    config = model.bart.config
    inputs = shift_tokens_right(labels.masked_fill(~valid, config.pad_token_id), config.pad_token_id,
                                config.decoder_start_token_id)
    m, length = labels.shape
    per_pass = max(1, RETRIEVAL_LOGITS // (length * config.vocab_size))
    rows_out = []
    try:
        for features in batches:
            embeds = model.bridge(torch.from_numpy(np.ascontiguousarray(features)).to(device))
            hidden = model.bart.model.encoder(inputs_embeds=embeds).last_hidden_state    # (b, P, d)
            scores = torch.empty(len(features) * m, dtype=torch.float64)
            pair_row = torch.arange(len(features), device=device).repeat_interleave(m)
            pair_text = torch.arange(m, device=device).repeat(len(features))
            for start in range(0, len(pair_row), per_pass):
                r, t = pair_row[start:start + per_pass], pair_text[start:start + per_pass]
                states = model.bart.model.decoder(input_ids=inputs[t], encoder_hidden_states=hidden[r]
                                                  ).last_hidden_state                    # (pairs, T, d)
                # The vocabulary projection only where a text has a token: most of the cost,
                # and padding is a third or more of the columns.
                mask = valid[t]
                logits = (model.bart.lm_head(states[mask]) + model.bart.final_logits_bias).float()
                token_lp = logits.gather(-1, labels[t][mask].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
                pair = torch.arange(len(r), device=device).unsqueeze(1).expand_as(mask)[mask]
                total = torch.zeros(len(r), device=device).index_add_(0, pair, token_lp)
                scores[start:start + len(r)] = (total / mask.sum(1).clamp_min(1)).double().cpu()
            rows_out.append(scores.view(len(features), m).numpy())
    finally:
        model.encoder = encoder
        model.train()
    return np.concatenate(rows_out) if rows_out else np.zeros((0, m))


RETRIEVAL_KEYS = tuple(f"test_retrieval_top{k}_{source}" for k in (1, 5)
                       for source in ("eeg", "noise", "shuffled", "chance")) + ("test_retrieval_p_eeg_vs_shuffled",)


def retrieval_metrics(scores: dict[str, tuple[np.ndarray, np.ndarray]], seed: int) -> dict[str, float]:
    """``test_retrieval_top{1,5}_<source>``, chance, and the EEG-vs-shuffled permutation p-value.

    ``scores`` maps ``eeg``, ``noise``, ``shuffled`` to an ``(n, m)`` matrix and its ``(n,)``
    targets (row i belongs to candidate ``targets[i]``; all share the ``m`` candidates). The
    shuffled matrix is the EEG one with its rows moved one place, and the p-value is the
    permutation test of EEG against every re-pairing of the same rows.
    """
    m = scores["eeg"][0].shape[1]
    out: dict[str, float] = {}
    for k in (1, 5):
        for source, (matrix, targets) in scores.items():
            out[f"test_retrieval_top{k}_{source}"] = float(retrieval_hits(matrix, targets, k).mean())
        out[f"test_retrieval_top{k}_chance"] = min(k, m) / m
    out["test_retrieval_p_eeg_vs_shuffled"] = retrieval_permutation_p(*scores["eeg"], 1, RETRIEVAL_PERMUTATIONS, seed)
    return out


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


def retrieval_on_test(model: EEGToText, features: FeatureSource, test: np.ndarray, references: list[str],
                   labels: np.ndarray, noise: np.ndarray, seed: int, device: torch.device
                   ) -> tuple[dict[str, float | None], dict, np.ndarray, np.ndarray]:
    """Retrieval on the test split: score matrices from EEG and noise, then :func:`retrieval_metrics`.

    Rows are test sentences (a seeded subset past :func:`retrieval_limit`), candidates the
    distinct texts among them: a text read twice is one candidate, right for both readings.

    Returns
    -------
    metrics : dict
        The :data:`RETRIEVAL_KEYS` (all ``None`` with fewer than two distinct texts).
    details : dict
        The report's ``retrieval`` section: rows, candidates, score, permutations, a note when
        capped, the seconds it took.
    positions : ndarray
        The rows' positions in ``test``.
    top1_hits : ndarray
        Per row, whether EEG ranked its own text first.
    """
    started = time.perf_counter()
    tokens = int((labels[test] != -100).sum(1).max()) if len(test) else 1
    limit = retrieval_limit(sum(p.numel() for p in model.bart.model.decoder.parameters()), tokens, device.type)
    positions = _retrieval_rows(len(test), limit, seed)
    first_row: dict[str, int] = {}
    for i in positions:
        first_row.setdefault(references[i], int(test[i]))
    candidate_texts = list(first_row)
    number = {t: j for j, t in enumerate(candidate_texts)}
    targets = np.asarray([number[references[i]] for i in positions], dtype=np.int64)
    details: dict = {
        "sentences": int(len(positions)), "candidate_texts": len(candidate_texts),
        "score": "mean token log-likelihood, teacher-forced", "permutations": RETRIEVAL_PERMUTATIONS,
        "note": (f"capped: {len(positions)} of {len(test)} test sentences, chosen at random (seed {seed}), so that "
                 f"the matrix costs at most {RETRIEVAL_BUDGET['cpu' if device.type == 'cpu' else 'accelerator']:.0e} "
                 f"multiply-adds on {device.type}" if len(positions) < len(test) else None)}
    if len(candidate_texts) < 2:  # one text cannot be told from itself: nothing to rank
        details.update(note="fewer than 2 distinct test texts: no retrieval", seconds=0.0)
        return {key: None for key in RETRIEVAL_KEYS}, details, positions, np.zeros(len(positions), dtype=bool)
    candidates = labels[[first_row[t] for t in candidate_texts]]
    eeg_scores = retrieval_scores(model, features(test[positions]), candidates, device)
    # Noise sits at chance whatever the model (its rows carry no sentence), so fewer rows
    # measure it: half the cost of a second full matrix saved.
    noisy = np.arange(min(len(positions), RETRIEVAL_NOISE_ROWS, max(RETRIEVAL_MIN, len(positions) // 2)))
    noise_scores = retrieval_scores(model, _chunks(noise[positions[noisy]], DECODE_BATCH), candidates, device)
    scores = {"eeg": (eeg_scores, targets), "noise": (noise_scores, targets[noisy]),
              # Each row's features are the next-listed sentence's: the same matrix, re-paired.
              "shuffled": (eeg_scores[np.roll(np.arange(len(positions)), 1)], targets)}
    metrics = retrieval_metrics(scores, seed)
    details.update(noise_sentences=int(len(noisy)), seconds=round(time.perf_counter() - started, 2))
    return metrics, details, positions, retrieval_hits(eeg_scores, targets, 1)


def retrieval_limit(decoder_parameters: int, tokens: int, device_type: str) -> int:
    """How many test sentences a retrieval matrix may cover on ``device_type``.

    The matrix scores ``n x n`` (sentence, text) pairs, each a decoder pass over ``tokens``
    tokens costing about ``decoder_parameters`` multiply-adds per token, so ``n`` is the largest
    number whose matrix fits :data:`RETRIEVAL_BUDGET`, within [:data:`RETRIEVAL_MIN`,
    :data:`RETRIEVAL_MAX`].
    """
    budget = RETRIEVAL_BUDGET["cpu" if device_type == "cpu" else "accelerator"]
    n = int(np.sqrt(budget / max(1, decoder_parameters * tokens)))
    return int(min(RETRIEVAL_MAX, max(RETRIEVAL_MIN, n)))


def _retrieval_rows(n_test: int, limit: int, seed: int) -> np.ndarray:
    """Positions (into the test split) that the retrieval matrices cover: all, or a seeded subset."""
    if n_test <= limit:
        return np.arange(n_test)
    return np.sort(np.random.default_rng(seed).choice(n_test, limit, replace=False))


def per_subject(subjects: list[str | None], predictions: dict[str, list[str]], references: list[str],
                retrieval_rows: np.ndarray, retrieval_top1_hits: np.ndarray) -> dict[str, dict]:
    """BLEU-1 from EEG and noise and retrieval top-1 for each subject's test sentences.

    ``subjects`` are the test sentences' subjects, pairwise with ``references``; retrieval
    covers the positions ``retrieval_rows`` (``retrieval_top1_hits`` pairwise with them), so a
    subject none of whose sentences were in the retrieval subset has ``retrieval_top1`` null.
    """
    out: dict[str, dict] = {}
    subject_of_row = np.asarray([s if s is not None else "" for s in subjects], dtype=object)
    for subject in sorted({s for s in subjects if s is not None}):
        rows = np.flatnonzero(subject_of_row == subject)
        refs = [references[i] for i in rows]
        covered = subject_of_row[retrieval_rows] == subject
        out[subject] = {
            "sentences": int(len(rows)),
            "bleu1_eeg": bleu1([predictions["eeg"][i] for i in rows], refs),
            "bleu1_noise": bleu1([predictions["noise"][i] for i in rows], refs),
            "retrieval_top1_eeg": float(retrieval_top1_hits[covered].mean()) if covered.any() else None,
            "retrieval_sentences": int(covered.sum()),
        }
    return out


def evaluate(model: EEGToText, tokenizer, features: FeatureSource, texts: list[str], index: dict[str, np.ndarray],
             labels: np.ndarray, noise_mean: np.ndarray, config: Stage2Config, device: torch.device,
             lengths: np.ndarray | None = None, length_unit: str = "fixated words",
             subjects: list[str | None] | None = None
             ) -> tuple[dict[str, float | int | None], list[dict[str, str]], dict]:
    """All Stage 2 metrics on the test split, a few examples, and the report's other sections.

    Parameters
    ----------
    lengths, length_unit
        Every sentence's length and its unit (:func:`trainer.controls.sentence_lengths`), for
        the length-only control; ``None`` leaves the control out.
    subjects
        Every sentence's subject; when any is known the details hold ``per_subject``.

    Returns
    -------
    metrics : dict
        ``test_<metric>_<input>`` for every metric of :func:`trainer.metrics.text_metrics` and
        :func:`trainer.metrics.content_metrics` and input ``eeg``, ``noise``, ``shuffled``;
        ``test_bleu1_eeg_minus_noise`` with ``..._ci_low`` / ``..._ci_high`` (paired bootstrap,
        95%); retrieval (:func:`retrieval_metrics`); ``test_bleu1_length_only``,
        ``test_rouge1_length_only``, ``test_bleu1_eeg_minus_length_only``;
        ``val_loss_teacher_forced_diagnostic``.
    examples : list of dict
        Reference and the three predictions of the first test sentences.
    details : dict
        ``retrieval`` (how many sentences and candidate texts, and a note when capped),
        ``length_only`` (its unit and a few of its texts), ``per_subject`` (or ``None``).
    """
    started = time.perf_counter()
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
        metrics.update({f"test_{name}_{source}": value
                        for name, value in content_metrics(hypotheses, references).items()})
    interval = paired_bootstrap(predictions["eeg"], predictions["noise"], references, bleu1,
                                samples=config.bootstrap_samples, seed=config.seed)
    metrics["test_bleu1_eeg_minus_noise"] = interval["diff"]
    metrics["test_bleu1_eeg_minus_noise_ci_low"] = interval["low"]
    metrics["test_bleu1_eeg_minus_noise_ci_high"] = interval["high"]

    retrieval, retrieval_details, positions, top1_hits = retrieval_on_test(
        model, features, test, references, labels, noise, config.seed, device)
    metrics.update(retrieval)

    extra: dict = {}
    if lengths is not None:
        guesses = length_only_predictions([texts[i] for i in index["train"]], lengths[index["train"]],
                                          lengths[test], length_unit)
        metrics["test_bleu1_length_only"] = bleu1(guesses, references)
        metrics["test_rouge1_length_only"] = rouge1(guesses, references)["f1"]
        metrics["test_bleu1_eeg_minus_length_only"] = metrics["test_bleu1_eeg"] - metrics["test_bleu1_length_only"]
        extra["length_only"] = {"by": length_unit, "examples": [
            {"reference": r, "length": float(lengths[i]), "length_only": g}
            for r, i, g in list(zip(references, test, guesses))[:3]]}
    metrics["val_loss_teacher_forced_diagnostic"] = teacher_forced_loss(
        model, features(index["val"]), labels[index["val"]], device)
    test_subjects = [subjects[i] for i in test] if subjects is not None else []
    extra["per_subject"] = (per_subject(test_subjects, predictions, references, positions, top1_hits)
                            if any(s is not None for s in test_subjects) else None)
    details = {"retrieval": retrieval_details, **extra, "evaluation_seconds": round(time.perf_counter() - started, 2)}
    examples = [{"reference": r, "from_eeg": e, "from_noise": n, "from_shuffled_eeg": s}
                for r, e, n, s in list(zip(references, predictions["eeg"], predictions["noise"],
                                           predictions["shuffled"]))[:REPORT_EXAMPLES]]
    return metrics, examples, details
