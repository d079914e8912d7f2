"""Stage 2's on-disk cache of encoder features, read a batch at a time through a memory map.

The frozen encoder's features of every sentence window (:meth:`MultiViewEncoder.patch_features`,
``(n, P, C·D)`` float32) are computed once per job and encoder file and stored as a ``.npy``
file. Training then reads the rows of each batch through a read-only memory map and, on Linux,
tells the kernel right after that it may drop those pages (``MADV_DONTNEED``): file pages a
process has mapped count in its resident set, so a plain ``np.load(mmap_mode='r')`` would let
the whole cache (600 MB for the ``large`` encoder on the synthetic set) creep into the trainer's
RSS over an epoch, which is what the Stage 2 memory bound is measured on.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import mmap
import os
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from trainer import export
from trainer.memory_prediction import embedding_batch

log = logging.getLogger(__name__)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FeatureCache:
    """Read-only rows of a ``.npy`` array, without keeping what was read resident.

    Parameters
    ----------
    path : Path
        A C-ordered ``.npy`` file written by :func:`cached_features`.
    """

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
        if fortran:
            raise ValueError(f"{path}: expected a C-ordered array")
        self.path, self.shape, self.dtype, self.offset = path, tuple(shape), np.dtype(dtype), offset
        self.row_bytes = int(np.prod(shape[1:])) * self.dtype.itemsize
        self._file = open(path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, index: Iterable[int]) -> np.ndarray:
        """A copy of the given rows (in the order given), their pages released afterwards."""
        index = [int(i) for i in index]
        out = np.empty((len(index),) + self.shape[1:], self.dtype)
        for k, i in enumerate(index):
            start = self.offset + i * self.row_bytes
            out[k] = np.frombuffer(self._map, self.dtype, count=self.row_bytes // self.dtype.itemsize,
                                   offset=start).reshape(self.shape[1:])
            self._release(start, self.row_bytes)
        return out

    def _release(self, start: int, length: int) -> None:
        if not hasattr(mmap, "MADV_DONTNEED"):  # not Linux: the pages are left to the kernel
            return
        page = mmap.PAGESIZE
        begin = start - start % page
        self._map.madvise(mmap.MADV_DONTNEED, begin, min(len(self._map) - begin, start + length - begin))

    def batches(self, index: np.ndarray, batch: int) -> Iterator[np.ndarray]:
        for i in range(0, len(index), batch):
            yield self.rows(index[i:i + batch])

    def close(self) -> None:
        self._map.close()
        self._file.close()


def cached_features(job_dir: Path, encoder_path: Path, x: np.ndarray, mask: np.ndarray,
                    device: torch.device) -> FeatureCache:
    """Features ``(n, P, C·D)`` of all sentence windows, computed once and cached in the job dir.

    The cache is keyed by the encoder file's sha256 and the number of windows, written through
    a temporary file and ``os.replace`` (so a resumed attempt skips the encoder entirely), and
    filled batch by batch into an ``np.lib.format.open_memmap`` so the features never need to
    fit in memory at once. The encoder is loaded only here and released before returning.
    """
    cache = job_dir / "cache" / f"features-{file_digest(encoder_path)[:16]}-{len(x)}.npy"
    if not cache.is_file():
        encoder = export.load_encoder(encoder_path).to(device).eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
        config = encoder.config
        batch = embedding_batch(config)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".tmp-{cache.name}-{os.getpid()}")
        shape = (len(x), config.n_patches, len(config.channels) * config.d_model)
        started = time.perf_counter()
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        with torch.no_grad():
            for i in range(0, len(x), batch):
                xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch])).to(device)
                mb = torch.from_numpy(np.ascontiguousarray(mask[i:i + batch])).to(device)
                out[i:i + batch] = encoder.patch_features(xb, mb).float().cpu().numpy()
        out.flush()
        del out, encoder
        gc.collect()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, cache)
        log.info("encoded %d sentence windows in %.1f s", len(x), time.perf_counter() - started)
    return FeatureCache(cache)


def feature_statistics(batches: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-(patch, feature) mean and standard deviation over all rows of ``batches`` (float64 sums)."""
    total = total_sq = None
    count = 0
    for b in batches:
        b64 = b.astype(np.float64)
        total = b64.sum(0) if total is None else total + b64.sum(0)
        total_sq = (b64 ** 2).sum(0) if total_sq is None else total_sq + (b64 ** 2).sum(0)
        count += len(b)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    return mean.astype(np.float32), std.astype(np.float32)
