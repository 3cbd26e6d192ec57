"""A config's lists resolved to feature files and split into train / validation / test parts (`Layout`),
before any feature value is read: what `vadclip.data.dataset` loads and `vadclip.data.cache` keys its packed
arrays by."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vadclip.config import VadClipConfig
from vadclip.data.classes import multi_hot
from vadclip.data.conventions import (
    CLASS_CODES,
    DATASET_NAMES,
    DEFAULT_TEST_CROP,
    crop_file_name,
    eval_files,
    has_validation_split,
    list_files,
)
from vadclip.data.errors import DataError
from vadclip.data.layout import ListRow, crop_files, read_list


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


def _eval_rows(csv: Path, features_dir: Path, style: str) -> list[ListRow]:
    """One row per video of an evaluated list (it holds one row per video, or every crop of it)."""
    listed = read_list(csv, features_dir, style)
    return [listed[idx[0]] for idx in _group_videos(listed, csv).values()]


@dataclass
class Layout:
    """What `load_dataset` reads from the lists before any feature value: the feature file(s) of each item
    of every part, in bank order, and the (cheap) labels. `files` has "train", "test" and, when videos are
    held out, "val"; "train" items are pooled to `pool_length`, the others kept whole."""
    lists_dir: Path
    features_dir: Path
    list_paths: list[Path]  # the train and test CSVs (and the validation CSV of a style that has one)
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

    own_val = has_validation_split(style)
    if own_val and d.val_fraction > 0:  # one validation source: the release's own split, with frame ground truth
        raise DataError(f"data.val_fraction={d.val_fraction}: {DATASET_NAMES[style]} validates on its own list "
                        f"{eval_files(style, 'val')['list']}; set data.val_fraction=0 (train on every training video)")
    rows = read_list(train_csv, features_dir, style)
    groups = _group_videos(rows, train_csv)
    videos = list(groups)
    held = split_videos(np.array([rows[groups[v][0]].classes == (0,) for v in videos]), d.val_fraction, cfg.seed)
    train_names = [v for v, h in zip(videos, held) if not h]
    video_index = {v: i for i, v in enumerate(train_names)}
    train_rows = [r for r in rows if r.video in video_index]
    files: dict[str, list[tuple[str, ...]]] = {"train": [(str(r.path),) for r in train_rows]}
    val_rows = [rows[groups[v][0]] for v, h in zip(videos, held) if h]
    list_paths = [train_csv, test_csv]
    if own_val:
        val_csv = lists_dir / eval_files(style, "val")["list"]
        val_rows = _eval_rows(val_csv, features_dir, style)
        list_paths.append(val_csv)
        files["val"] = [_eval_files(r, d.test_crop, style, val_csv) for r in val_rows]
    elif val_rows:
        files["val"] = [_eval_files(r, d.test_crop, style, train_csv) for r in val_rows]
    test_rows = _eval_rows(test_csv, features_dir, style)
    files["test"] = [_eval_files(r, d.test_crop, style, test_csv) for r in test_rows]
    return Layout(lists_dir=lists_dir, features_dir=features_dir, list_paths=list_paths, files=files,
                  pool_length=cfg.model.visual_length,
                  train_labels=np.stack([multi_hot(r.classes, num_classes) for r in train_rows]),
                  train_video=np.array([video_index[r.video] for r in train_rows], dtype=np.int64),
                  train_names=train_names, val_names=[r.video for r in val_rows],
                  val_labels=np.stack([multi_hot(r.classes, num_classes) for r in val_rows]) if val_rows else None,
                  test_names=[r.video for r in test_rows],
                  test_labels=np.stack([multi_hot(r.classes, num_classes) for r in test_rows]))
