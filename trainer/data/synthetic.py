"""Deterministic synthetic reading-EEG: sentences from a small grammar, word-locked responses.

The generator stands in for a real reading study so that the whole pipeline can be trained and
tested end to end without any download:

- a vocabulary of about 40 words and sentences of 4-7 words from a simple grammar
  ("the red fox sees a small house", "a dog sleeps quietly");
- per word, a fixed spatio-temporal response template (half a second of a few damped
  oscillations, each with a smooth scalp topography around a random electrode);
- EEG = spatially smoothed 1/f (pink) background noise + the template of each word added at its
  onset, ~0.3 s per word, sentences separated by pauses;
- annotations ``sentence:<text>`` (onset, duration of the sentence) and ``word:<text>``.

In the ``null`` variant each response is the template of a random word unrelated to the
annotated one, so the EEG looks the same but carries no information about the text: a model
that decodes it better than noise has learned the language, not the brain.

The recording is written with MNE as a real file (FIF here; :data:`WRITERS` maps a format to a
writer so that EDF, BrainVision or EEGLAB can be added), in volts, with the 10-20 montage set.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import mne
import numpy as np

from trainer.data.montage import channel_positions, standard_montage

log = logging.getLogger(__name__)

SFREQ = 256.0
WORD_S = 0.3
RESPONSE_S = 0.5
N_SENTENCES = 120
RECORDING_STEM = "sub-01_task-reading"

DETERMINERS = ("the", "a")
ADJECTIVES = ("red", "small", "big", "old", "green", "happy", "dark", "quiet")
NOUNS = ("fox", "house", "dog", "tree", "river", "bird", "car", "child", "man", "woman", "book", "garden")
VERBS = ("sees", "likes", "finds", "follows", "hears", "paints", "holds", "visits")
INTRANSITIVE = ("sleeps", "runs", "sings", "waits")
ADVERBS = ("quietly", "slowly", "today", "again")
VOCABULARY = tuple(dict.fromkeys(DETERMINERS + ADJECTIVES + NOUNS + VERBS + INTRANSITIVE + ADVERBS))


def make_sentence(rng: np.random.Generator) -> list[str]:
    """One sentence of 4-7 words: ``DET [ADJ] NOUN (VERB DET [ADJ] NOUN | IVERB ADV)``."""
    def noun_phrase() -> list[str]:
        words = [rng.choice(DETERMINERS)]
        if rng.random() < 0.5:
            words.append(rng.choice(ADJECTIVES))
        return words + [rng.choice(NOUNS)]

    subject = noun_phrase()
    if rng.random() < 0.7:
        return [str(w) for w in subject + [rng.choice(VERBS)] + noun_phrase()][:7]
    return [str(w) for w in subject + [rng.choice(INTRANSITIVE), rng.choice(ADVERBS)]]


def _word_templates(rng: np.random.Generator, channels: tuple[str, ...], sfreq: float) -> np.ndarray:
    """Response templates in microvolts, shape ``(n_words, n_channels, n_samples)``."""
    pos = channel_positions(channels)
    t = np.arange(int(RESPONSE_S * sfreq)) / sfreq
    templates = np.zeros((len(VOCABULARY), len(channels), len(t)))
    for w in range(len(VOCABULARY)):
        for _ in range(3):
            latency, width = rng.uniform(0.08, 0.35), rng.uniform(0.03, 0.08)
            freq, phase = rng.uniform(3.0, 12.0), rng.uniform(0, 2 * np.pi)
            wave = np.exp(-0.5 * ((t - latency) / width) ** 2) * np.cos(2 * np.pi * freq * (t - latency) + phase)
            centre = pos[rng.integers(len(channels))]
            topo = np.exp(-np.sum((pos - centre) ** 2, axis=1) / (2 * 0.08**2)) * rng.choice([-1.0, 1.0])
            templates[w] += rng.uniform(8.0, 16.0) * topo[:, None] * wave[None, :]
    return templates


def _pink_noise(rng: np.random.Generator, n_channels: int, n_samples: int, sfreq: float) -> np.ndarray:
    """1/f background in microvolts, about 10 uV RMS, mixed between neighbouring channels."""
    spectrum = np.fft.rfft(rng.standard_normal((n_channels, n_samples)), axis=1)
    freqs = np.fft.rfftfreq(n_samples, 1 / sfreq)
    spectrum *= 1.0 / np.sqrt(np.maximum(freqs, 0.5))
    noise = np.fft.irfft(spectrum, n=n_samples, axis=1)
    mixing = np.eye(n_channels) + 0.3 * rng.standard_normal((n_channels, n_channels)) / np.sqrt(n_channels)
    noise = mixing @ noise
    return 10.0 * noise / noise.std(axis=1, keepdims=True)


def generate_raw(channels: tuple[str, ...], seed: int, null: bool = False,
                 n_sentences: int = N_SENTENCES, sfreq: float = SFREQ) -> mne.io.RawArray:
    """Build the synthetic recording in memory.

    Parameters
    ----------
    channels : tuple of str
        10-20 electrode names, in order.
    seed : int
        Seed for the sentences, templates and noise; equal seeds give identical recordings.
    null : bool
        If true, each word's response belongs to a random other word (no text information).
    n_sentences : int
        Number of sentences read.
    sfreq : float
        Sampling rate in Hz.

    Returns
    -------
    mne.io.RawArray
        EEG in volts with the montage and the ``sentence:``/``word:`` annotations set.
    """
    rng = np.random.default_rng(seed)
    templates = _word_templates(rng, channels, sfreq)
    # Separate streams so that the null variant shares sentences and noise with the real one.
    text_rng, noise_rng, null_rng = (np.random.default_rng([seed, k]) for k in (1, 2, 3))
    sentences = [make_sentence(text_rng) for _ in range(n_sentences)]

    onsets, t = [], 1.0
    for words in sentences:
        word_onsets = [t + i * WORD_S + text_rng.uniform(-0.02, 0.02) for i in range(len(words))]
        onsets.append(word_onsets)
        t += len(words) * WORD_S + RESPONSE_S + text_rng.uniform(0.6, 1.0)
    n_samples = int((t + 1.0) * sfreq)

    data = _pink_noise(noise_rng, len(channels), n_samples, sfreq)
    index = {w: i for i, w in enumerate(VOCABULARY)}
    ann_onset, ann_duration, ann_text = [], [], []
    for words, word_onsets in zip(sentences, onsets):
        for word, onset in zip(words, word_onsets):
            source = int(null_rng.integers(len(VOCABULARY))) if null else index[word]
            start = int(round(onset * sfreq))
            data[:, start:start + templates.shape[2]] += templates[source]
            ann_onset.append(onset), ann_duration.append(WORD_S), ann_text.append(f"word:{word}")
        ann_onset.append(word_onsets[0])
        ann_duration.append(word_onsets[-1] + WORD_S - word_onsets[0])
        ann_text.append("sentence:" + " ".join(words))

    info = mne.create_info(list(channels), sfreq, ch_types="eeg")
    raw = mne.io.RawArray(data * 1e-6, info, verbose="error")  # MNE keeps EEG in volts
    raw.set_montage(standard_montage(), on_missing="ignore", verbose="error")
    raw.set_annotations(mne.Annotations(ann_onset, ann_duration, ann_text))
    return raw


def _write_fif(raw: mne.io.BaseRaw, directory: Path) -> Path:
    path = directory / f"{RECORDING_STEM}_eeg.fif"
    raw.save(path, verbose="error")
    return path


# Format name -> writer(raw, directory) -> written path. Other formats plug in here.
WRITERS: dict[str, Callable[[mne.io.BaseRaw, Path], Path]] = {"fif": _write_fif}


def ensure_synthetic_dataset(root: Path, variant: str, seed: int, channels: tuple[str, ...],
                             fmt: str = "fif", n_sentences: int = N_SENTENCES) -> Path:
    """Return the folder holding the synthetic dataset, generating it on first use.

    The folder is ``<root>/datasets/<variant>-<seed>-<nchannels>/``. It is built in a temporary
    sibling and moved into place with ``os.replace``; when two trainers race, the loser drops
    its copy and uses the winner's, so nobody ever reads a half-written dataset.

    Parameters
    ----------
    root : Path
        The cache directory (or the job directory).
    variant : str
        ``'synthetic'`` or ``'synthetic-null'``.
    seed : int
        Generator seed.
    channels : tuple of str
        Electrode names of the encoder.
    fmt : str
        File format key of :data:`WRITERS`.
    n_sentences : int
        Number of sentences.

    Returns
    -------
    Path
        The dataset folder.
    """
    if fmt not in WRITERS:
        raise ValueError(f"Invalid synthetic format {fmt!r}; expected one of {sorted(WRITERS)}.")
    final = root / "datasets" / f"{variant}-{seed}-{len(channels)}"
    if (final / "dataset.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    raw = generate_raw(channels, seed, null=variant.endswith("null"), n_sentences=n_sentences)
    written = WRITERS[fmt](raw, tmp)
    meta = {"variant": variant, "seed": seed, "channels": list(channels), "format": fmt,
            "sentences": n_sentences, "file": written.name, "vocabulary": list(VOCABULARY)}
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, final)
        log.info("generated synthetic dataset %s", final)
    except OSError:  # another trainer finished first: its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "dataset.json").is_file():
            raise
    return final
