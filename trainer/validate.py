"""Check that an artifact file's tensors are the ones its declared config builds.

Run by the server on every upload, in a subprocess because the server never imports torch::

    python -m trainer.validate encoder path/to/encoder.safetensors

Exit status 0 means the file is valid (a one-line JSON summary goes to stdout); 2 means it is
not, with one line on stderr that says why; anything else is a crash of the checker itself.

The expected state dict is built from the config in the file's own metadata, with the modules
constructed on torch's ``meta`` device: every parameter has its real shape and dtype but no
storage, so checking a 270M-parameter encoder costs a few MB and well under a second. Tensor data
is never read, and nothing is unpickled (safetensors headers are JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from trainer.artifact_format import (
    ArtifactFormatError, SafetensorsHeader, check_declared_size, declared_configs, layout_differences, read_header,
)
from trainer.checkpoint import SAFETENSORS_DTYPES
from trainer.config import EncoderConfig
from trainer.protocol import ArtifactKind

EXIT_INVALID = 2

Layout = dict[str, tuple[tuple[int, ...], str]]


def read_layout(path: Path, kind: ArtifactKind) -> tuple[SafetensorsHeader, Layout]:
    """The checked header of a file of ``kind`` and its ``{name: (shape, dtype)}``; no tensor data is read."""
    try:
        header = read_header(path)
    except OSError as exc:
        raise ArtifactFormatError(f"cannot read {path}: {exc}") from exc
    header.require_format(kind)
    return header, {name: (t.shape, t.dtype) for name, t in header.tensors.items()}


def expected_layout(module: torch.nn.Module, prefix: str = "") -> Layout:
    return {f"{prefix}{k}": (tuple(v.shape), SAFETENSORS_DTYPES.get(v.dtype, str(v.dtype)))
            for k, v in module.state_dict().items()}


def _encoder_config(header: SafetensorsHeader) -> EncoderConfig:
    """The declared encoder config, judged by the job-config rules and checked against the
    file's size before any module is built (a huge declared model is refused in milliseconds)."""
    check_declared_size(header)
    return declared_configs(header)[0]


def _bart(config_dict: Any) -> torch.nn.Module:
    """BART on the meta device; ``config_dict`` has passed :func:`trainer.config.check_bart_config`."""
    from transformers import BartConfig, BartForConditionalGeneration

    try:
        config = BartConfig.from_dict(config_dict)
        with torch.device("meta"):
            return BartForConditionalGeneration(config)
    except Exception as exc:  # transformers raises assorted errors for inconsistent configs
        raise ArtifactFormatError(f"invalid bart_config: {exc}") from exc


def compare(found: Layout, expected: Layout, aliases: dict[str, str] | None = None) -> None:
    """Raise :class:`ArtifactFormatError` naming missing, unexpected and mis-shaped tensors.

    ``aliases`` maps a tied tensor stored once to the name it is stored under.
    """
    found = dict(found)
    for alias, target in (aliases or {}).items():
        if target not in found:
            raise ArtifactFormatError(f"alias {alias!r} points to {target!r}, which is not in the file")
        found[alias] = found[target]
    problems = layout_differences(found, expected, "shape or dtype", describe=lambda layout: "{} {}".format(*layout))
    if problems:
        raise ArtifactFormatError(f"tensors do not match the declared config: {problems}")


def _aliases(header: SafetensorsHeader) -> dict[str, str]:
    if "aliases" not in header.metadata:
        return {}
    aliases = header.json_field("aliases")
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise ArtifactFormatError("metadata 'aliases' is not a JSON object of names")
    return aliases


def validate_encoder(path: Path) -> dict[str, Any]:
    from trainer.models.multiview import MultiViewEncoder

    header, found = read_layout(path, ArtifactKind.encoder)
    config = _encoder_config(header)
    with torch.device("meta"):
        encoder = MultiViewEncoder(config)
    compare(found, expected_layout(encoder))
    return {"kind": "encoder", "preset": config.name, "tensors": len(found)}


def validate_model(path: Path) -> dict[str, Any]:
    from trainer.models.bridge import Bridge
    from trainer.models.multiview import MultiViewEncoder

    header, found = read_layout(path, ArtifactKind.model)
    config = _encoder_config(header)
    bart = _bart(header.json_field("bart_config"))
    if not header.metadata.get("loader", "").strip():
        raise ArtifactFormatError("metadata has no 'loader' (the standalone loader's source)")
    with torch.device("meta"):
        encoder = MultiViewEncoder(config)
        bridge = Bridge(config.n_patches, len(config.channels) * config.d_model, bart.config.d_model)
    expected = expected_layout(encoder, "encoder.")
    expected["encoder.electrode_pos"] = ((len(config.channels), 3), "F32")
    expected.update(expected_layout(bridge, "bridge."))
    expected.update(expected_layout(bart, "bart."))
    compare(found, expected, _aliases(header))
    return {"kind": "model", "preset": config.name, "tensors": len(found)}


def validate_checkpoint(path: Path) -> dict[str, Any]:
    from trainer.models.bridge import EEGToText
    from trainer.models.multiview import MultiViewEncoder, SSLHead

    header, found = read_layout(path, ArtifactKind.checkpoint)
    config = _encoder_config(header)
    state = header.json_field("trainer_state")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ArtifactFormatError("metadata 'trainer_state' has no integer 'step'")
    if "bart_config" in header.metadata:  # Stage 2: the bridge and BART, and the encoder in phase 2
        bart = _bart(header.json_field("bart_config"))
        with torch.device("meta"):
            model: torch.nn.Module = EEGToText(config.n_patches, len(config.channels) * config.d_model, bart)
            if header.metadata.get("phase") == "2":
                model.attach_encoder(MultiViewEncoder(config))
        stage = "stage2"
    else:
        with torch.device("meta"):
            model = torch.nn.ModuleDict({"encoder": MultiViewEncoder(config), "head": SSLHead(config)})
        stage = "stage1"
    # Optimizer moments and RNG states ride along under their own prefixes; their shapes follow
    # the optimizer, not the config, and a resume checks them against the live optimizer.
    weights = {k: v for k, v in found.items() if k.startswith("model.")}
    others = sorted(k for k in found if not k.startswith(("model.", "optim.", "rng.")))
    if others:
        raise ArtifactFormatError(f"unexpected tensors {others[:5]} (a checkpoint holds model.*, optim.* and rng.*)")
    aliases = {k: v for k, v in _aliases(header).items() if k.startswith("model.")}
    compare(weights, expected_layout(model, "model."), aliases)
    return {"kind": "checkpoint", "stage": stage, "preset": config.name, "step": state["step"], "tensors": len(found)}


VALIDATORS = {"encoder": validate_encoder, "model": validate_model, "checkpoint": validate_checkpoint}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.validate",
                                     description="Check an artifact file against its declared config.")
    parser.add_argument("kind", choices=sorted(VALIDATORS))
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        summary = VALIDATORS[args.kind](args.path)
    except ArtifactFormatError as exc:
        print(" ".join(str(exc).split()), file=sys.stderr)
        return EXIT_INVALID
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
