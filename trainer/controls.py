"""Stage 2's length-only control: the best a decoder can do that knows only how long a sentence is.

A decoder can beat noise without reading a single word from the EEG: a sentence's EEG is as
long as the sentence, and a long sentence shares more words with a long guess. This control
sees only that length (the number of fixated words where the recording marks words, else the
sentence's duration in seconds) and writes, from the training sentences of that length, the
text that overlaps them most in unigrams: at each position the word most often found there
(ties: the word seen first). The report shows how far the model's BLEU-1 lies above it.
Everything here is plain Python on texts; it trains nothing.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from trainer.data.recordings import Recording

SECONDS_BUCKET = 0.5
"""Width of a duration bucket in seconds (where words are not marked)."""


def sentence_lengths(recordings: list[Recording]) -> tuple[np.ndarray, str]:
    """Each sentence's length, in the order :func:`trainer.stage2.sentence_windows` lists them.

    Returns
    -------
    lengths : ndarray
        Number of word annotations inside each sentence (``unit`` ``"fixated words"``) when
        every sentence has at least one, else each sentence's duration (``unit`` ``"seconds"``).
    unit : str
        ``"fixated words"`` or ``"seconds"``.
    """
    words, seconds = [], []
    for rec in recordings:
        onsets = np.sort(np.asarray([w.onset_s for w in rec.words], dtype=float))
        for s in rec.sentences:
            inside = np.searchsorted(onsets, s.onset_s + s.duration_s, "right") - np.searchsorted(
                onsets, s.onset_s - 1e-3, "left")
            words.append(int(inside))
            seconds.append(float(s.duration_s))
    if words and min(words) > 0:
        return np.asarray(words, dtype=float), "fixated words"
    return np.asarray(seconds, dtype=float), "seconds"


def _bucket(length: float, unit: str) -> int:
    return int(round(length)) if unit == "fixated words" else int(round(length / SECONDS_BUCKET))


def positional_mode(texts: list[str], n_words: int) -> str:
    """``n_words`` words, each the one most often at that position among ``texts``."""
    out = []
    for position in range(n_words):
        counts = Counter(t.split()[position] for t in texts if len(t.split()) > position)
        if counts:
            out.append(counts.most_common(1)[0][0])
    return " ".join(out)


def length_only_predictions(train_texts: list[str], train_lengths: np.ndarray, test_lengths: np.ndarray,
                            unit: str) -> list[str]:
    """The length-only control's text for each test sentence (see the module docstring).

    Parameters
    ----------
    train_texts : list of str
        Training sentences.
    train_lengths, test_lengths : ndarray
        Their lengths and the test sentences' (:func:`sentence_lengths`).
    unit : str
        ``"fixated words"`` (a bucket per word count) or ``"seconds"`` (buckets of
        :data:`SECONDS_BUCKET`); a test length no training sentence has takes the nearest bucket.

    Returns
    -------
    list of str
        One text per test sentence: for word counts, that many words; for durations, as many
        words as the bucket's median training sentence.
    """
    if not train_texts:
        return ["" for _ in test_lengths]
    buckets: dict[int, list[str]] = defaultdict(list)
    for text, length in zip(train_texts, train_lengths):
        buckets[_bucket(length, unit)].append(text)
    keys = np.asarray(sorted(buckets))
    guesses: dict[int, str] = {}
    for key, texts in buckets.items():
        n_words = key if unit == "fixated words" else int(np.median([len(t.split()) for t in texts]))
        guesses[key] = positional_mode(texts, n_words)
    out = []
    for length in test_lengths:
        key = _bucket(length, unit)
        if key not in guesses:
            key = int(keys[np.argmin(np.abs(keys - key))])
        out.append(guesses[key])
    return out
