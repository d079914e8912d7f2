"""Text metrics for Stage 2, written out here so that every number in a report can be read.

All metrics work on whitespace tokens of the normalised sentences (the synthetic and most
reading corpora are already lower-case and space-separated) and are corpus-level where the
literature reports them so:

- :func:`bleu` -- corpus BLEU-n (Papineni et al. 2002): clipped n-gram precisions up to ``n``,
  geometric mean, brevity penalty; no smoothing, so BLEU-4 is 0 when no 4-gram matches;
- :func:`rouge1` -- ROUGE-1 precision, recall and F1 (unigram overlap), averaged over sentences;
- :func:`wer` -- word error rate: word edit distance over reference words;
- :func:`distinct_share` -- distinct predictions over predictions (1 / n means mode collapse:
  the same sentence whatever the input);
- :func:`paired_bootstrap` -- a percentile bootstrap interval for the difference of a corpus
  metric between two systems on the same test sentences (Koehn 2004);
- :func:`content_metrics` -- BLEU-1 and ROUGE-1 F1 on content words only (stopwords of
  :mod:`trainer.stopwords` removed from both sides): n-gram scores reward a decoder that writes
  "the ... a" everywhere (SemKey, 2026), these do not;
- :func:`retrieval_hits` / :func:`retrieval_permutation_p` -- top-k retrieval accuracy from a
  (features x candidate texts) score matrix, and a permutation test of it against re-paired
  features (Brain-CLIPLM, 2026).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable

import numpy as np

from trainer.stopwords import content_words

Metric = Callable[[list[str], list[str]], float]


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu(hypotheses: list[str], references: list[str], n: int = 4) -> float:
    """Corpus BLEU-``n`` with uniform weights, one reference per sentence.

    Parameters
    ----------
    hypotheses, references : list of str
        Predicted and reference sentences, pairwise.
    n : int
        Longest n-gram order (BLEU-1 is clipped unigram precision times the brevity penalty).

    Returns
    -------
    float
        In [0, 1]; 0 when the hypotheses are empty or some order has no match.
    """
    matched = [0] * n
    total = [0] * n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        h, r = hyp.split(), ref.split()
        hyp_len += len(h)
        ref_len += len(r)
        for k in range(1, n + 1):
            hyp_grams = _ngrams(h, k)
            matched[k - 1] += sum((hyp_grams & _ngrams(r, k)).values())
            total[k - 1] += sum(hyp_grams.values())
    if hyp_len == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def bleu1(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU-1: clipped unigram precision times the brevity penalty."""
    return bleu(hypotheses, references, 1)


def rouge1(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1 precision, recall and F1, each the mean over sentence pairs.

    Returns
    -------
    dict
        ``precision``, ``recall``, ``f1`` (an empty hypothesis scores 0 on all three).
    """
    precision, recall, f1 = [], [], []
    for hyp, ref in zip(hypotheses, references):
        h, r = Counter(hyp.split()), Counter(ref.split())
        overlap = sum((h & r).values())
        p = overlap / max(1, sum(h.values()))
        q = overlap / max(1, sum(r.values()))
        precision.append(p)
        recall.append(q)
        f1.append(2 * p * q / (p + q) if p + q else 0.0)
    if not f1:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    return {"precision": float(np.mean(precision)), "recall": float(np.mean(recall)), "f1": float(np.mean(f1))}


def _edit_distance(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def wer(hypotheses: list[str], references: list[str]) -> float:
    """Corpus word error rate: word edit distance over reference words (can exceed 1)."""
    errors = sum(_edit_distance(h.split(), r.split()) for h, r in zip(hypotheses, references))
    return errors / max(1, sum(len(r.split()) for r in references))


def distinct_share(hypotheses: list[str]) -> float:
    """Distinct predictions over predictions; ``1/n`` means one sentence for every input."""
    return len(set(hypotheses)) / max(1, len(hypotheses))


def text_metrics(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Every Stage 2 metric of one set of predictions (see the module docstring)."""
    out = {f"bleu{n}": bleu(hypotheses, references, n) for n in (1, 2, 3, 4)}
    out.update({f"rouge1_{k}": v for k, v in rouge1(hypotheses, references).items()})
    out["wer"] = wer(hypotheses, references)
    out["distinct"] = distinct_share(hypotheses)
    return out


def paired_bootstrap(system_a: list[str], system_b: list[str], references: list[str], metric: Metric = bleu1,
                     samples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Percentile bootstrap interval of ``metric(a) - metric(b)`` over resampled test sentences.

    Each replicate draws the test sentences with replacement and scores both systems on the
    same draw, so the interval reflects how much the difference depends on which sentences
    happen to be in the test set (the pairing removes the between-sentence variance the two
    systems share).

    Parameters
    ----------
    system_a, system_b : list of str
        Predictions of the two systems (e.g. from EEG and from noise), pairwise with ``references``.
    references : list of str
        Reference sentences.
    metric : callable
        Corpus metric ``metric(hypotheses, references) -> float``.
    samples : int
        Bootstrap replicates.
    confidence : float
        Coverage of the interval.
    seed : int
        Seed of the resampling, so a report is reproducible.

    Returns
    -------
    dict
        ``diff`` (on the full test set), ``low`` and ``high`` (the interval), ``samples``.
    """
    n = len(references)
    if n == 0:
        return {"diff": 0.0, "low": 0.0, "high": 0.0, "samples": 0}
    rng = np.random.default_rng(seed)
    diffs = np.empty(samples)
    for s in range(samples):
        rows = rng.integers(0, n, n)
        refs = [references[i] for i in rows]
        diffs[s] = metric([system_a[i] for i in rows], refs) - metric([system_b[i] for i in rows], refs)
    alpha = (1 - confidence) / 2
    return {"diff": metric(system_a, references) - metric(system_b, references),
            "low": float(np.quantile(diffs, alpha)), "high": float(np.quantile(diffs, 1 - alpha)),
            "samples": samples}


def content_metrics(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """BLEU-1 and ROUGE-1 F1 on content words: ``content_bleu1``, ``content_rouge1``.

    Stopwords are removed from hypotheses and references alike, so a hypothesis of only
    function words scores 0 however many of them match.
    """
    hyp = [content_words(h) for h in hypotheses]
    ref = [content_words(r) for r in references]
    return {"content_bleu1": bleu1(hyp, ref), "content_rouge1": rouge1(hyp, ref)["f1"]}


def retrieval_hits(scores: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``scores``, whether its target candidate is among the row's ``k`` best.

    Parameters
    ----------
    scores : ndarray
        ``(n, m)``: row i scores every candidate text for input i (higher = more likely).
    targets : ndarray
        ``(n,)`` the index of each input's own text among the ``m`` candidates.
    k : int
        How many of the best candidates count as a hit.

    Returns
    -------
    ndarray
        ``(n,)`` booleans. Ties count against the row: a candidate is in the top ``k`` only if
        fewer than ``k`` candidates score strictly higher *or equal* (its own score excluded),
        so a decoder that scores every candidate alike gets no hits, not all of them.
    """
    own = scores[np.arange(len(targets)), targets]
    at_least = (scores >= own[:, None]).sum(axis=1) - 1  # others scoring as high or higher
    return at_least < k


def hit_matrix(scores: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """``(n, n)`` booleans: ``[r, i]`` is whether input r's scores put input i's text in the top ``k``."""
    own = scores[:, targets]                                      # (n rows, n inputs' texts)
    at_least = (scores[:, :, None] >= own[:, None, :]).sum(axis=1) - 1
    return at_least < k


def retrieval_permutation_p(scores: np.ndarray, targets: np.ndarray, k: int = 1, permutations: int = 1000,
                            seed: int = 0) -> float:
    """Permutation p-value of top-``k`` retrieval accuracy against random pairings.

    Under the null hypothesis that the features say nothing about which text they belong to,
    any pairing of feature rows with texts is as likely as the true one. Each permutation
    re-pairs the rows with the texts at random and recomputes the accuracy;
    ``p = (1 + #{permuted >= observed}) / (1 + permutations)`` (Phipson & Smyth 2010: never 0).

    Parameters
    ----------
    scores, targets, k
        As for :func:`retrieval_hits`.
    permutations : int
        Random re-pairings.
    seed : int
        Seed of the permutations, so a report is reproducible.
    """
    n = len(targets)
    if n < 2:
        return 1.0
    hits = hit_matrix(scores, targets, k)                         # hits[r, i]: row r retrieves text i
    observed = hits[np.arange(n), np.arange(n)].mean()
    rng = np.random.default_rng(seed)
    rows = np.argsort(rng.random((permutations, n)), axis=1)      # one permutation per line
    permuted = hits[rows, np.arange(n)[None, :]].mean(axis=1)
    return float((1 + np.count_nonzero(permuted >= observed - 1e-12)) / (1 + permutations))
