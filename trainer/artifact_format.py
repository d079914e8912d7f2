"""The artifact file format: its names, file names and dtypes, and the one safetensors header reader.

Every artifact but a report is a safetensors file: an 8-byte little-endian header length, a
JSON header mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the end of the header) plus an optional ``__metadata__`` of strings, then
the tensor data. NeuroLens writes its values into that metadata as JSON strings, and names the
file's kind in ``format`` (:data:`FORMATS`).

The server (which never imports torch) checks uploads with :func:`read_header`; the trainer
reads its checkpoints and encoder files through it and writes theirs with :func:`encode_header`.
Only the header is read, never tensor data, so checking a multi-GB file costs its header's size.
:func:`layout_differences` tells how a file's tensor table differs from the one a model needs.
:mod:`trainer.standalone` keeps its own few lines of reading: it ships inside the model file and
must load without NeuroLens.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import BartPreset, ConfigError, EncoderConfig, check_bart_config
from trainer.protocol import ArtifactKind

ENCODER_FORMAT = "neurolens.encoder/1"
MODEL_FORMAT = "neurolens.model/1"
CHECKPOINT_FORMAT = "neurolens.checkpoint/1"
FORMATS = {ArtifactKind.encoder: ENCODER_FORMAT, ArtifactKind.model: MODEL_FORMAT,
           ArtifactKind.checkpoint: CHECKPOINT_FORMAT}

# A job directory's exported files, under final/, and its checkpoints, one directory per step
# under checkpoints/ (the checkpoint file beside a readable copy of its trainer state).
FINAL_DIRNAME = "final"
ENCODER_FILENAME = "encoder.safetensors"
MODEL_FILENAME = "model.safetensors"
REPORT_FILENAME = "report.json"
CHECKPOINT_DIRNAME = "checkpoints"
CHECKPOINT_FILENAME = "checkpoint.safetensors"
STATE_FILENAME = "state.json"
# The name an artifact of each kind is stored under when an upload gives none.
DEFAULT_FILENAMES = {ArtifactKind.encoder: ENCODER_FILENAME, ArtifactKind.model: MODEL_FILENAME,
                     ArtifactKind.checkpoint: CHECKPOINT_FILENAME, ArtifactKind.report: REPORT_FILENAME}



def registered_filename(relative_path: str) -> str:
    """The name a file of a job directory is stored under as an artifact.

    Every checkpoint is a ``checkpoint.safetensors`` in its own ``checkpoints/step-NNNNNN/``
    folder; as artifacts they would all share one name, so a checkpoint's name carries its step
    (``checkpoint-step-000120.safetensors``) and none can be mistaken for another, or for the
    encoder, once downloaded. Other files keep their own name.
    """
    parts = relative_path.replace("\\", "/").split("/")
    if len(parts) == 3 and parts[0] == CHECKPOINT_DIRNAME and parts[1].startswith("step-") and parts[2] == CHECKPOINT_FILENAME:
        stem, dot, suffix = CHECKPOINT_FILENAME.partition(".")
        return f"{stem}-{parts[1]}{dot}{suffix}"
    return parts[-1]


# Every dtype name of the safetensors format, with its element size in bytes.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
# safetensors itself refuses headers above 100 MB; a NeuroLens header (tensor table plus JSON
# configs and a tokenizer) is a few hundred KB to a few MB. Parsing a header costs the server
# several times its size in memory, so a much larger one is refused unread.
MAX_HEADER_BYTES = 16 * 1024 * 1024
# A declared config may predict somewhat more parameters than it builds (the counts are
# approximate); a file whose tensors hold far fewer elements than that cannot match it.
DECLARED_PARAMETERS_SLACK = 1.5
DECLARED_PARAMETERS_FLOOR = 1 << 20
METADATA_KEY = "__metadata__"


class ArtifactFormatError(ValueError):
    """A file is not a valid artifact of the kind it should be; the message says what is wrong."""


def parse_json(raw: bytes | str, what: str) -> Any:
    """JSON from an untrusted file, every failure an :class:`ArtifactFormatError` naming ``what``.

    Nesting deeper than the interpreter's recursion limit (about 1000 levels) is refused like
    any other malformed JSON: no NeuroLens file nests more than a few levels.
    """
    try:
        return json.loads(raw)
    except RecursionError:
        raise ArtifactFormatError(f"{what} nests too deeply (more than about {sys.getrecursionlimit()} levels); "
                                  f"NeuroLens files nest a few levels.") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtifactFormatError(f"{what} is not valid JSON ({exc}).") from exc


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in the header: ``begin`` and ``end`` are offsets into the data."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed, checked safetensors header.

    Attributes
    ----------
    metadata : dict of str to str
        The ``__metadata__`` strings (empty when the file has none).
    tensors : dict of str to TensorInfo
        Every tensor, in the header's order.
    data_offset : int
        Where the tensor data starts in the file (``begin`` and ``end`` count from here).
    """

    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_offset: int

    @property
    def format(self) -> str | None:
        return self.metadata.get("format")

    def require_format(self, kind: ArtifactKind) -> None:
        """Raise :class:`ArtifactFormatError` unless the metadata names ``kind``'s format."""
        wanted = FORMATS[kind]
        if self.format != wanted:
            raise ArtifactFormatError(f"Not a NeuroLens {kind.value} file: its metadata format is "
                                      f"{self.format!r}, expected {wanted!r}.")

    def json_field(self, key: str) -> Any:
        """The metadata value ``key``, decoded from JSON.

        Raises
        ------
        ArtifactFormatError
            The metadata has no ``key``, or its value is not JSON.
        """
        if key not in self.metadata:
            raise ArtifactFormatError(f"metadata has no {key!r}")
        return parse_json(self.metadata[key], f"metadata {key!r}")

    def json_metadata(self) -> dict[str, Any]:
        """Every metadata value but ``format``, decoded from JSON (how checkpoints store theirs)."""
        return {key: self.json_field(key) for key in self.metadata if key != "format"}


def encode_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The bytes of a safetensors file before its data: length prefix and JSON header.

    Parameters
    ----------
    tensors : list of (name, dtype name, shape)
        The tensors in the order their data will follow, each right after the one before.
    metadata : dict of str to str
        The header's ``__metadata__``.
    """
    header: dict[str, Any] = {METADATA_KEY: metadata}
    offset = 0
    for name, dtype, shape in tensors:
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data must start 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and check a safetensors file's header, reading nothing else of the file.

    Every tensor's byte range must match its dtype and shape, and the ranges must tile the data
    section exactly: that is what tells a truncated or padded file from a whole one.

    Raises
    ------
    ArtifactFormatError
        With a message that names what is wrong.
    OSError
        The file cannot be read.
    """
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size < 8:
            raise ArtifactFormatError(f"File of {size} bytes is too short to be a safetensors file "
                                      f"(its header length alone takes 8).")
        fh.seek(0)
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise ArtifactFormatError(
                f"Not a safetensors file (or truncated): header length {header_len} does not fit "
                f"in a file of {size} bytes.")
        raw = fh.read(header_len)
    header = parse_json(raw, "Not a safetensors file: the header")
    if not isinstance(header, dict):
        raise ArtifactFormatError("Not a safetensors file: the header is not a JSON object.")
    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ArtifactFormatError(f"Invalid safetensors header: {METADATA_KEY} must map names to strings.")
    tensors = {name: _tensor_info(name, info) for name, info in header.items()}
    _check_tiling(tensors, size - 8 - header_len)
    return SafetensorsHeader(metadata=metadata, tensors=tensors, data_offset=8 + header_len)


def _tensor_info(name: str, info: Any) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (TypeError, KeyError, ValueError) as exc:
        raise ArtifactFormatError(f"Invalid safetensors header entry for tensor {name!r}.") from exc
    if dtype not in DTYPE_SIZES:
        raise ArtifactFormatError(f"Tensor {name!r} has unknown dtype {dtype!r}; expected one of "
                                  f"{', '.join(DTYPE_SIZES)}.")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ArtifactFormatError(f"Tensor {name!r} has an invalid shape {shape!r}.")
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
        raise ArtifactFormatError(f"Tensor {name!r} has invalid data offsets {[begin, end]!r}.")
    if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise ArtifactFormatError(f"Tensor {name!r}: {end - begin} bytes do not hold {dtype} {shape}.")
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_tiling(tensors: dict[str, TensorInfo], data_len: int) -> None:
    """The byte ranges must follow each other from 0 to exactly the end of the file."""
    position = 0
    for begin, end, name in sorted((t.begin, t.end, name) for name, t in tensors.items()):
        if begin != position:
            raise ArtifactFormatError(
                f"Invalid safetensors file: tensor {name!r} starts at {begin}, expected {position}.")
        position = end
    if position > data_len:
        raise ArtifactFormatError(
            f"Truncated safetensors file: its header describes {position} bytes of tensor data, "
            f"but only {data_len} follow the header.")
    if position < data_len:
        raise ArtifactFormatError(f"Invalid safetensors file: {data_len - position} bytes follow the last tensor.")


def declared_configs(header: SafetensorsHeader) -> tuple[EncoderConfig, BartPreset | None]:
    """The encoder config a file declares, and its BART's size if it has a ``bart_config``.

    Judged by the same rules as a job's config (:mod:`trainer.config`), without torch: the
    server runs this before any model is built from the file.

    Raises
    ------
    ArtifactFormatError
        A config is missing, not JSON, or out of bounds; the message names the field.
    """
    try:
        encoder = EncoderConfig.from_dict(header.json_field("encoder_config"))
    except ConfigError as exc:
        raise ArtifactFormatError(f"invalid encoder_config: {exc}") from exc
    if "bart_config" not in header.metadata:
        return encoder, None
    try:
        return encoder, check_bart_config(header.json_field("bart_config"))
    except ConfigError as exc:
        raise ArtifactFormatError(str(exc)) from exc


def check_declared_size(header: SafetensorsHeader) -> None:
    """Refuse a file whose tensors are far too few for the parameters its configs declare.

    Every artifact holds at least its model's weights (a checkpoint holds optimizer state too),
    so this costs nothing and stops a small file that declares a huge model before anything
    builds that model.
    """
    encoder, bart = declared_configs(header)
    # A Stage 2 checkpoint holds the encoder's weights only once phase 2 trains it.
    holds_encoder = bart is None or header.format != CHECKPOINT_FORMAT or header.metadata.get("phase") == "2"
    declared = (encoder.approx_parameters() if holds_encoder else 0) + (bart.approx_parameters() if bart else 0)
    stored = sum(math.prod(t.shape) for t in header.tensors.values())
    if declared > DECLARED_PARAMETERS_SLACK * stored + DECLARED_PARAMETERS_FLOOR:
        raise ArtifactFormatError(
            f"its configs declare about {declared:,} parameters (encoder {encoder.n_layers} layers of width "
            f"{encoder.d_model}{'' if bart is None else ' plus BART'}), but its tensors hold only {stored:,} values.")


def layout_differences(found: Mapping[str, Any], expected: Mapping[str, Any], compared: str,
                       describe: Callable[[Any], str] = str) -> str:
    """How a file's tensor table differs from the one a model needs, as one line ('' if it does not).

    Parameters
    ----------
    found, expected : mapping of tensor name to its layout
        A layout is whatever is compared: a shape, or a shape and a dtype.
    compared : str
        What a layout is, for the message ("shape", "shape or dtype").
    describe : callable
        Writes a layout in the message.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} {describe(found[k])} != {describe(expected[k])}"
             for k in expected if k in found and found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)} ({len(missing)} in all)")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if wrong:
        problems.append(f"{compared} mismatches {_first(wrong)}")
    return "; ".join(problems)


def _first(items: list[str]) -> str:
    return f"{items[:5]}{' ...' if len(items) > 5 else ''}"
