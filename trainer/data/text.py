"""Sentences and words aligned to a recording, and text-disjoint data splits.

Alignment comes from the recording's annotations (``sentence:<text>`` spanning a sentence,
``word:<text>`` at a word's onset) or, when a BIDS-style ``*_events.tsv`` sits beside the
recording, from its rows (``onset``, ``duration``, ``trial_type`` in {sentence, word}, and the
text in a ``text`` column, or in ``value`` where there is none: mne-bids' ``write_raw_bids``
keeps ``value`` for the event code and writes annotation extras, ours ``{"text": ...}``, as
extra columns). Times are seconds from the first sample of the recording.

Splits keep sentence texts disjoint across every subject (:func:`split_by_text`), or hold out
named subjects (:func:`split_sentences`).
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import mne

from trainer.exceptions import DatasetError, RecordingError

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
    text_column = "text" if rows and "text" in rows[0] else "value"
    for line, row in enumerate(rows, start=2):
        kind = (row.get("trial_type") or "").strip()
        if kind not in ("sentence", "word"):
            continue
        try:
            onset = float(row["onset"])
            duration = float(row.get("duration") or 0.0)
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordingError(f"{tsv} line {line}: bad onset/duration ({exc}).") from exc
        text = _normalise_text(row.get(text_column) or "")
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
    the order of recordings or on the seed and stays stable when data is added; and the same
    sentence read by several subjects lands in one part for all of them (every copy of a text
    has the same hash). If hashing leaves a wanted part empty (tiny datasets), distinct texts are
    dealt out in hash order instead. A share of 0 leaves that part out.

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
    wanted = {"train"} | {name for name, share in (("test", test_share), ("val", val_share)) if share > 0}
    if len(distinct) >= len(wanted) and set(assign.values()) != wanted:
        n_test = max(1, round(len(distinct) * test_share)) if test_share > 0 else 0
        n_val = max(1, round(len(distinct) * val_share)) if val_share > 0 else 0
        assign = {t: "test" if i < n_test else "val" if i < n_test + n_val else "train"
                  for i, t in enumerate(distinct)}
    return [assign[t] for t in texts]


def check_test_subjects(test_subjects: list[str], found: list[str | None]) -> None:
    """Refuse held-out subjects the dataset does not have, naming the subjects it has.

    Raises
    ------
    DatasetError
        Some of ``test_subjects`` label no recording (``found``: each recording's subject).
    """
    labels = sorted({s for s in found if s is not None})
    unknown = [s for s in test_subjects if s not in labels]
    if not unknown:
        return
    has = (f"its subjects are {', '.join(labels)}" if labels else
           "it has no subject labels (BIDS sub-<label> files, or ZuCo's results files, carry them)")
    raise DatasetError(f"Unknown split.test_subjects {', '.join(map(repr, unknown))}: not in the dataset; {has}.")


def split_sentences(texts: list[str], subjects: list[str | None], test_subjects: list[str] = (),
                    text_disjoint: bool = True, val_share: float = 0.1, test_share: float = 0.15
                    ) -> tuple[list[str], dict]:
    """Each sentence's part ('train', 'val', 'test' or 'excluded') and a summary for the report.

    Without ``test_subjects`` this is :func:`split_by_text`: parts are disjoint in text across
    all subjects. With them, the test part is exactly the named subjects' sentences and the
    other subjects' sentences are split by text into train and val, so no recording of a
    held-out subject is trained on. With ``text_disjoint`` (the default) the other subjects'
    sentences whose text a held-out subject read are left out too ('excluded'): the test then
    measures new subjects *and* new sentences, so a decoder cannot score by recalling trained
    sentences. Where every subject read the same sentences (ZuCo), that leaves nothing to train
    on; ``text_disjoint=False`` then tests new subjects reading seen sentences, and the summary
    counts the test texts seen in training.

    Returns
    -------
    parts : list of str
        One per sentence.
    summary : dict
        ``split`` ('text' or 'subjects'), ``test_subjects``, ``text_disjoint``, per part the
        ``sentences``, distinct ``texts`` and ``subjects`` it holds, ``excluded_sentences`` and
        ``test_texts_seen_in_training``.
    """
    check_test_subjects(list(test_subjects), subjects)
    held = set(test_subjects)
    if not held:
        parts = split_by_text(texts, val_share, test_share)
    else:
        test_texts = {t for t, s in zip(texts, subjects) if s in held}
        others = [i for i, s in enumerate(subjects) if s not in held and not (text_disjoint and texts[i] in test_texts)]
        parts = ["test" if s in held else "excluded" for s in subjects]
        for i, part in zip(others, split_by_text([texts[i] for i in others], val_share, 0.0)):
            parts[i] = part
    summary = {"split": "subjects" if held else "text", "test_subjects": sorted(held), "text_disjoint": text_disjoint,
               "excluded_sentences": parts.count("excluded")}
    for name in ("train", "val", "test"):
        rows = [i for i, p in enumerate(parts) if p == name]
        summary[name] = {"sentences": len(rows), "texts": len({texts[i] for i in rows}),
                         "subjects": sorted({subjects[i] for i in rows if subjects[i] is not None})}
    trained = {t for t, p in zip(texts, parts) if p == "train"}
    summary["test_texts_seen_in_training"] = len({t for t, p in zip(texts, parts) if p == "test"} & trained)
    return parts, summary
