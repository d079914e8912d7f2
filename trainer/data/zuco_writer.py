"""Write ZuCo-layout ``results<SUBJECT>_<TASK>.mat`` files: MATLAB v5 (scipy) and v7.3 (h5py).

The layout is the one :mod:`trainer.data.zuco` reads (``docs/notes/zuco.md``): a
``sentenceData`` struct array with ``content``, ``rawData`` (105 x T at 500 Hz: the HydroCel
electrodes, then the all-zero reference row), ``allFixations`` (``x``, ``y``, ``duration``)
and ``word`` (``content``, ``nFixations``, ``fixPositions``). v7.3 files are written the way
MATLAB writes them: a 512-byte MAT header in the HDF5 user block, ``MATLAB_class`` attributes,
struct-array fields as datasets of object references into ``#refs#``, chars as ``uint16``,
arrays transposed, ``[]`` as a ``uint64`` shape vector marked ``MATLAB_empty``.

The EEG is the synthetic generator's (:func:`trainer.data.synthetic.generate_raw`: word-locked
responses, pink background, the null variant's decoys) on a 10-20 cap, carried onto the
HydroCel net by the same spherical-spline mapping that reads it back
(:func:`trainer.data.channel_map.interpolation_matrix`). Each subject reads the same sentences
with their own added background. Fixations follow the words: one before the first word, one
per word (lasting until the next word's onset), sometimes a regression to the first word.

The files carry the traps real ones do (deterministic, by sentence number, see
:func:`_traps`): short NaN stretches, a sentence over the NaN limit, a failed sentence (all-NaN
``rawData``), a missing recording (only ``content``), words with ``nFixations = []``.
"""

from __future__ import annotations

import time
from itertools import takewhile
from pathlib import Path
from typing import Any

import h5py
import mne
import numpy as np
import scipy.io

from trainer.config import CHANNELS_32
from trainer.data import zuco
from trainer.data.channel_map import interpolation_matrix
from trainer.data.synthetic import RESPONSE_S, WORD_S, _pink_noise, build_once, generate_raw

WRITER_VERSION = 1  # part of the generated dataset's folder name: bump when the output changes
LEAD_S = 0.1
"""Seconds of ``rawData`` before the first word (the fixation on the sentence start)."""
SUBJECT_NOISE_UV = 5.0
# The synthetic dataset: ZuCo 1.0's task 1 (v5) and ZuCo 2.0's task 1 (v7.3), two subjects
# each, each task its own sentences (as in ZuCo), every subject of a task the same ones.
LAYOUT = {"zuco1/task1- SR/Matlab files": ("SR", "5", ("ZAB", "ZDM")),
          "zuco2/task1 - NR/Matlab files": ("NR", "7.3", ("YAC", "YAG"))}
N_SENTENCES = 160
"""Sentences per task."""


# -- sentences --------------------------------------------------------------------------------------

def _traps(i: int, n: int) -> set[str]:
    """The traps sentence ``i`` of ``n`` carries."""
    traps = set()
    if n >= 10 and i == 4:
        traps.add("failed")       # amplitude threshold: all-NaN rawData
    if n >= 10 and i == 8:
        traps.add("missing")      # no recording: only content
    if n >= 14 and i == 12:
        traps.add("long_nan")     # 30% NaN: over the reader's limit
    if i % 6 == 2:
        traps.add("short_nan")    # 40 ms NaN in all channels, 100 ms in one
    if i % 7 == 3:
        traps.add("skipped_word")  # the second word never fixated: nFixations = []
    if i % 5 == 1:
        traps.add("regression")   # a last fixation back on the first word
    return traps


def sentence_records(raw: mne.io.BaseRaw, to_net: np.ndarray, rng: np.random.Generator,
                     first: int, n: int) -> list[dict]:
    """``sentenceData`` elements for sentences ``first .. first + n - 1`` of a generated recording.

    ``to_net`` is the ``(104, n_channels)`` 10-20 -> HydroCel spline matrix. Values are
    MATLAB-shaped: strings, ``(105, T)`` float32 ``rawData`` in microvolts, ``[]`` as ``None``.
    """
    sfreq = raw.info["sfreq"]
    # The subject's own background, on the 10-20 cap (cheaper than on the net; the spline
    # carries it over like the rest).
    signal = raw.get_data() * 1e6
    signal += SUBJECT_NOISE_UV / 10.0 * _pink_noise(rng, *signal.shape, sfreq)
    ann = raw.annotations
    sentences = [(o, d, str(t)[len("sentence:"):]) for o, d, t in zip(ann.onset, ann.duration, ann.description)
                 if str(t).startswith("sentence:")][first:first + n]
    words = [(o, str(t)[len("word:"):]) for o, t in zip(ann.onset, ann.description) if str(t).startswith("word:")]
    word_onsets = np.array([o for o, _ in words])
    records = []
    for i, (onset, duration, text) in enumerate(sentences):
        traps = _traps(i, n)
        if "missing" in traps:
            records.append({"content": text, "rawData": None, "word": [], "allFixations": None})
            continue
        start = int(round((onset - LEAD_S) * sfreq))
        stop = int(round((onset + duration + RESPONSE_S) * sfreq))
        eeg = to_net @ signal[:, start:stop]
        data = np.vstack([eeg, np.zeros((1, eeg.shape[1]))]).astype(np.float32)  # + the reference row
        if "failed" in traps:
            data[:] = np.nan
        if "long_nan" in traps:
            data[:, : int(0.3 * data.shape[1])] = np.nan
        if "short_nan" in traps:
            mid = data.shape[1] // 2
            data[:-1, mid:mid + int(0.04 * sfreq)] = np.nan
            data[3, mid // 2:mid // 2 + int(0.1 * sfreq)] = np.nan
        mine = list(takewhile(lambda w: w[0] < onset + duration, words[np.searchsorted(word_onsets, onset - 1e-6):]))
        # Fixation k lasts from its word's onset to the next fixation's; the first one is on the
        # sentence start, so each word's onset is the summed duration of the fixations before it.
        durations = [LEAD_S * 1000.0]
        fix_of: list[list[int]] = []
        for j, (o, _) in enumerate(mine):
            length = ((mine[j + 1][0] if j + 1 < len(mine) else o + WORD_S) - o) * 1000.0
            if "skipped_word" in traps and j == 1:
                durations[-1] += length  # the eye stays on the word before: no fixation here
                fix_of.append([])
            else:
                durations.append(length)
                fix_of.append([len(durations)])  # 1-based, as MATLAB
        if "regression" in traps and fix_of and fix_of[0]:
            durations.append(200.0)
            fix_of[0].append(len(durations))
        word_list = [{"content": t, "nFixations": float(len(f)) if f else None,
                      "fixPositions": np.asarray(f, float) if f else None} for (_, t), f in zip(mine, fix_of)]
        x = np.cumsum(np.r_[0.0, np.full(len(durations) - 1, 40.0)]) + 100.0
        records.append({"content": text, "rawData": data, "word": word_list,
                        "allFixations": {"x": x, "y": np.full(len(durations), 300.0),
                                         "duration": np.asarray(durations, float)}})
    return records


# -- v5 ---------------------------------------------------------------------------------------------

def _v5(value: Any) -> Any:
    """A record value as scipy.io.savemat writes it: None -> [] (a 0x0 double)."""
    if value is None:
        return np.zeros((0, 0))
    if isinstance(value, dict):
        return {k: _v5(v) for k, v in value.items()}
    if isinstance(value, list):
        if not value:
            return np.zeros((0, 0))
        keys = list(value[0])
        arr = np.empty((1, len(value)), dtype=[(k, object) for k in keys])
        for i, item in enumerate(value):
            for k in keys:
                arr[0, i][k] = _v5(item[k])
        return arr
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return value[None, :]  # MATLAB vectors are 1 x n
    return value


def write_v5(path: Path, sentences: list[dict]) -> None:
    """``sentenceData`` as a MATLAB v5 file (ZuCo 1.0's format)."""
    scipy.io.savemat(path, {"sentenceData": _v5(sentences)}, format="5", do_compression=False, oned_as="row")


# -- v7.3 -------------------------------------------------------------------------------------------

class _H5:
    """Writes MATLAB values into an HDF5 file the way MATLAB's v7.3 does."""

    def __init__(self, f: h5py.File) -> None:
        self.f, self.refs, self.n = f, f.create_group("#refs#"), 0

    def _new(self) -> str:
        self.n += 1
        return f"r{self.n}"

    def write(self, value: Any, parent: h5py.Group | None = None, name: str | None = None) -> h5py.HLObject:
        parent = self.refs if parent is None else parent
        name = name or self._new()
        if value is None or (isinstance(value, list) and not value):
            obj = parent.create_dataset(name, data=np.zeros(2, np.uint64))
            obj.attrs["MATLAB_class"] = np.bytes_("struct" if isinstance(value, list) else "double")
            obj.attrs["MATLAB_empty"] = np.uint8(1)
        elif isinstance(value, str):
            codes = np.array([ord(c) for c in value], np.uint16).reshape(-1, 1)
            obj = parent.create_dataset(name, data=codes)
            obj.attrs["MATLAB_class"] = np.bytes_("char")
            obj.attrs["MATLAB_int_decode"] = np.int32(2)
        elif isinstance(value, dict):  # a 1x1 struct: fields stored in place
            obj = parent.create_group(name)
            obj.attrs["MATLAB_class"] = np.bytes_("struct")
            for key, item in value.items():
                self.write(item, obj, key)
        elif isinstance(value, list):  # a 1xN struct array: each field a column of references
            obj = parent.create_group(name)
            obj.attrs["MATLAB_class"] = np.bytes_("struct")
            for key in value[0]:
                refs = [self.write(item[key]).ref for item in value]
                obj.create_dataset(key, data=np.array(refs, dtype=h5py.ref_dtype).reshape(-1, 1))
        else:
            arr = np.asarray(value)
            arr = arr.reshape(1, -1) if arr.ndim < 2 else arr
            obj = parent.create_dataset(name, data=arr.T)  # MATLAB is column-major
            obj.attrs["MATLAB_class"] = np.bytes_("single" if arr.dtype == np.float32 else "double")
        return obj


def _mat73_header() -> bytes:
    text = f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {time.strftime('%a %b %d %H:%M:%S %Y')} HDF5 schema 1.00 ."
    return text.encode().ljust(116)[:116] + b"\x00" * 8 + b"\x00\x02" + b"IM"


def write_v73(path: Path, sentences: list[dict]) -> None:
    """``sentenceData`` as a MATLAB v7.3 (HDF5) file (ZuCo 2.0's format)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        _H5(f).write(sentences, f, "sentenceData")
    with open(path, "r+b") as fh:  # MATLAB recognises its files by this header in the user block
        fh.write(_mat73_header())


WRITERS = {"5": write_v5, "7.3": write_v73}


# -- a generated dataset ------------------------------------------------------------------------------

def write_task(directory: Path, task: str, version: str, subjects: tuple[str, ...], seed: int, null: bool,
               n_sentences: int, first: int = 0) -> list[Path]:
    """``results<SUBJECT>_<task>.mat`` for each subject, all reading the same sentences.

    Sentences ``first .. first + n_sentences - 1`` of the generator's recording (seeded by
    ``seed``) are read; one subject's records are in memory at a time.
    """
    raw = generate_raw(CHANNELS_32, seed, null=null, n_sentences=first + n_sentences, sfreq=zuco.SFREQ)
    net = mne.channels.make_standard_montage(zuco.MONTAGE)
    pos = net.get_positions()
    names = [ch for ch in zuco.CHANNELS if ch != zuco.REFERENCE]
    goal = mne.channels.make_dig_montage(ch_pos={n: pos["ch_pos"][n] for n in names}, nasion=pos["nasion"],
                                         lpa=pos["lpa"], rpa=pos["rpa"], coord_frame=pos["coord_frame"])
    rows, to_net, _ = interpolation_matrix(raw.info, list(CHANNELS_32), goal)
    to_net = to_net[[rows.index(n) for n in names]]
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, subject in enumerate(subjects):
        records = sentence_records(raw, to_net, np.random.default_rng([seed, 100 + k]), first, n_sentences)
        path = directory / f"results{subject}_{task}.mat"
        WRITERS[version](path, records)
        del records
        paths.append(path)
    return paths


def ensure_zuco_dataset(root: Path, variant: str, seed: int, n_sentences: int = N_SENTENCES) -> Path:
    """The ``synthetic:zuco`` folder (``variant`` 'synthetic-zuco' or 'synthetic-zuco-null'),
    generated on first use (:func:`trainer.data.synthetic.build_once`): :data:`LAYOUT`'s two tasks,
    v5 and v7.3."""
    name = f"{variant}-v{WRITER_VERSION}-{seed}" + (f"-{n_sentences}" if n_sentences != N_SENTENCES else "")

    def build(tmp: Path) -> dict:
        files = []
        for t, (folder, (task, version, subjects)) in enumerate(LAYOUT.items()):
            written = write_task(tmp / folder, task, version, subjects, seed, variant.endswith("null"), n_sentences,
                                 first=t * n_sentences)
            files += [str(p.relative_to(tmp)) for p in written]
        return {"variant": variant, "seed": seed, "sentences_per_task": n_sentences, "files": files}

    return build_once(root / "datasets" / name, build)
