"""Read EEG recordings with MNE, preprocess them and map them onto the encoder's channels.

A dataset path is a recording file, a folder of recordings or a BIDS folder (searched
recursively), or ``synthetic`` / ``synthetic:null`` (generated on first use). Every recording
goes through the same steps:

1. ``mne.io.read_raw(path, preload=False)``; a file MNE cannot read fails with its name;
2. EEG channels only (channels marked bad in the file are left out), average reference, notch
   at the power-line frequency and its harmonics (``info["line_freq"]``, 50 Hz when the file
   does not say) where they lie below the file's Nyquist frequency, band-pass 0.5-45 Hz (upper
   edge lowered to fit the sampling rate), resample to the encoder's rate;
3. microvolts, then each channel scaled by a robust z-score (median / IQR) so that recordings
   from different amplifiers share one input scale;
4. channels mapped onto the encoder's set by name (case-insensitive, "EEG Fz-REF" style
   decorations ignored): missing ones are zero-filled and masked, extra ones dropped.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import mne
import numpy as np

from trainer.config import EncoderConfig
from trainer.data.synthetic import ensure_synthetic_dataset
from trainer.data.text import Sentence, Word, read_annotations
from trainer.exceptions import ChannelError, DatasetError, RecordingError

log = logging.getLogger(__name__)

EXTENSIONS = (".fif", ".edf", ".bdf", ".vhdr", ".set")
SYNTHETIC_VARIANTS = {"synthetic": "synthetic", "synthetic:null": "synthetic-null"}
SYNTHETIC_SEED = 0  # fixed, so Stage 1 and Stage 2 jobs with different training seeds share data
L_FREQ, H_FREQ = 0.5, 45.0
DEFAULT_LINE_FREQ = 50.0  # Hz; most of the world. A file that records 60 Hz says so in line_freq.


@dataclass
class Recording:
    """One preprocessed recording on the encoder's channel grid."""

    path: Path
    data: np.ndarray
    """Signals, shape ``(n_encoder_channels, n_samples)``, float32, robust z-scored microvolts."""
    present: np.ndarray
    """Boolean mask, shape ``(n_encoder_channels,)``: channel found in the recording."""
    sfreq: float
    sentences: list[Sentence] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)


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
        raise DatasetError(f"Invalid dataset {dataset!r}; expected a path, 'synthetic' or 'synthetic:null'.")
    path = Path(dataset).expanduser()
    if not path.exists():
        raise DatasetError(f"Dataset path {path} does not exist.")
    if path.is_file():
        return [path]
    found = sorted(p for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not found:
        raise DatasetError(f"No recordings ({', '.join(EXTENSIONS)}) found under {path}.")
    return found


def _normalise_name(name: str) -> str:
    """'EEG Fz-REF' -> 'fz', 'CZ' -> 'cz': drop the type prefix and the reference suffix."""
    name = re.sub(r"^(eeg)[\s_:-]+", "", name.strip(), flags=re.IGNORECASE)
    return re.split(r"[-\s]", name, maxsplit=1)[0].lower()


def map_channels(names: list[str], encoder_channels: tuple[str, ...]) -> tuple[list[int | None], list[str]]:
    """For each encoder channel, the index of the matching recording channel (or ``None``).

    Returns
    -------
    mapping : list of int or None
        One entry per encoder channel.
    extras : list of str
        Recording channels that match no encoder channel (dropped).
    """
    by_name: dict[str, int] = {}
    for i, name in enumerate(names):
        by_name.setdefault(_normalise_name(name), i)
    mapping = [by_name.get(ch.lower()) for ch in encoder_channels]
    used = {i for i in mapping if i is not None}
    extras = [n for i, n in enumerate(names) if i not in used]
    return mapping, extras


def load_recording(path: Path, encoder: EncoderConfig, min_channel_share: float = 0.5) -> Recording:
    """Read, preprocess and channel-map one recording.

    Parameters
    ----------
    path : Path
        A file ``mne.io.read_raw`` can read.
    encoder : EncoderConfig
        Target channels and sampling rate.
    min_channel_share : float
        Smallest share of the encoder's channels the recording must have.

    Returns
    -------
    Recording

    Raises
    ------
    RecordingError
        The file cannot be read or preprocessed.
    ChannelError
        Too few of the encoder's channels are present.
    """
    try:
        raw = mne.io.read_raw(path, preload=False, verbose="error")
    except Exception as exc:  # MNE raises many types for broken files; all mean "unreadable"
        raise RecordingError(f"Cannot read {path}: {exc}") from exc

    eeg_names = [raw.ch_names[i] for i in mne.pick_types(raw.info, eeg=True, exclude="bads")]
    mapping, extras = map_channels(eeg_names, encoder.channels)
    n_found = sum(i is not None for i in mapping)
    needed = int(np.ceil(min_channel_share * len(encoder.channels)))
    if n_found < needed:
        raise ChannelError(
            f"Recording {path} has {n_found} of the encoder's {len(encoder.channels)} channels; "
            f"at least {needed} are needed."
        )
    missing = [ch for ch, i in zip(encoder.channels, mapping) if i is None]
    if missing:
        log.info("%s: %d channels missing, zero-filled and masked: %s", path.name, len(missing), ", ".join(missing))
    if extras:
        log.info("%s: %d extra channels dropped: %s", path.name, len(extras), ", ".join(extras))

    try:
        raw.pick(eeg_names).load_data(verbose="error")
        # Average reference over all EEG channels present, before the extras are dropped.
        raw.set_eeg_reference("average", projection=False, verbose="error")
        # Line noise is often far stronger than EEG; the low-pass's transition band would let
        # part of it through, so it is notched out first (harmonics too, for high-rate files).
        line = float(raw.info.get("line_freq") or DEFAULT_LINE_FREQ)
        harmonics = np.arange(line, raw.info["sfreq"] / 2 - 1.0, line)
        if len(harmonics):
            raw.notch_filter(harmonics, verbose="error")
        nyquist = min(raw.info["sfreq"], encoder.sfreq) / 2
        h_freq = min(H_FREQ, 0.9 * nyquist)
        raw.filter(L_FREQ, h_freq, verbose="error")
        if raw.info["sfreq"] != encoder.sfreq:
            raw.resample(encoder.sfreq, verbose="error")
        signals = raw.get_data(units="uV").astype(np.float32)
    except Exception as exc:
        raise RecordingError(f"Cannot preprocess {path}: {exc}") from exc

    data = np.zeros((len(encoder.channels), signals.shape[1]), dtype=np.float32)
    present = np.zeros(len(encoder.channels), dtype=bool)
    for row, index in enumerate(mapping):
        if index is None:
            continue
        channel = signals[index]
        median = np.median(channel)
        iqr = np.subtract(*np.percentile(channel, [75, 25]))
        data[row] = (channel - median) / (iqr / 1.349 if iqr > 0 else 1.0)  # IQR/1.349 ~ std
        present[row] = True
    sentences, words = read_annotations(raw, path)
    return Recording(path=path, data=data, present=present, sfreq=encoder.sfreq, sentences=sentences, words=words)


def load_dataset(dataset: str, root: Path, encoder: EncoderConfig) -> list[Recording]:
    """All recordings of a dataset, preprocessed (see :func:`load_recording`)."""
    recordings = [load_recording(p, encoder) for p in resolve_dataset(dataset, root, encoder)]
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


def windows(recordings: list[Recording], encoder: EncoderConfig, val_share: float = 0.1
            ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping ``window_s`` windows for Stage 1, split into train and validation.

    The last ``val_share`` of each recording's windows (in time) is held out, so validation
    windows never overlap training ones.

    Returns
    -------
    (train_x, train_mask), (val_x, val_mask)
        ``x`` has shape ``(n, channels, window_samples)``, ``mask`` ``(n, channels)``.
    """
    length = encoder.window_samples
    train, val, train_mask, val_mask = [], [], [], []
    for rec in recordings:
        n = rec.data.shape[1] // length
        n_val = int(round(n * val_share)) if n >= 2 else 0
        for k in range(n):
            x = rec.data[:, k * length:(k + 1) * length]
            (val if k >= n - n_val else train).append(x)
            (val_mask if k >= n - n_val else train_mask).append(rec.present)
    if not train:
        raise DatasetError(f"Recordings are shorter than one {encoder.window_s:g} s window; nothing to train on.")

    def stack(xs: list[np.ndarray], masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if not xs:
            return np.zeros((0, len(encoder.channels), length), np.float32), np.zeros((0, len(encoder.channels)), bool)
        return np.stack(xs).astype(np.float32), np.stack(masks)

    return stack(train, train_mask), stack(val, val_mask)
