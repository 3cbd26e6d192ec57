"""Test-set uncertainty of one run: the frame metrics recomputed on resamples of the test VIDEOS.

Videos, not frames, are the independent units (a video's frames are strongly correlated), so each
bootstrap replicate draws the test videos with replacement. The frame arrays are never rebuilt: each
video is collapsed once to its unique (snippet score, gt) cells with frame counts, and a replicate is a
weighted sklearn call with weight = frame count × the video's multiplicity in the resample. For ROC AUC
and sklearn's step-wise AP an integer weight equals that many replicated samples, so multiplicities all
1 reproduce `vadclip.metrics.frame_metrics` to float rounding.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import auc as area_under_curve
from sklearn.metrics import average_precision_score, roc_curve

from vadclip.data.conventions import SNIPPET_FRAMES
from vadclip.io import atomic_write

TEST_SCORES_FILE = "test_scores.npz"
BOOTSTRAP_FILE = "bootstrap.npz"
BOOTSTRAP_METRICS = ("auc", "ap", "ano_auc")
N_RESAMPLES = 1000
BLOCK_ELEMENTS = 2**22  # replicates × cells per block of video_bootstrap: ~32 MiB per float64 array

_SCORE_KEYS = ("scores", "snippet_counts", "frame_gt_bits", "frame_gt_length", "is_abnormal", "snippet_frames")
_SEED_KEY = "seed"  # reserved key of the bootstrap file next to the metric arrays


@dataclass(frozen=True, eq=False)  # eq=False: the generated == would compare arrays, which is ambiguous
class TestScores:
    """A run's per-snippet test scores with the frame ground truth they are scored against.

    `video_scores[i]`: (T_i,) snippet scores; `frame_gt`: 0/1 per frame, length Σ T_i · snippet_frames;
    `is_abnormal[i]`: video i counts for `ano_auc`. Inputs are normalised to 1-D arrays and checked.
    """

    __test__ = False  # a data class, not a pytest test class

    video_scores: list[np.ndarray]
    frame_gt: np.ndarray
    is_abnormal: np.ndarray
    snippet_frames: int = SNIPPET_FRAMES

    def __post_init__(self) -> None:
        scores = [np.asarray(s) for s in self.video_scores]
        for i, s in enumerate(scores):
            if s.ndim != 1:
                raise ValueError(f"video_scores[{i}] must be 1-D (T,), got shape {s.shape}")
        gt = np.asarray(self.frame_gt).reshape(-1)
        abnormal = np.asarray(self.is_abnormal, dtype=bool).reshape(-1)
        if self.snippet_frames < 1:
            raise ValueError(f"snippet_frames must be >= 1, got {self.snippet_frames}")
        if len(abnormal) != len(scores):
            raise ValueError(f"is_abnormal has {len(abnormal)} entries but there are {len(scores)} videos")
        n_frames = sum(len(s) for s in scores) * self.snippet_frames
        if len(gt) != n_frames:
            raise ValueError(f"repeated scores have {n_frames} frames ({self.snippet_frames} per snippet) "
                             f"but frame_gt has {len(gt)}")
        if not np.isin(gt, (0, 1)).all():  # bit-packing and the cells assume a binary gt
            raise ValueError("frame_gt must hold 0/1 only")
        object.__setattr__(self, "video_scores", scores)
        object.__setattr__(self, "frame_gt", gt)
        object.__setattr__(self, "is_abnormal", abnormal)


# ----------------------------------------------------------------------------- files


def save_test_scores(path: str | os.PathLike[str], scores: TestScores) -> Path:
    """Write `scores` compactly (float32 scores, bit-packed gt) to `path` atomically; returns the path.

    Scores are stored as float32: lossless for the trainer's float32 scores, rounded otherwise.
    """
    path = Path(path)
    arrays: dict[str, Any] = {  # Any: numpy's stubs type **kwds as if they could fill `allow_pickle`
        "scores": np.concatenate([np.zeros(0, np.float32), *scores.video_scores]).astype(np.float32),
        "snippet_counts": np.array([len(s) for s in scores.video_scores], dtype=np.int64),
        "frame_gt_bits": np.packbits(scores.frame_gt.astype(bool)),
        "frame_gt_length": np.int64(len(scores.frame_gt)),
        "is_abnormal": scores.is_abnormal,
        "snippet_frames": np.int64(scores.snippet_frames),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
    return path


def _read_npz(path: Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """All arrays of an npz file (requiring `keys`); a damaged file raises ValueError naming it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys or () if k not in data.files]
            if missing:
                raise ValueError(f"missing key(s) {missing}")
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: malformed file ({e})") from e


def load_test_scores(path: str | os.PathLike[str]) -> TestScores:
    """Inverse of `save_test_scores`: scores float32, frame_gt uint8, is_abnormal bool."""
    path = Path(path)
    d = _read_npz(path, _SCORE_KEYS)
    try:
        counts = d["snippet_counts"].astype(np.int64)
        n_gt = int(d["frame_gt_length"])
        if counts.ndim != 1 or (counts < 0).any() or counts.sum() != len(d["scores"]):
            raise ValueError(f"snippet counts sum to {counts.sum()} but there are {len(d['scores'])} scores")
        if len(d["frame_gt_bits"]) != (n_gt + 7) // 8:
            raise ValueError(f"{len(d['frame_gt_bits'])} gt bytes cannot hold {n_gt} frames")
        gt = np.unpackbits(d["frame_gt_bits"], count=n_gt)
        video_scores = np.split(d["scores"].astype(np.float32), np.cumsum(counts)[:-1]) if len(counts) else []
        return TestScores(video_scores, gt, d["is_abnormal"], int(d["snippet_frames"]))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: malformed test scores file ({e})") from e


def save_bootstrap(path: str | os.PathLike[str], replicates: dict[str, np.ndarray], seed: int) -> Path:
    """Write the replicate arrays (one per metric) and their seed to `path` atomically; returns the path."""
    path = Path(path)
    if _SEED_KEY in replicates:
        raise ValueError(f"{_SEED_KEY!r} is reserved for the seed and cannot name a metric")
    arrays: dict[str, Any] = {k: np.asarray(v, dtype=np.float64) for k, v in replicates.items()}
    arrays[_SEED_KEY] = np.int64(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
    return path


def load_bootstrap(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The replicate arrays of `save_bootstrap`, per metric (the seed is not returned)."""
    path = Path(path)
    d = _read_npz(path, (_SEED_KEY,))
    out = {k: v for k, v in d.items() if k != _SEED_KEY}
    if any(v.ndim != 1 for v in out.values()) or len({len(v) for v in out.values()}) > 1:
        raise ValueError(f"{path}: malformed bootstrap file (replicate arrays must be 1-D of one length)")
    return out


# ----------------------------------------------------------------------------- cells and metrics


@dataclass(frozen=True, eq=False)
class Cells:
    """The test frames collapsed to unique (video, snippet score, gt) cells, sorted by ascending score.

    Every masked subset keeps that order, so sklearn's stable (timsort) argsort of the scores runs in linear time.
    """

    video: np.ndarray  # (n,) int64: the cell's video
    score: np.ndarray  # (n,) the snippet score, in its original dtype (exact ties and order as frame_metrics)
    positive: np.ndarray  # (n,) bool: gt == 1
    frames: np.ndarray  # (n,) float64: frames in the cell
    abnormal: np.ndarray  # (n,) bool: the cell's video counts for ano_auc
    n_videos: int


def collapse(scores: TestScores) -> Cells:
    """Each video's frames as unique (score, gt) cells with frame counts."""
    sf, n_videos = scores.snippet_frames, len(scores.video_scores)
    lengths = np.array([len(s) for s in scores.video_scores], dtype=np.int64)
    snippet_score = np.concatenate(scores.video_scores) if n_videos else np.zeros(0)
    snippet_video = np.repeat(np.arange(n_videos, dtype=np.int64), lengths)
    # a video's frames are contiguous and snippet-aligned, so row j holds snippet j's frames
    n_pos = scores.frame_gt.reshape(-1, sf).sum(axis=1, dtype=np.int64)
    video = np.concatenate([snippet_video, snippet_video])
    score = np.concatenate([snippet_score, snippet_score])
    positive = np.repeat([True, False], len(snippet_score))
    frames = np.concatenate([n_pos, sf - n_pos])
    keep = frames > 0
    video, score, positive, frames = video[keep], score[keep], positive[keep], frames[keep]
    # merge tied scores within a video: sort by (video, score, gt) and sum the runs
    order = np.lexsort((positive, score, video))
    video, score, positive, frames = video[order], score[order], positive[order], frames[order]
    new = np.ones(len(video), dtype=bool)
    new[1:] = (video[1:] != video[:-1]) | (score[1:] != score[:-1]) | (positive[1:] != positive[:-1])
    starts = np.flatnonzero(new)
    frames = np.add.reduceat(frames, starts) if len(starts) else frames
    video, score, positive = video[starts], score[starts], positive[starts]
    asc = np.argsort(score, kind="stable")
    video = video[asc]
    return Cells(video, score[asc], positive[asc], frames[asc].astype(np.float64),
                 scores.is_abnormal[video], n_videos)


def _auc_ap(positive: np.ndarray, score: np.ndarray, weight: np.ndarray, with_ap: bool) -> tuple[float, float]:
    """Weighted ROC AUC and AP over the cells of positive weight; NaN when those hold one class."""
    used = weight > 0
    positive, score, weight = positive[used], score[used], weight[used]
    if positive.all() or not positive.any():
        return float("nan"), float("nan")
    # what roc_auc_score computes for binary labels, without its label checks (half the time per replicate)
    fpr, tpr, _ = roc_curve(positive, score, sample_weight=weight)
    auc = float(area_under_curve(fpr, tpr))
    ap = float(average_precision_score(positive, score, sample_weight=weight)) if with_ap else float("nan")
    return auc, ap


def weighted_metrics(cells: Cells, counts: np.ndarray) -> dict[str, float]:
    """auc / ap / ano_auc with video i taken `counts[i]` times (frame_metrics of the replicated video list)."""
    counts = np.asarray(counts)
    if counts.shape != (cells.n_videos,):
        raise ValueError(f"counts must have shape ({cells.n_videos},), got {counts.shape}")
    weight = cells.frames * counts[cells.video]
    auc, ap = _auc_ap(cells.positive, cells.score, weight, with_ap=True)
    ano = cells.abnormal
    ano_auc, _ = _auc_ap(cells.positive[ano], cells.score[ano], weight[ano], with_ap=False)
    return {"auc": auc, "ap": ap, "ano_auc": ano_auc}


def point_estimates(scores: TestScores) -> dict[str, float]:
    """The metrics on the test set as it is (every video once): equals `frame_metrics`."""
    cells = collapse(scores)
    return weighted_metrics(cells, np.ones(cells.n_videos, dtype=np.int64))


def _curve_metrics(positive: np.ndarray, score: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC and step-wise AP of many weightings at once: `weight` (B, n) over cells in ascending score order.

    sklearn's curves, vectorised over the B rows: cumulative true/false positives (weight 0 adds exactly 0) read
    at the end of each run of tied scores, in descending score order; NaN where a row's cells hold one class.
    """
    desc = slice(None, None, -1)  # sklearn's order: the reverse of a stable ascending sort
    score, w = score[desc], weight[:, desc]
    hit = positive[desc].astype(np.float64)
    ends = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]  # the last cell of each distinct score
    tps = np.cumsum(w * hit, axis=1)[:, ends]
    fps = np.cumsum(w * (1.0 - hit), axis=1)[:, ends]
    p, n = tps[:, -1:], fps[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.hstack([np.zeros_like(p), tps / p])
        fpr = np.hstack([np.zeros_like(n), fps / n])
        auc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
        precision = np.where(tps + fps > 0, tps / (tps + fps), 0.0)
        ap = np.sum(np.diff(tpr, axis=1) * precision, axis=1)  # Σ (R_k − R_k−1) P_k
    undefined = (p[:, 0] <= 0) | (n[:, 0] <= 0)
    auc[undefined], ap[undefined] = np.nan, np.nan
    return auc, np.maximum(ap, 0.0)


def video_bootstrap(scores: TestScores, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict[str, np.ndarray]:
    """Per metric, `n_resamples` replicate values on resamples of the test videos drawn with replacement.

    A replicate where a metric is undefined (its frames hold one class) is NaN. Deterministic under `seed`.
    The replicates are computed in blocks (`_curve_metrics`); they equal `weighted_metrics` per replicate to float
    rounding (tested), at a tenth of its time.
    """
    cells = collapse(scores)
    out = {m: np.full(n_resamples, np.nan) for m in BOOTSTRAP_METRICS}
    if cells.n_videos == 0:
        return out
    rng = np.random.default_rng(seed)
    # the multiplicities of n draws with replacement from n videos are Multinomial(n, uniform)
    multiplicities = rng.multinomial(cells.n_videos, np.full(cells.n_videos, 1 / cells.n_videos), size=n_resamples)
    ano = cells.abnormal
    block = max(1, BLOCK_ELEMENTS // max(len(cells.score), 1))
    for lo in range(0, n_resamples, block):
        weight = cells.frames * multiplicities[lo:lo + block][:, cells.video]
        out["auc"][lo:lo + block], out["ap"][lo:lo + block] = _curve_metrics(cells.positive, cells.score, weight)
        out["ano_auc"][lo:lo + block], _ = _curve_metrics(cells.positive[ano], cells.score[ano], weight[:, ano])
    return out


def percentile_interval(replicates: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the finite replicates; (nan, nan) when none is finite."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = np.asarray(replicates, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(low), float(high)
