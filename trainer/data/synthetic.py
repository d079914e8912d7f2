"""Deterministic synthetic reading-EEG: sentences from a small grammar, word-locked responses.

The generator stands in for a real reading study so that the whole pipeline can be trained and
tested end to end without any download:

- a vocabulary of about 40 words and sentences of 4-7 words from a simple grammar
  ("the red fox sees a small house", "a dog sleeps quietly");
- per word, a fixed spatio-temporal response template (half a second of a few damped
  oscillations, each with a smooth scalp topography around a random electrode);
- EEG = spatially smoothed 1/f (pink) background noise + the template of each word added at its
  onset, ~0.3 s per word, sentences separated by pauses; the responses are strong (30-60 uV
  per component against 10 uV of background) so that single sentences can be decoded, which is
  what Stage 2's evaluation needs to tell a working decoder from one that only learned the
  language;
- annotations ``sentence:<text>`` (onset, duration of the sentence) and ``word:<text>``.

In the ``null`` variant each annotated sentence is "read" as an independent random decoy
sentence: the responses are those of the decoy's words, at the decoy's word onsets (so even the
number of responses says nothing about the annotated sentence's length). The EEG looks the same
but carries no information about the text: a model that decodes it better than noise has
learned the language, not the brain.

The recording is written as a real file in any of the formats MNE reads (:data:`WRITERS`: FIF,
EDF, BDF, BrainVision, EEGLAB, or a BIDS dataset written by mne-bids), in volts, with the 10-20 montage
set where the format stores one. Non-FIF formats go through ``mne.export.export_raw``, which uses
edfio (EDF and BDF), pybv (BrainVision) and eeglabio (EEGLAB).
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
N_SENTENCES = 600
# Per-component peak amplitude range of the word responses, in microvolts.
RESPONSE_UV = (30.0, 60.0)
# Part of the cached dataset's name: bump when the generator's output changes.
GENERATOR_VERSION = 2
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
            templates[w] += rng.uniform(*RESPONSE_UV) * topo[:, None] * wave[None, :]
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
    # Whole seconds: EDF and BDF store 1 s data records and would pad a partial last one,
    # which would make those copies differ from the others in length.
    n_samples = int(np.ceil(t + 1.0) * sfreq)

    data = _pink_noise(noise_rng, len(channels), n_samples, sfreq)
    index = {w: i for i, w in enumerate(VOCABULARY)}
    ann_onset, ann_duration, ann_text = [], [], []
    for words, word_onsets in zip(sentences, onsets):
        # The null variant reads a decoy instead: its words, its length, evenly paced.
        read = make_sentence(null_rng) if null else words
        read_onsets = [word_onsets[0] + i * WORD_S for i in range(len(read))] if null else word_onsets
        for word, onset in zip(read, read_onsets):
            start = int(round(onset * sfreq))
            data[:, start:start + templates.shape[2]] += templates[index[word]]
        for word, onset in zip(words, word_onsets):
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


def _exporter(fmt: str, extension: str) -> Callable[[mne.io.BaseRaw, Path], Path]:
    """A writer that exports through ``mne.export.export_raw`` (annotations included)."""
    def write(raw: mne.io.BaseRaw, directory: Path) -> Path:
        path = directory / f"{RECORDING_STEM}_eeg.{extension}"
        mne.export.export_raw(path, raw, fmt=fmt, overwrite=True, verbose="error")
        return path

    write.__name__ = f"_write_{fmt}"
    return write


def write_bids_recording(raw: mne.io.BaseRaw, root: Path, subject: str, session: str | None = None,
                         task: str = "reading", run: str | None = None) -> Path:
    """Write one synthetic recording into a BIDS dataset at ``root`` with mne-bids' ``write_raw_bids``.

    The layout is the one real datasets have (mne-bids writes ``dataset_description.json``,
    ``participants.tsv``, ``*_scans.tsv``, ``*_channels.tsv`` with ``raw.info['bads']`` as status
    ``bad``, ``*_electrodes.tsv`` and ``*_coordsystem.json`` from the montage, ``*_events.tsv``),
    the signal an EDF. Our ``sentence:<text>`` / ``word:<text>`` annotations become events with
    ``trial_type`` sentence / word and the text in an extra ``text`` column: write_raw_bids writes
    annotation ``extras`` as columns (and keeps ``value`` for the event code), which is where
    :func:`trainer.data.text.read_events_tsv` reads it.

    Returns
    -------
    Path
        The written recording.
    """
    import mne_bids  # only the BIDS writer needs it

    raw = raw.copy()
    ann = raw.annotations
    kinds, texts = zip(*(str(d).partition(":")[::2] for d in ann.description)) if len(ann) else ((), ())
    raw.set_annotations(mne.Annotations(ann.onset, ann.duration, list(kinds), orig_time=ann.orig_time,
                                        extras=[{"text": t} for t in texts]))
    raw.info["line_freq"] = 50.0  # BIDS requires PowerLineFrequency; the generator adds no line noise
    path = mne_bids.BIDSPath(subject=subject, session=session, task=task, run=run, datatype="eeg", root=root)
    # EDF (through edfio), as many OpenNeuro EEG datasets store; allow_preload: the raw is in memory.
    mne_bids.write_raw_bids(raw, path, format="EDF", allow_preload=True, overwrite=True, verbose="error")
    return Path(path.fpath)


def _write_bids(raw: mne.io.BaseRaw, directory: Path) -> Path:
    """The synthetic dataset as a one-subject BIDS dataset (:func:`write_bids_recording`)."""
    import mne_bids

    path = write_bids_recording(raw, directory, subject="01")
    mne_bids.make_dataset_description(path=directory, name="NeuroLens synthetic reading EEG", overwrite=True,
                                      verbose="error")
    return path


# Format name -> writer(raw, directory) -> written recording path.
WRITERS: dict[str, Callable[[mne.io.BaseRaw, Path], Path]] = {
    "fif": _write_fif,
    "edf": _exporter("edf", "edf"),
    "bdf": _exporter("bdf", "bdf"),
    "brainvision": _exporter("brainvision", "vhdr"),
    "eeglab": _exporter("eeglab", "set"),
    "bids": _write_bids,
}


def ensure_synthetic_dataset(root: Path, variant: str, seed: int, channels: tuple[str, ...],
                             fmt: str = "fif", n_sentences: int = N_SENTENCES) -> Path:
    """Return the folder holding the synthetic dataset, generating it on first use.

    The folder is ``<root>/datasets/<variant>-v<version>-<seed>-<nchannels>[-<n_sentences>][-<fmt>]/`` (the
    optional parts only where they differ from the defaults, so existing caches stay valid). It is built in a temporary
    sibling and moved into place with ``os.replace``; when two trainers race, the loser drops
    its copy and uses the winner's, so nobody ever reads a half-written dataset.

    Parameters
    ----------
    root : Path
        The cache directory (or the job directory).
    variant : str
        ``'synthetic'`` or ``'synthetic-null'``; ``'synthetic-zuco'`` and ``'synthetic-zuco-null'``
        are written by :func:`trainer.data.zuco_writer.ensure_zuco_dataset` (``fmt`` ignored).
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
    if variant.startswith("synthetic-zuco"):  # ZuCo-layout .mat files: their own writer and folder
        from trainer.data.zuco_writer import N_SENTENCES as ZUCO_SENTENCES, ensure_zuco_dataset

        return ensure_zuco_dataset(root, variant, seed, n_sentences if n_sentences != N_SENTENCES else ZUCO_SENTENCES)
    if fmt not in WRITERS:
        raise ValueError(f"Invalid synthetic format {fmt!r}; expected one of {sorted(WRITERS)}.")
    name = f"{variant}-v{GENERATOR_VERSION}-{seed}-{len(channels)}"
    if n_sentences != N_SENTENCES:
        name += f"-{n_sentences}"
    if fmt != "fif":
        name += f"-{fmt}"

    def build(tmp: Path) -> dict:
        raw = generate_raw(channels, seed, null=variant.endswith("null"), n_sentences=n_sentences)
        written = WRITERS[fmt](raw, tmp)
        return {"variant": variant, "seed": seed, "channels": list(channels), "format": fmt,
                "sentences": n_sentences, "file": str(written.relative_to(tmp)), "vocabulary": list(VOCABULARY)}

    return build_once(root / "datasets" / name, build)


def build_once(final: Path, build: Callable[[Path], dict]) -> Path:
    """``final``, built on first use: ``build(tmp)`` fills a temporary sibling and returns the
    metadata written to its ``dataset.json``; the folder is then moved into place with
    ``os.replace``. When two trainers race, the loser drops its copy and uses the winner's, so
    nobody ever reads a half-written dataset."""
    if (final / "dataset.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = build(tmp)
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, final)
        log.info("generated dataset %s", final)
    except OSError:  # another trainer finished first: its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "dataset.json").is_file():
            raise
    return final
