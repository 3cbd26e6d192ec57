"""Power, equivalence and effect size of a report's rows, checked against answers computed here by hand (scipy's
distributions, the textbook formulas) on seeded samples."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sp

from study.report import stats


def seeds(values) -> dict[str, float]:
    return {f"s{i}": float(v) for i, v in enumerate(values)}


def pair(n: int, shift: float, noise: float, seed: int = 0) -> tuple[dict[str, float], dict[str, float]]:
    rng = np.random.default_rng(seed)
    reference = rng.normal(0.80, 0.02, n)
    return seeds(reference + shift + rng.normal(0, noise, n)), seeds(reference)


# ---------------------------------------------------------------- the seed floor of an exact test


@pytest.mark.parametrize("n", [2, 3, 5, 8, 10])
def test_exact_wilcoxon_floor_is_two_over_two_to_the_n(n):
    assert stats.smallest_p(n, "wilcoxon") == pytest.approx(2 / 2**n)
    assert stats.smallest_p(n, "t") == 0.0
    assert math.isnan(stats.smallest_p(1, "wilcoxon"))


def test_holm_over_six_rows_needs_eight_pairs_for_an_exact_test():
    # 3 seeds: 6 · 2/2³ = 1.5 -> capped at 1; no row can be significant, whatever the data
    assert stats.holm_floor(3, 6) == 1.0
    assert stats.holm_floor(7, 6) == pytest.approx(6 * 2 / 128) and not stats.holm_floor(7, 6) < 0.05
    assert stats.holm_floor(8, 6) == pytest.approx(6 * 2 / 256) and stats.holm_floor(8, 6) < 0.05
    assert stats.seeds_for_exact_test(6) == 8
    assert stats.seeds_for_exact_test(1) == 6  # the 2/2^5 = 0.0625 of one comparison


# ---------------------------------------------------------------- equivalence (TOST)


def test_tost_is_the_larger_of_two_one_sided_paired_t_tests():
    row, reference = pair(8, 0.002, 0.004, seed=1)
    margin = 0.01
    d = np.array([row[k] - reference[k] for k in sorted(row)])
    se = d.std(ddof=1) / math.sqrt(len(d))
    p_lower = sp.t.sf((d.mean() + margin) / se, len(d) - 1)  # H0: mean <= -margin
    p_upper = sp.t.cdf((d.mean() - margin) / se, len(d) - 1)  # H0: mean >= +margin
    assert stats.tost_p(row, reference, margin) == pytest.approx(max(p_lower, p_upper), rel=1e-9)


def test_tost_of_a_row_with_itself_is_zero_and_constant_shifts_are_decided_by_the_margin():
    row, _ = pair(5, 0, 0.01)
    assert stats.tost_p(row, row, 0.01) == 0.0
    shifted = {k: v + 0.02 for k, v in row.items()}
    assert stats.tost_p(shifted, row, 0.01) == 1.0
    assert math.isnan(stats.tost_p(seeds([0.5]), seeds([0.4]), 0.01))


# ---------------------------------------------------------------- effect size


def test_hedges_g_of_paired_differences_by_hand():
    row, reference = pair(6, 0.01, 0.006, seed=2)
    d = np.array([row[k] - reference[k] for k in sorted(row)])
    n = len(d)
    dz = d.mean() / d.std(ddof=1)
    j = 1 - 3 / (4 * (n - 1) - 1)
    effect = stats.paired_effect(row, reference)
    assert effect.g == pytest.approx(j * dz, rel=1e-12)
    # the interval's ends put the observed t at the 97.5 % and 2.5 % points of the noncentral t
    t = dz * math.sqrt(n)
    assert sp.nct.cdf(t, n - 1, effect.g_low / j * math.sqrt(n)) == pytest.approx(0.975, abs=1e-6)
    assert sp.nct.cdf(t, n - 1, effect.g_high / j * math.sqrt(n)) == pytest.approx(0.025, abs=1e-6)
    assert effect.g_low < effect.g < effect.g_high


def test_superiority_is_the_fraction_of_seeds_won_with_a_wilson_interval():
    row, reference = seeds([0.9, 0.8, 0.7, 0.6, 0.5]), seeds([0.8, 0.7, 0.6, 0.6, 0.6])  # 3 wins, 1 tie, 1 loss
    effect = stats.paired_effect(row, reference)
    wins, n, z = 3.5, 5, sp.norm.ppf(0.975)
    p = wins / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert effect.superiority == pytest.approx(0.7)
    assert (effect.superiority_low, effect.superiority_high) == pytest.approx((centre - half, centre + half))


def test_minimum_detectable_difference_has_eighty_percent_power():
    row, reference = pair(5, 0.0, 0.01, seed=3)
    d = np.array([row[k] - reference[k] for k in sorted(row)])
    n, alpha = len(d), 0.05 / 6
    mdd = stats.paired_effect(row, reference, alpha=alpha).mdd
    # power of the two-sided paired t-test at a true difference of mdd, from the noncentral t by hand
    crit = sp.t.ppf(1 - alpha / 2, n - 1)
    ncp = mdd / d.std(ddof=1) * math.sqrt(n)
    power = sp.nct.sf(crit, n - 1, ncp) + sp.nct.cdf(-crit, n - 1, ncp)
    assert power == pytest.approx(0.8, abs=1e-6)


# ---------------------------------------------------------------- verdicts


def verdict_of(n: int, shift: float, noise: float, margin: float = 0.01, rows: int = 1, seed: int = 0) -> str:
    row, reference = pair(n, shift, noise, seed)
    paired = stats.paired_comparison(row, reference)
    p_holm = min(1.0, paired.p * rows)
    tost_holm = min(1.0, stats.tost_p(row, reference, margin) * rows)
    return stats.verdict(paired.delta, p_holm, tost_holm)


def test_verdicts_of_seeded_samples():
    assert verdict_of(8, +0.05, 0.005) == "better"
    assert verdict_of(8, -0.05, 0.005) == "worse"
    assert verdict_of(10, 0.0005, 0.002) == "equivalent"
    assert verdict_of(3, 0.004, 0.02) == "inconclusive"  # too few seeds, too much noise: neither
    assert stats.verdict(math.nan, math.nan, math.nan) == ""


# ---------------------------------------------------------------- in a table


def test_compare_gives_each_row_its_verdict_and_a_row_with_itself_is_equivalent():
    from study.record import SEED, VARIANT, column
    from study.report.ablation import compare

    rng = np.random.default_rng(5)
    full = rng.normal(0.8, 0.01, 10)
    rows = {"same": full, "worse": full - 0.05 + rng.normal(0, 0.002, 10), "noisy": full + rng.normal(0, 0.05, 10),
            "full": full}
    values = pd.DataFrame([{column(VARIANT): v, column(SEED): str(i), "ap": x}
                           for v, xs in rows.items() for i, x in enumerate(xs)])
    out = dict(zip(rows, compare(values, list(rows), "full", "ap", margin=0.01)))
    assert out["same"].delta == 0 and out["same"].verdict == "equivalent" and out["same"].tost_p == 0.0
    assert out["worse"].verdict == "worse" and out["worse"].g < 0
    assert out["noisy"].verdict == "inconclusive" and out["noisy"].mdd > 0.01
    assert out["full"].verdict == "" and out["full"].pairs == 0


# ---------------------------------------------------------------- cost


def test_cost_note_splits_trial_time_by_outcome():
    from types import SimpleNamespace

    from study.record import DEVICE, REUSED_FROM, STOPPED_EARLY, column
    from study.report.notes import COST_NOTE, cost_note, study_cost

    runs = pd.DataFrame({
        "status": ["FINISHED", "FINISHED", "KILLED", "FAILED", "FINISHED"],
        "start_time": [0, 0, 0, 0, 0],
        "end_time": [60_000, 120_000, 30_000, 10_000, 1_000],  # ms
        column(STOPPED_EARLY): [None, None, "true", None, None],
        column(REUSED_FROM): [None, None, None, None, "abc"],
        column(DEVICE): ["cpu", "cpu", "cpu", "cuda:0", "cpu"]})
    ctx = SimpleNamespace(children=runs, parent=pd.Series({"start_time": 0}))
    cost = study_cost(ctx, rows=2)  # type: ignore[arg-type]
    text = cost_note(cost)[COST_NOTE]
    # kept 60 + 120 s, stopped 30 s, failed 10 s, reused 1 s; wall = last end (120 s) - parent start
    assert "Cost: 3.7 min of trial time (kept 3.0 min, stopped early 30 s, failed 10 s, reused 1 s)" in text
    assert "4 on cpu, 1 on cuda:0" in text and "wall time 2.0 min; 150 trials per hour" in text
    assert "one more seed per row (2 rows) ≈ 3.0 min of trial time" in text  # the mean kept trial (90 s) × 2
    # the same on the parent run, as metrics (seconds)
    assert cost is not None and cost.metrics() == {
        "cost/trial_seconds": 221.0, "cost/trial_seconds/kept": 180.0, "cost/trial_seconds/stopped_early": 30.0,
        "cost/trial_seconds/failed": 10.0, "cost/trial_seconds/reused": 1.0, "cost/wall_seconds": 120.0,
        "cost/trials_per_hour": 150.0, "cost/one_more_seed_seconds": 180.0}


def test_budget_curve_is_the_best_so_far_against_cumulative_trial_hours():
    from study.report.search import budget_curve

    runs = pd.DataFrame({"status": ["FINISHED", "KILLED", "FINISHED", "FAILED", "KILLED"],
                         "start_time": [0, 0, 3_600_000, 0, 0],
                         # 1 h, 0.5 h, 1.5 h, 0.25 h, 0.1 h (stopped last)
                         "end_time": [3_600_000, 1_800_000, 9_000_000, 900_000, 9_360_000],
                         "val": [0.6, 0.9, 0.7, None, 0.95]})
    curve = budget_curve(runs, "val")
    # in the order they ended: failed (0.25 h), stopped (0.5 h: its value cannot count), first (1 h), third (1.5 h),
    # then a stopped one (2.6 h: time spent, the best holds)
    assert curve["hours"].tolist() == pytest.approx([0.25, 0.75, 1.75, 3.25, 5.85])
    assert curve["best"].tolist()[2:] == [0.6, 0.7, 0.7] and np.isnan(curve["best"].tolist()[:2]).all()
