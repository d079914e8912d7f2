"""Stage 2's text metrics on cases worked out by hand."""

from __future__ import annotations

import math

import pytest

from trainer.metrics import bleu, bleu1, distinct_share, paired_bootstrap, rouge1, text_metrics, wer


def test_bleu_clips_counts_and_applies_the_brevity_penalty():
    # 2 of 4 "the" are clipped matches; 4 words against 6 costs exp(1 - 6/4).
    assert bleu1(["the the the the"], ["the cat is on the mat"]) == pytest.approx(0.5 * math.exp(-0.5))
    # Unigrams 5/6, bigrams 3/5, equal lengths: sqrt(5/6 * 3/5).
    assert bleu(["the cat sat on the mat"], ["the cat is on the mat"], 2) == pytest.approx(math.sqrt(0.5))
    assert bleu(["the cat sat on the mat"], ["the cat is on the mat"], 4) == 0.0  # no 4-gram matches
    assert bleu(["a b c d"], ["a b c d"], 4) == pytest.approx(1.0)
    assert bleu1([""], ["a b"]) == 0.0


def test_rouge1_wer_and_distinct():
    scores = rouge1(["a b"], ["a c d"])
    assert scores["precision"] == pytest.approx(0.5) and scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(0.4)
    assert wer(["a b c"], ["a x c d"]) == pytest.approx(0.5)  # one substitution, one insertion
    assert distinct_share(["a", "a", "b"]) == pytest.approx(2 / 3)
    perfect = text_metrics(["a b c d", "e f g h"], ["a b c d", "e f g h"])
    assert perfect["bleu4"] == pytest.approx(1.0) and perfect["wer"] == 0.0 and perfect["rouge1_f1"] == 1.0


def test_paired_bootstrap_interval():
    refs = [f"the word{i} runs" for i in range(40)]
    same = paired_bootstrap(refs, refs, refs, samples=200)
    assert same["diff"] == same["low"] == same["high"] == 0.0
    better = paired_bootstrap(refs, ["the dog sleeps"] * 40, refs, samples=200)
    assert 0 < better["low"] <= better["diff"] <= better["high"]
    # Half the sentences right, half wrong: the interval is wide and holds the point estimate.
    mixed = [r if i % 2 else "a b" for i, r in enumerate(refs)]
    half = paired_bootstrap(mixed, ["the dog sleeps"] * 40, refs, samples=500, seed=1)
    assert half["low"] < half["diff"] < half["high"]
