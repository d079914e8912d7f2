"""The one safetensors header reader: what it returns for a whole file and what it refuses."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from trainer.artifact_format import (DTYPE_SIZES, ArtifactFormatError, TensorInfo, encode_header, layout_differences,
                                     read_header)
from trainer.checkpoint import TORCH_DTYPES, write_safetensors
from trainer.protocol import ArtifactKind


def raw_file(path: Path, header: object, data: bytes = b"") -> Path:
    """A file with ``header`` serialised as the safetensors header, whatever it holds."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def two_tensors(a_offsets=(0, 8), b_offsets=(8, 12), b_dtype="F32", b_shape=(1,)) -> dict:
    return {"__metadata__": {"format": "neurolens.encoder/1"},
            "a": {"dtype": "F32", "shape": [2], "data_offsets": list(a_offsets)},
            "b": {"dtype": b_dtype, "shape": list(b_shape), "data_offsets": list(b_offsets)}}


def test_a_written_file_reads_back_as_the_safetensors_library_reads_it(tmp_path):
    tensors = {"weight": torch.randn(3, 4), "steps": torch.arange(5), "mask": torch.ones(2, dtype=torch.bool),
               "empty": torch.zeros(0, 7, dtype=torch.float16)}
    metadata = {"format": "neurolens.checkpoint/1", "trainer_state": json.dumps({"step": 3})}
    path = tmp_path / "file.safetensors"
    write_safetensors(tensors, path, metadata)

    header = read_header(path)
    assert header.metadata == metadata
    assert list(header.tensors) == list(tensors)
    assert header.tensors["weight"] == TensorInfo(dtype="F32", shape=(3, 4), begin=0, end=48)
    assert header.data_offset % 8 == 0
    with safe_open(str(path), framework="pt") as fh:
        for name in fh.keys():
            piece = fh.get_slice(name)
            assert (header.tensors[name].shape, header.tensors[name].dtype) == (tuple(piece.get_shape()),
                                                                                 piece.get_dtype())
        assert fh.metadata() == metadata
    with open(path, "rb") as fh:  # the offsets point at the tensor's bytes
        fh.seek(header.data_offset + header.tensors["steps"].begin)
        assert fh.read(40) == torch.arange(5).numpy().tobytes()
    assert header.format == "neurolens.checkpoint/1"
    assert header.json_field("trainer_state") == {"step": 3}
    assert header.json_metadata() == {"trainer_state": {"step": 3}}


def test_the_torch_dtypes_are_the_formats_names_with_the_same_element_sizes():
    for name, dtype in TORCH_DTYPES.items():
        assert DTYPE_SIZES[name] == torch.empty((), dtype=dtype).element_size(), name


def test_encode_header_lays_tensors_end_to_end(tmp_path):
    prefix = encode_header([("a", "F32", (2, 3)), ("b", "BF16", ()), ("c", "U8", (0,))], {"k": "v"})
    path = tmp_path / "file.safetensors"
    path.write_bytes(prefix + bytes(24 + 2))
    header = read_header(path)
    assert header.data_offset == len(prefix)
    assert [(t.begin, t.end) for t in header.tensors.values()] == [(0, 24), (24, 26), (26, 26)]


@pytest.mark.parametrize(("header", "data", "message"), [
    (two_tensors(), bytes(10), "Truncated safetensors file: its header describes 12 bytes of tensor data, but only 10"),
    (two_tensors(), bytes(14), "Invalid safetensors file: 2 bytes follow the last tensor."),
    (two_tensors(b_offsets=(4, 8), b_shape=(1,)), bytes(12), "tensor 'b' starts at 4, expected 8"),
    (two_tensors(b_offsets=(12, 16)), bytes(16), "tensor 'b' starts at 12, expected 8"),
    (two_tensors(b_dtype="F128"), bytes(12), "Tensor 'b' has unknown dtype 'F128'; expected one of BOOL,"),
    (two_tensors(b_shape=(2,)), bytes(12), "Tensor 'b': 4 bytes do not hold F32 [2]."),
    (two_tensors(b_shape=(-1,)), bytes(12), "Tensor 'b' has an invalid shape [-1]."),
    (two_tensors(b_offsets=(12, 8)), bytes(12), "Tensor 'b' has invalid data offsets [12, 8]."),
    ({"a": {"dtype": "F32", "shape": [1]}}, bytes(4), "Invalid safetensors header entry for tensor 'a'."),
    ({"a": [1, 2]}, b"", "Invalid safetensors header entry for tensor 'a'."),
    ([1, 2, 3], b"", "Not a safetensors file: the header is not a JSON object."),
    ({"__metadata__": {"format": 1}}, b"", "__metadata__ must map names to strings."),
    ({"__metadata__": ["format"]}, b"", "__metadata__ must map names to strings."),
])
def test_a_malformed_file_is_refused_naming_what_is_wrong(tmp_path, header, data, message):
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ArtifactFormatError) as caught:
        read_header(path)
    assert message in str(caught.value)


def test_a_file_that_is_not_safetensors_at_all_is_refused(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ArtifactFormatError, match="File of 2 bytes is too short to be a safetensors file"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ArtifactFormatError, match="header length 1000 does not fit in a file of 10 bytes"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 200 * 2**20) + bytes(64))  # a length claimed past the 100 MB cap
    with pytest.raises(ArtifactFormatError, match="header length 209715200 does not fit"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 4) + b"\xff{}x")
    with pytest.raises(ArtifactFormatError, match="the header is not valid JSON"):
        read_header(path)


def test_format_and_json_fields_are_checked_by_name(tmp_path):
    path = raw_file(tmp_path / "enc.safetensors", {"__metadata__": {"format": "neurolens.encoder/1", "cfg": "{bad"}})
    header = read_header(path)
    header.require_format(ArtifactKind.encoder)
    with pytest.raises(ArtifactFormatError, match="Not a NeuroLens model file: its metadata format is "
                                                  "'neurolens.encoder/1', expected 'neurolens.model/1'."):
        header.require_format(ArtifactKind.model)
    with pytest.raises(ArtifactFormatError, match="metadata has no 'encoder_config'"):
        header.json_field("encoder_config")
    with pytest.raises(ArtifactFormatError, match="metadata 'cfg' is not valid JSON"):
        header.json_metadata()
    empty = read_header(raw_file(tmp_path / "empty.safetensors", {"__metadata__": None}))
    assert empty.metadata == {} and empty.tensors == {} and empty.format is None


def test_layout_differences_name_the_first_missing_unexpected_and_mismatched_tensors():
    expected = {f"w{i}": (4,) for i in range(8)}
    found = {"w0": (4,), "w1": (5,), "extra": (1,)}
    assert layout_differences(found, expected, "shape") == (
        "missing keys ['w2', 'w3', 'w4', 'w5', 'w6'] ... (6 in all); unexpected keys ['extra']; "
        "shape mismatches ['w1 (5,) != (4,)']")
    assert layout_differences(expected, expected, "shape") == ""
