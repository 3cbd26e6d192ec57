"""The notes both kinds of report carry: dataset and evaluation protocol, the paper's numbers, provenance.

A report's notes are addressable by name: an ordered mapping name -> text (`Notes`), in the order shown.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from study.record import (
    CODE_VERSION,
    DEVICE,
    FINAL_COLUMN,
    KERNEL_TAGS,
    MAP_PROTOCOL,
    REUSED_FROM,
    SCORE_BRANCH,
    SELECTION,
    SOURCE_DIGEST,
    STOPPED_EARLY,
    VARIANT,
    column,
    param_column,
)
from study.report.context import Context, tag
from study.report.render import date_text
from study.spec import PAPER_DATASETS
from study.tracking import sqlite_path
from vadclip.data.conventions import DATASET_NAMES

Notes = dict[str, str]  # name -> text, in the order shown
COST_NOTE = "cost"

AP_NOTE = "AP = sklearn average_precision_score, not trapezoidal AUC-PR"
MAP_NOTES = {"official": "all test videos and classes incl. normal", "paper": "abnormal videos and classes only"}
SYNTHETIC_NOTE = "Synthetic data: the paper's values are for the real dataset, shown for orientation only"
# a dataset the paper does not report (not in study.spec.PAPER_DATASETS): its results page quotes re-runs
REPORTED_ELSEWHERE_NOTE = ("{dataset}: the paper reports no result on it; the (paper) column holds the value VadCLIP's "
                           "results page quotes, a third-party re-run of unknown settings, most likely best-on-test "
                           "(docs/real-data.md)")


def trial_seconds(runs: pd.DataFrame) -> pd.Series:
    """Each run's start-to-end seconds (MLflow's run times; a run still open counts as 0)."""
    if not len(runs) or "end_time" not in runs:
        return pd.Series(dtype=float)
    return ((runs["end_time"] - runs["start_time"]) / 1000).fillna(0).clip(lower=0)


def duration(seconds: float) -> str:
    """`42 s`, `3.5 min`, `2.1 h`."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


OUTCOMES = ("kept", "stopped early", "failed", "reused", "unfinished")  # a trial's time is counted under one


@dataclass(frozen=True)
class Cost:
    """What a study's table cost: trial-seconds by outcome (OUTCOMES) and trials by device, the wall time from the
    parent's start to the last trial's end, and the mean kept trial times the rows (one more seed per row)."""

    seconds: dict[str, float]  # outcome -> trial-seconds, outcomes seen only
    devices: dict[str, int]  # device -> trials
    trials: int
    wall: float
    one_more_seed: float  # NaN without a kept trial or rows
    rows: int = 0  # the table's rows that one more seed would train

    @property
    def per_hour(self) -> float:
        return self.trials / (self.wall / 3600) if self.wall > 0 else math.nan

    def metrics(self) -> dict[str, float]:
        """The parent run's cost metrics (seconds; MLflow-safe names): `cost/trial_seconds[/<outcome>]`,
        `cost/wall_seconds`, `cost/trials_per_hour`, `cost/one_more_seed_seconds`; non-finite ones left out."""
        out = {"cost/trial_seconds": sum(self.seconds.values()),
               **{f"cost/trial_seconds/{k.replace(' ', '_')}": v for k, v in self.seconds.items()},
               "cost/wall_seconds": self.wall, "cost/trials_per_hour": self.per_hour,
               "cost/one_more_seed_seconds": self.one_more_seed}
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}


def study_cost(ctx: Context, rows: int = 0) -> Cost | None:
    """The study's Cost from its children's MLflow run times and tags; None without a trial."""
    runs = ctx.children
    if not len(runs) or not {"start_time", "end_time"} <= set(runs.columns):
        return None
    seconds = trial_seconds(runs)
    reused = runs[column(REUSED_FROM)].notna() if column(REUSED_FROM) in runs else pd.Series(False, index=runs.index)
    stopped = (runs[column(STOPPED_EARLY)] == "true") if column(STOPPED_EARLY) in runs else reused & False
    outcome = pd.Series("kept", index=runs.index)
    outcome[runs["status"] != "FINISHED"] = "unfinished"
    outcome[runs["status"] == "FAILED"] = "failed"
    outcome[stopped] = "stopped early"
    outcome[reused] = "reused"
    by = seconds.groupby(outcome).sum()
    devices = Counter(runs[column(DEVICE)].dropna()) if column(DEVICE) in runs else Counter()
    ends = runs["end_time"].dropna()
    wall = (float(ends.max()) - float(ctx.parent["start_time"])) / 1000 if len(ends) else 0.0
    kept = seconds[outcome == "kept"]
    return Cost({k: float(by[k]) for k in OUTCOMES if k in by}, dict(devices), len(runs), wall,
                float(kept.mean() * rows) if rows and len(kept) else math.nan, rows)


def cost_note(cost: Cost | None) -> Notes:
    """COST: the Cost in a sentence."""
    if cost is None:
        return {}
    parts = ", ".join(f"{name} {duration(s)}" for name, s in cost.seconds.items())
    on = ", ".join(f"{n} on {d}" for d, n in cost.devices.items())
    per_hour = f"; {cost.per_hour:.0f} trials per hour" if cost.wall > 0 else ""
    more = (f"; one more seed per row ({cost.rows} rows) ≈ {duration(cost.one_more_seed)} of trial time"
            if math.isfinite(cost.one_more_seed) else "")
    return {COST_NOTE: f"Cost: {duration(sum(cost.seconds.values()))} of trial time ({parts})"
            f"{f'; {on}' if on else ''}; wall time {duration(cost.wall)}{per_hour}{more}. Times vary run to run; "
            "the numbers of the table do not."}


def protocol_notes(ctx: Context) -> Notes:
    """Dataset and model selection, AP and mAP definitions, the score branch (when known)."""
    selection = _describe(ctx, SELECTION, "eval.selection")
    notes = {"dataset": f"Dataset: {ctx.dataset} ({ctx.style}-style labels); model selection on {selection}; the "
             "selected checkpoint re-evaluated on test.", "ap": AP_NOTE + "."}
    if any(c.startswith(f"{FINAL_COLUMN}map") for c in ctx.children):  # binary data (sht, ubnormal) has no mAP
        protocol = _describe(ctx, MAP_PROTOCOL, "eval.map_protocol",
                             lambda p: f"{p} ({MAP_NOTES.get(p, 'unknown protocol')})")
        notes["map"] = f"mAP protocol: {protocol}."
    branch = _describe(ctx, SCORE_BRANCH)
    if branch != "unknown":
        notes["branch"] = f"Scores from branch: {branch}."
    return notes


def paper_note(ctx: Context) -> Notes:
    if ctx.dataset == "synthetic":
        return {"paper": SYNTHETIC_NOTE + "."}
    if ctx.style in DATASET_NAMES and ctx.style not in PAPER_DATASETS:
        return {"paper": REPORTED_ELSEWHERE_NOTE.format(dataset=DATASET_NAMES[ctx.style]) + "."}
    return {}


def planned(parent: pd.Series, param: str, default: Any) -> str:
    """The invocation's value (the parent's `study.trials`/`study.seeds` params count --num-samples/--seeds
    overrides; the YAML's value does not)."""
    value = parent.get(param_column(param))
    return str(value) if value is not None and value == value else str(default)


def provenance(ctx: Context) -> str:
    status = str(ctx.parent["status"])
    # an interrupted or failed invocation, or one whose trials still run; the report a study writes at its
    # end (parent still RUNNING, every trial ended) is complete
    unfinished = status in ("KILLED", "FAILED") or status == "RUNNING" and (ctx.children["status"] == "RUNNING").any()
    partial = f" ({status}: partial results)" if unfinished else ""
    code = tag(ctx.parent, CODE_VERSION) or "unknown"
    digest = tag(ctx.parent, SOURCE_DIGEST)
    started = date_text(ctx.parent.get("start_time"))
    return (f"MLflow {display_uri(ctx.uri)}, experiment {ctx.spec.name}, parent run {ctx.parent_id}{partial} "
            f"started {started}, code version {code}{f' (source digest {digest})' if digest else ''}"
            f"{kernels_note(ctx.children)}; report generated {ctx.date}.")


def kernels_note(children: pd.DataFrame) -> str:
    """'; trials on CPU capability AVX2 (forced), MKL CNR COMPATIBLE, 1 thread' from the trials' tags (vadclip.portable:
    the kernels decide the last bits); every value seen, '/'-joined; '' when no trial has them."""
    def seen(key: str) -> str:
        values = children.get(column(key))
        return " / ".join(sorted(map(str, values.dropna().unique()))) if values is not None else ""

    capability, mkl, threads = map(seen, KERNEL_TAGS)
    if not capability:
        return ""
    mkl_text = f", MKL CNR {mkl}" if mkl and mkl != "n/a" else ""
    threads_text = f", {threads} thread{'' if threads == '1' else 's'}" if threads else ""
    return f"; trials on CPU capability {capability}{mkl_text}{threads_text}"


def display_uri(uri: str) -> str:
    """A SQLite store inside the current folder as a relative URI: reports carry no machine path."""
    path = sqlite_path(uri)
    if path is None:
        return uri
    try:
        return f"sqlite:///{path.resolve().relative_to(Path.cwd().resolve())}"
    except ValueError:
        return uri


def _describe(ctx: Context, key: str, param: str | None = None, explain: Callable[[str], str] = str) -> str:
    """A trial's common value, with the rows that differ (e.g. the one row that switches the mAP protocol)."""
    values = _per_variant(ctx.children, key, param)
    counts = Counter(values.values())
    common = counts.most_common(1)[0][0] if counts else ""
    if not common and len(counts) <= 1:  # the trials lack it: the parent's tag
        return explain(tag(ctx.parent, key) or "unknown")
    exceptions = [f"{v}: {explain(val) if val else 'mixed'}" for v, val in values.items() if val != common]
    return (explain(common) if common else "mixed") + (f"; except {'; '.join(exceptions)}" if exceptions else "")


def _per_variant(children: pd.DataFrame, key: str, param: str | None = None) -> dict[str, str]:
    """A trial's value per variant ('' where the variant's trials disagree): the config param where it is
    logged (it is the trial's own config; the runner's tags may carry the study's base value), else the tag."""
    logged = column(key)  # older runs: the tag alone
    name = param_column(param) if param and param_column(param) in children else logged
    if name not in children or column(VARIANT) not in children:
        return {}
    return {str(v): _single(rows[name]) for v, rows in children.groupby(column(VARIANT), sort=False)}


def _single(values: pd.Series) -> str:
    distinct = values.dropna().unique()
    return str(distinct[0]) if len(distinct) == 1 else ""
