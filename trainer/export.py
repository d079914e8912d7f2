"""The exported artifact files: ``final/encoder.safetensors`` and ``final/model.safetensors``.

Both are plain safetensors files whose header metadata carries JSON strings, so they load with
``safetensors.safe_open`` alone, without NeuroLens:

- encoder: the encoder's weights (no SSL head), metadata ``format = "neurolens.encoder/1"`` and
  ``encoder_config`` (:meth:`EncoderConfig.to_dict`);
- model: tensors prefixed ``encoder.`` (plus ``encoder.electrode_pos``, the electrode positions
  the encoder's spatial view uses), ``bridge.`` and ``bart.`` (Hugging Face's names), metadata
  ``format = "neurolens.model/1"``, ``encoder_config``, ``bart_config``
  (``BartConfig.to_json_string()``), ``tokenizer`` (the tokenizer's JSON), ``aliases`` (tied
  tensors stored once: ``{alias: stored name}``) and ``loader``: the source of
  :mod:`trainer.standalone`, a one-file loader that needs only torch, safetensors and
  transformers. The README shows the few lines that load a model with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trainer.artifact_format import ENCODER_FORMAT, MODEL_FORMAT, ArtifactFormatError, SafetensorsHeader, read_header
from trainer.checkpoint import (TORCH_DTYPES, LazyTensor, SafetensorsReader, atomic_save_safetensors, dedupe_tensors,
                                read_safetensors_into, validate_state_dict)
from trainer.config import ConfigError, EncoderConfig
from trainer.exceptions import CheckpointError, EncoderFileError
from trainer.models.multiview import MultiViewEncoder


def save_encoder(encoder: MultiViewEncoder, path: Path) -> Path:
    """Write the encoder's weights and config atomically to ``path``."""
    metadata = {"format": ENCODER_FORMAT, "encoder_config": json.dumps(encoder.config.to_dict())}
    return atomic_save_safetensors(encoder.state_dict(), path, metadata)


def _read_encoder_header(path: Path) -> tuple[SafetensorsHeader, EncoderConfig]:
    """An encoder file's checked header and the config in it; no tensor data is read."""
    if not path.is_file():
        raise EncoderFileError(f"Encoder file {path} does not exist.")
    try:
        header = read_header(path)
    except (OSError, ArtifactFormatError) as exc:
        raise EncoderFileError(f"Cannot read encoder file {path}: {exc}") from exc
    if header.format != ENCODER_FORMAT:
        raise EncoderFileError(
            f"{path} is not a NeuroLens encoder file: format {header.format!r}, expected {ENCODER_FORMAT!r}."
        )
    try:
        return header, EncoderConfig.from_dict(header.json_field("encoder_config"))
    except (ArtifactFormatError, ValueError, TypeError, KeyError, ConfigError) as exc:
        raise EncoderFileError(f"{path} has no valid encoder_config: {exc}") from exc


def check_encoder_file(path: Path) -> EncoderConfig:
    """The config of an encoder file whose tensor names and shapes (read from the header, no
    data) match the encoder that config builds; raises :class:`EncoderFileError` otherwise."""
    header, config = _read_encoder_header(path)
    with torch.device("meta"):
        encoder = MultiViewEncoder(config)
    try:
        validate_state_dict(encoder, {name: t.shape for name, t in header.tensors.items()}, f"Encoder file {path}")
    except CheckpointError as exc:
        raise EncoderFileError(str(exc)) from exc
    return config


def load_encoder(path: Path) -> MultiViewEncoder:
    """Build a :class:`MultiViewEncoder` from an encoder file, validating keys and shapes.

    The weights are copied into the module one tensor at a time, so loading costs the
    encoder's size once, not twice (1 GB for the ``large`` preset).
    """
    config = check_encoder_file(path)
    encoder = MultiViewEncoder(config)
    try:
        read_safetensors_into(path, encoder.state_dict(keep_vars=True))
    except (OSError, ValueError, CheckpointError) as exc:
        raise EncoderFileError(f"Cannot read encoder file {path}: {exc}") from exc
    return encoder


def _lazy_file_tensors(path: Path) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors file, each read only when written."""
    def loader(name: str):
        def load() -> torch.Tensor:
            with SafetensorsReader(path) as reader:
                return reader.read(name)
        return load

    return {name: LazyTensor(TORCH_DTYPES[t.dtype], t.shape, loader(name))
            for name, t in read_header(path).tensors.items()}


def save_model(path: Path, encoder_path: Path, encoder_config: EncoderConfig, model: Any,
               tokenizer_json: str) -> Path:
    """Write the Stage 2 inference bundle atomically (see the module docstring).

    Parameters
    ----------
    path : Path
        Target file.
    encoder_path : Path
        The encoder file the job started from; its tensors are copied one at a time (phase 1
        never changes them, and reading them all at once would cost their size in memory).
    encoder_config : EncoderConfig
        Its config.
    model : EEGToText
        The trained bridge and BART, and the fine-tuned encoder if phase 2 ran (whose weights
        are then written instead of the file's).
    tokenizer_json : str
        The tokenizer, as :func:`trainer.data.tokenizer.tokenizer_json` gives it.
    """
    from trainer import standalone

    own = {f"bridge.{k}": v for k, v in model.bridge.state_dict().items()}
    own.update({f"bart.{k}": v for k, v in model.bart.state_dict().items()})
    if model.encoder is not None:
        own.update({f"encoder.{k}": v for k, v in model.encoder.state_dict().items()})
    kept, aliases = dedupe_tensors(own)
    tensors: dict[str, Any] = {}
    if model.encoder is None:
        tensors.update({f"encoder.{k}": v for k, v in _lazy_file_tensors(encoder_path).items()})
    tensors.update(kept)
    from trainer.data.montage import channel_positions

    tensors["encoder.electrode_pos"] = torch.from_numpy(channel_positions(tuple(encoder_config.channels)) * 10.0)
    metadata = {
        "format": MODEL_FORMAT,
        "encoder_config": json.dumps(encoder_config.to_dict()),
        "bart_config": model.bart.config.to_json_string(),
        "tokenizer": tokenizer_json,
        "aliases": json.dumps(aliases),
        "loader": Path(standalone.__file__).read_text(encoding="utf-8"),
    }
    return atomic_save_safetensors(tensors, path, metadata)
