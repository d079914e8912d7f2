"""Atomic, validated safetensors checkpoints: ``<job_dir>/checkpoints/step-000120/``.

Each checkpoint directory holds exactly ``checkpoint.safetensors`` (every tensor: model weights
``model.*``, optimizer state ``optim.*``, RNG states ``rng.*`` as uint8 tensors; JSON strings in
the safetensors metadata for the configs and the trainer state) and ``state.json``, a
human-readable copy of the trainer state.

A checkpoint is built in a hidden sibling ``.tmp-step-000120-<pid>/``, fsynced, then moved into
place with ``os.replace``, so a kill at any moment leaves either the old set of checkpoints or
the new one, never a torn directory under a real name. Loading picks the newest directory whose
safetensors file opens; leftovers are deleted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.artifact_format import (CHECKPOINT_DIRNAME, CHECKPOINT_FILENAME, CHECKPOINT_FORMAT, STATE_FILENAME,
                                     ArtifactFormatError, TensorInfo, encode_header, layout_differences,
                                     read_header)
from trainer.exceptions import CheckpointError
from trainer.protocol import ArtifactKind

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dirname(step: int) -> str:
    return f"step-{step:06d}"


# -- writing files atomically ----------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


# The torch dtype of each safetensors dtype name (artifact_format.DTYPE_SIZES) our state dicts hold.
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_DTYPES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


class LazyTensor:
    """A tensor read only when it is written: ``dtype`` and ``shape`` now, data from ``load()``.

    :func:`write_safetensors` needs every tensor's size for the header before any data, so a
    file can be copied into another (the encoder into the Stage 2 model file) without holding
    all of it in memory.
    """

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], load) -> None:
        self.dtype, self.shape, self.load = dtype, tuple(shape), load


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file one tensor at a time, without building it in memory.

    ``safetensors.torch.save_file`` first converts every tensor to ``bytes`` and then writes
    them, so saving a 1 GB state briefly needs another 1 GB: for the large encoder that alone
    would break the 2 GB budget. The format is simple (a header that
    :func:`trainer.artifact_format.encode_header` lays out, then the raw little-endian data), so
    it is written here tensor by tensor straight from each tensor's own memory.

    Parameters
    ----------
    tensors : dict of str to Tensor or LazyTensor
        Tensors on any device (each is moved to the CPU on its own while it is written).
    path : Path
        File to write (overwritten).
    metadata : dict of str to str
        The header's ``__metadata__``.
    """
    if sys.byteorder != "little":  # the format is little-endian; a raw copy would be wrong
        save_file({k: (v.load() if isinstance(v, LazyTensor) else v).detach().to("cpu").contiguous()
                   for k, v in tensors.items()}, str(path), metadata=metadata)
        return
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"Cannot store tensor {name!r} of dtype {tensor.dtype} in safetensors; expected one "
                            f"of {', '.join(map(str, SAFETENSORS_DTYPES))}.")
    header = encode_header([(name, SAFETENSORS_DTYPES[t.dtype], tuple(t.shape)) for name, t in tensors.items()],
                           metadata)
    with open(path, "wb") as fh:
        fh.write(header)
        for tensor in tensors.values():
            if isinstance(tensor, LazyTensor):
                tensor = tensor.load()
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                fh.write(memoryview(flat.view(torch.uint8).numpy()))
        fh.flush()


class SafetensorsReader:
    """Reads a safetensors file's tensors with plain file reads, straight into tensor memory.

    Not through ``safetensors.safe_open``: that maps the file, and the mapped pages it touches
    count in the process's resident set until it is closed, so loading a 1 GB encoder or
    checkpoint that way peaks at its size twice (the module plus the mapping). The header is
    checked whole first (:func:`trainer.artifact_format.read_header`, which raises
    :class:`~trainer.artifact_format.ArtifactFormatError`); names and shapes are checked against
    it. Use as a context manager.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header = read_header(path)
        self._fh = open(path, "rb")

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def _info(self, name: str) -> TensorInfo:
        info = self.header.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        return info

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a new CPU tensor."""
        info = self._info(name)
        if info.dtype not in TORCH_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info.dtype}")
        tensor = torch.empty(info.shape, dtype=TORCH_DTYPES[info.dtype])
        self._fill(name, info, tensor)
        return tensor

    def read_into(self, name: str, target: torch.Tensor) -> None:
        """Copy tensor ``name`` into ``target`` in place (same shape; any device and dtype)."""
        info = self._info(name)
        if info.shape != tuple(target.shape):
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {list(info.shape)}, "
                                  f"expected {list(target.shape)}")
        direct = (target.device.type == "cpu" and target.is_contiguous()
                  and SAFETENSORS_DTYPES.get(target.dtype) == info.dtype)
        with torch.no_grad():
            if direct:  # no second copy: the file's bytes land in the parameter itself
                self._fill(name, info, target.detach())
            else:        # another device or dtype: through one tensor-sized CPU buffer
                target.copy_(self.read(name))

    def _fill(self, name: str, info: TensorInfo, tensor: torch.Tensor) -> None:
        """Read the tensor's bytes into ``tensor``, whose dtype and shape are the header's
        (so its size is the range's: the header check made sure of that)."""
        if sys.byteorder != "little":  # the format is little-endian; a raw read would be wrong
            with safe_open(str(self.path), framework="pt") as fh:
                tensor.copy_(fh.get_tensor(name))
            return
        self._fh.seek(self.header.data_offset + info.begin)
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        # The header matched the file's length when it was read; a file cut since is caught here.
        if info.end > info.begin and self._fh.readinto(view) != info.end - info.begin:
            raise CheckpointError(f"{self.path} is truncated inside tensor {name!r}")


def read_safetensors_into(path: Path, targets: dict[str, torch.Tensor]) -> None:
    """Fill each tensor of ``targets`` in place with the file's tensor of the same name
    (see :class:`SafetensorsReader`)."""
    with SafetensorsReader(path) as reader:
        for name, tensor in targets.items():
            reader.read_into(name, tensor)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file via a hidden temporary sibling and ``os.replace``.

    Parameters
    ----------
    tensors : dict of str to Tensor
        Tensors to store; they are made contiguous and moved to the CPU.
    path : Path
        Final file path; its parent directory is created.
    metadata : dict of str to str
        Safetensors header metadata (JSON strings for structured values).

    Returns
    -------
    Path
        ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    write_safetensors(tensors, tmp, metadata)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write a text file via a hidden temporary sibling and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


# -- state dicts ------------------------------------------------------------------------------------
def dedupe_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied embeddings).

    safetensors refuses shared storage, so each alias is recorded as ``{alias: kept name}``;
    :func:`load_checkpoint_into` reads the kept tensor for its aliases too.
    """
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in tensors.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = tensor
    return kept, aliases


def validate_state_dict(module: torch.nn.Module, tensors: dict[str, Any], source: str) -> None:
    """Check that ``tensors`` has exactly ``module``'s keys and shapes before loading.

    ``tensors`` maps names to tensors, or to shapes (so a file can be checked before any of its
    data is read).

    Raises
    ------
    CheckpointError
        Naming the first missing or unexpected keys and shape mismatches.
    """
    shapes = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in tensors.items()}
    problems = layout_differences(shapes, {k: tuple(v.shape) for k, v in module.state_dict().items()}, "shape")
    if problems:
        raise CheckpointError(f"{source} does not match the model: {problems}")


# -- optimizer state --------------------------------------------------------------------------------
def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer state dict into ``optim.<param>.<key>`` tensors plus JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict[str, Any], source: str) -> None:
    """Restore what :func:`optimizer_to_tensors` wrote into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    groups = meta["param_groups"]
    current = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
        raise CheckpointError(f"{source}: optimizer parameter groups do not match the model.")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{source}: cannot restore the optimizer state: {exc}") from exc


# -- checkpoints ------------------------------------------------------------------------------------
class Retention:
    """Which checkpoint directories a job keeps: the newest :attr:`keep` (0: all), plus any whose
    file is also an artifact, plus the one this run resumed from.

    An artifact the server registered is a hard link to the file here (server.storage), so a
    link count above one marks it, across attempts and restarts, with no list to keep in step.
    ``keep`` comes from the job spec (the server's NEUROLENS_KEEP_CHECKPOINTS), set once by
    ``trainer.__main__``; the run's resumed directory is noted by :func:`find_latest_checkpoint`.
    """

    def __init__(self, keep: int = 3) -> None:
        self.keep = keep
        self.protected: set[Path] = set()

    def is_artifact(self, directory: Path) -> bool:
        try:
            return (directory / CHECKPOINT_FILENAME).stat().st_nlink > 1
        except OSError:
            return False

    def prune(self, job_dir: Path, keep: int | None = None) -> list[Path]:
        """Delete the checkpoint directories beyond the newest ``keep`` (default :attr:`keep`) that
        are neither artifacts nor protected; return those deleted."""
        keep = self.keep if keep is None else keep
        if keep <= 0:
            return []
        removed = []
        for old in list_checkpoints(job_dir)[:-keep]:
            if old.resolve() in self.protected or self.is_artifact(old):
                continue
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
        return removed


RETENTION = Retention()


def save_checkpoint(job_dir: Path, step: int, tensors: dict[str, torch.Tensor],
                    metadata: dict[str, Any], keep: int | None = None) -> Path:
    """Write ``checkpoints/step-XXXXXX/`` atomically, then prune older ones (:class:`Retention`).

    Parameters
    ----------
    job_dir : Path
        The job directory.
    step : int
        Optimizer steps completed.
    tensors : dict of str to Tensor
        All tensors (``model.*``, ``optim.*``, ``rng.*``); tied aliases are deduplicated.
    metadata : dict of str to object
        Values stored as JSON strings in the safetensors header. ``trainer_state`` is also
        written to ``state.json``.
    keep : int, optional
        Number of newest checkpoints to keep; default :data:`RETENTION`'s (the job's setting).

    Returns
    -------
    Path
        The checkpoint's ``checkpoint.safetensors``.
    """
    root = job_dir / CHECKPOINT_DIRNAME
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dirname(step)
    tmp = root / f".tmp-{step_dirname(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    kept, aliases = dedupe_tensors(tensors)
    header = {k: json.dumps(v) for k, v in metadata.items()}
    header["aliases"] = json.dumps(aliases)
    header["format"] = CHECKPOINT_FORMAT
    write_safetensors(kept, tmp / CHECKPOINT_FILENAME, header)
    _fsync_file(tmp / CHECKPOINT_FILENAME)
    with open(tmp / STATE_FILENAME, "w", encoding="utf-8") as fh:
        json.dump({"step": step, **metadata.get("trainer_state", {})}, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # the same step written again (e.g. stop right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    RETENTION.prune(job_dir, keep)
    return final / CHECKPOINT_FILENAME


def list_checkpoints(job_dir: Path) -> list[Path]:
    """Checkpoint directories under ``job_dir``, oldest first (by step)."""
    root = job_dir / CHECKPOINT_DIRNAME
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def _readable(path: Path) -> bool:
    try:
        return read_header(path).format == CHECKPOINT_FORMAT
    except (OSError, ArtifactFormatError):  # torn, foreign or gone
        return False


def find_latest_checkpoint(job_dir: Path) -> Path | None:
    """Newest complete checkpoint file, deleting torn directories and leftover temporaries.

    Returns
    -------
    Path or None
        The newest readable ``checkpoint.safetensors``, or ``None`` if there is none.
    """
    root = job_dir / CHECKPOINT_DIRNAME
    if not root.is_dir():
        return None
    for leftover in root.glob(".tmp-*"):
        log.info("removing incomplete checkpoint %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    for directory in reversed(list_checkpoints(job_dir)):
        path = directory / CHECKPOINT_FILENAME
        if _readable(path):
            RETENTION.protected.add(directory.resolve())  # what this run resumes from stays
            return path
        log.warning("removing unreadable checkpoint %s", directory)
        shutil.rmtree(directory, ignore_errors=True)
    return None


def load_checkpoint_into(path: Path, module: torch.nn.Module, prefix: str = "model."
                         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``prefix``-ed weights into ``module`` in place, one tensor at a time.

    Reading the whole file first would hold a second copy of the weights next to the module's
    own: 1 GB more at the moment a large run resumes. Here shapes are validated from the header,
    then each weight is read from the file straight into its parameter's memory
    (:class:`SafetensorsReader`; reading through a ``safe_open`` mapping cost the same 1 GB,
    in mapped pages).

    Returns
    -------
    others : dict of str to Tensor
        The file's other tensors (optimizer state, RNG states), read in full.
    metadata : dict
        The decoded JSON metadata (configs, trainer state; the aliases removed).

    Raises
    ------
    CheckpointError
        The file is unreadable, not a checkpoint, or does not match ``module``.
    """
    try:
        with SafetensorsReader(path) as reader:
            reader.header.require_format(ArtifactKind.checkpoint)
            meta = reader.header.json_metadata()
            aliases = meta.pop("aliases", {})
            stored = {name: name for name in reader.header.tensors}
            stored.update({alias: name for alias, name in aliases.items()})
            weights = {k[len(prefix):]: name for k, name in stored.items() if k.startswith(prefix)}
            validate_state_dict(module, {k: reader.shape(name) for k, name in weights.items()}, str(path))
            target = module.state_dict(keep_vars=True)
            for key, name in weights.items():
                reader.read_into(name, target[key])
            others = {k: reader.read(name) for k, name in stored.items() if not k.startswith(prefix)}
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"Cannot read checkpoint {path}: {exc}") from exc
    return others, meta

