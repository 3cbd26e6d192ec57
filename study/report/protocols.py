"""Selection protocols derived from a trial's logged evaluation histories.

Every evaluation (where `eval.cadence` puts them: in-loop and at epoch ends) logs the validation and the test
metrics at its global optimisation step. From the same run a report then reads the test metrics at
- `val`: the best validation evaluation (honest; what `eval.selection=val` keeps),
- `test`: the best test evaluation (what the authors' code prints, best-on-test),
- `last`: the last evaluation.
"Best" is the run's selection metric (AUC for UCF-style, AP for XD-style); ties go to the earliest evaluation,
as `BestCheckpoint` keeps the first of equal scores.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from study.tracking import client, retry
from vadclip.metrics import CORE_METRICS, MAP_LEVELS, mlflow_key

if TYPE_CHECKING:
    from study.report.context import Context

PROTOCOLS = ("val", "test", "last")
SELECTION = "selection"  # a report's default: each run's own eval.selection, its re-evaluated checkpoint (final/*)
PROTOCOL_CHOICES = (SELECTION, *PROTOCOLS)
_TEXT = {SELECTION: "the checkpoint each trial selected by its eval.selection (re-evaluated; final/* metrics)",
         "val": "the best-on-val protocol (test metrics at the best validation evaluation, from the histories)",
         "test": "the best-on-test protocol (test metrics at the best test evaluation, from the histories: what "
                 "the authors' code prints)",
         "last": "the last-evaluation protocol (test metrics at the last evaluation, from the histories)"}


def protocol_text(protocol: str) -> str:
    return _TEXT[protocol]


def evaluations(client: MlflowClient, run_id: str, selection_metric: str, metrics: Iterable[str]) -> pd.DataFrame:
    """A run's evaluations as rows indexed by global step: `val/<selection metric>`, `test/<selection metric>` and
    `test/<m>` for each of `metrics` (metric names as computed, e.g. `map@0.1`). A key never logged is absent."""
    keys = dict.fromkeys([f"val/{selection_metric}", f"test/{selection_metric}", *[f"test/{m}" for m in metrics]])
    columns = {}
    for key in keys:
        history = retry(client.get_metric_history, run_id, mlflow_key(key))
        if history:
            columns[key] = pd.Series({m.step: m.value for m in history}, dtype=float)
    return pd.DataFrame(columns).sort_index()


def derive(evals: pd.DataFrame, selection_metric: str) -> dict[str, dict[str, float]]:
    """protocol -> {metric: test value} (metric names without the `test/` prefix); NaN where undefined (no
    validation metric logged, or no evaluation)."""
    tests = [c for c in evals.columns if c.startswith("test/")]
    empty = {c[len("test/"):]: float("nan") for c in tests}
    out = {p: dict(empty) for p in PROTOCOLS}
    if evals.empty:
        return out
    for protocol, column in (("val", f"val/{selection_metric}"), ("test", f"test/{selection_metric}")):
        if column in evals and evals[column].notna().any():
            step = evals[column].idxmax()  # the first of equal maxima; NaN scores are skipped
            out[protocol] = {c[len("test/"):]: float(evals.at[step, c]) for c in tests}
    out["last"] = {c[len("test/"):]: float(evals[c].iloc[-1]) for c in tests}
    return out


def protocol_frame(client: MlflowClient, runs: pd.DataFrame, default_selection_metric: str,
                   metrics: Iterable[str]) -> pd.DataFrame:
    """One row per run (index: run_id) with columns `<protocol>/<metric>` for every protocol and metric."""
    metrics = list(metrics)
    rows = {}
    for _, run in runs.iterrows():
        sel = run.get("tags.selection_metric")
        sel = sel if isinstance(sel, str) and sel else default_selection_metric
        derived = derive(evaluations(client, str(run["run_id"]), sel, metrics), sel)
        rows[run["run_id"]] = {f"{p}/{m}": derived[p].get(m, np.nan) for p in PROTOCOLS for m in metrics}
    columns = [f"{p}/{m}" for p in PROTOCOLS for m in metrics]
    return pd.DataFrame.from_dict(rows, orient="index", columns=columns)


def read_protocols(ctx: Context) -> pd.DataFrame:
    """The protocol frame of a report's FINISHED trials for the core metrics and mAP levels they logged."""
    present = {c[len("metrics.final/"):] for c in ctx.finished.columns if c.startswith("metrics.final/")}
    metrics = [m for m in (*CORE_METRICS, *map(mlflow_key, MAP_LEVELS)) if m in present]
    default = "auc" if ctx.style == "ucf" else "ap"  # eval.selection_metric auto; runs tag their own
    return protocol_frame(client(ctx.uri), ctx.finished, default, metrics)
