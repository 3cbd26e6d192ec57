"""vadclip.bootstrap against vadclip.metrics.frame_metrics: files, cells, weighted replicates, intervals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from vadclip import bootstrap
from vadclip.bootstrap import (
    BOOTSTRAP_METRICS,
    TestScores,
    collapse,
    load_bootstrap,
    load_test_scores,
    percentile_interval,
    point_estimates,
    save_bootstrap,
    save_test_scores,
    video_bootstrap,
    weighted_metrics,
)
from vadclip.metrics import frame_metrics


def _test_set(n_videos: int = 30, seed: int = 0, decimals: int = 2) -> TestScores:
    """Random videos, about half abnormal with one anomalous span that need not align with snippets; scores
    rounded so that ties occur within and across videos."""
    rng = np.random.default_rng(seed)
    abnormal = rng.random(n_videos) < 0.5
    scores, gts = [], []
    for i in range(n_videos):
        t = int(rng.integers(5, 40))
        gt = np.zeros(t * 16, dtype=np.uint8)
        if abnormal[i]:
            start = int(rng.integers(0, t * 16 - 8))
            gt[start:start + int(rng.integers(8, t * 8))] = 1
        s = rng.random(t) * 0.6 + 0.4 * gt.reshape(-1, 16).mean(axis=1)
        scores.append(np.round(s, decimals).astype(np.float32))
        gts.append(gt)
    return TestScores(scores, np.concatenate(gts), abnormal)


def _frame_metrics(ts: TestScores, videos: list[int] | None = None) -> dict[str, float]:
    """frame_metrics on the explicit video list `videos` (indices, repeats allowed)."""
    videos = list(range(len(ts.video_scores))) if videos is None else videos
    bounds = np.concatenate([[0], np.cumsum([len(s) * ts.snippet_frames for s in ts.video_scores])])
    gt = [ts.frame_gt[bounds[i]:bounds[i + 1]] for i in videos]
    return frame_metrics([ts.video_scores[i] for i in videos], np.concatenate(gt) if gt else np.zeros(0),
                         ts.is_abnormal[videos], ts.snippet_frames)


def _assert_metrics_equal(got: dict[str, float], expected: dict[str, float]) -> None:
    assert got.keys() == expected.keys()
    for k in expected:
        if math.isnan(expected[k]):
            assert math.isnan(got[k]), k
        else:
            assert abs(got[k] - expected[k]) <= 1e-12, k


# ----------------------------------------------------------------------------- files


def test_test_scores_round_trip_is_exact(tmp_path: Path) -> None:
    ts = _test_set(decimals=6)
    path = save_test_scores(tmp_path / "run" / "test_scores.npz", ts)
    back = load_test_scores(path)
    assert len(back.video_scores) == len(ts.video_scores)
    for a, b in zip(back.video_scores, ts.video_scores):
        assert a.dtype == np.float32 and np.array_equal(a, b)
    assert np.array_equal(back.frame_gt, ts.frame_gt)
    assert np.array_equal(back.is_abnormal, ts.is_abnormal) and back.snippet_frames == ts.snippet_frames
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left no temporary behind


def test_round_trip_of_odd_gt_length_and_empty_videos(tmp_path: Path) -> None:
    ts = TestScores([np.array([0.5], np.float32), np.zeros(0, np.float32), np.array([0.1, 0.9], np.float32)],
                    np.array([1, 0, 1, 1, 0, 0, 1, 0, 1]), np.array([True, False, True]), snippet_frames=3)
    back = load_test_scores(save_test_scores(tmp_path / "s.npz", ts))
    assert [len(s) for s in back.video_scores] == [1, 0, 2]
    assert np.array_equal(back.frame_gt, ts.frame_gt) and back.snippet_frames == 3


def test_truncated_or_inconsistent_file_raises_naming_the_path(tmp_path: Path) -> None:
    path = save_test_scores(tmp_path / "test_scores.npz", _test_set())
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.npz"):
        load_test_scores(truncated)
    data = dict(np.load(path))
    missing = tmp_path / "missing.npz"
    np.savez(missing, **{k: v for k, v in data.items() if k != "is_abnormal"})
    with pytest.raises(ValueError, match=r"missing.npz.*is_abnormal"):
        load_test_scores(missing)
    inconsistent = tmp_path / "inconsistent.npz"
    np.savez(inconsistent, **{**data, "frame_gt_length": data["frame_gt_length"] - 16})
    with pytest.raises(ValueError, match="inconsistent.npz"):
        load_test_scores(inconsistent)
    with pytest.raises(FileNotFoundError):
        load_test_scores(tmp_path / "absent.npz")


def test_bootstrap_file_round_trip(tmp_path: Path) -> None:
    reps = {"auc": np.array([0.5, np.nan, 0.7]), "ap": np.array([0.1, 0.2, 0.3]), "ano_auc": np.full(3, np.nan)}
    back = load_bootstrap(save_bootstrap(tmp_path / "bootstrap.npz", reps, seed=3))
    assert back.keys() == reps.keys()
    for k in reps:
        np.testing.assert_array_equal(back[k], reps[k])
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        load_bootstrap(bad)


# ----------------------------------------------------------------------------- point estimates


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_point_estimates_equal_frame_metrics_with_ties(seed: int) -> None:
    ts = _test_set(seed=seed, decimals=1)  # heavy ties
    assert len(collapse(ts).score) < 2 * sum(len(s) for s in ts.video_scores)  # tied cells were merged
    _assert_metrics_equal(point_estimates(ts), _frame_metrics(ts))


def test_point_estimates_nan_where_a_single_class() -> None:
    ts = _test_set()
    normal = [i for i in range(len(ts.video_scores)) if not ts.is_abnormal[i]]
    bounds = np.concatenate([[0], np.cumsum([len(s) * 16 for s in ts.video_scores])])
    only_normal = TestScores([ts.video_scores[i] for i in normal],
                             np.concatenate([ts.frame_gt[bounds[i]:bounds[i + 1]] for i in normal]),
                             np.zeros(len(normal), dtype=bool))
    expected = _frame_metrics(only_normal)
    assert all(math.isnan(v) for v in expected.values())
    _assert_metrics_equal(point_estimates(only_normal), expected)
    empty = TestScores([], np.zeros(0), np.zeros(0, dtype=bool))
    assert all(math.isnan(v) for v in point_estimates(empty).values())


@pytest.mark.parametrize("videos", [[0, 0, 2], [1, 1, 1, 3, 4, 4], [5, 2, 2, 7, 7, 7, 0]])
def test_weighted_metrics_equal_frame_metrics_of_replicated_videos(videos: list[int]) -> None:
    ts = _test_set(n_videos=8, seed=4, decimals=2)
    counts = np.bincount(videos, minlength=8)
    _assert_metrics_equal(weighted_metrics(collapse(ts), counts), _frame_metrics(ts, videos))


# ----------------------------------------------------------------------------- resampling


def test_video_bootstrap_is_deterministic_under_its_seed() -> None:
    ts = _test_set(n_videos=20)
    a, b, c = (video_bootstrap(ts, n_resamples=40, seed=s) for s in (7, 7, 8))
    assert set(a) == set(BOOTSTRAP_METRICS) and all(len(v) == 40 for v in a.values())
    for m in BOOTSTRAP_METRICS:
        np.testing.assert_array_equal(a[m], b[m])
    assert not np.array_equal(a["auc"], c["auc"], equal_nan=True)


def test_replicates_are_frame_metrics_of_some_resample() -> None:
    """Each replicate is frame_metrics of a with-replacement resample (found by replaying the draw)."""
    ts = _test_set(n_videos=12, seed=5)
    reps = video_bootstrap(ts, n_resamples=5, seed=11)
    counts = np.random.default_rng(11).multinomial(12, np.full(12, 1 / 12), size=5)
    for b in range(5):
        videos = [int(i) for i in np.repeat(np.arange(12), counts[b])]
        _assert_metrics_equal({m: float(reps[m][b]) for m in BOOTSTRAP_METRICS}, _frame_metrics(ts, videos))
    assert (counts.sum(axis=1) == 12).all() and (counts != 1).any()


def test_blocked_replicates_equal_weighted_metrics_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vectorised replicates, over several blocks and with undefined (one-class) resamples, equal the
    per-replicate sklearn path (`weighted_metrics`)."""
    ts = _test_set(n_videos=4, seed=2)  # 4 videos: some resamples hold no abnormal (or no normal) video
    monkeypatch.setattr(bootstrap, "BLOCK_ELEMENTS", 7 * len(collapse(ts).score))  # blocks of 7 replicates
    cells = collapse(ts)
    counts = np.random.default_rng(9).multinomial(4, np.full(4, 1 / 4), size=300)
    reps = video_bootstrap(ts, n_resamples=300, seed=9)
    expected = [weighted_metrics(cells, c) for c in counts]
    nans = 0
    for b, e in enumerate(expected):
        _assert_metrics_equal({m: float(reps[m][b]) for m in BOOTSTRAP_METRICS}, e)
        nans += math.isnan(e["ano_auc"])
    assert nans > 0


def test_percentile_interval_contains_the_point_estimate() -> None:
    ts = _test_set(n_videos=40, seed=6, decimals=3)
    point = point_estimates(ts)
    reps = video_bootstrap(ts, n_resamples=200, seed=0)
    for m in BOOTSTRAP_METRICS:
        low, high = percentile_interval(reps[m])
        assert low < point[m] < high, m
        assert high - low < 0.5


def test_percentile_interval_drops_nan() -> None:
    values = np.r_[np.arange(101.0), np.nan, np.nan]
    assert percentile_interval(values, 0.9) == pytest.approx((5.0, 95.0))
    assert all(math.isnan(v) for v in percentile_interval(np.full(4, np.nan)))
    with pytest.raises(ValueError):
        percentile_interval(values, 1.0)
