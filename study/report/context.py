"""Reading a study's runs from MLflow into a `Context`: the parent run, its trials as rows, the data style."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from study.record import (
    DATASET,
    FINAL_COLUMN,
    PARENT,
    ROLE,
    SEED,
    TRIAL,
    children_filter,
    column,
    metric_column,
    param_column,
    parents_filter,
    tag_columns,
)
from study.report.protocols import SELECTION, protocol_frame
from study.report.render import date_text
from study.spec import StudySpec
from study.tracking import client as tracking_client
from study.tracking import is_mlflow_store, sqlite_path
from vadclip.bootstrap import (
    BOOTSTRAP_FILE,
    BOOTSTRAP_METRICS,
    TEST_SCORES_FILE,
    load_bootstrap,
    load_test_scores,
    video_bootstrap,
)
from vadclip.config import auto_metric
from vadclip.data.conventions import DATASET_NAMES
from vadclip.errors import VadClipError
from vadclip.metrics import CORE_METRICS as CORE
from vadclip.metrics import MAP_LEVELS, mlflow_key


class ReportError(VadClipError, RuntimeError):
    """Nothing to report (no experiment, no parent run, no finished trial); the message says what is missing."""


def finished_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "FINISHED"]


@dataclass(frozen=True)
class Context:
    """What every part of a report needs to know about the runs it describes."""

    spec: StudySpec
    uri: str
    parent: pd.Series
    children: pd.DataFrame  # every trial run of the parent, any status
    dataset: str
    style: str
    metric: str  # the spec's main metric resolved for the data style
    date: str
    protocol: str = SELECTION  # a study.report.protocols.REGISTRY name: which test values the tables show

    @property
    def finished(self) -> pd.DataFrame:
        return finished_runs(self.children)

    @property
    def parent_id(self) -> str:
        return str(self.parent["run_id"])


def read_context(spec: StudySpec, uri: str, parent_run_id: str | None, protocol: str = SELECTION) -> Context:
    client = _client(uri)
    experiment_id = _experiment(client, spec.name, uri)
    parent = _parent(client, experiment_id, spec.name, parent_run_id)
    children = _children(client, experiment_id, parent, spec.name)
    dataset = tag(parent, DATASET) or tag(children, DATASET) or spec.preset
    style = data_style(dataset, children)
    date = date_text(datetime.now(UTC).timestamp() * 1000)
    return Context(spec, uri, parent, children, dataset, style, spec.resolve_metric(style), date, protocol)


def _client(uri: str) -> MlflowClient:
    # MLflow would silently create (or migrate) a store; a report must not write anything
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise ReportError(f"no MLflow store at {uri} (the file does not exist)")
    if path is not None and not is_mlflow_store(path):
        raise ReportError(f"no MLflow store at {uri} (the file holds no MLflow tables); run a study first")
    return tracking_client(uri)


def _runs(client: MlflowClient, experiment_id: str, filter_string: str) -> pd.DataFrame:
    """Runs as rows with `status`, `start_time`, `metrics.*`, `params.*`, `tags.*` (mlflow.search_runs's names)."""
    rows, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=5000, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        for run in page:
            row: dict[str, Any] = {"run_id": run.info.run_id, "status": run.info.status,
                                   "start_time": run.info.start_time, "end_time": run.info.end_time}
            row.update({metric_column(k): v for k, v in run.data.metrics.items()})
            row.update({param_column(k): v for k, v in run.data.params.items()})
            row.update(tag_columns(run.data.tags))
            rows.append(row)
        token = page.token
        if not token:
            return pd.DataFrame(rows, columns=None if rows else ["run_id", "status", "start_time", "end_time"])


def _experiment(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        raise ReportError(f"no MLflow experiment {name!r} in {uri}; run the study first")
    return exp.experiment_id


def _parent(client: MlflowClient, experiment_id: str, name: str, parent_run_id: str | None) -> pd.Series:
    parents = _runs(client, experiment_id, parents_filter())
    if parent_run_id is not None:
        match = parents[parents["run_id"] == parent_run_id]
        if match.empty:
            raise ReportError(f"run {parent_run_id} is not a parent run ({ROLE}={PARENT}) of study {name!r}")
        return match.iloc[0]
    # the newest invocation with results: one that failed at its start or was interrupted before any trial
    # finished has nothing to show
    for _, parent in parents.sort_values("start_time", ascending=False).iterrows():
        runs = _runs(client, experiment_id, f"{children_filter(parent['run_id'])} and attributes.status = 'FINISHED'")
        if not runs.empty:
            return parent
    raise ReportError(f"study {name!r} has no parent run ({ROLE}={PARENT}) with a FINISHED trial; "
                      f"{len(parents)} parent run(s) without results")


def _children(client: MlflowClient, experiment_id: str, parent: pd.Series, name: str) -> pd.DataFrame:
    runs = _runs(client, experiment_id, children_filter(parent["run_id"]))
    if column(ROLE) in runs:
        runs = runs[runs[column(ROLE)].fillna(TRIAL) == TRIAL]
    if runs.empty or not (runs["status"] == "FINISHED").any():
        counts = runs["status"].value_counts().to_dict() if not runs.empty else {}
        raise ReportError(f"parent run {parent['run_id']} of study {name!r} has no FINISHED trial runs "
                          f"(trials by status: {counts or 'none'})")
    return runs.reset_index(drop=True)


def tag(row: pd.Series | pd.DataFrame, key: str, default: str = "") -> str:
    """A run's tag; of a column of runs, its single value (the default when mixed or absent)."""
    value = row.get(column(key))
    if isinstance(value, pd.Series):
        values = value.dropna().unique()
        return str(values[0]) if len(values) == 1 else default
    return default if value is None or value != value else str(value)


def data_style(dataset: str, children: pd.DataFrame) -> str:
    """The label convention: the dataset (ucf, xd, sht, ubnormal); synthetic data carries its convention in the
    `data.synthetic.style` param; anything else reads as xd."""
    style = param_column("data.synthetic.style")
    if dataset == "synthetic" and style in children:
        styles = children[style].dropna().unique()
        return "ucf" if list(styles) == ["ucf"] else "xd"
    return dataset if dataset in DATASET_NAMES else "xd"


def final_metrics(runs: pd.DataFrame) -> list[str]:
    """The `final/*` metric names present, core ones first (paper order), then mAP levels, then the rest."""
    names = [c[len(FINAL_COLUMN):] for c in runs.columns if c.startswith(FINAL_COLUMN)]
    names = [n for n in names if "/" not in n]  # not final/val/*
    levels = sorted(n for n in names if n.startswith("map_iou"))
    rest = sorted(n for n in names if n not in CORE and n not in levels)
    return [m for m in CORE if m in names] + levels + rest


def read_replicates(ctx: Context, metric: str) -> dict[str, np.ndarray]:
    """run id -> the video-bootstrap replicates of `metric` from each FINISHED trial's `bootstrap.npz` artifact
    (trials without one, e.g. logged by an older version, are left out)."""
    if metric not in BOOTSTRAP_METRICS:
        return {}
    out = {}
    seeds = ctx.finished.get(column(SEED), pd.Series("0", index=ctx.finished.index))
    with tempfile.TemporaryDirectory(prefix="vadclip-report-") as tmp:
        for i, (run_id, seed) in enumerate(zip(ctx.finished["run_id"], seeds)):
            def fetch(name: str, run_id: str = str(run_id), i: int = i) -> str | None:
                try:
                    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name,
                                                               tracking_uri=ctx.uri, dst_path=f"{tmp}/{i}")
                except (MlflowException, OSError):
                    return None
            if (path := fetch(BOOTSTRAP_FILE)) is not None:
                out[str(run_id)] = load_bootstrap(path)[metric]
            elif (path := fetch(TEST_SCORES_FILE)) is not None:  # recomputed from the scores, as the trial does
                seed_value = int(seed) if str(seed).lstrip("-").isdigit() else 0
                out[str(run_id)] = video_bootstrap(load_test_scores(path), seed=seed_value)[metric]
    return out


def read_protocols(ctx: Context) -> pd.DataFrame:
    """The protocol frame of a report's FINISHED trials for the core metrics and mAP levels they logged."""
    present = {c[len(FINAL_COLUMN):] for c in ctx.finished.columns if c.startswith(FINAL_COLUMN)}
    metrics = [m for m in (*CORE, *map(mlflow_key, MAP_LEVELS)) if m in present]
    default = auto_metric(ctx.style)  # eval.selection_metric auto; runs tag their own
    return protocol_frame(tracking_client(ctx.uri), ctx.finished, default, metrics)
