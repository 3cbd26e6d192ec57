"""Evaluation metrics of VadCLIP: frame-level AUC / AP / AnoAUC, video-level AUC / AP for splits
with video labels only, and the fine-grained detection mAP@IoU of the authors' `getDetectionMAP`.

Conventions follow the official code (its test scripts and `getDetectionMAP`): snippet scores are
brought to frame resolution with `np.repeat(·, 16)`, sklearn's `roc_auc_score` and
`average_precision_score` (step-wise AP, not the trapezoid area under the PR curve) are used, and
the mAP is reported in percent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from vadclip.data.conventions import GT_NORMAL, SNIPPET_FRAMES

MAP_PROTOCOLS = ("official", "paper")

# ---------------------------------------------------------------- the metric vocabulary (one home)
# Names as computed: auc/ap/ano_auc (fractions), map@0.1..map@0.5 and map_avg (percent, as the authors print),
# each also per branch with a `c_`/`a_` prefix. MLflow keys allow no '@': `map@0.1` is logged as `map_iou0.1`.
CORE_METRICS = ("auc", "ap", "ano_auc", "map_avg")  # the paper's headline columns, in its order
MAP_IOUS = (0.1, 0.2, 0.3, 0.4, 0.5)  # the IoU thresholds of the authors' getDetectionMAP


def map_level(iou: float) -> str:
    """The name of the mAP at one IoU threshold: 0.1 -> `map@0.1`."""
    return f"map@{iou:g}"


MAP_LEVELS = tuple(map_level(t) for t in MAP_IOUS)
LABELS = {"auc": "AUC", "ap": "AP", "ano_auc": "AnoAUC", "map_avg": "mAP AVG"}
FRACTIONS = ("auc", "ap", "ano_auc")  # logged as fractions, shown in percent


def mlflow_key(name: str) -> str:
    """A metric name as MLflow stores it: `map@0.1` -> `map_iou0.1` (also inside `test/...`, `final/...`)."""
    return name.replace("@", "_iou")


def metric_name(key: str) -> str:
    """Inverse of `mlflow_key`."""
    return key.replace("_iou", "@")


def _unbranched(name: str) -> str:
    name = metric_name(name)
    return name[2:] if name[:2] in ("c_", "a_") else name


def is_fraction(name: str) -> bool:
    """auc/ap/ano_auc (also per branch: c_auc, a_ap) are fractions; mAP is already percent."""
    return _unbranched(name) in FRACTIONS


def percent_scale(name: str) -> float:
    return 100.0 if is_fraction(name) else 1.0


def shown_range(name: str) -> tuple[float, float] | None:
    """The values a metric can take, in the table's units (percent); None for unbounded ones (epochs, seconds)."""
    base = _unbranched(name)
    return (0.0, 100.0) if base in FRACTIONS or base == "map_avg" or base.startswith("map@") else None


def label(name: str) -> str:
    """The paper's column label: AUC, AP, AnoAUC, mAP AVG, mAP@0.1 (accepts MLflow keys too)."""
    name = metric_name(name)
    return LABELS.get(name, name.replace("map@", "mAP@"))


# Constants hard-coded in the authors' getLocMAP.
_TOPK_DIVISOR = 16  # c_s = mean of the top int(n_frames / 16) frames (literal 16, not the snippet length)
# thr_set = np.arange(0.6, 0.7, 0.1) == [np.float64(0.6)]; kept as a float64 scalar so that the threshold
# is computed and compared in float64 exactly as the authors' expression does under NumPy >= 2.
_THRESHOLD_RATIO = np.float64(0.6)
_MIN_RUN_FRAMES = 2  # keep runs with end - start >= 2
_CLASS_SCORE_WEIGHT = 0.7  # proposal score = max prob in run + 0.7 * c_s
_NMS_IOU = 0.6  # per-video NMS, a proposal is suppressed if IoU > 0.6


def _auc_ap(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """ROC-AUC and AP; both NaN when only one class is present (sklearn would raise / warn)."""
    if np.unique(y_true).size < 2:
        return float("nan"), float("nan")
    return float(roc_auc_score(y_true, scores)), float(average_precision_score(y_true, scores))


def _as_1d_scores(video_scores: Sequence[np.ndarray]) -> list[np.ndarray]:
    out = []
    for i, s in enumerate(video_scores):
        a = np.asarray(s)
        if a.ndim != 1:
            raise ValueError(f"video_scores[{i}] must be 1-D (T,), got shape {a.shape}")
        out.append(a)
    return out


def frame_metrics(video_scores: list[np.ndarray], frame_gt: np.ndarray, is_abnormal: np.ndarray,
                  snippet_frames: int = SNIPPET_FRAMES) -> dict[str, float]:
    """Frame-level `auc`, `ap` and `ano_auc` of per-snippet anomaly scores.

    Each video's (T_i,) snippet scores are repeated `snippet_frames` times and concatenated in
    order (the authors' `np.repeat(·, 16)`); the result must match `frame_gt` (0/1 per frame).
    `ano_auc` (paper Table 2, not in the official code) is the AUC over the frames of the videos
    flagged in `is_abnormal` only (author, issues #8/#9). A metric is NaN when its frames hold a
    single class.
    """
    scores = _as_1d_scores(video_scores)
    is_abnormal = np.asarray(is_abnormal, dtype=bool).reshape(-1)
    if len(is_abnormal) != len(scores):
        raise ValueError(f"is_abnormal has {len(is_abnormal)} entries but there are {len(scores)} videos")
    if snippet_frames < 1:
        raise ValueError(f"snippet_frames must be >= 1, got {snippet_frames}")
    frame_gt = np.asarray(frame_gt).reshape(-1)
    frames = np.repeat(np.concatenate(scores) if scores else np.zeros(0), snippet_frames)
    if len(frames) != len(frame_gt):
        raise ValueError(f"repeated scores have {len(frames)} frames ({snippet_frames} per snippet) "
                         f"but frame_gt has {len(frame_gt)}")
    auc, ap = _auc_ap(frame_gt, frames)
    n_frames = np.array([len(s) * snippet_frames for s in scores], dtype=np.int64)
    ano = np.repeat(is_abnormal, n_frames)
    ano_auc, _ = _auc_ap(frame_gt[ano], frames[ano])
    return {"auc": auc, "ap": ap, "ano_auc": ano_auc}


def video_metrics(video_scores: list[np.ndarray], labels: np.ndarray, topk_divisor: int = 16) -> dict[str, float]:
    """Video-level `auc` and `ap` for a split with video labels only (e.g. a held-out validation
    split of the training set, which has no frame annotation).

    Video score = mean of the top-k snippet scores, k = floor(T / topk_divisor) + 1 (the training
    losses' top-k rule, capped at T); target = 1 - labels[:, 0] (labels multi-hot (n, C), index 0 =
    normal). NaN when only one class is present.
    """
    scores = _as_1d_scores(video_scores)
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] != len(scores):
        raise ValueError(f"labels must be (n_videos={len(scores)}, C) multi-hot, got shape {labels.shape}")
    if topk_divisor < 1:
        raise ValueError(f"topk_divisor must be >= 1, got {topk_divisor}")
    video = np.empty(len(scores), dtype=np.float64)
    for i, s in enumerate(scores):
        if len(s) == 0:
            raise ValueError(f"video_scores[{i}] is empty")
        k = min(len(s), len(s) // topk_divisor + 1)
        video[i] = np.sort(s)[::-1][:k].mean()
    target = (1 - labels[:, 0]).astype(np.int64)
    auc, ap = _auc_ap(target, video)
    return {"auc": auc, "ap": ap}


# ----------------------------------------------------------------------------- detection mAP


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of the maximal runs of True in a 1-D boolean mask."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def _nms(segments: np.ndarray, thresh: float = _NMS_IOU) -> list[int]:
    """Greedy 1-D NMS over (n, 2) [start, end) rows already sorted by descending score; returns the
    kept row indices in order. A row is dropped when its IoU with a kept row exceeds `thresh`."""
    x1, x2 = segments[:, 0].astype(np.float64), segments[:, 1].astype(np.float64)
    lengths = x2 - x1
    order = np.arange(len(segments))
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        inter = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        iou = inter / (lengths[i] + lengths[rest] - inter)
        order = rest[iou <= thresh]
    return keep


def _class_scores(probs: np.ndarray, snippet_frames: int) -> np.ndarray:
    """c_s: per class, mean of the top-⌊n_frames/16⌋ (at least 1) frame probabilities, from (T, C)
    snippet probabilities. Sorting snippets then repeating gives the same descending frame array as
    the authors' sort of the repeated frames (so the float32 mean is bit-identical), T× cheaper."""
    k = max(1, probs.shape[0] * snippet_frames // _TOPK_DIVISOR)
    top = np.repeat(-np.sort(-probs, axis=0), snippet_frames, axis=0)[:k]
    return top.mean(axis=0)


def _video_proposals(curve: np.ndarray, class_score: np.floating) -> tuple[np.ndarray, np.ndarray]:
    """Proposals of one class in one video: (n, 2) int [start, end) frames and (n,) float64 scores,
    in descending score order after NMS."""
    hi, lo = curve.max(), curve.min()
    threshold = hi - (hi - lo) * _THRESHOLD_RATIO
    starts, ends = _runs(curve > threshold)
    long_enough = ends - starts >= _MIN_RUN_FRAMES
    starts, ends = starts[long_enough], ends[long_enough]
    if len(starts) == 0:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float64)
    # max over each [s, e): reduceat over interleaved bounds (a zero sentinel makes e == len valid)
    bounds = np.stack([starts, ends], axis=1).reshape(-1)
    run_max = np.maximum.reduceat(np.append(curve, curve.dtype.type(0)), bounds)[::2]
    scores = (run_max + _CLASS_SCORE_WEIGHT * class_score).astype(np.float64)
    order = np.argsort(-scores)  # default sort kind, as the authors (tie order = NumPy's)
    segs, scores = np.stack([starts, ends], axis=1)[order], scores[order]
    # The authors' NMS. With their single threshold the runs of one curve are disjoint (IoU 0), so it
    # keeps everything; skip the quadratic loop in that case (identical result).
    by_start = np.sort(segs, axis=0)
    if np.any(by_start[1:, 0] < by_start[:-1, 1]):
        keep = _nms(segs)
        segs, scores = segs[keep], scores[keep]
    return segs, scores


def _localization_ap(video_ids: np.ndarray, segs: np.ndarray, scores: np.ndarray,
                     gt: dict[int, list[tuple[int, int]]], iou_threshold: float) -> float:
    """Non-interpolated AP of pooled proposals of one class: Σ precision at each TP / #gt.

    Proposals are visited by descending score; each is matched to the unmatched gt segment of its
    video with the highest IoU over integer frame ranges (first one on ties) and is a TP if that
    IoU >= `iou_threshold`; the matched gt is removed. AP is 0 when there is no TP (incl. no gt).
    """
    n_gt = sum(len(v) for v in gt.values())
    remaining = {v: list(spans) for v, spans in gt.items()}
    order = np.argsort(-scores)  # default sort kind, as the authors' pooled sort
    tp = np.zeros(len(order), dtype=np.float64)
    # Plain Python: a video has only a few gt segments, numpy calls on such tiny arrays cost more.
    for rank, (v, s, e) in enumerate(zip(video_ids[order].tolist(), segs[order, 0].tolist(),
                                         segs[order, 1].tolist())):
        cand = remaining.get(v)
        if not cand:
            continue
        best_iou, best = -1.0, -1
        for k, (gs, ge) in enumerate(cand):
            # |range(a, b)| = max(0, b - a): identical to the authors' set-based IoU.
            inter = max(0, min(ge, e) - max(gs, s))
            iou = inter / (max(0, ge - gs) + (e - s) - inter)
            if iou > best_iou:  # strict: the first of equal IoUs wins, as in the authors' loop
                best_iou, best = iou, k
        if best_iou >= iou_threshold:
            tp[rank] = 1.0
            del cand[best]
    if tp.sum() == 0:
        return 0.0
    tp_c, fp_c = np.cumsum(tp), np.cumsum(1.0 - tp)
    return float(np.sum(tp_c / (tp_c + fp_c) * tp) / n_gt)


def detection_map(class_probs: list[np.ndarray], segments: list[list[tuple[int, int]]],
                  segment_labels: list[list[str]], class_codes: list[str], protocol: str = "official",
                  iou_thresholds: Sequence[float] = MAP_IOUS,
                  snippet_frames: int = SNIPPET_FRAMES) -> dict[str, float]:
    """Fine-grained detection mAP@IoU in percent: `{"map@0.1": .., ..., "map_avg": mean of levels}`.

    `class_probs[i]`: (T_i, C) per-snippet class probabilities (softmax of the alignment map),
    repeated `snippet_frames`× along time; `segments[i]` / `segment_labels[i]`: the video's gt
    [start, end) frame ranges and their class codes (normal videos: one whole-video segment 'A');
    `class_codes[c]`: the code of class c, index 0 = normal (UCF 'Normal', XD 'A').

    Common to both protocols (authors' getLocMAP): c_s = mean of the top-⌊n_frames/16⌋ frame
    probabilities per class (a class with c_s <= 0 gets an all-zero curve); per class and video,
    threshold = max - 0.6·(max - min); proposals = maximal runs with prob > threshold and
    end - start >= 2 frames, score = max prob in the run + 0.7·c_s; per-video NMS at IoU 0.6;
    proposals pooled over videos and sorted by score; greedy best-IoU matching to the same video's
    unmatched gt of that class (TP if IoU >= threshold); AP = Σ precision at TPs / #gt.

    protocol="official" (the authors' code, excludeNormal=False) vs "paper" ("we only compute mAP
    on the abnormal videos"):
    - videos: official all videos; paper only videos with a gt label other than 'A'/class_codes[0].
    - classes: official all C incl. normal (gt label == class code, so UCF's 'Normal' never matches
      the 'A' gt and its AP is 0, yet averaged; XD's 'A' matches the normal videos); paper 1..C-1.
    - class without gt: official AP 0 and averaged; paper skipped (NaN if no class has gt).
    - class without any proposal: official returns 0 for the whole IoU level (early return);
      paper gives that class AP 0.
    gt labels that are not in `class_codes` never match (the authors' UCF behaviour).
    """
    if protocol not in MAP_PROTOCOLS:
        raise ValueError(f"unknown mAP protocol {protocol!r}; expected one of {MAP_PROTOCOLS}")
    if not (len(class_probs) == len(segments) == len(segment_labels)):
        raise ValueError(f"class_probs ({len(class_probs)}), segments ({len(segments)}) and "
                         f"segment_labels ({len(segment_labels)}) must have one entry per video")
    codes = [str(c) for c in class_codes]
    n_classes = len(codes)
    if n_classes == 0 or len(set(codes)) != n_classes:
        raise ValueError(f"class_codes must be non-empty and unique, got {class_codes}")
    if snippet_frames < 1:
        raise ValueError(f"snippet_frames must be >= 1, got {snippet_frames}")
    thresholds = [float(t) for t in iou_thresholds]
    if not thresholds:
        raise ValueError("iou_thresholds is empty")

    snippets: list[np.ndarray] = []
    for i, p in enumerate(class_probs):
        p = np.asarray(p)
        if p.ndim != 2 or p.shape[1] != n_classes or p.shape[0] == 0:
            raise ValueError(f"class_probs[{i}] must be (T>0, C={n_classes}) to match class_codes, "
                             f"got shape {p.shape}")
        if not np.issubdtype(p.dtype, np.floating):
            p = p.astype(np.float64)
        snippets.append(p)
    frames = [np.repeat(p, snippet_frames, axis=0) for p in snippets]
    gt: list[list[tuple[int, int, str]]] = []
    for i, (video_segs, video_labs) in enumerate(zip(segments, segment_labels)):
        if len(video_segs) != len(video_labs):
            raise ValueError(f"video {i}: {len(video_segs)} segments but {len(video_labs)} segment labels")
        # int() like the authors (their abnormal coordinates are strings from the annotation file)
        gt.append([(int(s), int(e), str(lab)) for (s, e), lab in zip(video_segs, video_labs)])

    normal_labels = {GT_NORMAL, codes[0]}
    if protocol == "official":
        videos = list(range(len(frames)))
        classes = list(range(n_classes))
    else:
        videos = [i for i in range(len(frames)) if any(lab not in normal_labels for _, _, lab in gt[i])]
        classes = list(range(1, n_classes))

    # Proposals do not depend on the IoU threshold: build them once per class.
    class_scores = {i: _class_scores(snippets[i], snippet_frames) for i in videos}
    per_class: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    gt_per_class: dict[int, dict[int, list[tuple[int, int]]]] = {}
    for c in classes:
        ids: list[np.ndarray] = []
        segs: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        for i in videos:
            c_s = class_scores[i][c]
            if not c_s > 0:  # authors: predictions * (c_s > 0)
                continue  # an all-zero curve has max == min, hence no run above the threshold
            s, sc = _video_proposals(frames[i][:, c], c_s)
            ids.append(np.full(len(sc), i, dtype=np.int64))
            segs.append(s)
            scores.append(sc)
        per_class[c] = (np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64),
                        np.concatenate(segs) if segs else np.zeros((0, 2), dtype=np.int64),
                        np.concatenate(scores) if scores else np.zeros(0, dtype=np.float64))
        gt_c: dict[int, list[tuple[int, int]]] = {}
        for i in videos:
            spans = [(s, e) for s, e, lab in gt[i] if lab == codes[c]]
            if spans:
                gt_c[i] = spans
        gt_per_class[c] = gt_c

    if protocol == "paper":
        classes = [c for c in classes if gt_per_class[c]]  # classes absent from the gt are skipped

    result: dict[str, float] = {}
    for th in thresholds:
        aps: list[float] = []
        for c in classes:
            c_ids, c_segs, c_scores = per_class[c]
            if len(c_scores) == 0 and protocol == "official":
                aps = []  # authors: `return 0` from inside the class loop
                break
            aps.append(_localization_ap(c_ids, c_segs, c_scores, gt_per_class[c], th) if len(c_scores) else 0.0)
        if protocol == "official":
            value = 100 * float(np.mean(aps)) if aps else 0.0
        else:
            value = 100 * float(np.mean(aps)) if aps else float("nan")
        result[map_level(th)] = value
    result["map_avg"] = float(np.mean([result[map_level(th)] for th in thresholds]))
    return result
