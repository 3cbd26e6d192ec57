"""In-memory (or disk-backed) datasets built from the authors' layout: train samples, validation
videos and test videos. Everything is numpy arrays, lists and strings, so a `VadDataset` pickles
cheaply (Ray's object store shares the few large arrays without copies)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vadclip.config import VadClipConfig
from vadclip.data.banks import build_bank
from vadclip.data.batching import Bank
from vadclip.data.cache import open_banks
from vadclip.data.conventions import CLASS_CODES, CLASS_PROMPTS, SNIPPET_FRAMES, list_files
from vadclip.data.errors import DataError
from vadclip.data.layout import ground_truth_paths, read_ground_truth
from vadclip.data.split import read_layout


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
