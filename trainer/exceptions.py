"""Errors the trainer raises on purpose; each message names the file or value at fault.

Hierarchy::

    TrainerError                  base class; the run ends with EXIT_FAILED and an ``error`` event
    ├── DatasetError              the dataset path is missing, empty or unusable
    │   ├── RecordingError        one recording cannot be read or preprocessed
    │   └── ChannelError          a recording shares too few channels with the encoder
    ├── CheckpointError           a checkpoint is incomplete or does not match the model
    └── EncoderFileError          ``encoder_path`` is not a NeuroLens encoder file

:class:`trainer.config.ConfigError` (a ``ValueError``) is handled like a ``TrainerError``.
Anything else that escapes a run is a bug: it is reported as a crash, not a clean failure.
"""

from __future__ import annotations


class TrainerError(Exception):
    """Base class: the run cannot go on; the message is shown to the user as is."""


class DatasetError(TrainerError):
    """The dataset as a whole is unusable (missing path, no recordings, no sentences)."""


class RecordingError(DatasetError):
    """One recording cannot be read or preprocessed."""


class ChannelError(DatasetError):
    """A recording has too few of the encoder's channels."""


class CheckpointError(TrainerError):
    """A checkpoint is unreadable or does not fit the model and optimizer being resumed."""


class EncoderFileError(TrainerError):
    """The Stage 2 ``encoder_path`` is missing or is not a NeuroLens encoder file."""
