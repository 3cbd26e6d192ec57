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
from vadclip.data.conventions import CLASS_CODES, CLASS_PROMPTS, SNIPPET_FRAMES, eval_files, has_validation_split
from vadclip.data.errors import DataError
from vadclip.data.layout import ground_truth_paths, read_ground_truth
from vadclip.data.split import Layout, read_layout


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
    splits = ("test", "val") if has_validation_split(style) else ("test",)
    truth = {split: read_ground_truth(layout.lists_dir, style, split) for split in splits}
    banks: dict[str, Bank]
    if d.in_memory and d.feature_cache:
        banks = dict(open_banks(cfg, layout))
    else:
        pools = layout.pools()
        banks = {part: build_bank(files, dim, pools[part], d.in_memory) for part, files in layout.files.items()}

    val = None
    if "val" in truth and layout.val_labels is not None:  # the release's own validation split, with frame labels
        val = _with_truth(layout, style, "val", banks["val"], layout.val_names, layout.val_labels, truth["val"])
    elif layout.val_labels is not None:
        val = EvalSet(names=layout.val_names, features=banks["val"], labels=layout.val_labels)
    test = _with_truth(layout, style, "test", banks["test"], layout.test_names, layout.test_labels, truth["test"])
    return VadDataset(style=style, class_prompts=list(CLASS_PROMPTS[style]), class_codes=list(CLASS_CODES[style]),
                      train=banks["train"], train_labels=layout.train_labels, train_video=layout.train_video,
                      val=val, test=test, feature_dim=dim, train_names=layout.train_names)


def _with_truth(layout: Layout, style: str, split: str, bank: Bank, names: list[str], labels: np.ndarray,
                truth: tuple[np.ndarray, list[list[tuple[int, int]]], list[list[str]]]) -> EvalSet:
    """An evaluated split with its ground truth, checked to match its features: 16 frames per snippet."""
    frame_gt, segments, segment_labels = truth
    files = eval_files(style, split)
    csv = layout.lists_dir / files["list"]
    expected = SNIPPET_FRAMES * int(bank.lengths.sum())
    if len(frame_gt) != expected:
        gt_path = ground_truth_paths(layout.lists_dir, style, split)[0]
        raise DataError(f"{gt_path}: {len(frame_gt)} frames, expected {expected} "
                        f"({SNIPPET_FRAMES} per snippet of the {len(bank)} videos of {csv.name}, "
                        f"in list order)")
    if len(segments) != len(bank):
        raise DataError(f"{layout.lists_dir / files['segments']}: {len(segments)} videos, expected {len(bank)} "
                        f"(one entry per row of {csv.name}, in list order)")
    return EvalSet(names=names, features=bank, labels=labels, frame_gt=frame_gt, segments=segments,
                   segment_labels=segment_labels)


def describe(data: VadDataset) -> str:
    """One line of what a dataset holds (printed once per run, so that a wrong list or split shows at the start)."""
    videos = len(data.train_names) or len(np.unique(data.train_video))
    val = 0 if data.val is None else len(data.val)
    snippets = int(np.asarray(data.test.features.lengths).sum())
    return (f"data: {len(data.train)} training crops of {videos} videos, {val} validation videos, "
            f"{len(data.test)} test videos ({snippets} snippets)")
