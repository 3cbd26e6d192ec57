"""Stage policies of a study invocation, decided from the trials recorded so far (read through study.record):
the `--seeds auto` stopping rule and the confirmation stage's top-k selection of a search."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from study import record
from study.report.stats import holm_level, paired_effect, t_interval
from study.space import Domain
from vadclip.metrics import percent_scale


@dataclass(frozen=True)
class SeedsVerdict:
    """Whether `--seeds auto` stops at `seeds` per row, and the sentence the parent's `seeds.auto` tag keeps."""

    stop: bool
    reason: str


def _rows(trials: Iterable[record.TrialView], metric: str, seed_limit: int) -> dict[str, dict[str, float]]:
    """Per row the study metric of its FINISHED trials with a seed below `seed_limit` (a resumed invocation replays
    the rounds as they were decided), by seed."""
    key = record.final_key(metric)
    rows: dict[str, dict[str, float]] = {}
    for t in trials:
        if (t.finished and t.variant is not None and key in t.metrics and t.seed_number is not None
                and t.seed_number < seed_limit):
            rows.setdefault(t.variant, {})[str(t.seed_number)] = t.metrics[key]
    return rows


def reference_half_width(trials: Iterable[record.TrialView], full: str | None, metric: str, seed_limit: int) -> float:
    """Half the 95 % t-interval (in the table's units: percent for AUC/AP/AnoAUC) of the full row's study metric
    over its FINISHED trials with a seed below `seed_limit`; NaN with fewer than 2."""
    low, high = t_interval(list(_rows(trials, metric, seed_limit).get(full or "", {}).values()))
    return (high - low) / 2 * percent_scale(metric)


def largest_detectable(trials: Iterable[record.TrialView], full: str | None, metric: str, seed_limit: int) -> float:
    """The largest minimum detectable difference (points; 80 % power at Holm's strictest level, alpha / compared
    rows, paired over matched seeds: the report's `mdd`) of any row against the full row, over the FINISHED
    trials with a seed below `seed_limit`; NaN while a row has fewer than 2 matched seeds. A row whose differences
    do not vary detects any difference (0)."""
    rows = _rows(trials, metric, seed_limit)
    reference = rows.pop(full or "", {})
    if not rows or not reference:
        return math.nan
    level = holm_level(len(rows))
    largest = 0.0
    for values in rows.values():
        effect = paired_effect(values, reference, alpha=level)
        if not math.isfinite(effect.superiority):  # fewer than 2 matched seeds
            return math.nan
        largest = max(largest, effect.mdd if math.isfinite(effect.mdd) else 0.0)
    return largest * percent_scale(metric)


@dataclass(frozen=True)
class SeedsRule:
    """What `--seeds auto` measures after each round and stops on: the full row's CI half-width (`--ci-target`) or
    the largest minimum detectable difference of the rows (`--mdd-target`), at most `target` points."""

    detectable: bool
    target: float
    cap: int

    def measure(self, trials: Iterable[record.TrialView], full: str | None, metric: str, seed_limit: int) -> float:
        return (largest_detectable if self.detectable else reference_half_width)(trials, full, metric, seed_limit)

    def verdict(self, value: float, seeds: int, full: str | None, metric: str) -> SeedsVerdict:
        """Stop when `value` is at most the target, or at `cap` seeds per row."""
        done = value == value and value <= self.target
        if not done and seeds < self.cap:
            return SeedsVerdict(False, "")
        what = ("largest minimum detectable difference" if self.detectable else "half-width")
        verdict = (f"{what} {value:.2f} <= target {self.target:g}" if done
                   else f"cap {self.cap} reached with {what} {value:.2f} > target {self.target:g}")
        basis = (f"80 % power at Holm's strictest level, every row against the full row {full!r} on {metric}"
                 if self.detectable else f"95 % t-interval of the full row {full!r} on {metric}")
        return SeedsVerdict(True, f"{verdict} points ({basis}) at {seeds} seeds per row")


@dataclass(frozen=True)
class Candidate:
    """A distinct configuration of the search, in rank order: its searched values (typed) and as MLflow shows them."""

    values: Mapping[str, Any]
    shown: str  # `window=8, lr=1e-05`


def confirm_candidates(trials: Iterable[record.TrialView], space: Mapping[str, Domain], selection: str,
                       metric: str, top: int) -> tuple[str, list[Candidate]]:
    """The `top` distinct configurations of the FINISHED search trials by the key the search optimised
    (record.final_objective_key: the validation metric, the test metric under selection=test), ties by trial id.
    Returns that key and the candidates (fewer when the search found fewer; none when no trial logged the key)."""
    key = record.final_objective_key(selection, metric)
    ranked = sorted((t for t in trials if t.finished and t.stage == record.SEARCH and key in t.metrics),
                    key=lambda t: (-t.metrics[key], t.trial_id))
    seen: list[dict[str, str]] = []
    out = []
    for trial in ranked:  # distinct configurations: a searcher may sample one twice
        logged = {k: trial.params[k] for k in space if k in trial.params}
        if logged in seen:
            continue
        seen.append(logged)
        out.append(Candidate({k: _typed(space[k], v) for k, v in logged.items()},
                             ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in logged.items())))
        if len(out) == top:
            break
    return key, out


def _typed(domain: Domain, raw: str) -> Any:
    """An MLflow param string as the domain's value; as logged when the space changed since."""
    try:
        return domain.value(raw)
    except ValueError:
        return raw
