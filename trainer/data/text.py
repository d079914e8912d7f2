"""Sentences and words aligned to a recording, and text-disjoint data splits.

Alignment comes from the recording's annotations (``sentence:<text>`` spanning a sentence,
``word:<text>`` at a word's onset) or, when a BIDS-style ``*_events.tsv`` sits beside the
recording, from its rows (``onset``, ``duration``, ``trial_type`` in {sentence, word},
``value``). Times are seconds from the first sample of the recording.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import mne

from trainer.exceptions import RecordingError

log = logging.getLogger(__name__)

BRAINVISION_COMMENT = "Comment/"


@dataclass(frozen=True)
class Sentence:
    onset_s: float
    duration_s: float
    text: str


@dataclass(frozen=True)
class Word:
    onset_s: float
    text: str


def _normalise_text(text: str) -> str:
    return " ".join(text.split())


def events_tsv_for(path: Path) -> Path | None:
    """The BIDS ``*_events.tsv`` beside a recording (``sub-01_task-x_eeg.edf`` ->
    ``sub-01_task-x_events.tsv``), if there is one."""
    stem = path.name[: -len("".join(path.suffixes))] if path.suffixes else path.name
    base = stem.rsplit("_", 1)[0] if "_" in stem else stem
    for candidate in (path.with_name(f"{base}_events.tsv"), path.with_name(f"{stem}_events.tsv")):
        if candidate.is_file():
            return candidate
    return None


def read_events_tsv(tsv: Path) -> tuple[list[Sentence], list[Word]]:
    """Sentences and words from a BIDS-style events file."""
    sentences, words = [], []
    try:
        with open(tsv, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RecordingError(f"Cannot read {tsv}: {exc}") from exc
    for line, row in enumerate(rows, start=2):
        kind = (row.get("trial_type") or "").strip()
        if kind not in ("sentence", "word"):
            continue
        try:
            onset = float(row["onset"])
            duration = float(row.get("duration") or 0.0)
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordingError(f"{tsv} line {line}: bad onset/duration ({exc}).") from exc
        text = _normalise_text(row.get("value") or "")
        if not text:
            continue
        if kind == "sentence":
            sentences.append(Sentence(onset, duration, text))
        else:
            words.append(Word(onset, text))
    return sentences, words


def read_annotations(raw: mne.io.BaseRaw, path: Path) -> tuple[list[Sentence], list[Word]]:
    """Sentences and words of a recording: from ``*_events.tsv`` if present, else annotations."""
    tsv = events_tsv_for(path)
    if tsv is not None:
        return read_events_tsv(tsv)
    ann = raw.annotations
    # Annotations tied to a measurement date count from it; the data starts at first_time.
    offset = raw.first_time if ann.orig_time is not None else 0.0
    sentences, words = [], []
    for onset, duration, description in zip(ann.onset, ann.duration, ann.description):
        description = str(description)
        # BrainVision markers come back as "<marker type>/<description>"; ours are comments.
        if description.startswith(BRAINVISION_COMMENT):
            description = description[len(BRAINVISION_COMMENT):]
        kind, _, text = description.partition(":")
        text = _normalise_text(text)
        if kind == "sentence" and text:
            sentences.append(Sentence(float(onset - offset), float(duration), text))
        elif kind == "word" and text:
            words.append(Word(float(onset - offset), text))
    return sentences, words


def split_by_text(texts: list[str], val_share: float = 0.1, test_share: float = 0.15) -> list[str]:
    """Assign each sample to 'train', 'val' or 'test' so that no sentence text is in two splits.

    Each distinct text is placed by a hash of the text itself, so the split does not depend on
    the order of recordings or on the seed and stays stable when data is added. If hashing leaves
    a split empty (tiny datasets), distinct texts are dealt out in hash order instead.

    Returns
    -------
    list of str
        One split name per input text.
    """
    distinct = sorted(set(texts), key=lambda t: hashlib.sha1(t.encode()).hexdigest())
    if not distinct:
        return []

    def bucket(text: str) -> float:
        return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    assign = {t: "test" if bucket(t) < test_share else "val" if bucket(t) < test_share + val_share else "train"
              for t in distinct}
    if len(distinct) >= 3 and len(set(assign.values())) < 3:
        n_test = max(1, round(len(distinct) * test_share))
        n_val = max(1, round(len(distinct) * val_share))
        assign = {t: "test" if i < n_test else "val" if i < n_test + n_val else "train"
                  for i, t in enumerate(distinct)}
    return [assign[t] for t in texts]
