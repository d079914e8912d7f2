"""Stage 2's text metrics, retrieval, length-only control and verdict on cases worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.controls import length_only_predictions, positional_mode, sentence_lengths
from trainer.data.recordings import Recording
from trainer.data.text import Sentence, Word
from trainer.metrics import (bleu, bleu1, content_metrics, distinct_share, paired_bootstrap, retrieval_hits,
                             retrieval_permutation_p, rouge1, text_metrics, wer)
from trainer.stopwords import STOPWORDS
from trainer.verdict import RunFacts, verdict


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


def test_content_metrics_ignore_stopwords():
    # Content words: "cat mat" against "dog mat": one of two unigrams, equal lengths.
    scores = content_metrics(["the cat is on the mat"], ["the dog is on the mat"])
    assert scores == {"content_bleu1": pytest.approx(0.5), "content_rouge1": pytest.approx(0.5)}
    # Plain BLEU-1 gives a run of function words credit; the content-word one gives none.
    assert bleu1(["the a the on"], ["the fox sees a house on the hill"]) > 0
    assert content_metrics(["the a the on"], ["the fox sees a house on the hill"]) == {
        "content_bleu1": 0.0, "content_rouge1": 0.0}
    assert 150 <= len(STOPWORDS) <= 200 and {"the", "a", "of", "is"} <= STOPWORDS and "fox" not in STOPWORDS


def test_retrieval_hits_rank_each_row_and_count_ties_against_it():
    scores = np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [2.0, 2.0, 1.0]])
    targets = np.array([0, 1, 2])
    assert retrieval_hits(scores, targets, 1).tolist() == [True, True, False]
    assert retrieval_hits(scores, targets, 2).tolist() == [True, True, False]  # two others score higher
    assert retrieval_hits(scores, targets, 5).tolist() == [True, True, True]
    assert not retrieval_hits(np.ones((4, 4)), np.arange(4), 1).any()  # all alike: no hits


def test_retrieval_permutation_p():
    n = 30
    rng = np.random.default_rng(0)
    reads = rng.standard_normal((n, n)) + 5 * np.eye(n)  # each row prefers its own text
    assert retrieval_permutation_p(reads, np.arange(n), 1, 1000) == pytest.approx(1 / 1001)
    ignores = np.tile(rng.standard_normal(n), (n, 1))  # every row the same: the input is ignored
    assert retrieval_permutation_p(ignores, np.arange(n), 1, 1000) == 1.0
    assert retrieval_permutation_p(ignores, np.arange(n), 5, 1000) == 1.0
    noise = [retrieval_permutation_p(rng.standard_normal((n, n)), np.arange(n), 5, 200, seed=s) for s in range(20)]
    assert 0.0 < min(noise) and np.mean(noise) > 0.2  # no pairing: p is not small on average


def tiny_model(vocab: int = 40, n_patches: int = 4, feature_dim: int = 12):
    from transformers import BartForConditionalGeneration

    from trainer.config import BART_PRESETS
    from trainer.models.bridge import EEGToText, bart_config

    torch.manual_seed(0)
    return EEGToText(n_patches, feature_dim, BartForConditionalGeneration(bart_config(BART_PRESETS["tiny"], vocab, 20)))


def test_retrieval_scores_are_the_decoders_mean_log_likelihood_and_ignore_nothing_it_does_not():
    from trainer.text_eval import retrieval_metrics, retrieval_scores

    model = tiny_model()
    rng = np.random.default_rng(1)
    features = rng.standard_normal((12, 4, 12)).astype(np.float32)
    texts = rng.integers(3, 40, (10, 6))
    texts[::2, 4:] = -100  # shorter texts: padding is not scored
    scores = retrieval_scores(model, [features[:5], features[5:]], texts, torch.device("cpu"))
    assert scores.shape == (12, 10) and np.all(scores < 0)
    model.eval()
    for row, text in ((0, 0), (7, 3)):  # minus the teacher-forced cross-entropy of that pair
        loss = model(torch.from_numpy(features[row:row + 1]), torch.from_numpy(texts[text:text + 1])).item()
        assert -scores[row, text] == pytest.approx(loss, rel=1e-4)
    assert len({tuple(np.round(r, 6)) for r in scores}) == 12  # each input scores the texts differently

    # A decoder that ignores its input: the bridge's projection zeroed, every input looks alike.
    with torch.no_grad():
        model.bridge.proj.weight.zero_()
    blind = retrieval_scores(model, [features[:10]], texts, torch.device("cpu"))
    targets = np.arange(10)
    metrics = retrieval_metrics({"eeg": (blind, targets), "noise": (blind, targets),
                                 "shuffled": (blind[np.roll(targets, 1)], targets)}, seed=0)
    assert metrics["test_retrieval_p_eeg_vs_shuffled"] >= 0.05
    assert metrics["test_retrieval_top1_chance"] == pytest.approx(0.1)
    assert metrics["test_retrieval_top5_chance"] == pytest.approx(0.5)
    assert metrics["test_retrieval_top1_eeg"] <= 0.1  # at most the one row whose text every row prefers


def test_the_length_only_control_writes_the_commonest_words_of_that_length():
    train = ["a b c", "a d c", "x y", "a d e"]
    assert positional_mode(train[:2], 3) == "a b c"  # ties: the word seen first
    guesses = length_only_predictions(train, np.array([3, 3, 2, 3]), np.array([3, 2, 4, 1]), "fixated words")
    assert guesses == ["a d c", "x y", "a d c", "x y"]  # 4 and 1 words: the nearest lengths, 3 and 2
    by_seconds = length_only_predictions(train, np.array([1.2, 1.0, 0.5, 2.0]), np.array([1.1, 0.4]), "seconds")
    assert by_seconds == ["a b c", "x y"]  # 1.0 s bucket: "a b c", "a d c"; 0.5 s bucket: "x y"
    assert length_only_predictions([], np.array([]), np.array([3]), "fixated words") == [""]


def test_sentence_lengths_count_fixated_words_or_fall_back_to_seconds(tmp_path):
    def recording(sentences, words):
        return Recording(tmp_path / "r.fif", np.zeros((1, 10), np.float32), np.ones(1, bool), 100.0,
                         sentences=sentences, words=words)

    sentences = [Sentence(1.0, 0.9, "a b c"), Sentence(3.0, 0.5, "d e")]
    words = [Word(1.0, "a"), Word(1.3, "b"), Word(1.6, "c"), Word(3.0, "d"), Word(3.3, "e"), Word(5.0, "z")]
    lengths, unit = sentence_lengths([recording(sentences, words)])
    assert unit == "fixated words" and lengths.tolist() == [3, 2]
    lengths, unit = sentence_lengths([recording(sentences, words[:3])])  # the second sentence has no words
    assert unit == "seconds" and lengths.tolist() == [0.9, 0.5]


FACTS = RunFacts(steps=200, batch_size=8, lr=5e-4, train_sentences=460, train_texts=454,
                 losses=[5.0 - 0.02 * i for i in range(50)])


def test_the_verdict_says_whether_the_model_reads_the_eeg_and_what_to_change():
    reads = {"test_bleu1_eeg_minus_noise": 0.094, "test_bleu1_eeg_minus_noise_ci_low": 0.061,
             "test_bleu1_eeg_minus_noise_ci_high": 0.122, "test_retrieval_top1_eeg": 0.31,
             "test_retrieval_top1_chance": 0.05, "test_retrieval_p_eeg_vs_shuffled": 0.000999}
    assert verdict(reads, FACTS) == {"reads_eeg": True, "advice": [], "sentence": (
        "reads the EEG: BLEU-1 from EEG exceeds noise by 0.09 (95% interval 0.06 to 0.12); "
        "retrieval top-1 31% against chance 5% (p=0.001)")}

    null = {**reads, "test_bleu1_eeg_minus_noise": -0.002, "test_bleu1_eeg_minus_noise_ci_low": -0.021,
            "test_bleu1_eeg_minus_noise_ci_high": 0.017, "test_retrieval_top1_eeg": 0.04,
            "test_retrieval_p_eeg_vs_shuffled": 0.62, "test_distinct_eeg": 0.037, "test_bleu1_eeg": 0.131,
            "test_bleu1_length_only": 0.25, "train_loss": 3.0, "val_loss_teacher_forced_diagnostic": 3.1}
    out = verdict(null, FACTS)
    assert out["reads_eeg"] is False
    assert out["sentence"] == ("no evidence that the model reads the EEG: BLEU-1 from EEG falls below noise by 0.00 "
                               "(95% interval -0.02 to 0.02, which contains zero); retrieval top-1 4% against "
                               "chance 5% (p=0.620)")
    advice = " | ".join(out["advice"])
    assert "4% of its test predictions are distinct" in advice and "higher lr (now 0.0005)" in advice
    assert "still falling" in advice and "200 steps of batch 8" in advice and "at least 1150" in advice
    assert "length-only control" in advice and "word probe" in advice
    assert "validation loss" not in advice  # 3.1 against 3.0 is no sign of memorising

    # One test passes, the other does not: no claim, and the sentence says the tests disagree.
    mixed = verdict({**reads, "test_retrieval_p_eeg_vs_shuffled": 0.3}, FACTS)
    assert mixed["reads_eeg"] is False and mixed["sentence"].startswith("weak evidence")
    # A learned model that stopped early, plateaued, saw its data many times: only the probe advice.
    plateau = RunFacts(steps=3000, batch_size=16, lr=3e-3, train_sentences=460, train_texts=100, losses=[1.0] * 50)
    assert len(verdict(null, plateau)["advice"]) == 3  # distinct, length-only, probe


def test_per_subject_figures_split_the_test_sentences_by_reader():
    from trainer.text_eval import per_subject

    references = ["a b", "c d", "e f", "g h"]
    predictions = {"eeg": ["a b", "x y", "e f", "e f"], "noise": ["x y"] * 4}
    out = per_subject(["s1", "s2", "s1", None], predictions, references, np.array([0, 2, 3]),
                      np.array([True, False, True]))
    assert out == {"s1": {"sentences": 2, "bleu1_eeg": 1.0, "bleu1_noise": 0.0, "retrieval_top1_eeg": 0.5,
                          "retrieval_sentences": 2},
                   "s2": {"sentences": 1, "bleu1_eeg": 0.0, "bleu1_noise": 0.0, "retrieval_top1_eeg": None,
                          "retrieval_sentences": 0}}


def test_retrieval_is_capped_by_a_compute_budget():
    from trainer.text_eval import RETRIEVAL_MAX, RETRIEVAL_MIN, _retrieval_rows, retrieval_limit

    model = tiny_model(vocab=512)
    tiny = sum(p.numel() for p in model.bart.model.decoder.parameters())
    assert retrieval_limit(tiny, 16, "cpu") == RETRIEVAL_MAX  # the tiny preset: every test sentence up to 200
    # The small preset's decoder (about 44M parameters) over 20 tokens: ~23 sentences on a CPU, 200 on a GPU.
    assert 20 <= retrieval_limit(44_000_000, 20, "cpu") <= 30
    assert retrieval_limit(44_000_000, 20, "cuda") == RETRIEVAL_MAX
    assert retrieval_limit(10**12, 32, "cpu") == RETRIEVAL_MIN
    rows = _retrieval_rows(300, 50, seed=0)
    assert len(rows) == 50 and len(set(rows)) == 50 and rows.max() < 300 and np.all(np.diff(rows) > 0)
    assert (rows == _retrieval_rows(300, 50, seed=0)).all() and _retrieval_rows(30, 50, 0).tolist() == list(range(30))
