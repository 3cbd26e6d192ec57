"""Feature banks: ragged (T_i, d) float32 arrays by index, in memory (`FeatureBank`) or read from the feature
files at each access (`DiskFeatureBank`), and the threaded reads that fill them. `vadclip.data.cache` packs and
maps them; `vadclip.data.dataset` builds them for each part of a layout."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar, cast

import numpy as np

from vadclip.data.batching import Bank, pool_to_length
from vadclip.data.errors import DataError
from vadclip.data.layout import feature_shape, load_features

_T = TypeVar("_T")
_R = TypeVar("_R")


def parallel_map(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    # np.load releases the GIL while reading: threads speed up reading tens of thousands of files
    workers = min(8, os.cpu_count() or 1)
    if workers == 1 or len(items) < 32:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


class FeatureBank:
    """Ragged (T_i, d) arrays stored as one `data (sum T, d)` float32 array and `offsets (n+1,)`."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self.data = np.asarray(data, dtype=np.float32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if self.data.ndim != 2 or self.offsets.ndim != 1 or self.offsets[-1] != len(self.data):
            raise ValueError("FeatureBank: need data (sum T, d) and offsets (n+1,) ending at sum T")

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], dim: int | None = None) -> FeatureBank:
        lengths = [len(a) for a in arrays]
        width = dim if dim is not None else (arrays[0].shape[1] if arrays else 0)
        data = np.concatenate(arrays).astype(np.float32, copy=False) if arrays else np.zeros((0, width), np.float32)
        return cls(data, np.concatenate([[0], np.cumsum(lengths)]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        i = range(len(self))[i]  # negative indices, IndexError
        return self.data[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def feature_dim(self) -> int:
        return int(self.data.shape[1])

    def subset(self, indices: Sequence[int] | np.ndarray) -> FeatureBank:
        return FeatureBank.from_arrays([self[int(i)] for i in indices], self.feature_dim)


def _read_item(files: Sequence[str], dim: int, pool_length: int | None) -> np.ndarray:
    """One sample: a crop file, or the mean over several crop files of one video; pooled if asked."""
    arrays = [load_features(f, dim) for f in files]
    if any(a.shape != arrays[0].shape for a in arrays):
        shapes = ", ".join(f"{Path(f).name} {a.shape}" for f, a in zip(files, arrays))
        raise DataError(f"crops of one video differ in length ({shapes}); expected equal (T, {dim})")
    with np.errstate(over="ignore"):  # reported below, naming the file
        # np.mean over axis 0 of (n, T, dim) is a (T, dim) array; numpy's stubs also allow a scalar
        x = arrays[0] if len(arrays) == 1 else cast(np.ndarray, np.mean(arrays, axis=0, dtype=np.float32))
        x = pool_to_length(x, pool_length) if pool_length is not None else x
    if (len(arrays) > 1 or pool_length is not None) and not np.isfinite(x).all():  # each file is finite
        raise DataError(f"{files[0]}: the mean over its crops or pooled snippets overflows float32; expected "
                        f"feature values far below float32's limit (3.4e38)")
    return x


def _item_length(files: Sequence[str], dim: int, pool_length: int | None) -> int:
    shapes = [feature_shape(f, dim) for f in files]
    if any(s != shapes[0] for s in shapes):
        raise DataError(f"crops of one video differ in length ({', '.join(map(str, files))}: {shapes}); "
                        f"expected equal (T, {dim})")
    t = shapes[0][0]
    return min(t, pool_length) if pool_length is not None else t


class DiskFeatureBank:
    """Same interface as `FeatureBank`, but every access np.loads (and averages / pools) the files,
    the authors' behaviour (`data.in_memory = False`). Lengths come from the .npy headers; values (finite)
    are checked at each read, so a bad file is named when first drawn, not at construction."""

    def __init__(self, files: Sequence[Sequence[str | Path]], dim: int, pool_length: int | None = None,
                 lengths: np.ndarray | None = None) -> None:
        self.files = [tuple(str(f) for f in item) for item in files]
        self.dim = dim
        self.pool_length = pool_length
        if lengths is None:
            lengths = np.asarray(parallel_map(lambda f: _item_length(f, dim, pool_length), self.files),
                                 dtype=np.int64)
        self._lengths = np.asarray(lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        return _read_item(self.files[range(len(self))[i]], self.dim, self.pool_length)

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    @property
    def feature_dim(self) -> int:
        return self.dim


def build_bank(files: Sequence[Sequence[str | Path]], dim: int, pool_length: int | None,
               in_memory: bool) -> Bank:
    """Read every item once into a `FeatureBank` (preallocated from the headers: no 2x peak memory),
    or wrap the files in a `DiskFeatureBank`."""
    disk = DiskFeatureBank(files, dim, pool_length)
    if not in_memory:
        return disk
    offsets = disk_offsets(disk)
    data = np.empty((int(offsets[-1]), dim), dtype=np.float32)
    pack(disk, data, offsets)
    return FeatureBank(data, offsets)


def disk_offsets(disk: DiskFeatureBank) -> np.ndarray:
    """(n+1,) int64 row offsets of the items of `disk` packed one after another (from the headers' lengths)."""
    return np.concatenate([[0], np.cumsum(disk.lengths)]).astype(np.int64)


def pack(disk: DiskFeatureBank, out: np.ndarray, offsets: np.ndarray,
         convert: Callable[[int, np.ndarray], np.ndarray] | None = None) -> None:
    """Read every item of `disk` into rows offsets[i]:offsets[i+1] of `out` (an array or a memory map), in threads;
    `convert(i, x)` (optional) turns item i into what is stored. A file whose length changed since its header was
    read raises DataError naming it."""
    def fill(i: int) -> None:
        x = disk[i]
        if len(x) != offsets[i + 1] - offsets[i]:
            raise DataError(f"{disk.files[i][0]}: length changed while it was read; expected "
                            f"{offsets[i + 1] - offsets[i]} snippets, read {len(x)}")
        out[offsets[i]:offsets[i + 1]] = x if convert is None else convert(i, x)

    parallel_map(fill, range(len(disk)))
