"""Read EEG recordings with MNE, preprocess them and map them onto the encoder's channels.

A dataset path is a recording file, a folder of recordings (searched recursively), a BIDS root
(``dataset_description.json``: enumerated by mne-bids, :mod:`trainer.data.bids`), or
``synthetic`` / ``synthetic:null`` (generated on first use). Every recording goes through the
same steps:

1. ``mne.io.read_raw(path, preload=False)`` (a BIDS recording: ``mne_bids.read_raw_bids``, which
   applies its sidecars: bad channels, electrode positions); a file that cannot be read fails
   with its name;
2. EEG channels only (channels marked bad in the file are left out), average reference, notch
   at the power-line frequency and its harmonics (``info["line_freq"]``, 50 Hz when the file
   does not say) where they lie below the file's Nyquist frequency, band-pass 0.5-45 Hz (upper
   edge lowered to fit the sampling rate), polyphase resampling to the encoder's rate;
3. microvolts, then each channel scaled by a robust z-score (median / IQR) so that recordings
   from different amplifiers share one input scale;
4. channels mapped onto the encoder's set by name (case-insensitive, "EEG Fz-REF" style
   decorations ignored): missing ones are zero-filled and masked, extra ones dropped; or, when
   the names do not match but the electrodes have positions, by position
   (:mod:`trainer.data.channel_map`: spline weights computed once, applied to every chunk).

ZuCo's ``results<SUBJECT>_<TASK>.mat`` files (MATLAB v5 or v7.3) are read by
:mod:`trainer.data.zuco` into an in-memory ``RawArray`` (one subject's file at a time) with
the GSN-HydroCel montage and sentence and word annotations, then take the same path.

A dataset is preprocessed one recording at a time, and each recording a chunk at a time
(:func:`preprocess_recording`: padded chunks, so the result equals whole-recording processing),
straight into an on-disk cache (``<cache>/preprocessed/``: one memory-mapped float32 ``.npy``
per recording plus a JSON sidecar), keyed by the file's path, size and modification time and by
the encoder's channels and rate. Training then reads the cache through memory maps, and
:class:`WindowArray` cuts windows only when a batch asks for them, so neither a dataset nor a
single recording larger than RAM needs more than bounded memory: the operating system pages
signal in and out as needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Callable

import mne
import numpy as np
from scipy.signal import resample_poly

from trainer.config import EncoderConfig
from trainer.data import bids, zuco
from trainer.data.channel_map import ChannelMap, plan_channels
from trainer.data.synthetic import ensure_synthetic_dataset
from trainer.data.text import Sentence, Word, read_annotations
from trainer.exceptions import ChannelError, DatasetError, RecordingError
from trainer.protocol import SYNTHETIC_DATASETS

log = logging.getLogger(__name__)

EXTENSIONS = (".fif", ".edf", ".bdf", ".vhdr", ".set")
# Each built-in dataset's name and the folder it is generated in.
SYNTHETIC_VARIANTS = {name: name.replace(":", "-") for name in SYNTHETIC_DATASETS}
SYNTHETIC_SEED = 0  # fixed, so Stage 1 and Stage 2 jobs with different training seeds share data
L_FREQ, H_FREQ = 0.5, 45.0
DEFAULT_LINE_FREQ = 50.0  # Hz; most of the world. A file that records 60 Hz says so in line_freq.


@dataclass
class Recording:
    """One preprocessed recording on the encoder's channel grid."""

    path: Path
    data: np.ndarray
    """Signals, shape ``(n_encoder_channels, n_samples)``, float32, robust z-scored microvolts;
    a read-only memory map when the recording comes from the preprocessing cache."""
    present: np.ndarray
    """Boolean mask, shape ``(n_encoder_channels,)``: channel found in the recording."""
    sfreq: float
    notes: dict = field(default_factory=dict)
    """How it was read: ``channels`` (encoder channel -> how it was obtained), ``mapping``
    (one line), ``skipped`` (ZuCo sentences and words left out, by reason)."""
    sentences: list[Sentence] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    subject: str | None = None
    """The subject label (a BIDS ``sub-`` entity, or ZuCo's file name); ``None`` when unknown."""


def resolve_dataset(dataset: str, root: Path, encoder: EncoderConfig) -> list[Path]:
    """Recording files of a job's ``dataset`` value.

    Parameters
    ----------
    dataset : str
        A path, ``'synthetic'`` or ``'synthetic:null'``.
    root : Path
        Where generated datasets are cached (``cache_dir`` or the job dir).
    encoder : EncoderConfig
        Gives the channel set a synthetic dataset is generated with.

    Returns
    -------
    list of Path
        Recording files, sorted.
    """
    if dataset in SYNTHETIC_VARIANTS:
        dataset = str(ensure_synthetic_dataset(root, SYNTHETIC_VARIANTS[dataset], SYNTHETIC_SEED, encoder.channels))
    elif dataset.startswith("synthetic"):
        raise DatasetError(f"Invalid dataset {dataset!r}; expected a path or one of "
                           f"{', '.join(repr(v) for v in SYNTHETIC_VARIANTS)}.")
    path = Path(dataset).expanduser()
    if not path.exists():
        raise DatasetError(f"Dataset path {path} does not exist.")
    if path.is_file():
        return [path]
    if bids.is_bids_root(path):
        return bids.find_recordings(path, EXTENSIONS)
    found = sorted(p for p in path.rglob("*") if (p.suffix.lower() in EXTENSIONS or zuco.is_zuco_file(p))
                   and p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not found:
        raise DatasetError(f"No recordings ({', '.join(EXTENSIONS)}, or ZuCo's results<SUBJECT>_<TASK>.mat) "
                           f"found under {path}.")
    return found


def subject_label(path: Path) -> str | None:
    """The subject a recording file belongs to, for held-out-subject splits and the check: a
    ZuCo file's ``results<SUBJECT>_<TASK>.mat``, the ``sub-<label>`` of a file named the BIDS way
    (what mne-bids parses), else ``None``. The one place a reader of another layout adds its
    labels, so the trainer and the check agree."""
    if zuco.is_zuco_file(path):
        return zuco.subject_and_task(path)[0]
    return bids.subject_of(path)


# Preprocessing runs in chunks of the recording so that a recording larger than RAM can be
# cached: only a chunk (plus its padding) and a bounded sample for the scaling statistics are
# ever in memory; the output goes straight into its (memory-mapped) destination.
CHUNK_BYTES = 8 * 2**20
"""Float64 bytes of input signal read per chunk (all EEG channels), before padding."""
PAD_S = 10.0
"""Seconds of real signal read on each side of a chunk and discarded after filtering. The notch
and band-pass are zero-phase FIR filters of at most 6.6 s each (MNE's automatic length for the
0.5 Hz transition bands: 3.3 s each side), applied one after the other (3.3 + 3.3 s of reach),
and the polyphase resampler reaches a few samples; 10 s covers all three, so every kept sample
is computed from exactly the input the whole-recording computation would use."""
MAX_SCALE_SAMPLES = 250_000
"""Most samples per channel the robust z-score's median and IQR are taken from: every k-th
output sample, k chosen from the length. Below this many samples (33 min at 128 Hz) they are
exact; above, the standard error of either is ~0.3% of a channel's spread."""


@dataclass
class Opened:
    """A recording opened by :func:`open_recording`: header (or, for ZuCo, the signal) and mapping."""

    raw: mne.io.BaseRaw
    eeg_names: list[str]
    """Its EEG channels, bad ones left out: the rows :meth:`_Plan.process` returns."""
    channel_map: ChannelMap
    subject: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    """ZuCo: sentences and words left out, by reason (see :mod:`trainer.data.zuco`)."""

    @property
    def notes(self) -> dict:
        return {"mapping": self.channel_map.summary(), "channels": self.channel_map.describe(),
                "skipped": dict(self.skipped)}


@dataclass
class _Plan:
    """How one recording is read, filtered and resampled (see :func:`preprocess_recording`)."""

    opened: Opened
    harmonics: np.ndarray
    h_freq: float
    up: int
    down: int
    n_out: int

    @property
    def raw(self) -> mne.io.BaseRaw:
        return self.opened.raw

    @cached_property
    def referenced(self) -> np.ndarray:
        return self.opened.channel_map.referenced()

    def process(self, start: int, stop: int) -> np.ndarray:
        """Preprocessed output samples for input samples ``[start, stop)``, µV: the encoder's
        filled rows (:attr:`ChannelMap.rows`), in order."""
        sfreq = self.raw.info["sfreq"]
        # Average reference over all EEG channels present, then the channel map (by name or
        # position): both linear, folded into one matrix, so only the encoder's rows are filtered.
        x = self.referenced @ self.raw.get_data(picks=self.opened.eeg_names, start=start, stop=stop)
        # Line noise is often far stronger than EEG; the low-pass's transition band would let
        # part of it through, so it is notched out first (harmonics too, for high-rate files).
        if len(self.harmonics):
            x = mne.filter.notch_filter(x, sfreq, self.harmonics, verbose="error")
        x = mne.filter.filter_data(x, sfreq, L_FREQ, self.h_freq, verbose="error")
        if (self.up, self.down) != (1, 1):
            # Polyphase resampling has a finite filter, so a chunk padded by PAD_S gives the
            # same samples as the whole recording would (the FFT method depends on all of it).
            x = resample_poly(x, self.up, self.down, axis=1)
        return (x * 1e6).astype(np.float32)


def _read_raw(path: Path, header_only: bool) -> tuple[mne.io.BaseRaw, str | None, dict[str, int]]:
    """The unloaded MNE recording, or a ZuCo file's signal; with its subject and skip counts."""
    if zuco.is_zuco_file(path):
        read = zuco.read_zuco(path, signal=not header_only)  # raises RecordingError naming the file
        return read.raw, read.subject, read.skipped
    if bids.bids_root_of(path) is not None:  # mne-bids applies the sidecars: bad channels, positions
        return bids.read_raw(path), subject_label(path), {}
    try:
        return mne.io.read_raw(path, preload=False, verbose="error"), subject_label(path), {}
    except Exception as exc:  # MNE raises many types for broken files; all mean "unreadable"
        raise RecordingError(f"Cannot read {path}: {exc}") from exc


def open_recording(path: Path, encoder: EncoderConfig, min_channel_share: float = 0.5,
                   header_only: bool = False) -> Opened:
    """Open a recording's header (no signal is read) and map its EEG channels onto the encoder's.

    The one place that decides whether a recording can be trained on: the trainer calls it
    before preprocessing, and ``python -m trainer.check_dataset`` before a job is queued. A ZuCo
    file has no header to read alone: it is read whole (one subject's file), or with
    ``header_only`` only its structure, not its EEG.

    Channels are mapped by name when enough names match, else by electrode position when the
    recording's montage gives every EEG channel one (:func:`trainer.data.channel_map.plan_channels`).

    Raises
    ------
    RecordingError
        The file cannot be read.
    ChannelError
        Fewer than ``min_channel_share`` of the encoder's channels are obtained; the message
        names the channels found and the ones needed.
    """
    raw, subject, skipped = _read_raw(path, header_only)
    eeg_names = [raw.ch_names[i] for i in mne.pick_types(raw.info, eeg=True, exclude="bads")]
    needed = int(np.ceil(min_channel_share * len(encoder.channels)))
    try:
        cmap = plan_channels(raw.info, eeg_names, encoder.channels, needed)
    except Exception as exc:  # MNE's interpolation refuses degenerate positions (all in one point...)
        raise ChannelError(f"Recording {path}: its {len(eeg_names)} EEG channels cannot be mapped onto the encoder's "
                           f"by position: {exc}") from exc
    if cmap.n_found < needed:
        wanted = f"at least {needed} are needed ({', '.join(encoder.channels)})"
        if not eeg_names:
            others = ", ".join(f"{name} ({kind})" for name, kind in zip(raw.ch_names[:40], raw.get_channel_types()))
            raise ChannelError(f"Recording {path} has no EEG channels (found: {others or 'none'}); of the encoder's "
                               f"{len(encoder.channels)} channels {wanted}.")
        by = " by electrode position" if cmap.method == "position" else ""
        why = "" if cmap.method == "position" else " (matched by name: they have no positions to map by)"
        raise ChannelError(f"Recording {path} has {cmap.n_found} of the encoder's {len(encoder.channels)} channels{by}; "
                           f"{wanted}; its EEG channels: {', '.join(eeg_names[:40])}{why}.")
    return Opened(raw=raw, eeg_names=eeg_names, channel_map=cmap, subject=subject, skipped=skipped)


def _plan(path: Path, encoder: EncoderConfig, min_channel_share: float) -> _Plan:
    opened = open_recording(path, encoder, min_channel_share)
    raw, cmap = opened.raw, opened.channel_map
    missing = [ch for ch, ok in zip(encoder.channels, cmap.present) if not ok]
    if missing:
        log.info("%s: %d channels missing, zero-filled and masked: %s", path.name, len(missing), ", ".join(missing))
    if cmap.extras:
        log.info("%s: %d extra channels dropped: %s", path.name, len(cmap.extras), ", ".join(cmap.extras))
    if cmap.method == "position":
        log.info("%s: %s", path.name, cmap.summary())

    sfreq = float(raw.info["sfreq"])
    line = float(raw.info.get("line_freq") or DEFAULT_LINE_FREQ)
    ratio = Fraction(encoder.sfreq).limit_denominator(10**6) / Fraction(sfreq).limit_denominator(10**6)
    up, down = ratio.numerator, ratio.denominator
    return _Plan(opened=opened, harmonics=np.arange(line, sfreq / 2 - 1.0, line),
                 h_freq=min(H_FREQ, 0.9 * min(sfreq, encoder.sfreq) / 2), up=up, down=down,
                 n_out=int(-(-int(raw.n_times) * up // down)))


def _zeros(shape: tuple[int, int]) -> np.ndarray:
    return np.zeros(shape, np.float32)


def preprocess_recording(path: Path, encoder: EncoderConfig, allocate: Callable[[tuple[int, int]], np.ndarray] = _zeros,
                         min_channel_share: float = 0.5, chunk_s: float | None = None) -> Recording:
    """Read, preprocess and channel-map one recording, a chunk at a time.

    The input is read in chunks of about ``chunk_s`` seconds, each with :data:`PAD_S` of real
    signal on both sides; each padded chunk is referenced, filtered and resampled, and only its
    middle is written to the output. Every filter has a finite reach shorter than the padding,
    so the result equals processing the whole recording at once (to float rounding; a test
    checks it). A second pass over the output applies the robust z-score, from statistics of a
    bounded sample (:data:`MAX_SCALE_SAMPLES`). Peak memory is thus a chunk, not the recording.

    Parameters
    ----------
    path : Path
        A file ``mne.io.read_raw`` can read.
    encoder : EncoderConfig
        Target channels and sampling rate.
    allocate : callable
        ``allocate((n_channels, n_samples))`` returns the zeroed float32 array the signal is
        written into: ``np.zeros`` for RAM, a ``np.lib.format.open_memmap`` for the disk cache.
    min_channel_share : float
        Smallest share of the encoder's channels the recording must have.
    chunk_s : float, optional
        Input seconds per chunk; by default as many as :data:`CHUNK_BYTES` holds.

    Returns
    -------
    Recording
        With ``data`` the array ``allocate`` returned, filled.

    Raises
    ------
    RecordingError
        The file cannot be read or preprocessed.
    ChannelError
        Too few of the encoder's channels are present.
    """
    plan = _plan(path, encoder, min_channel_share)
    raw, up, down, cmap = plan.raw, plan.up, plan.down, plan.opened.channel_map
    sfreq, n_in = float(raw.info["sfreq"]), int(raw.n_times)
    if chunk_s is None:
        chunk_s = CHUNK_BYTES / (8 * len(plan.opened.eeg_names) * sfreq)
    # Chunk edges and padding are whole multiples of `down` input samples, so each chunk's
    # first output sample falls on the output grid of the whole recording.
    chunk = max(1, round(chunk_s * sfreq / down)) * down
    pad = -(-int(PAD_S * sfreq) // down) * down
    rows = cmap.rows
    data = allocate((len(encoder.channels), plan.n_out))
    stride = -(-plan.n_out // MAX_SCALE_SAMPLES)
    # Every stride-th output sample of each present channel, for the scaling statistics.
    sample = np.empty((len(rows), -(-plan.n_out // stride)), np.float32)
    try:
        for start in range(0, n_in, chunk):
            stop = min(start + chunk, n_in)
            first, last = max(0, start - pad), min(n_in, stop + pad)
            out = plan.process(first, last)
            skip = (start - first) * up // down
            o0 = start * up // down
            o1 = plan.n_out if stop == n_in else stop * up // down
            core = out[:, skip:skip + o1 - o0]
            data[rows, o0:o1] = core
            first_kept = -(-o0 // stride)
            picked = core[:, first_kept * stride - o0::stride]
            sample[:, first_kept:first_kept + picked.shape[1]] = picked
            del picked
            del out, core
    except Exception as exc:
        raise RecordingError(f"Cannot preprocess {path}: {exc}") from exc

    # Robust z-score (median / IQR) per channel, so that recordings from different amplifiers
    # share one input scale; applied in place, a chunk of the output at a time.
    present = np.zeros(len(encoder.channels), dtype=bool)
    out_chunk = max(1, chunk * up // down)
    for k, row in enumerate(rows):
        median = np.median(sample[k])
        iqr = np.subtract(*np.percentile(sample[k], [75, 25]))
        scale = iqr / 1.349 if iqr > 0 else 1.0  # IQR/1.349 ~ std
        for o in range(0, plan.n_out, out_chunk):
            data[row, o:o + out_chunk] = (data[row, o:o + out_chunk] - median) / scale
        present[row] = True
    sentences, words = read_annotations(raw, path)
    return Recording(path=path, data=data, present=present, sfreq=encoder.sfreq, notes=plan.opened.notes,
                     sentences=sentences, words=words, subject=plan.opened.subject)


def load_recording(path: Path, encoder: EncoderConfig, min_channel_share: float = 0.5) -> Recording:
    """:func:`preprocess_recording` into RAM (tests and small files; training uses the cache)."""
    return preprocess_recording(path, encoder, _zeros, min_channel_share)


PREPROCESS_VERSION = 4  # bump when preprocessing's output changes, so old caches are rebuilt


def _cache_key(path: Path, encoder: EncoderConfig) -> str:
    stat = path.stat()
    ident = [str(path.resolve()), stat.st_size, stat.st_mtime_ns, list(encoder.channels), encoder.sfreq,
             L_FREQ, H_FREQ, PREPROCESS_VERSION]
    if bids.bids_root_of(path) is not None:  # its sidecars (bad channels, positions) shape the output too
        ident.append(bids.sidecar_stamps(path))
    return hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:20]


def load_recording_cached(path: Path, encoder: EncoderConfig, cache: Path) -> Recording:
    """:func:`preprocess_recording` through the on-disk cache; the signal comes back memory-mapped.

    The first call preprocesses the file, a chunk at a time, straight into a memory-mapped
    ``.npy`` under a temporary name, then writes ``<key>.json`` the same way and moves both
    into place with ``os.replace`` (the JSON last, so its presence means the pair is complete);
    later calls, from this job or another, only map the file.
    """
    key = _cache_key(path, encoder)
    data_path, meta_path = cache / f"{key}.npy", cache / f"{key}.json"
    if not meta_path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".tmp-{key}-{os.getpid()}.npy"
        rec = preprocess_recording(
            path, encoder, lambda shape: np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape))
        rec.data.flush()
        rec.data = None  # unmap before the rename (needed on Windows)
        os.replace(tmp, data_path)
        meta = {"path": str(path), "present": rec.present.tolist(), "sfreq": rec.sfreq,
                "sentences": [[x.onset_s, x.duration_s, x.text] for x in rec.sentences],
                "words": [[w.onset_s, w.text] for w in rec.words], "subject": rec.subject, "notes": rec.notes}
        tmp_meta = cache / f".tmp-{key}-{os.getpid()}.json"
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, meta_path)
    meta = json.loads(meta_path.read_text())
    return Recording(path=path, data=np.load(data_path, mmap_mode="r"), present=np.asarray(meta["present"], bool),
                     sfreq=meta["sfreq"], sentences=[Sentence(*x) for x in meta["sentences"]],
                     words=[Word(*w) for w in meta["words"]], subject=meta.get("subject"),
                     notes=meta.get("notes", {}))


def reading_report(rec: Recording) -> tuple[str, dict] | None:
    """The job event that says how a recording was read, when there is more to say than "all
    channels by name": channels by position or missing, ZuCo sentences or words skipped."""
    notes = rec.notes or {}
    channels, skipped = notes.get("channels", {}), {k: v for k, v in notes.get("skipped", {}).items() if v}
    if all(how.startswith("by name") for how in channels.values()) and not skipped:
        return None
    who = f" (subject {rec.subject})" if rec.subject else ""
    message = f"{rec.path.name}{who}: {notes.get('mapping', '')}; {len(rec.sentences)} sentences, {len(rec.words)} words"
    if skipped:
        message += "; skipped " + ", ".join(f"{n} {zuco.SKIP_REASONS.get(k, k)}" for k, n in skipped.items())
    return message, {"recording": str(rec.path), "subject": rec.subject, "channels": channels, "skipped": skipped}


def load_dataset(dataset: str, root: Path, encoder: EncoderConfig,
                 report: Callable[[str, dict], None] | None = None) -> list[Recording]:
    """All recordings of a dataset, preprocessed (see :func:`load_recording`) and cached on disk
    under ``<root>/preprocessed/``, one at a time, so only one recording is ever in RAM whole.

    ``report(message, metrics)`` is called for each recording :func:`reading_report` has
    something to say about (the trainer sends it as a ``log`` event)."""
    cache = root / "preprocessed"
    recordings = []
    for path in resolve_dataset(dataset, root, encoder):
        recordings.append(load_recording_cached(path, encoder, cache))
        said = reading_report(recordings[-1])
        if said is not None:
            log.info("%s", said[0])
            if report is not None:
                report(*said)
    total_s = sum(r.data.shape[1] for r in recordings) / encoder.sfreq
    log.info("dataset %s: %d recordings, %.0f s, %d sentences", dataset, len(recordings), total_s,
             sum(len(r.sentences) for r in recordings))
    return recordings


def cut(recording: Recording, start: int, length: int) -> np.ndarray:
    """``length`` samples from ``start``, zero-padded past the end of the recording."""
    out = np.zeros((recording.data.shape[0], length), dtype=np.float32)
    piece = recording.data[:, max(start, 0):start + length]
    out[:, :piece.shape[1]] = piece
    return out


class WindowArray:
    """Fixed-length windows of recordings, cut only when indexed.

    Indexing with an integer array or a slice returns a new ``(n, C, T)`` float32 array; the
    windows themselves stay in the (memory-mapped) recordings, so holding a ``WindowArray`` of
    a dataset of any size costs a few bytes per window.

    Parameters
    ----------
    recordings : list of Recording
        Sources of the signal.
    starts : ndarray
        ``(n, 2)`` int64 rows of (recording index, first sample).
    length : int
        Samples per window.
    """

    def __init__(self, recordings: list[Recording], starts: np.ndarray, length: int) -> None:
        self.recordings, self.starts, self.length = recordings, starts.reshape(-1, 2), length
        self.n_channels = recordings[0].data.shape[0] if recordings else 0

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), self.n_channels, self.length)

    def __getitem__(self, index: slice | np.ndarray | list[int]) -> np.ndarray:
        rows = self.starts[index]
        out = np.empty((len(rows), self.n_channels, self.length), dtype=np.float32)
        for i, (rec, start) in enumerate(rows):
            out[i] = self.recordings[rec].data[:, start:start + self.length]
        return out


def windows(recordings: list[Recording], encoder: EncoderConfig, val_share: float = 0.1
            ) -> tuple[tuple[WindowArray, np.ndarray], tuple[WindowArray, np.ndarray]]:
    """Non-overlapping ``window_s`` windows for Stage 1, split into train and validation.

    The last ``val_share`` of each recording's windows (in time) is held out, so validation
    windows never overlap training ones.

    Returns
    -------
    (train_x, train_mask), (val_x, val_mask)
        ``x`` is a :class:`WindowArray` of shape ``(n, channels, window_samples)`` (windows are
        cut when indexed), ``mask`` an ``(n, channels)`` boolean array.
    """
    length = encoder.window_samples
    train, val = [], []
    for r, rec in enumerate(recordings):
        n = rec.data.shape[1] // length
        n_val = int(round(n * val_share)) if n >= 2 else 0
        for k in range(n):
            (val if k >= n - n_val else train).append((r, k * length))
    if not train:
        raise DatasetError(f"Recordings are shorter than one {encoder.window_s:g} s window; nothing to train on.")

    def build(rows: list[tuple[int, int]]) -> tuple[WindowArray, np.ndarray]:
        starts = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
        masks = np.stack([recordings[r].present for r, _ in rows]) if rows else np.zeros((0, len(encoder.channels)), bool)
        return WindowArray(recordings, starts, length), masks

    return build(train), build(val)
