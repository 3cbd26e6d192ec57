"""Selection protocols derived from a trial's logged evaluation histories.

Every evaluation (each epoch's end and each `eval.eval_every_steps` step) logs the validation and the test
metrics at its global optimisation step. From the same run a report then reads the test metrics at
- `val`: the best validation evaluation (honest; what `eval.selection=val` keeps),
- `test`: the best test evaluation (what the authors' code prints, best-on-test),
- `last`: the last evaluation.
"Best" is the run's selection metric (AUC for UCF-style, AP for XD-style); ties go to the earliest evaluation,
as `BestCheckpoint` keeps the first of equal scores.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from study.tracking import retry
from vadclip.metrics import mlflow_key

PROTOCOLS = ("val", "test", "last")
PROTOCOL_TEXT = {"val": "best validation evaluation", "test": "best test evaluation (the authors' protocol)",
                 "last": "last evaluation"}


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
