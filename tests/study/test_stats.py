"""study.report.stats against scipy / statsmodels computed directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from study.report.stats import (
    holm,
    optimism,
    paired_comparison,
    significance_mark,
    t_interval,
    two_level_bootstrap,
)
from vadclip.bootstrap import TestScores, point_estimates, video_bootstrap

ROW = {"0": 0.81, "1": 0.84, "2": 0.79, "3": 0.86, "4": 0.83}
REF = {"0": 0.78, "1": 0.80, "2": 0.80, "3": 0.82, "4": 0.79}


def _nan(*values: float) -> bool:
    return all(math.isnan(v) for v in values)


# ----------------------------------------------------------------------------- t interval


def test_t_interval_equals_scipy() -> None:
    x = np.array([0.81, 0.84, 0.79, 0.86, 0.83])
    expected = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert t_interval(x) == pytest.approx(expected, abs=1e-15)
    assert t_interval(list(x), 0.9) == pytest.approx(stats.t.interval(0.9, 4, loc=x.mean(), scale=stats.sem(x)))


def test_t_interval_degenerate() -> None:
    assert _nan(*t_interval([0.5])) and _nan(*t_interval([]))
    m = float(np.mean([0.7, 0.7, 0.7]))
    assert t_interval([0.7, 0.7, 0.7]) == (m, m)
    assert t_interval([0.1, np.nan, 0.3]) == pytest.approx(t_interval([0.1, 0.3]))  # NaN dropped


# ----------------------------------------------------------------------------- paired comparison


def test_paired_known_example_equals_scipy() -> None:
    x, y = np.array(list(ROW.values())), np.array(list(REF.values()))
    r = paired_comparison(ROW, REF)
    assert r.n == 5 and r.test == "t" and math.isnan(r.p_wilcoxon)
    assert r.delta == pytest.approx((x - y).mean())
    assert r.p_t == pytest.approx(stats.ttest_rel(x, y).pvalue) and r.p == r.p_t
    d = x - y
    assert (r.ci_low, r.ci_high) == pytest.approx(stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d)))


def test_paired_uses_wilcoxon_from_six_pairs() -> None:
    rng = np.random.default_rng(0)
    ref = {str(s): float(v) for s, v in enumerate(rng.random(6))}
    row = {s: v + float(rng.normal(0.05, 0.03)) for s, v in ref.items()}
    r = paired_comparison(row, ref)
    x, y = np.array([row[s] for s in sorted(ref)]), np.array([ref[s] for s in sorted(ref)])
    assert r.n == 6 and r.test == "wilcoxon"
    assert r.p == r.p_wilcoxon == pytest.approx(stats.wilcoxon(x, y).pvalue)
    assert r.p_t == pytest.approx(stats.ttest_rel(x, y).pvalue)
    five = paired_comparison({s: row[s] for s in list(row)[:5]}, ref)
    assert five.test == "t" and math.isnan(five.p_wilcoxon)


def test_paired_matches_seeds_by_key() -> None:
    row = {**ROW, "9": 0.99, "2": float("nan")}  # 9: not in the reference; 2: not finite
    ref = {"7": 0.1, **REF}
    r = paired_comparison(row, ref)
    kept = ["0", "1", "3", "4"]
    x, y = np.array([ROW[s] for s in kept]), np.array([REF[s] for s in kept])
    assert r.n == 4 and r.delta == pytest.approx((x - y).mean())
    assert r.p_t == pytest.approx(stats.ttest_rel(x, y).pvalue)
    # insertion order does not matter, only the keys
    assert paired_comparison(dict(reversed(list(row.items()))), ref).p_t == pytest.approx(r.p_t)


def test_paired_degenerate_cases() -> None:
    same = paired_comparison(ROW, dict(ROW))
    assert same.delta == 0.0 and (same.ci_low, same.ci_high) == (0.0, 0.0) and same.p == 1.0 and same.test == "t"
    six = {str(i): 0.1 * i for i in range(6)}
    assert paired_comparison(six, dict(six)).p == 1.0
    empty = paired_comparison({"0": 0.5}, {"1": 0.5})
    assert empty.n == 0 and _nan(empty.delta, empty.ci_low, empty.p)
    one = paired_comparison({"0": 0.6}, {"0": 0.5})
    assert one.n == 1 and one.delta == pytest.approx(0.1) and _nan(one.p_t, one.p_wilcoxon, one.ci_low)
    shift = paired_comparison({"0": 2.0, "1": 3.0, "2": 4.0}, {"0": 1.0, "1": 2.0, "2": 3.0})
    assert shift.delta == 1.0 and (shift.ci_low, shift.ci_high) == (1.0, 1.0) and math.isnan(shift.p)


# ----------------------------------------------------------------------------- multiplicity


def test_holm_equals_statsmodels_and_keeps_nan_positions() -> None:
    p = [0.01, float("nan"), 0.04, 0.03, float("nan"), 0.005]
    finite = [v for v in p if not math.isnan(v)]
    expected = iter(multipletests(finite, method="holm")[1])
    adjusted = holm(p)
    assert len(adjusted) == len(p)
    for raw, adj in zip(p, adjusted):
        if math.isnan(raw):
            assert math.isnan(adj)
        else:
            assert adj == pytest.approx(next(expected))
    assert holm([]) == [] and _nan(*holm([float("nan")]))


@pytest.mark.parametrize(("p", "mark"), [(0.2, "n.s."), (0.05, "n.s."), (float("nan"), "n.s."), (0.049, "*"),
                                         (0.0099, "**"), (0.0009, "***")])
def test_significance_mark(p: float, mark: str) -> None:
    assert significance_mark(p) == mark


def test_significance_mark_respects_alpha() -> None:
    assert significance_mark(0.02, alpha=0.01) == "n.s."


# ----------------------------------------------------------------------------- bootstrap over seeds


def _seed_scores(seed: int) -> TestScores:
    rng = np.random.default_rng(seed)
    scores, gts, abnormal = [], [], []
    for i in range(16):
        t = int(rng.integers(8, 20))
        gt = np.zeros(t * 16, dtype=np.uint8)
        if i % 2:
            gt[16:16 * (t // 2)] = 1
        scores.append((rng.random(t) * 0.7 + 0.3 * gt.reshape(-1, 16).mean(axis=1)).astype(np.float32))
        gts.append(gt)
        abnormal.append(bool(i % 2))
    return TestScores(scores, np.concatenate(gts), np.array(abnormal))


def test_two_level_bootstrap_deterministic_and_contains_the_mean() -> None:
    runs = [_seed_scores(s) for s in range(4)]
    reps = [video_bootstrap(r, n_resamples=100, seed=i)["auc"] for i, r in enumerate(runs)]
    mean = float(np.mean([point_estimates(r)["auc"] for r in runs]))
    a = two_level_bootstrap(reps, n_resamples=500, seed=1)
    assert a == two_level_bootstrap(reps, n_resamples=500, seed=1)
    assert a != two_level_bootstrap(reps, n_resamples=500, seed=2)
    assert a[0] < mean < a[1]
    # without video noise (each seed's replicates = its point estimate) only the seed spread remains: narrower
    point = [np.full(10, point_estimates(r)["auc"]) for r in runs]
    narrow = two_level_bootstrap(point, n_resamples=500, seed=1)
    assert narrow[1] - narrow[0] < a[1] - a[0]


def test_two_level_bootstrap_degenerate() -> None:
    assert _nan(*two_level_bootstrap([]))
    assert _nan(*two_level_bootstrap([np.full(5, np.nan)]))
    # one seed with constant replicates: a point; NaN replicates are ignored
    assert two_level_bootstrap([np.array([0.7, np.nan, 0.7])]) == (0.7, 0.7)


def test_optimism_is_mean_and_t_interval_of_matched_differences() -> None:
    test = {"0": 0.85, "1": 0.88, "2": 0.84, "3": 0.9}
    val = {"0": 0.83, "1": 0.85, "2": 0.84, "5": 0.7}
    d = np.array([0.02, 0.03, 0.0])
    mean, low, high, n = optimism(test, val)
    assert n == 3 and mean == pytest.approx(d.mean())
    assert (low, high) == pytest.approx(stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d)))
    assert optimism({}, val)[3] == 0 and _nan(*optimism({}, val)[:3])
