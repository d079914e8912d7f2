"""Electrode positions of the 10-20 system, from MNE's built-in template montage."""

from __future__ import annotations

from functools import lru_cache

import mne
import numpy as np


@lru_cache(maxsize=1)
def montage_name() -> str:
    """MNE's 10-20 template montage: 'standard_1020', renamed 'colin27_1020' in MNE 1.12.

    The new name is preferred where it exists so that no deprecation warning is raised; both
    hold the same positions.
    """
    builtin = mne.channels.get_builtin_montages()
    return "colin27_1020" if "colin27_1020" in builtin else "standard_1020"


def standard_montage() -> mne.channels.DigMontage:
    return mne.channels.make_standard_montage(montage_name())


@lru_cache(maxsize=8)
def channel_positions(channels: tuple[str, ...]) -> np.ndarray:
    """3-D head positions (metres, shape ``(len(channels), 3)``) of 10-20 electrode names.

    A name the template lacks gets the origin, which the encoder still tells apart by its
    learned channel-identity embedding.
    """
    positions = {k.lower(): v for k, v in standard_montage().get_positions()["ch_pos"].items()}
    return np.stack([positions.get(ch.lower(), np.zeros(3)) for ch in channels]).astype(np.float32)
