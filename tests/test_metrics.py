"""Hand-computed checks of vadclip.metrics (frame / video metrics and the detection mAP)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import auc as trapezoid_auc
from sklearn.metrics import precision_recall_curve

from vadclip.metrics import _nms, _runs, detection_map, frame_metrics, video_metrics

LEVELS = ("map@0.1", "map@0.2", "map@0.3", "map@0.4", "map@0.5")


# ----------------------------------------------------------------------------- frame_metrics


def test_frame_metrics_perfect_and_inverted() -> None:
    scores = [np.array([0.1, 0.2]), np.array([0.9, 0.8])]
    gt = np.r_[np.zeros(32), np.ones(32)]
    m = frame_metrics(scores, gt, np.array([False, True]))
    assert m["auc"] == 1.0 and m["ap"] == 1.0
    inv = frame_metrics([1 - s for s in scores], gt, np.array([False, True]))
    assert inv["auc"] == 0.0


def test_frame_ap_is_step_wise_not_trapezoid() -> None:
    scores, labels = np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 0, 1, 0])
    m = frame_metrics([scores], labels, np.array([True]), snippet_frames=1)
    assert m["ap"] == pytest.approx((1 + 2 / 3) / 2)
    prec, rec, _ = precision_recall_curve(labels, scores)
    assert abs(trapezoid_auc(rec, prec) - m["ap"]) > 0.01
    # ×16 repetition: tied frames form one threshold, the AP is unchanged
    m16 = frame_metrics([scores], np.repeat(labels, 16), np.array([True]))
    assert m16["ap"] == pytest.approx(m["ap"]) and m16["auc"] == pytest.approx(m["auc"])


def test_frame_metrics_ano_auc_uses_abnormal_videos_only() -> None:
    abnormal = np.array([0.2, 0.6, 0.7, 0.1])
    normal = np.array([0.9, 0.9])
    gt = np.r_[np.repeat([0, 1, 1, 0], 16), np.zeros(32)]
    m = frame_metrics([abnormal, normal], gt, np.array([True, False]))
    assert m["ano_auc"] == 1.0
    assert m["auc"] < 1.0  # the normal video's high scores hurt the overall AUC
    # swapping video order must follow the flags, not the positions
    gt2 = np.r_[np.zeros(32), np.repeat([0, 1, 1, 0], 16)]
    assert frame_metrics([normal, abnormal], gt2, np.array([False, True]))["ano_auc"] == 1.0
    # no abnormal video (single class among them) -> NaN
    assert math.isnan(frame_metrics([normal, abnormal], gt2, np.array([False, False]))["ano_auc"])


def test_frame_metrics_length_check() -> None:
    with pytest.raises(ValueError, match=r"64 frames.*frame_gt has 63"):
        frame_metrics([np.zeros(2), np.ones(2)], np.zeros(63), np.array([False, True]))
    with pytest.raises(ValueError, match="is_abnormal"):
        frame_metrics([np.zeros(2)], np.zeros(32), np.array([False, True]))


# ----------------------------------------------------------------------------- video_metrics


def test_video_metrics_topk_rule() -> None:
    v0 = np.r_[np.full(16, 0.1), 0.9, 0.5, 0.6, 0.6]  # T=20 -> k=2 -> 0.75 (mean of all: 0.21)
    v1 = np.array([0.68, 0.0, 0.0, 0.0, 0.0])  # T=5 -> k=1 -> 0.68
    v2 = np.array([0.65, 0.1, 0.1])  # k=1 -> 0.65
    labels = np.array([[0, 1], [1, 0], [0, 1]])
    m = video_metrics([v0, v1, v2], labels)
    # abnormal 0.75, 0.65 vs normal 0.68: one of two pairs ordered; AP = (1 + 2/3) / 2
    assert m["auc"] == pytest.approx(0.5)
    assert m["ap"] == pytest.approx((1 + 2 / 3) / 2)
    # divisor 4: v0 k=6 -> 2.8/6, v1 k=2 -> 0.34, v2 k=1 -> 0.65: both abnormal above the normal
    assert video_metrics([v0, v1, v2], labels, topk_divisor=4)["auc"] == 1.0
    assert math.isnan(video_metrics([v0, v2], labels[[0, 2]])["auc"])
    with pytest.raises(ValueError, match="labels"):
        video_metrics([v0, v1], labels)


# ----------------------------------------------------------------------------- detection_map helpers


def snippet_curve(T: int, lo: int, hi: int, h: float = 1.0) -> np.ndarray:
    """(T,) curve equal to h on snippets [lo, hi) and 0 elsewhere."""
    c = np.zeros(T)
    c[lo:hi] = h
    return c


def two_class(curve: np.ndarray) -> np.ndarray:
    """(T, 2) probs: class 1 = curve, class 0 = 1 - curve (softmax-like)."""
    return np.stack([1 - curve, curve], axis=1)


def test_runs_and_min_length_rule() -> None:
    s, e = _runs(np.array([0, 1, 0, 1, 1, 0, 1], dtype=bool))
    assert s.tolist() == [1, 3, 6] and e.tolist() == [2, 5, 7]
    # snippet_frames=1 so that a 1-frame run exists: [1,2) is dropped, [3,5) kept
    probs = two_class(np.array([0.0, 1, 0, 1, 1, 0]))
    m = detection_map([probs], [[(1, 2), (3, 5)]], [["B1", "B1"]], ["A", "B1"], protocol="paper",
                      snippet_frames=1)
    assert m["map@0.5"] == pytest.approx(50.0)  # 1 TP of 2 gt; would be 100 if the 1-frame run counted


def test_nms_removes_duplicate() -> None:
    segs = np.array([[0, 10], [1, 10], [20, 30], [0, 6]])  # sorted by score already
    # [1,10) vs [0,10): IoU 0.9 > 0.6 -> removed; [0,6) vs [0,10): IoU 0.6 exactly -> kept (<=)
    assert _nms(segs, 0.6) == [0, 2, 3]


# ----------------------------------------------------------------------------- detection_map by hand


def test_iou_tp_fp_switch() -> None:
    # proposal of B1 = snippets 2..5 = frames [32, 96); gt [80, 112): IoU = 16 / 80 = 0.2 exactly
    probs = two_class(snippet_curve(8, 2, 6))
    m = detection_map([probs], [[(80, 112)]], [["B1"]], ["A", "B1"], protocol="paper")
    assert [m[k] for k in LEVELS] == [100.0, 100.0, 0.0, 0.0, 0.0]
    assert m["map_avg"] == pytest.approx(40.0)
    # official: class 'A' also has proposals ([0,32), [96,128)) but no gt -> AP 0, averaged
    o = detection_map([probs], [[(80, 112)]], [["B1"]], ["A", "B1"])
    assert [o[k] for k in LEVELS] == [50.0, 50.0, 0.0, 0.0, 0.0]


def test_score_order_changes_ap() -> None:
    # three videos, each with one B1 proposal [32, 96) of score 1.7*h; the middle-scored one misses
    gts = [[(32, 96)], [(112, 128)], [(32, 96)]]
    labels = [["B1"], ["B1"], ["B1"]]

    def run(hs: list[float]) -> float:
        probs = [two_class(snippet_curve(8, 2, 6, h)) for h in hs]
        return detection_map(probs, gts, labels, ["A", "B1"], protocol="paper")["map@0.5"]

    assert run([0.9, 0.8, 0.7]) == pytest.approx(100 * (1 + 2 / 3) / 3)  # TP, FP, TP
    assert run([0.8, 0.9, 0.7]) == pytest.approx(100 * (1 / 2 + 2 / 3) / 3)  # FP, TP, TP


def normal_and_abnormal() -> tuple[list[np.ndarray], list[list[tuple[int, int]]], list[list[str]]]:
    abnormal = two_class(snippet_curve(8, 2, 6))  # B1 = 1 on frames [32, 96)
    normal_a = np.r_[np.full(6, 0.9), np.full(2, 0.5)]  # 'A' run [0, 96): IoU 0.75 with [0, 128)
    normal = np.stack([normal_a, 1 - normal_a], axis=1)
    return [abnormal, normal], [[(32, 96)], [(0, 128)]], [["B1"], ["A"]]


def test_official_vs_paper_with_normal_video() -> None:
    probs, segs, labs = normal_and_abnormal()
    # official, class A: proposals v0 [0,32) 1.7, v0 [96,128) 1.7 (FP, FP), v1 [0,96) 0.9+0.7*0.9 (TP)
    #   -> AP 1/3; class B1: v0 [32,96) 1.7 TP, v1 [96,128) 0.5+0.7*0.5 FP -> AP 1
    o = detection_map(probs, segs, labs, ["A", "B1"])
    for k in LEVELS:
        assert o[k] == pytest.approx(100 * (1 / 3 + 1) / 2)
    # paper: only v0, only B1 -> AP 1
    p = detection_map(probs, segs, labs, ["A", "B1"], protocol="paper")
    for k in (*LEVELS, "map_avg"):
        assert p[k] == pytest.approx(100.0)


def test_ucf_normal_code_never_matches_a() -> None:
    probs, segs, labs = normal_and_abnormal()
    o = detection_map(probs, segs, labs, ["Normal", "B1"])  # UCF naming, gt label still 'A'
    assert o["map@0.1"] == pytest.approx(50.0)  # normal AP structurally 0, still averaged
    p = detection_map(probs, segs, labs, ["Normal", "B1"], protocol="paper")
    assert p["map@0.1"] == pytest.approx(100.0)  # 'A' is recognised as normal for video selection


def test_official_early_return_when_a_class_has_no_proposal() -> None:
    b1 = snippet_curve(8, 2, 6)
    probs = [np.stack([1 - b1, b1, np.zeros(8)], axis=1)]  # B2 curve constant -> no proposal
    segs, labs = [[(32, 96), (0, 16)]], [["B1", "B2"]]
    o = detection_map(probs, segs, labs, ["A", "B1", "B2"])
    assert all(o[k] == 0.0 for k in (*LEVELS, "map_avg"))
    p = detection_map(probs, segs, labs, ["A", "B1", "B2"], protocol="paper")
    assert p["map@0.5"] == pytest.approx(50.0)  # B1 AP 1, B2 AP 0 (no early return)
    # paper skips classes without gt: drop the B2 gt -> only B1 is averaged
    p2 = detection_map(probs, [[(32, 96)]], [["B1"]], ["A", "B1", "B2"], protocol="paper")
    assert p2["map@0.5"] == pytest.approx(100.0)


def synthetic(seed: int = 0, n: int = 24, T: int = 32, n_cls: int = 4):
    rng = np.random.default_rng(seed)
    masks, segs, labs = [], [], []
    n_abnormal = 0
    for i in range(n):
        m = np.zeros((T, n_cls))
        if i % 3 == 2:  # normal video: one whole-video 'A' segment
            m[:, 0] = 1
            segs.append([(0, 16 * T)])
            labs.append(["A"])
        else:
            c = 1 + n_abnormal % (n_cls - 1)  # every class occurs
            n_abnormal += 1
            lo = int(rng.integers(0, T - 8))
            hi = lo + int(rng.integers(3, 8))
            m[:, 0] = 1
            m[lo:hi, 0], m[lo:hi, c] = 0, 1
            segs.append([(16 * lo, 16 * hi)])
            labs.append([f"B{c}"])
        masks.append(m)
    return rng, masks, segs, labs


def test_gt_masks_give_100_and_random_is_low() -> None:
    rng, masks, segs, labs = synthetic()
    codes = ["A", "B1", "B2", "B3"]
    perfect = detection_map(masks, segs, labs, codes, protocol="paper")
    assert all(perfect[k] == pytest.approx(100.0) for k in (*LEVELS, "map_avg"))
    # official: the 'A' curve of normal videos is constant (no proposal) and abnormal videos' 'A'
    # runs have no 'A' gt, so the normal AP is 0 -> 3/4 of 100
    official = detection_map(masks, segs, labs, codes)
    assert official["map_avg"] == pytest.approx(75.0)
    logits = [rng.normal(size=m.shape) for m in masks]
    rand = [np.exp(x) / np.exp(x).sum(1, keepdims=True) for x in logits]
    r = detection_map(rand, segs, labs, codes, protocol="paper")
    assert r["map_avg"] < 30.0
    assert r["map@0.5"] <= r["map@0.1"]


def test_float32_inputs_and_key_names() -> None:
    _, masks, segs, labs = synthetic()
    m = detection_map([x.astype(np.float32) for x in masks], segs, labs, ["A", "B1", "B2", "B3"],
                      protocol="paper", iou_thresholds=(0.25, 0.75))
    assert set(m) == {"map@0.25", "map@0.75", "map_avg"}
    assert m["map_avg"] == pytest.approx(100.0)


def test_detection_map_validation() -> None:
    probs, segs, labs = normal_and_abnormal()
    with pytest.raises(ValueError, match="protocol"):
        detection_map(probs, segs, labs, ["A", "B1"], protocol="abnormal-only")
    with pytest.raises(ValueError, match="one entry per video"):
        detection_map(probs[:1], segs, labs, ["A", "B1"])
    with pytest.raises(ValueError, match="class_codes"):
        detection_map(probs, segs, labs, ["A", "B1", "B2"])
    with pytest.raises(ValueError, match="segment labels"):
        detection_map(probs, segs, [["B1"], []], ["A", "B1"])
