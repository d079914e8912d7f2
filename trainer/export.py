"""The exported artifact files: ``final/encoder.safetensors`` and ``final/model.safetensors``.

Both are plain safetensors files whose header metadata carries JSON strings, so they load with
``safetensors.safe_open`` alone, without NeuroLens:

- encoder: the encoder's weights (no SSL head), metadata ``format = "neurolens.encoder/1"`` and
  ``encoder_config`` (:meth:`EncoderConfig.to_dict`);
- model: tensors prefixed ``encoder.``, ``bridge.`` and ``bart.``, metadata
  ``format = "neurolens.model/1"``, ``encoder_config``, ``bart_config``
  (``BartConfig.to_json_string()``), ``tokenizer`` (the tokenizer's JSON) and ``aliases``
  (tied tensors stored once: ``{alias: stored name}``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from trainer.checkpoint import atomic_save_safetensors, dedupe_tensors, validate_state_dict
from trainer.config import ConfigError, EncoderConfig
from trainer.exceptions import CheckpointError, EncoderFileError
from trainer.models.multiview import MultiViewEncoder

ENCODER_FORMAT = "neurolens.encoder/1"
MODEL_FORMAT = "neurolens.model/1"
FINAL_DIRNAME = "final"
ENCODER_FILENAME = "encoder.safetensors"
MODEL_FILENAME = "model.safetensors"
REPORT_FILENAME = "report.json"


def save_encoder(encoder: MultiViewEncoder, path: Path) -> Path:
    """Write the encoder's weights and config atomically to ``path``."""
    metadata = {"format": ENCODER_FORMAT, "encoder_config": json.dumps(encoder.config.to_dict())}
    return atomic_save_safetensors(encoder.state_dict(), path, metadata)


def read_encoder_file(path: Path) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """Config and weights of an encoder file, checked against its format.

    Raises
    ------
    EncoderFileError
        The file is missing, unreadable, or not a NeuroLens encoder.
    """
    if not path.is_file():
        raise EncoderFileError(f"Encoder file {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise EncoderFileError(f"Cannot read encoder file {path}: {exc}") from exc
    if meta.get("format") != ENCODER_FORMAT:
        raise EncoderFileError(
            f"{path} is not a NeuroLens encoder file: format {meta.get('format')!r}, expected {ENCODER_FORMAT!r}."
        )
    try:
        config = EncoderConfig.from_dict(json.loads(meta["encoder_config"]))
    except (KeyError, ValueError, TypeError, ConfigError) as exc:
        raise EncoderFileError(f"{path} has no valid encoder_config: {exc}") from exc
    return config, tensors


def load_encoder(path: Path) -> MultiViewEncoder:
    """Build a :class:`MultiViewEncoder` from an encoder file, validating keys and shapes."""
    config, tensors = read_encoder_file(path)
    encoder = MultiViewEncoder(config)
    try:
        validate_state_dict(encoder, tensors, f"Encoder file {path}")
    except CheckpointError as exc:
        raise EncoderFileError(str(exc)) from exc
    encoder.load_state_dict(tensors)
    return encoder


def save_model(path: Path, encoder_tensors: dict[str, torch.Tensor], encoder_config: EncoderConfig,
               bridge: torch.nn.Module, bart: Any, tokenizer_json: str) -> Path:
    """Write the Stage 2 inference bundle atomically (see the module docstring)."""
    tensors = {f"encoder.{k}": v for k, v in encoder_tensors.items()}
    tensors.update({f"bridge.{k}": v for k, v in bridge.state_dict().items()})
    tensors.update({f"bart.{k}": v for k, v in bart.state_dict().items()})
    kept, aliases = dedupe_tensors(tensors)
    metadata = {
        "format": MODEL_FORMAT,
        "encoder_config": json.dumps(encoder_config.to_dict()),
        "bart_config": bart.config.to_json_string(),
        "tokenizer": tokenizer_json,
        "aliases": json.dumps(aliases),
    }
    return atomic_save_safetensors(kept, path, metadata)
