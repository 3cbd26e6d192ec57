"""In-memory (or disk-backed) datasets built from the authors' layout: train samples, validation
videos and test videos. Everything is numpy arrays, lists and strings, so a `VadDataset` pickles
cheaply (Ray's object store shares the few large arrays without copies)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, cast

import numpy as np

from vadclip.config import VadClipConfig
from vadclip.data.batching import Bank, pool_to_length
from vadclip.data.classes import multi_hot
from vadclip.data.conventions import (
    CLASS_CODES,
    CLASS_PROMPTS,
    DEFAULT_TEST_CROP,
    SNIPPET_FRAMES,
    crop_file_name,
    list_files,
)
from vadclip.data.errors import DataError
from vadclip.data.layout import (
    ListRow,
    crop_files,
    feature_shape,
    ground_truth_paths,
    load_features,
    read_ground_truth,
    read_list,
)

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


@dataclass
class EvalSet:
    names: list[str]
    features: Bank  # raw (T_i, d) per video: the chosen test crop, or the mean over crops
    labels: np.ndarray  # (n, C) float32 multi-hot
    frame_gt: np.ndarray | None = None  # (SNIPPET_FRAMES * sum T,) float32, list order
    segments: list[list[tuple[int, int]]] | None = None  # frame [start, end) per gt segment
    segment_labels: list[list[str]] | None = None

    @property
    def is_abnormal(self) -> np.ndarray:
        return self.labels[:, 0] < 0.5

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class VadDataset:
    style: str
    class_prompts: list[str]
    class_codes: list[str]
    train: Bank  # one sample per training crop, pooled to <= visual_length
    train_labels: np.ndarray  # (N, C) float32
    train_video: np.ndarray  # (N,) int64: index into train_names
    val: EvalSet | None
    test: EvalSet
    feature_dim: int
    train_names: list[str] = field(default_factory=list)  # training video names


def split_videos(is_normal: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Bool mask of held-out videos: `fraction` of the normal and of the abnormal videos (at least
    one of each, never all), deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    is_normal = np.asarray(is_normal, dtype=bool)
    held = np.zeros(len(is_normal), dtype=bool)
    if fraction <= 0:
        return held
    for group in (is_normal, ~is_normal):
        idx = np.flatnonzero(group)
        if len(idx) < 2:
            continue
        k = int(np.clip(round(fraction * len(idx)), 1, len(idx) - 1))
        held[rng.permutation(idx)[:k]] = True
    return held


def _eval_files(row: ListRow, test_crop: str, style: str, csv: Path) -> tuple[str, ...]:
    """The crop file(s) that represent a video at evaluation (`data.test_crop`)."""
    if test_crop == "mean":
        found = crop_files(row.path, row.video)
        return tuple(str(p) for p in found.values()) or (str(row.path),)
    crop = DEFAULT_TEST_CROP[style] if test_crop == "default" else int(test_crop)
    if crop == row.crop:
        return (str(row.path),)
    sibling = row.path.with_name(crop_file_name(row.video, crop))
    if not sibling.is_file():
        raise DataError(f"{sibling}: crop {crop} of video {row.video} (listed in {csv}) not found; "
                        f"data.test_crop={test_crop!r} needs it next to {row.path.name}")
    return (str(sibling),)


def _folder(value: str | None, key: str, dataset: str) -> Path:
    if value is None:
        raise DataError(f"{key} is not set; data.dataset={dataset!r} needs it (the authors' "
                        f"{'list/ folder' if key == 'data.lists' else 'unpacked CLIP feature folder'})")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: {key} is not a directory")
    return path


def _group_videos(rows: list[ListRow], csv: Path) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.video, []).append(i)
    for video, idx in groups.items():
        if len({rows[i].classes for i in idx}) > 1:
            raise DataError(f"{csv}: crops of video {video} have different labels "
                            f"({sorted({rows[i].label for i in idx})}); expected one label per video")
    return groups


@dataclass
class Layout:
    """What `load_dataset` reads from the lists before any feature value: the feature file(s) of each item
    of every part, in bank order, and the (cheap) labels. `files` has "train", "test" and, when videos are
    held out, "val"; "train" items are pooled to `pool_length`, the others kept whole."""
    lists_dir: Path
    features_dir: Path
    list_paths: list[Path]  # the train and test CSVs
    files: dict[str, list[tuple[str, ...]]]
    pool_length: int
    train_labels: np.ndarray
    train_video: np.ndarray
    train_names: list[str]
    val_names: list[str]
    val_labels: np.ndarray | None
    test_names: list[str]
    test_labels: np.ndarray

    def pools(self) -> dict[str, int | None]:
        return {part: self.pool_length if part == "train" else None for part in self.files}


def read_layout(cfg: VadClipConfig) -> Layout:
    """The lists of `cfg.data` resolved to feature files (checked to exist; no feature is read), the
    train / validation split made (synthetic data: generated first if missing)."""
    style, d = cfg.style, cfg.data
    dim = cfg.model.embed_dim
    if d.dataset == "synthetic":
        # imported here: `python -m vadclip.data.synthetic` runs that module, which must not be imported first
        from vadclip.data.synthetic import ensure_synthetic

        lists_dir, features_dir = ensure_synthetic(d.synthetic, dim, cfg.seed, d.cache_dir)
    else:
        lists_dir = _folder(d.lists, "data.lists", d.dataset)
        features_dir = _folder(d.features, "data.features", d.dataset)
    names = list_files(style)
    train_csv, test_csv = lists_dir / names["train"], lists_dir / names["test"]
    num_classes = len(CLASS_CODES[style])

    rows = read_list(train_csv, features_dir, style)
    groups = _group_videos(rows, train_csv)
    videos = list(groups)
    held = split_videos(np.array([rows[groups[v][0]].classes == (0,) for v in videos]), d.val_fraction, cfg.seed)
    train_names = [v for v, h in zip(videos, held) if not h]
    video_index = {v: i for i, v in enumerate(train_names)}
    train_rows = [r for r in rows if r.video in video_index]
    files: dict[str, list[tuple[str, ...]]] = {"train": [(str(r.path),) for r in train_rows]}
    val_rows = [rows[groups[v][0]] for v, h in zip(videos, held) if h]
    if val_rows:
        files["val"] = [_eval_files(r, d.test_crop, style, train_csv) for r in val_rows]
    listed = read_list(test_csv, features_dir, style)  # one row per video, or every crop of it
    test_rows = [listed[idx[0]] for idx in _group_videos(listed, test_csv).values()]
    files["test"] = [_eval_files(r, d.test_crop, style, test_csv) for r in test_rows]
    return Layout(lists_dir=lists_dir, features_dir=features_dir, list_paths=[train_csv, test_csv], files=files,
                  pool_length=cfg.model.visual_length,
                  train_labels=np.stack([multi_hot(r.classes, num_classes) for r in train_rows]),
                  train_video=np.array([video_index[r.video] for r in train_rows], dtype=np.int64),
                  train_names=train_names, val_names=[r.video for r in val_rows],
                  val_labels=np.stack([multi_hot(r.classes, num_classes) for r in val_rows]) if val_rows else None,
                  test_names=[r.video for r in test_rows],
                  test_labels=np.stack([multi_hot(r.classes, num_classes) for r in test_rows]))


def load_dataset(cfg: VadClipConfig) -> VadDataset:
    """Train / validation / test data of `cfg.data` (synthetic data goes through the same reader). In memory:
    from the packed feature cache (`data.feature_cache`, `vadclip.data.cache`) or by reading every file;
    `data.in_memory = False`: read from the files at each access."""
    style, d, dim = cfg.style, cfg.data, cfg.model.embed_dim
    layout = read_layout(cfg)
    # the list folder whole before any feature is read: packing a real cache takes minutes
    frame_gt, segments, segment_labels = read_ground_truth(layout.lists_dir, style)
    banks: dict[str, Bank]
    if d.in_memory and d.feature_cache:
        from vadclip.data.cache import open_banks  # the cache builds on this module's banks

        banks = dict(open_banks(cfg, layout))
    else:
        pools = layout.pools()
        banks = {part: build_bank(files, dim, pools[part], d.in_memory) for part, files in layout.files.items()}

    val = None
    if layout.val_labels is not None:
        val = EvalSet(names=layout.val_names, features=banks["val"], labels=layout.val_labels)
    test_bank, names = banks["test"], list_files(style)
    test_csv = layout.list_paths[1]
    expected = SNIPPET_FRAMES * int(test_bank.lengths.sum())
    if len(frame_gt) != expected:
        gt_path = ground_truth_paths(layout.lists_dir, style)[0]
        raise DataError(f"{gt_path}: {len(frame_gt)} frames, expected {expected} "
                        f"({SNIPPET_FRAMES} per snippet of the {len(test_bank)} videos of {test_csv.name}, "
                        f"in list order)")
    if len(segments) != len(test_bank):
        raise DataError(f"{layout.lists_dir / names['segments']}: {len(segments)} videos, expected {len(test_bank)} "
                        f"(one entry per row of {test_csv.name}, in list order)")
    test = EvalSet(names=layout.test_names, features=test_bank, labels=layout.test_labels,
                   frame_gt=frame_gt, segments=segments, segment_labels=segment_labels)
    return VadDataset(style=style, class_prompts=list(CLASS_PROMPTS[style]), class_codes=list(CLASS_CODES[style]),
                      train=banks["train"], train_labels=layout.train_labels, train_video=layout.train_video,
                      val=val, test=test, feature_dim=dim, train_names=layout.train_names)


def describe(data: VadDataset) -> str:
    """One line of what a dataset holds (printed once per run, so that a wrong list or split shows at the start)."""
    videos = len(data.train_names) or len(np.unique(data.train_video))
    val = 0 if data.val is None else len(data.val)
    snippets = int(np.asarray(data.test.features.lengths).sum())
    return (f"data: {len(data.train)} training crops of {videos} videos, {val} validation videos, "
            f"{len(data.test)} test videos ({snippets} snippets)")
