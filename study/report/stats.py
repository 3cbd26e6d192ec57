"""The statistics of a report's table over seeds: t intervals, paired comparisons against a reference row with
Holm-adjusted p-values, equivalence (paired TOST), effect sizes (Hedges' g of the paired differences, the chance of
beating the reference on a seed), the smallest difference a row's seeds could detect, the seed floor of an exact
test, a two-level (seeds × test videos) bootstrap interval and the optimism of picking the best configuration on
the test set instead of the validation set. docs/statistics.md explains each to a reviewer."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.proportion import proportion_confint
from statsmodels.stats.weightstats import ttost_paired

from vadclip.bootstrap import percentile_interval

# Below 6 pairs the exact two-sided Wilcoxon p cannot go under 0.0625 (2 / 2^5), so it could never reach 0.05.
WILCOXON_MIN_N = 6
NAN = math.nan
ALPHA = 0.05  # every test and interval of a report: two-sided 5 % (95 % intervals)
POWER = 0.8  # the power the minimum detectable difference is computed at


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    return x[np.isfinite(x)]


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of the finite values; (nan, nan) for fewer than 2."""
    x = _finite(values)
    if len(x) < 2:
        return NAN, NAN
    mean = float(x.mean())
    if np.ptp(x) == 0:  # scipy gives nan for a zero scale; the interval collapses onto the mean
        return mean, mean
    low, high = stats.t.interval(confidence, len(x) - 1, loc=mean, scale=stats.sem(x))
    return float(low), float(high)


@dataclass(frozen=True)
class Paired:
    """A row against the reference over matched seeds: mean difference, its t interval, both p-values."""

    delta: float
    ci_low: float
    ci_high: float
    n: int
    p_t: float
    p_wilcoxon: float
    test: str  # "t" or "wilcoxon": which p is shown

    @property
    def p(self) -> float:
        return self.p_wilcoxon if self.test == "wilcoxon" else self.p_t


def _matched(row: Mapping[str, float], reference: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Values of the seeds with a finite value in both, in seed order."""
    seeds = sorted(s for s in row.keys() & reference.keys() if math.isfinite(row[s]) and math.isfinite(reference[s]))
    return (np.array([row[s] for s in seeds], dtype=np.float64),
            np.array([reference[s] for s in seeds], dtype=np.float64))


def paired_comparison(row: Mapping[str, float], reference: Mapping[str, float]) -> Paired:
    """`row` − `reference` over the seeds (keys) both hold: paired t-test, and Wilcoxon from 6 pairs on.

    The shown test is Wilcoxon signed-rank when n >= 6 (no normality assumption), else the paired t-test.
    """
    x, y = _matched(row, reference)
    n = len(x)
    test = "wilcoxon" if n >= WILCOXON_MIN_N else "t"
    if n == 0:
        return Paired(NAN, NAN, NAN, 0, NAN, NAN, test)
    diff = x - y
    delta = float(diff.mean())
    if n == 1:  # one pair: a difference but no test
        return Paired(delta, NAN, NAN, 1, NAN, NAN, test)
    if not diff.any():
        # No evidence of a difference at all: p = 1 (scipy returns nan for the t statistic 0/0).
        return Paired(0.0, 0.0, 0.0, n, 1.0, 1.0 if n >= WILCOXON_MIN_N else NAN, test)
    low, high = t_interval(diff)
    # Constant nonzero differences: zero variance makes the t statistic undefined (±inf or 0/0), so p_t is nan;
    # the Wilcoxon test is still defined (all signs agree).
    p_t = NAN if np.ptp(diff) == 0 else float(stats.ttest_rel(x, y).pvalue)
    p_w = float(stats.wilcoxon(x, y).pvalue) if n >= WILCOXON_MIN_N else NAN
    return Paired(delta, low, high, n, p_t, p_w, test)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values over the finite p's; a NaN stays NaN at its position."""
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    out = np.full(len(p), NAN)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return [float(v) for v in out]


def significance_mark(p_adjusted: float, alpha: float = 0.05) -> str:
    """"n.s." when p >= alpha (or nan), else "***" (< 0.001), "**" (< 0.01) or "*"."""
    if not p_adjusted < alpha:  # also true for nan
        return "n.s."
    if p_adjusted < 0.001:
        return "***"
    return "**" if p_adjusted < 0.01 else "*"


def two_level_bootstrap(replicates: Sequence[np.ndarray], n_resamples: int = 1000, seed: int = 0,
                        confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean over seeds with both seed and test-video variation.

    `replicates[i]`: seed i's video-bootstrap replicates (`vadclip.bootstrap.video_bootstrap`). An outer
    replicate resamples the seeds with replacement and, per drawn seed, one of its replicates at random: an iid
    draw from its video-resampling distribution, i.e. the videos resampled afresh. Non-finite replicates are
    dropped, and a seed with none left; (nan, nan) without seeds. Deterministic under `seed`.
    """
    pools = [r for r in (_finite(r) for r in replicates) if len(r)]
    if not pools:
        return NAN, NAN
    sizes = np.array([len(r) for r in pools], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = np.concatenate(pools)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(pools), size=(n_resamples, len(pools)))
    inner = rng.integers(0, sizes[drawn])  # one replicate index below each drawn seed's pool size
    means = flat[offsets[drawn] + inner].mean(axis=1)
    return percentile_interval(means, confidence)


def optimism(test_values: Mapping[str, float], val_values: Mapping[str, float]) -> tuple[float, float, float, int]:
    """(mean, t-interval low, high, n) of best-on-test − best-on-val over the matched seeds.

    `test_values[seed]`: the test metric of the configuration chosen on the test set; `val_values[seed]`: the
    test metric of the one chosen on validation. The mean is the optimism of reporting the former.
    """
    x, y = _matched(test_values, val_values)
    if len(x) == 0:
        return NAN, NAN, NAN, 0
    diff = x - y
    low, high = t_interval(diff)
    return float(diff.mean()), low, high, len(diff)


def smallest_p(n: int, test: str) -> float:
    """The smallest two-sided p the shown test can give with `n` pairs. Exact Wilcoxon signed-rank: 2 / 2^n (every
    difference of one sign; scipy's exact distribution); the paired t-test: 0, any p is attainable (by assuming the
    differences normal); nan below 2 pairs."""
    if n < 2:
        return NAN
    if test == "t":
        return 0.0
    return float(stats.wilcoxon(np.arange(1.0, n + 1), method="exact").pvalue)


def holm_level(rows: int, alpha: float = ALPHA) -> float:
    """Holm's strictest level over `rows` compared rows (what its smallest p is held to): alpha / rows."""
    return alpha / max(rows, 1)


def holm_floor(n: int, rows: int, test: str = "wilcoxon") -> float:
    """The smallest Holm-adjusted p any of `rows` compared rows can reach with `n` pairs: Holm multiplies the
    smallest p by the number of rows (capped at 1)."""
    return min(1.0, rows * smallest_p(n, test)) if rows > 0 else NAN


def seeds_for_exact_test(rows: int, alpha: float = ALPHA) -> int:
    """The fewest pairs with which an exact (distribution-free) test can make one of `rows` rows significant after
    Holm: the smallest n with rows · 2 / 2^n < alpha."""
    n = 2
    while not holm_floor(n, max(rows, 1)) < alpha:
        n += 1
    return n


def seed_floor_note(n: int, rows: int, alpha: float = ALPHA) -> str:
    """What `n` seeds per row can show about `rows` rows compared with a reference: said before a study starts
    (also by --dry-run) and in its report."""
    if n < 2 or rows < 1:
        return f"{n} seed(s) per row, {rows} row(s) compared: no paired test is possible."
    test = "exact Wilcoxon signed-rank test" if n >= WILCOXON_MIN_N else "paired t-test"
    floor, need = holm_floor(n, rows), seeds_for_exact_test(rows, alpha)
    text = (f"{n} seeds per row, {rows} row(s) compared with the reference, shown test the {test}: an exact test's "
            f"smallest two-sided p is 2/2^{n} = {smallest_p(n, 'wilcoxon'):.3g}, {floor:.3g} after Holm over {rows} "
            "row(s)")
    if floor < alpha:
        return text + f", so an exact test can reach significance at {alpha:g}."
    return (text + f": without assuming normal differences (as the t-test does) no row can be significant at "
            f"{alpha:g}; an exact test needs >= {need} seeds per row. An n.s. row may be too few seeds, not no "
            "effect: its verdict says which (equivalent, or inconclusive).")


def tost_p(row: Mapping[str, float], reference: Mapping[str, float], margin: float) -> float:
    """Paired two one-sided tests (statsmodels' ttost_paired) that row − reference lies within ±`margin`: the
    larger of the two one-sided p's; small = equivalent. Constant differences (zero variance): 0 inside the
    margin, 1 outside; nan below 2 pairs or without a margin."""
    x, y = _matched(row, reference)
    if len(x) < 2 or not margin > 0:
        return NAN
    diff = x - y
    if np.ptp(diff) == 0:
        return 0.0 if abs(float(diff[0])) < margin else 1.0
    return float(ttost_paired(x, y, -margin, margin)[0])


@dataclass(frozen=True)
class Effect:
    """How big a row's difference from the reference is, relative to its seed-to-seed noise: Hedges' g of the
    paired differences (mean / sd, small-sample corrected) with its 95 % interval (noncentral t), the fraction
    of seeds on which the row beats the reference (ties half) with its Wilson interval, and the minimum detectable
    difference (`mdd`: the |difference| this many pairs detect with POWER at the given alpha, from the observed
    sd of the differences; statsmodels' TTestPower)."""

    g: float = NAN
    g_low: float = NAN
    g_high: float = NAN
    superiority: float = NAN
    superiority_low: float = NAN
    superiority_high: float = NAN
    mdd: float = NAN


def hedges_correction(n: int) -> float:
    """J of Hedges' g for the standardized mean of n paired differences (df = n − 1)."""
    df = n - 1
    return 1.0 - 3.0 / (4.0 * df - 1.0)


def _ncp_interval(t: float, df: int, confidence: float) -> tuple[float, float]:
    """The noncentrality parameters whose noncentral t puts the observed `t` at the upper and lower tail (the exact
    interval of a standardized mean), searched around the large-sample interval t ± z · sqrt(1 + t² / 2n)."""
    tail = (1 - confidence) / 2
    half = float(stats.norm.ppf(1 - tail)) * math.sqrt(1 + t * t / (2 * (df + 1)))

    def above(ncp: float, q: float) -> float:
        cdf = float(stats.nct.cdf(t, df, ncp))
        if math.isnan(cdf):  # scipy's series fails far in a tail: the cdf is 1 there below t, 0 above
            cdf = 1.0 if ncp < t else 0.0
        return cdf - q

    low, high = t - 4 * half - 1, t + 4 * half + 1
    return (float(optimize.brentq(above, low, high, args=(1 - tail,))),
            float(optimize.brentq(above, low, high, args=(tail,))))


def paired_effect(row: Mapping[str, float], reference: Mapping[str, float], alpha: float = ALPHA,
                  confidence: float = 1 - ALPHA) -> Effect:
    """Effect of row − reference over the matched seeds (see Effect); nan where fewer than 2 pairs, and g's
    interval and the mdd where the differences do not vary."""
    x, y = _matched(row, reference)
    n = len(x)
    if n < 2:
        return Effect()
    diff = x - y
    wins = float((diff > 0).sum() + 0.5 * (diff == 0).sum())
    low_s, high_s = proportion_confint(wins, n, alpha=1 - confidence, method="wilson")
    superiority = (wins / n, float(low_s), float(high_s))
    sd = float(diff.std(ddof=1))
    if sd == 0:
        return Effect(NAN, NAN, NAN, *superiority)
    j = hedges_correction(n)
    dz = float(diff.mean()) / sd
    low, high = _ncp_interval(dz * math.sqrt(n), n - 1, confidence)
    detectable = float(TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=POWER,
                                                alternative="two-sided"))
    return Effect(j * dz, j * low / math.sqrt(n), j * high / math.sqrt(n), *superiority, detectable * sd)


VERDICTS = ("better", "worse", "equivalent", "inconclusive")


def verdict(delta: float, p_holm: float, tost_p_holm: float, alpha: float = ALPHA) -> str:
    """A row's verdict against the reference: better / worse (the difference significant after Holm), else
    equivalent (TOST within the margin, Holm-adjusted), else inconclusive (neither: too few seeds or too much
    noise to tell); "" without a comparison."""
    if p_holm < alpha:
        return "better" if delta > 0 else "worse"
    if tost_p_holm < alpha:
        return "equivalent"
    return "inconclusive" if math.isfinite(delta) else ""
