"""How a recording's EEG channels become an encoder's channels: by name, else by electrode position.

A recording whose channel names match enough of the encoder's (case-insensitive, "EEG Fz-REF"
decorations ignored) is mapped by name, as it always was: each encoder channel takes one
recording channel's row, missing ones are zero-filled and masked. A recording whose names do
not match (an EGI net's ``E1`` ... ``E128``, a BIDS dataset's own labels) but whose channels
have positions (the file's montage, a BIDS ``electrodes.tsv``, or a standard montage its reader
sets, such as ZuCo's ``GSN-HydroCel-129``) is mapped by position: each encoder channel is
interpolated from all of the recording's electrodes by MNE's spherical splines
(:meth:`mne.io.BaseRaw.interpolate_to` applied to an identity signal yields the
``(n_encoder, n_recording)`` matrix, computed once per recording and applied to every chunk).
An encoder channel whose nearest electrode is further than :data:`MAX_NEAREST_M` away would
be extrapolated rather than interpolated, so it is masked as missing instead.

:class:`ChannelMap` records, per encoder channel, how it was obtained, so the job's events and
the submission check can say it.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import mne
import numpy as np

from trainer.data.montage import standard_montage

MAX_NEAREST_M = 0.03
"""An encoder channel is interpolated only if a recording electrode lies within 3 cm of it
(neighbouring 10-20 electrodes are 3-5 cm apart; a 128-electrode net's about 2.5 cm)."""
N_WEIGHTS_SHOWN = 3


def normalise_name(name: str) -> str:
    """'EEG Fz-REF' -> 'fz', 'CZ' -> 'cz': drop the type prefix and the reference suffix."""
    name = re.sub(r"^(eeg)[\s_:-]+", "", name.strip(), flags=re.IGNORECASE)
    return re.split(r"[-\s]", name, maxsplit=1)[0].lower()


def map_channels(names: list[str], encoder_channels: tuple[str, ...]) -> tuple[list[int | None], list[str]]:
    """For each encoder channel, the index of the recording channel of the same name (or ``None``).

    Returns
    -------
    mapping : list of int or None
        One entry per encoder channel.
    extras : list of str
        Recording channels that match no encoder channel (dropped).
    """
    by_name: dict[str, int] = {}
    for i, name in enumerate(names):
        by_name.setdefault(normalise_name(name), i)
    mapping = [by_name.get(ch.lower()) for ch in encoder_channels]
    used = {i for i in mapping if i is not None}
    extras = [n for i, n in enumerate(names) if i not in used]
    return mapping, extras


@dataclass
class ChannelMap:
    """How each encoder channel is obtained from a recording's EEG channels.

    ``method`` is ``'name'`` (rows picked) or ``'position'`` (rows mixed by ``matrix``).
    """

    targets: tuple[str, ...]
    sources: list[str]
    method: str
    present: np.ndarray
    """Boolean, shape ``(n_targets,)``: the encoder channel is obtained (else zero and masked)."""
    how: list[str]
    """Per encoder channel, in words: 'by name (Fz)', 'interpolated from E11 0.61, ...', 'missing'."""
    index: list[int | None] = field(default_factory=list)
    """By name: the source row of each encoder channel."""
    matrix: np.ndarray | None = None
    """By position: ``(n_targets, n_sources)`` weights (rows of absent channels are zero)."""
    extras: list[str] = field(default_factory=list)
    """Source channels no encoder channel uses (dropped); by position, none."""

    @property
    def rows(self) -> list[int]:
        """Encoder rows that are filled, in order."""
        return [int(i) for i in np.flatnonzero(self.present)]

    @property
    def n_found(self) -> int:
        return int(self.present.sum())

    def referenced(self) -> np.ndarray:
        """``(len(rows), n_sources)`` weights giving the filled encoder rows of the average-
        referenced signal: the reference and the map are both linear, so they fold into one
        matrix, and the filters then run on the encoder's few rows instead of every electrode."""
        if self.method == "name":
            weights = np.zeros((len(self.rows), len(self.sources)))
            weights[np.arange(len(self.rows)), [self.index[r] for r in self.rows]] = 1.0
        else:
            assert self.matrix is not None
            weights = self.matrix[self.rows].astype(float)
        return weights - weights.sum(axis=1, keepdims=True) / len(self.sources)

    def describe(self) -> dict[str, str]:
        """``{encoder channel: how}``, for events and the submission check."""
        return dict(zip(self.targets, self.how))

    def summary(self) -> str:
        """One line: '8 of 8 channels by position (from 104 electrodes)'."""
        if self.method == "name":
            return f"{self.n_found} of {len(self.targets)} channels by name"
        return f"{self.n_found} of {len(self.targets)} channels by position (from {len(self.sources)} electrodes)"


def by_name(names: list[str], targets: tuple[str, ...]) -> ChannelMap:
    """The name mapping of :func:`map_channels` as a :class:`ChannelMap`."""
    index, extras = map_channels(names, targets)
    how = [f"by name ({names[i]})" if i is not None else "missing (no channel of that name)" for i in index]
    return ChannelMap(targets=targets, sources=list(names), method="name",
                      present=np.array([i is not None for i in index], bool), how=how, index=index, extras=extras)


def _positions(info: mne.Info, names: list[str]) -> np.ndarray:
    """Head-frame positions (metres) of ``names``; NaN rows where the file has none."""
    locs = {ch["ch_name"]: np.asarray(ch["loc"][:3], float) for ch in info["chs"]}
    pos = np.array([locs.get(n, np.full(3, np.nan)) for n in names], float).reshape(-1, 3)
    pos[~np.isfinite(pos).all(axis=1) | (np.abs(pos).sum(axis=1) == 0)] = np.nan
    return pos


def has_positions(info: mne.Info, names: list[str]) -> bool:
    """Whether every one of ``names`` has an electrode position (at least 4 are needed)."""
    return len(names) >= 4 and bool(np.isfinite(_positions(info, names)).all())


def target_montage(targets: tuple[str, ...], montage: mne.channels.DigMontage | None = None
                   ) -> mne.channels.DigMontage | None:
    """The positions of ``targets`` in ``montage`` (default: MNE's 10-20 template), with its
    fiducials so that both sets meet in the head frame; ``None`` if none of them is in it."""
    montage = montage or standard_montage()
    pos = montage.get_positions()
    lookup = {k.lower(): (k, v) for k, v in pos["ch_pos"].items()}
    ch_pos = {t: lookup[t.lower()][1] for t in targets if t.lower() in lookup}
    if not ch_pos:
        return None
    return mne.channels.make_dig_montage(ch_pos=ch_pos, nasion=pos["nasion"], lpa=pos["lpa"], rpa=pos["rpa"],
                                         coord_frame=pos["coord_frame"])


def interpolation_matrix(info: mne.Info, sources: list[str], montage: mne.channels.DigMontage
                         ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Spherical-spline weights from ``sources`` (positioned in ``info``) onto ``montage``'s channels.

    Returns
    -------
    names : list of str
        The montage's channels, in the matrix's row order.
    matrix : ndarray
        ``(len(names), len(sources))`` weights.
    positions : ndarray
        ``(len(names), 3)`` head-frame positions of the montage's channels.
    """
    src_info = mne.create_info(list(sources), 100.0, ch_types="eeg")
    with warnings.catch_warnings(), mne.utils.use_log_level("error"):
        warnings.simplefilter("ignore")  # "spherical fit is poor" for partial caps: the weights stand
        src_info.set_montage(mne.channels.make_dig_montage(
            ch_pos=dict(zip(sources, _positions(info, sources))), coord_frame="head"), on_missing="ignore")
        identity = mne.io.RawArray(np.eye(len(sources)), src_info, verbose="error")
        mapped = identity.interpolate_to(montage, method="spline")
    names = list(mapped.ch_names)
    return names, mapped.get_data(), _positions(mapped.info, names)


def by_position(info: mne.Info, names: list[str], targets: tuple[str, ...],
                montage: mne.channels.DigMontage | None = None) -> ChannelMap:
    """Map ``names`` (all positioned in ``info``) onto ``targets`` by electrode position.

    Targets with a recording channel of the same name keep that row (by name); the others are
    spline-interpolated from every electrode when one lies within :data:`MAX_NEAREST_M`.
    """
    index, _ = map_channels(names, targets)
    goal = target_montage(targets, montage)
    matrix = np.zeros((len(targets), len(names)))
    present = np.zeros(len(targets), bool)
    how = ["missing (no position known for this name)"] * len(targets)
    src_pos = _positions(info, names)
    if goal is not None:
        rows, weights, goal_pos = interpolation_matrix(info, names, goal)
        by_row = {n.lower(): (w, p) for n, w, p in zip(rows, weights, goal_pos)}
        for t, target in enumerate(targets):
            if index[t] is not None:
                matrix[t, index[t]], present[t], how[t] = 1.0, True, f"by name ({names[index[t]]})"
                continue
            if target.lower() not in by_row:
                continue
            w, p = by_row[target.lower()]
            dist = np.linalg.norm(src_pos - p, axis=1)
            nearest = int(np.argmin(dist))
            where = f"nearest {names[nearest]}, {1000 * dist[nearest]:.0f} mm"
            if dist[nearest] > MAX_NEAREST_M:
                how[t] = f"missing (no electrode within {1000 * MAX_NEAREST_M:.0f} mm: {where})"
                continue
            top = np.argsort(-np.abs(w))[:N_WEIGHTS_SHOWN]
            matrix[t], present[t] = w, True
            how[t] = (f"interpolated from {len(names)} electrodes (" + ", ".join(f"{names[i]} {w[i]:.2f}" for i in top)
                      + f", ...; {where})")
    return ChannelMap(targets=targets, sources=list(names), method="position", present=present, how=how,
                      matrix=matrix.astype(np.float32))


def plan_channels(info: mne.Info, names: list[str], targets: tuple[str, ...], needed: int) -> ChannelMap:
    """By name when at least ``needed`` targets match by name (or the channels have no
    positions); otherwise by position."""
    named = by_name(names, targets)
    if named.n_found >= needed or not has_positions(info, names):
        return named
    return by_position(info, names, targets)
