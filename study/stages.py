"""Stage policies of a study invocation, decided from the trials recorded so far (read through study.record):
the `--seeds auto` stopping rule and the confirmation stage's top-k selection of a search."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from study import record
from study.report.stats import t_interval
from study.space import Domain
from vadclip.metrics import percent_scale


@dataclass(frozen=True)
class SeedsVerdict:
    """Whether `--seeds auto` stops at `seeds` per row, and the sentence the parent's `seeds.auto` tag keeps."""

    stop: bool
    reason: str


def reference_half_width(trials: Iterable[record.TrialView], full: str | None, metric: str, seed_limit: int) -> float:
    """Half the 95 % t-interval (in the table's units: percent for AUC/AP/AnoAUC) of the full row's study metric
    over its FINISHED trials with a seed below `seed_limit` (a resumed invocation replays the rounds as they were
    decided); NaN with fewer than 2."""
    key = record.final_key(metric)
    values = [t.metrics[key] for t in trials
              if t.finished and t.variant == full and key in t.metrics
              and t.seed_number is not None and t.seed_number < seed_limit]
    low, high = t_interval(values)
    return (high - low) / 2 * percent_scale(metric)


def seeds_verdict(half: float, seeds: int, target: float, cap: float, full: str | None, metric: str) -> SeedsVerdict:
    """Stop when the full row's half-width is at most `target` points, or at `cap` seeds per row."""
    done = half == half and half <= target
    if not done and seeds < cap:
        return SeedsVerdict(False, "")
    verdict = (f"half-width {half:.2f} <= target {target:g}" if done
               else f"cap {cap} reached with half-width {half:.2f} > target {target:g}")
    return SeedsVerdict(True, f"{verdict} points (95 % t-interval of the full row {full!r} on {metric}) "
                              f"at {seeds} seeds per row")


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
