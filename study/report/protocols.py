"""Selection protocols: which of a trial's evaluations a report takes its test values from, one registry.

Every evaluation (where `eval.cadence` puts them: in-loop and at epoch ends) logs the validation and the test
metrics at its global optimisation step. From the same run a report then reads the test metrics at
- `selection` (the default): the checkpoint the trial selected by its own eval.selection, re-evaluated (final/*),
- `val`: the best validation evaluation (honest; what `eval.selection=val` keeps),
- `test`: the best test evaluation (what the authors' code prints, best-on-test),
- `last`: the last evaluation.
"Best" is the run's selection metric (AUC for UCF-style, AP for XD-style); ties go to the earliest evaluation,
as `BestCheckpoint` keeps the first of equal scores.

`REGISTRY` holds them in display order: the CLI's --protocol choices, the ablation's protocol grid and notes and
the search report's columns loop over it. A new protocol is one more `Protocol` there (with its `derive`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from study.record import SELECTION_METRIC, TEST, VAL, column
from study.tracking import retry
from vadclip.metrics import mlflow_key

Derive = Callable[[pd.DataFrame, str], dict[str, float]]


@dataclass(frozen=True)
class Protocol:
    """One selection protocol.

    name: the --protocol choice, `Context.protocol`, the protocol frame's `<name>/<metric>` and the table's
    `<metric>_<name>` columns. label: its header in the grids ("AP best-on-test"). text: what the notes say the
    test values are under it ("Test metrics under <text>."). derive: its test values from a run's evaluations
    frame (`evaluations`) and selection metric, {metric: value} (metric names without `test/`; a metric left out
    is undefined, NaN); None: the selected checkpoint's re-evaluated final/* metrics, read from the run itself.
    definition: the ablation's protocol note, "<label> = <definition>". search_text: the search report's note
    on its column beside each top trial's selected checkpoint, "the test AP <search_text> and …"; "": a search
    shows no such column (best-on-val: the checkpoint a selection=val search ranks by is it)."""

    name: str
    label: str
    text: str
    derive: Derive | None
    definition: str = ""
    search_text: str = ""

    @property
    def selected(self) -> bool:
        """The selected checkpoint's final/* metrics, not derived from the histories."""
        return self.derive is None


def tests_at(evals: pd.DataFrame, step: Any) -> dict[str, float]:
    """The test metrics of the evaluation at `step` (an index label of `evals`)."""
    return {c[len(TEST):]: float(evals.at[step, c]) for c in evals.columns if c.startswith(TEST)}


def best_on(prefix: str) -> Derive:
    """The test metrics at the best `<prefix><selection metric>` evaluation (VAL or TEST); the first of equal
    maxima, NaN scores skipped; undefined without that score."""
    def derive(evals: pd.DataFrame, selection_metric: str) -> dict[str, float]:
        scores = evals.get(f"{prefix}{selection_metric}")
        return tests_at(evals, scores.idxmax()) if scores is not None and scores.notna().any() else {}
    return derive


def last(evals: pd.DataFrame, selection_metric: str) -> dict[str, float]:
    """The test metrics of the last evaluation (each metric's last row)."""
    return {c[len(TEST):]: float(evals[c].iloc[-1]) for c in evals.columns if c.startswith(TEST)}


SELECTION = "selection"  # a report's default: each run's own eval.selection, its re-evaluated checkpoint (final/*)
SELECTED = Protocol(
    name=SELECTION, label="selected", derive=None,
    text="the checkpoint each trial selected by its eval.selection (re-evaluated; final/* metrics)")
BEST_ON_VAL = Protocol(
    name="val", label="best-on-val", derive=best_on(VAL),
    text="the best-on-val protocol (test metrics at the best validation evaluation, from the histories)",
    definition="at the evaluation with the best validation score")
BEST_ON_TEST = Protocol(
    name="test", label="best-on-test", derive=best_on(TEST),
    text="the best-on-test protocol (test metrics at the best test evaluation, from the histories: what the "
    "authors' code prints)",
    definition="at the best test evaluation (what the authors' code prints)",
    search_text="at the trial's best test evaluation (best-on-test, what the authors' code prints; for information "
    "only: choosing by it is optimistic)")
LAST = Protocol(
    name="last", label="last", derive=last,
    text="the last-evaluation protocol (test metrics at the last evaluation, from the histories)",
    definition="at the last evaluation", search_text="at its last evaluation")
REGISTRY: tuple[Protocol, ...] = (SELECTED, BEST_ON_VAL, BEST_ON_TEST, LAST)  # display order


def names() -> tuple[str, ...]:
    """The --protocol choices, in display order."""
    return tuple(p.name for p in REGISTRY)


def get(name: str) -> Protocol:
    for protocol in REGISTRY:
        if protocol.name == name:
            return protocol
    raise KeyError(f"unknown selection protocol {name!r}; known: {', '.join(names())}")


def derived() -> tuple[Protocol, ...]:
    """The protocols derived from the histories, in display order."""
    return tuple(p for p in REGISTRY if not p.selected)


def shown_in_search() -> tuple[Protocol, ...]:
    """The derived protocols a search report shows beside each top trial's selected checkpoint."""
    return tuple(p for p in derived() if p.search_text)


def protocol_text(protocol: str) -> str:
    return get(protocol).text


def definitions() -> str:
    """'best-on-val = at the evaluation with the best validation score, best-on-test = …' over the derived ones."""
    return ", ".join(f"{p.label} = {p.definition}" for p in derived())


def frame_column(protocol: str, metric: str) -> str:
    """A protocol frame's column: the test `metric` under `protocol`, e.g. `test/ap`."""
    return f"{protocol}/{metric}"


def evaluations(client: MlflowClient, run_id: str, selection_metric: str, metrics: Iterable[str]) -> pd.DataFrame:
    """A run's evaluations as rows indexed by global step: `val/<selection metric>`, `test/<selection metric>` and
    `test/<m>` for each of `metrics` (metric names as computed, e.g. `map@0.1`). A key never logged is absent."""
    keys = dict.fromkeys([f"{VAL}{selection_metric}", f"{TEST}{selection_metric}", *[f"{TEST}{m}" for m in metrics]])
    columns = {}
    for key in keys:
        history = retry(client.get_metric_history, run_id, mlflow_key(key))
        if history:
            columns[key] = pd.Series({m.step: m.value for m in history}, dtype=float)
    return pd.DataFrame(columns).sort_index()


def derive(evals: pd.DataFrame, selection_metric: str) -> dict[str, dict[str, float]]:
    """derived protocol -> {metric: test value} (metric names without the `test/` prefix); NaN where undefined (no
    validation metric logged, or no evaluation)."""
    empty = {c[len(TEST):]: float("nan") for c in evals.columns if c.startswith(TEST)}
    if evals.empty:
        return {p.name: dict(empty) for p in derived()}
    return {p.name: {**empty, **p.derive(evals, selection_metric)} for p in derived() if p.derive is not None}


def protocol_row(evals: pd.DataFrame, selection_metric: str, metrics: list[str]) -> dict[str, float]:
    """One run's protocol frame row: `<protocol>/<metric>` for every derived protocol and metric."""
    values = derive(evals, selection_metric)
    return {frame_column(p, m): values[p].get(m, np.nan) for p in values for m in metrics}


def protocol_frame(client: MlflowClient, runs: pd.DataFrame, default_selection_metric: str,
                   metrics: Iterable[str]) -> pd.DataFrame:
    """One row per run (index: run_id) with columns `<protocol>/<metric>` for every derived protocol and metric."""
    metrics = list(metrics)
    rows = {}
    for _, run in runs.iterrows():
        sel = run.get(column(SELECTION_METRIC))
        sel = sel if isinstance(sel, str) and sel else default_selection_metric
        rows[run["run_id"]] = protocol_row(evaluations(client, str(run["run_id"]), sel, metrics), sel, metrics)
    columns = [frame_column(p.name, m) for p in derived() for m in metrics]
    return pd.DataFrame.from_dict(rows, orient="index", columns=columns)
