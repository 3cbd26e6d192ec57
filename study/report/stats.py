"""The statistics of a report's table over seeds: t intervals, paired comparisons against a reference row with
Holm-adjusted p-values, a two-level (seeds × test videos) bootstrap interval and the optimism of picking the
best configuration on the test set instead of the validation set."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests

from vadclip.bootstrap import percentile_interval

# Below 6 pairs the exact two-sided Wilcoxon p cannot go under 0.0625 (2 / 2^5), so it could never reach 0.05.
WILCOXON_MIN_N = 6
NAN = math.nan


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
