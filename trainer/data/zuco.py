"""Read ZuCo's ``results<SUBJECT>_<TASK>.mat`` files (ZuCo 1.0: MATLAB v5; ZuCo 2.0: v7.3, HDF5).

One subject's file becomes one recording: an in-memory :class:`mne.io.RawArray` of the
subject's sentences laid end to end (each sentence's ``rawData``, demeaned, then
:data:`GAP_S` of zeros), named by the EGI HydroCel numbering with MNE's ``GSN-HydroCel-129``
montage, annotated ``sentence:<content>`` over each sentence's ``rawData`` and
``word:<content>`` at each word's first fixation. The fields read and why are in
``docs/notes/zuco.md``; in short:

- ``sentenceData(i).content``, ``.rawData`` (105 x T at 500 Hz), ``.word``, ``.allFixations``;
- ``word(j).content``, ``.nFixations`` (``[]`` when never fixated), ``.fixPositions`` (1-based
  indices into the sentence's ``allFixations``); a word's onset is the summed ``duration`` of
  the fixations before its first one.

Sentences without EEG (no, empty or all-NaN ``rawData``) or with more than
:data:`MAX_NAN_SHARE` of their samples NaN are skipped; shorter NaN stretches are filled by
linear interpolation per channel. Words without fixations have no onset and are skipped. Every
skip is counted (:attr:`ZucoFile.skipped`, keys :data:`SKIP_REASONS`), never raised. The
reference electrode's all-zero row is dropped.

A v7.3 file is read a sentence at a time through h5py; a v5 file is read whole by scipy (the
format has no partial reads), one subject's file, never more, being in memory at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import h5py
import mne
import numpy as np
import scipy.io

from trainer.exceptions import RecordingError

FILE_PATTERN = re.compile(r"^results(?P<subject>[A-Za-z0-9]+)_(?P<task>[A-Za-z0-9]+)\.mat$")
SFREQ = 500.0
REMOVED = (1, 8, 14, 17, 21, 25, 32, 48, 49, 56, 63, 68, 73, 81, 88, 94, 99, 107, 113, 119, 125, 126, 127, 128)
"""HydroCel 128 electrodes not in ZuCo's files: eye (EOG) and neck/face rim electrodes."""
REFERENCE = "Cz"
CHANNELS = tuple(f"E{i}" for i in range(1, 129) if i not in REMOVED) + (REFERENCE,)
"""ZuCo's 105 rows in order: 104 HydroCel electrodes, then the reference (all zeros)."""
MONTAGE = "GSN-HydroCel-129"
GAP_S = 1.0
MAX_NAN_SHARE = 0.1
SKIP_REASONS = {
    "no_eeg": "sentences without EEG",
    "nan": f"sentences more than {MAX_NAN_SHARE:.0%} NaN",
    "words_no_fixation": "words without fixations",
}


def is_zuco_file(path: Path) -> bool:
    """Whether ``path`` is named like a ZuCo results file (``resultsZAB_SR.mat``)."""
    return FILE_PATTERN.match(Path(path).name) is not None


def subject_and_task(path: Path) -> tuple[str, str]:
    match = FILE_PATTERN.match(Path(path).name)
    if match is None:
        raise RecordingError(f"{path} is not named like a ZuCo file (results<SUBJECT>_<TASK>.mat).")
    return match["subject"], match["task"]


@dataclass
class ZucoSentence:
    """One ``sentenceData`` element as read: text, EEG (or None), words with onsets (s or None)."""

    text: str
    data: np.ndarray | None
    """``(105, T)`` float, or None when the file holds no EEG for it."""
    n_samples: int
    words: list[tuple[str, float | None]] = field(default_factory=list)


@dataclass
class ZucoFile:
    """A ZuCo file read as a recording."""

    raw: mne.io.RawArray
    subject: str
    task: str
    n_sentences: int
    """Sentences in the file, skipped ones included."""
    skipped: dict[str, int]


# -- v5 (scipy) ---------------------------------------------------------------------------------

def _as_list(value: Any) -> list:
    """A squeezed MATLAB struct array or cell as a list (one element, or none for ``[]``)."""
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return list(value.ravel()) if value.dtype == object else ([] if value.size == 0 else [value])
    return [value]


def _numbers(value: Any) -> np.ndarray:
    """A MATLAB numeric (scalar, vector or ``[]``) as a flat float array."""
    if value is None:
        return np.zeros(0)
    try:
        return np.asarray(value, dtype=float).ravel()
    except (TypeError, ValueError):
        return np.zeros(0)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "US":
        return "".join(str(v) for v in value.ravel())
    return ""


def _onset_s(fix_positions: np.ndarray, durations_ms: np.ndarray) -> float | None:
    """Seconds from the sentence's first sample to the word's first fixation (see the module doc)."""
    if fix_positions.size == 0:
        return None
    first = int(np.nanmin(fix_positions)) - 1  # MATLAB indices start at 1
    if not 0 <= first < len(durations_ms):
        return None
    return float(np.nansum(durations_ms[:first])) / 1000.0


def _v5_sentences(path: Path, signal: bool) -> Iterator[ZucoSentence]:
    mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False, variable_names=["sentenceData"])
    if "sentenceData" not in mat:
        raise RecordingError(f"{path} holds no sentenceData; a ZuCo results file has one.")
    for sentence in _as_list(mat["sentenceData"]):
        raw = getattr(sentence, "rawData", None)
        data = np.asarray(raw, dtype=float) if isinstance(raw, np.ndarray) and raw.ndim == 2 and raw.size else None
        fixations = getattr(sentence, "allFixations", None)
        durations = _numbers(getattr(fixations, "duration", None))
        words = [(_text(getattr(w, "content", "")),
                  _onset_s(_numbers(getattr(w, "fixPositions", None)) if _numbers(getattr(w, "nFixations", None)).size
                           else np.zeros(0), durations))
                 for w in _as_list(getattr(sentence, "word", None)) if hasattr(w, "content")]
        text = _text(getattr(sentence, "content", ""))
        # Drop what was read (per-word EEG cut-outs and features included) as we go, so the
        # recording being built does not sit on top of the whole parsed file.
        vars(sentence).clear()
        yield ZucoSentence(text=text, data=data if signal else None,
                           n_samples=0 if data is None else data.shape[1], words=words)


# -- v7.3 (h5py) --------------------------------------------------------------------------------

def _h5_empty(obj: h5py.HLObject) -> bool:
    return isinstance(obj, h5py.Dataset) and bool(obj.attrs.get("MATLAB_empty", 0))


def _h5_text(f: h5py.File, ref: h5py.Reference) -> str:
    obj = f[ref]
    if _h5_empty(obj):
        return ""
    return "".join(chr(int(c)) for c in np.asarray(obj[()]).ravel(order="F") if c)


def _h5_numbers(f: h5py.File, ref: h5py.Reference) -> np.ndarray:
    obj = f[ref]
    if not isinstance(obj, h5py.Dataset) or _h5_empty(obj) or obj.dtype.kind not in "fiu":
        return np.zeros(0)
    return np.asarray(obj[()], dtype=float).ravel()


def _h5_field(group: h5py.Group, name: str, i: int) -> h5py.Reference | None:
    """The reference to element ``i`` of struct-array field ``name`` (stored as an (N, 1) or (1, N)
    dataset of references), or None."""
    ds = group.get(name)
    if not isinstance(ds, h5py.Dataset) or ds.dtype != h5py.ref_dtype:
        return None
    refs = ds[()].ravel()
    return refs[i] if i < len(refs) and refs[i] else None


def _h5_sentences(path: Path, signal: bool) -> Iterator[ZucoSentence]:
    with h5py.File(path, "r") as f:
        group = f.get("sentenceData")
        if not isinstance(group, h5py.Group) or "content" not in group:
            raise RecordingError(f"{path} holds no sentenceData struct; a ZuCo results file has one.")
        for i in range(group["content"].size):
            text_ref = _h5_field(group, "content", i)
            text = _h5_text(f, text_ref) if text_ref is not None else ""
            data, n_samples = None, 0
            raw_ref = _h5_field(group, "rawData", i)
            if raw_ref is not None and isinstance(f[raw_ref], h5py.Dataset) and not _h5_empty(f[raw_ref]) \
                    and f[raw_ref].ndim == 2:
                n_samples = f[raw_ref].shape[0]  # v7.3 stores MATLAB's (105, T) transposed
                if signal:
                    data = np.asarray(f[raw_ref][()], dtype=float).T
            durations = np.zeros(0)
            fix_ref = _h5_field(group, "allFixations", i)
            if fix_ref is not None and isinstance(f[fix_ref], h5py.Group) and "duration" in f[fix_ref]:
                durations = np.asarray(f[fix_ref]["duration"][()], dtype=float).ravel()
            words = []
            word_ref = _h5_field(group, "word", i)
            if word_ref is not None and isinstance(f[word_ref], h5py.Group) and "content" in f[word_ref]:
                wg = f[word_ref]
                for j in range(wg["content"].size):
                    content = _h5_field(wg, "content", j)
                    n_fix = _h5_field(wg, "nFixations", j)
                    positions = _h5_field(wg, "fixPositions", j)
                    fixed = n_fix is not None and _h5_numbers(f, n_fix).size > 0
                    onset = _onset_s(_h5_numbers(f, positions), durations) if fixed and positions is not None else None
                    words.append((_h5_text(f, content) if content is not None else "", onset))
            yield ZucoSentence(text=text, data=data, n_samples=n_samples, words=words)


def iter_sentences(path: Path, signal: bool = True) -> Iterator[ZucoSentence]:
    """The file's sentences in order; v7.3 (HDF5) or v5 recognised by the file itself.

    With ``signal`` false the EEG is not read (``data`` is None; ``n_samples`` still says how
    long it is, for v7.3; v5 files are read whole either way: see :func:`count_sentences`).
    """
    try:
        hdf5 = h5py.is_hdf5(path)
        yield from (_h5_sentences(path, signal) if hdf5 else _v5_sentences(path, signal))
    except RecordingError:
        raise
    except Exception as exc:  # scipy and h5py raise many types for damaged files
        raise RecordingError(f"Cannot read ZuCo file {path}: {exc}") from exc


def count_sentences(path: Path) -> tuple[int, int | None]:
    """Sentences in the file and how many have no EEG, cheaply, for the submission check: a v7.3
    file's datasets have shapes without being read; a v5 file would have to be parsed whole
    (real ZuCo 1.0 files hold thousands of per-fixation arrays), so only its ``sentenceData``
    header is read (``scipy.io.whosmat``) and the second count is None."""
    try:
        if h5py.is_hdf5(path):
            with h5py.File(path, "r") as f:
                group = f.get("sentenceData")
                if not isinstance(group, h5py.Group) or "content" not in group:
                    raise RecordingError(f"{path} holds no sentenceData struct; a ZuCo results file has one.")
                n = group["content"].size
                shapes = [f[ref].shape for ref in (_h5_field(group, "rawData", i) for i in range(n))
                          if ref is not None and not _h5_empty(f[ref]) and f[ref].ndim == 2]
                wrong = {shape[1] for shape in shapes} - {len(CHANNELS)}
                if wrong:
                    raise RecordingError(f"{path}: rawData has {min(wrong)} EEG rows; ZuCo files have {len(CHANNELS)}.")
                return n, n - len(shapes)
        shapes = dict((name, shape) for name, shape, _ in scipy.io.whosmat(path))
    except RecordingError:
        raise
    except Exception as exc:  # scipy and h5py raise many types for damaged files
        raise RecordingError(f"Cannot read ZuCo file {path}: {exc}") from exc
    if "sentenceData" not in shapes:
        raise RecordingError(f"{path} holds no sentenceData; a ZuCo results file has one.")
    return int(np.prod(shapes["sentenceData"])), None


# -- one file -> one recording ---------------------------------------------------------------------

def _fill_nan(data: np.ndarray) -> np.ndarray:
    """Linear interpolation over each channel's NaN samples (ends: the nearest good sample)."""
    t = np.arange(data.shape[1])
    for row in data:
        bad = ~np.isfinite(row)
        if bad.any() and not bad.all():
            row[bad] = np.interp(t[bad], t[~bad], row[~bad])
        elif bad.all():
            row[:] = 0.0
    return data


def read_zuco(path: Path, signal: bool = True) -> ZucoFile:
    """One ZuCo file as a recording (see the module doc).

    With ``signal`` false (the submission check) no EEG is read (:func:`count_sentences`); the
    recording then has one sample, no annotations and no skip counts.

    Raises
    ------
    RecordingError
        The file cannot be read, or its EEG rows are not ZuCo's 105.
    """
    path = Path(path)
    subject, task = subject_and_task(path)
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    pieces, onsets, durations, descriptions = [], [], [], []
    cursor, n_sentences, gap = 0, 0, int(GAP_S * SFREQ)
    if not signal:
        n_sentences, _ = count_sentences(path)
    for sentence in iter_sentences(path) if signal else ():
        n_sentences += 1
        rows = sentence.data.shape[0] if sentence.data is not None else None
        if rows is not None and rows != len(CHANNELS):
            raise RecordingError(f"{path}: sentence {n_sentences} has {rows} EEG rows; ZuCo files have "
                                 f"{len(CHANNELS)} (the HydroCel 128 net less {len(REMOVED)}, plus the reference).")
        data = sentence.data
        if data is None or data.shape[1] == 0 or not np.isfinite(data).any():
            skipped["no_eeg"] += 1
            continue
        if (~np.isfinite(data)).any(axis=0).mean() > MAX_NAN_SHARE:
            skipped["nan"] += 1
            continue
        data = _fill_nan(data)
        data -= data.mean(axis=1, keepdims=True)
        n = data.shape[1]
        onsets.append(cursor / SFREQ), durations.append(n / SFREQ), descriptions.append(f"sentence:{sentence.text}")
        for text, onset in sentence.words:
            if onset is None or not 0 <= onset < n / SFREQ:
                skipped["words_no_fixation"] += 1
                continue
            onsets.append(cursor / SFREQ + onset), durations.append(0.0), descriptions.append(f"word:{text}")
        pieces.append((cursor, data.astype(np.float32)))  # half the bytes until the copy below
        cursor += n + gap
    if signal and not pieces:
        raise RecordingError(f"{path}: none of its {n_sentences} sentences has usable EEG ("
                             + ", ".join(f"{n} {SKIP_REASONS[k]}" for k, n in skipped.items() if n) + ").")
    total = max(cursor, 1)
    signal_v = np.zeros((len(CHANNELS), total))
    for start, data in pieces:
        signal_v[:, start:start + data.shape[1]] = data * 1e-6  # ZuCo stores microvolts; MNE volts
    del pieces
    info = mne.create_info(list(CHANNELS), SFREQ, ch_types="eeg")
    # The reference row is all zeros (the signal was recorded against it): no information, and
    # a zero spread would break the robust scaling. Any other all-zero row is marked bad too.
    zero = ~signal_v.any(axis=1) if signal else np.array([ch == REFERENCE for ch in CHANNELS])
    info["bads"] = [ch for ch, z in zip(CHANNELS, zero) if z or ch == REFERENCE]
    raw = mne.io.RawArray(signal_v, info, verbose="error")
    raw.set_montage(mne.channels.make_standard_montage(MONTAGE), on_missing="ignore", verbose="error")
    raw.set_annotations(mne.Annotations(onsets, durations, descriptions))
    return ZucoFile(raw=raw, subject=subject, task=task, n_sentences=n_sentences, skipped=skipped)


def describe_folder(paths: list[Path]) -> dict:
    """What a check of ZuCo files says: subjects, tasks, sentences, and how many of them have no
    EEG (counted in v7.3 files; ``null`` when v5 files, which are not parsed here, are among them)."""
    subjects, tasks, sentences, without = set(), set(), 0, 0
    for path in paths:
        subject, task = subject_and_task(path)
        subjects.add(subject), tasks.add(task)
        n, n_without = count_sentences(path)
        sentences += n
        without = None if without is None or n_without is None else without + n_without
    return {"layout": "zuco", "subjects": sorted(subjects), "tasks": sorted(tasks), "sentences": sentences,
            "sentences_without_eeg": without}
