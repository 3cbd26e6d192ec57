"""Inference (paper: Inference) and evaluation of both branches on a test or validation set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vadclip.data import EvalSet, split_chunks
from vadclip.data.conventions import has_detection_map
from vadclip.metrics import detection_map, frame_metrics, video_metrics
from vadclip.model import VadCLIP


@dataclass
class Predictions:
    c_scores: list[np.ndarray] | None  # per video (T,): sigmoid of the C-branch
    a_scores: list[np.ndarray] | None  # per video (T,): 1 - softmax(M)[:, normal]
    class_probs: list[np.ndarray] | None  # per video (T, C): softmax(M), for the fine-grained mAP


@torch.no_grad()
def predict(model: VadCLIP, videos: EvalSet, length: int, device: torch.device | str,
            chunk_batch: int = 64, batched: bool = True) -> Predictions:
    """Score every video: chunks of `length` (authors' split), scores cut to T.

    Exact speed-ups: t_out is encoded once per pass (it does not depend on the video), and chunks
    of many videos share a forward pass (chunks never interact). `batched=False` is the authors'
    loop: one forward per video, re-encoding the class prompts each time.
    """
    model.eval()
    chunks, owners, lengths = [], [], []
    for i in range(len(videos.features)):
        c, c_lengths = split_chunks(videos.features[i], length)
        chunks.append(c)
        owners += [i] * len(c)
        lengths.append(c_lengths)
    owners_arr = np.asarray(owners)
    outputs: dict[str, list[np.ndarray]] = {"c": [], "a": []}
    t_out = model.encode_classes() if batched else None
    groups = ([np.arange(s, min(s + chunk_batch, len(owners))) for s in range(0, len(owners), chunk_batch)]
              if batched else [np.flatnonzero(owners_arr == i) for i in range(len(videos.features))])
    all_chunks, all_lengths = np.concatenate(chunks), np.concatenate(lengths)
    for idx in groups:
        x = torch.from_numpy(all_chunks[idx]).to(device)
        n = torch.from_numpy(all_lengths[idx]).to(device)
        out = model(x, n, t_out)
        # .float(): under optim.precision the logits are bf16/fp16 (numpy has no bf16); float32 unchanged
        if out.logits_c is not None:
            outputs["c"].append(torch.sigmoid(out.logits_c[..., 0].float()).cpu().numpy())
        if out.logits_a is not None:
            outputs["a"].append(torch.softmax(out.logits_a.float(), dim=-1).cpu().numpy())

    def per_video(parts: list[np.ndarray]) -> list[np.ndarray] | None:
        if not parts:
            return None
        flat = np.concatenate(parts)  # (n_chunks, L, ...)
        result = []
        for i in range(len(videos.features)):
            rows = flat[owners_arr == i]
            t = len(videos.features[i])
            result.append(rows.reshape(-1, *rows.shape[2:])[:t])
        return result

    probs = per_video(outputs["a"])
    return Predictions(per_video(outputs["c"]),
                       None if probs is None else [1.0 - p[:, 0] for p in probs], probs)


def branch_scores(preds: Predictions) -> dict[str, list[np.ndarray]]:
    return {b: s for b, s in (("c", preds.c_scores), ("a", preds.a_scores)) if s is not None}


@dataclass
class Evaluation:
    metrics: dict[str, float]  # both branches' (`c_auc`, `a_ap`, ...), the chosen one's unprefixed, mAP
    predictions: Predictions
    branch: str  # the branch whose scores the unprefixed metrics are: "c" or "a"


def evaluate(model: VadCLIP, videos: EvalSet, class_codes: list[str], *, length: int,
             device: torch.device | str, score_branch: str, selection_metric: str,
             map_protocol: str = "official", topk_divisor: int = 16, batched: bool = True) -> Evaluation:
    """Metrics of both branches (`c_auc`, `a_ap`, ...), the chosen branch's without prefix, and the
    fine-grained mAP of the A-branch (not for binary datasets: no classes). Sets without frame ground truth
    (held-out training videos) get video-level AUC/AP of the mean top-k snippet score."""
    preds = predict(model, videos, length, device, batched=batched)
    metrics: dict[str, float] = {}
    for branch, scores in branch_scores(preds).items():
        if videos.frame_gt is not None:
            m = frame_metrics(scores, videos.frame_gt, videos.is_abnormal)
        else:
            m = video_metrics(scores, videos.labels, topk_divisor)
        metrics.update({f"{branch}_{k}": float(v) for k, v in m.items()})
    chosen = score_branch
    if chosen == "best":  # paper: "select the best of these two ways"
        available = [b for b in ("c", "a") if f"{b}_{selection_metric}" in metrics]
        chosen = max(available, key=lambda b: np.nan_to_num(metrics[f"{b}_{selection_metric}"], nan=-1))
    for key in [k for k in metrics if k.startswith(f"{chosen}_")]:
        metrics[key[2:]] = metrics[key]
    if preds.class_probs is not None and videos.segments is not None and has_detection_map(class_codes):
        if videos.segment_labels is None:  # the test sets are built with both or neither
            raise ValueError("the evaluation set has gt segments but no segment labels")
        metrics.update(detection_map(preds.class_probs, videos.segments, videos.segment_labels,
                                     class_codes, protocol=map_protocol))
    return Evaluation(metrics, preds, chosen)
