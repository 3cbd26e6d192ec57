"""MLflow tracking: one parent run per study invocation (driver), one child run per trial (worker).

Everything goes through an explicit MlflowClient and tracking URI, never the fluent global state, so
it behaves the same in the driver and in Ray workers on other nodes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from study import record
from study.spec import sampled
from vadclip.errors import VadClipError
from vadclip.metrics import mlflow_key

T = TypeVar("T")
# MLflow 3 experiment kinds (the UI's ExperimentKind enum): a classic training experiment, not a GenAI app
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # what the UI shows (and edits) as the experiment's or run's description
DESCRIPTION_TAG = "vadclip.description"  # the description this code wrote last (a note edited in the UI is kept)
TRIAL_ERROR = "trial_error"  # the Tune result of a trial that ended on a deterministic error (not retried)
ML_WORKFLOW = "machine_learning"  # MLflow >= 3.x UI: ?workflowType=machine_learning shows runs, not traces


class TrackingError(VadClipError, RuntimeError):
    """The tracking URI cannot be used; the message names it."""


def default_tracking_uri(project: Path) -> str:
    return f"sqlite:///{(project / 'mlruns.db').resolve()}"


def code_version() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return version("vadclip-studies")


def retry(fn: Callable[..., T], *args: Any, attempts: int = 8, **kwargs: Any) -> T:
    """SQLite allows one writer at a time: retry 'database is locked' from parallel trials."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # MLflow wraps SQLAlchemy errors in MlflowException
            if "locked" not in str(err).lower() or i == attempts - 1:
                raise
            time.sleep(0.2 * 2**i)
    raise AssertionError("unreachable")


def check_tracking_uri(uri: str) -> None:
    """Fail early, before any run is created, with a message naming the URI."""
    if (path := sqlite_path(uri)) is not None:
        folder = path.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking URI {uri}: folder {folder} does not exist or is not writable")
        return
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                if response.status != 200:
                    raise TrackingError(f"tracking URI {uri}: /health answered {response.status}")
        except (urllib.error.URLError, OSError) as err:
            raise TrackingError(f"tracking URI {uri} is unreachable: {err}") from err
        return
    if uri.startswith("file:") or "://" not in uri:
        raise TrackingError(f"tracking URI {uri}: the MLflow file store is deprecated; use sqlite:///ABS/PATH.db "
                            "or a tracking server http://HOST:PORT")


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def sqlite_path(uri: str) -> Path | None:
    """The file of a SQLite store URI; None for a server."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def prepare_store(uri: str, timeout: float = 300) -> None:
    """Create a new SQLite store's tables under a file lock (`<store>.lock`): two studies starting at once on a
    new store would both run MLflow's schema migration, and one would crash (`table ... already exists`)."""
    path = sqlite_path(uri)
    if path is None:
        return
    from filelock import FileLock

    with FileLock(f"{path}.lock", timeout=timeout):
        retry(client(uri).search_experiments, max_results=1)  # opening the store migrates it


def is_mlflow_store(path: Path) -> bool:
    """Whether a SQLite file holds MLflow's tables; read without changing it (MLflow would migrate it)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:
        return False
    return {"experiments", "runs", "alembic_version"} <= tables


def ensure_experiment(uri: str, name: str, artifact_root: Path | None = None, description: str | None = None) -> str:
    """The study's experiment, created when missing, marked as a model-training experiment (also when it
    already existed), with `description` as its note. A note edited in the UI since is left alone."""
    c = client(uri)
    exp = retry(c.get_experiment_by_name, name)
    if exp is None:
        location = None
        if artifact_root is not None and uri.startswith("sqlite:"):
            location = (artifact_root / name).resolve().as_uri()  # beside the SQLite store, not in cwd
        try:
            experiment_id, current = retry(c.create_experiment, name, artifact_location=location), {}
        except MlflowException:  # another study created it since
            exp = retry(c.get_experiment_by_name, name)
            if exp is None:
                raise
            experiment_id, current = exp.experiment_id, dict(exp.tags)
    else:
        experiment_id, current = exp.experiment_id, dict(exp.tags)
    wanted = {EXPERIMENT_KIND_TAG: MODEL_TRAINING}
    if description is not None:
        wanted[DESCRIPTION_TAG] = description
        if current.get(NOTE_TAG) in (None, "", current.get(DESCRIPTION_TAG)):
            wanted[NOTE_TAG] = description
    for key, value in wanted.items():
        if current.get(key) != value:
            retry(c.set_experiment_tag, experiment_id, key, value)
    return experiment_id


def ui_url(uri: str, experiment_id: str, run_id: str | None = None, ui: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page of the experiment's runs (or of one run). MLflow 3.17's UI chooses traces or runs
    from a global "workflow type" (default GenAI), not from the experiment's kind tag; the query parameter
    selects model training. `ui`: where `mlflow ui` serves a SQLite store (a tracking server serves its own)."""
    base = uri if uri.startswith(("http://", "https://")) else ui
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/{page}?workflowType={ML_WORKFLOW}"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def child_run_name(variant: str, seed: Any, trial_id: str, params: Mapping[str, Any] | None = None) -> str:
    """A trial's run name with what tells it apart first (the UI cuts long names): `s234 · LGT-Adapter` for
    an ablation row; for a search (one seed) the trial number and the sampled values, `#3 · window=8, lr=1e-05`.
    The full trial id stays in the `trial_id` tag."""
    if variant != record.SEARCH:
        return f"s{seed} · {variant}"[:200]
    number = trial_id.rsplit("_", 1)[-1]
    head = f"#{int(number)}" if number.isdigit() else trial_id
    shown = ", ".join(f"{key.rsplit('.', 1)[-1]}={_short(value)}" for key, value in sorted((params or {}).items()))
    return f"{head} · {shown}"[:200] if shown else f"{head} · s{seed}"


_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def safe_key(text: str) -> str:
    """A piece of an MLflow metric key: MLflow allows only alphanumerics, `_ - . / :` and space (no '(', '+');
    `Local TF-Encoder + Global TF-Encoder` -> `Local_TF-Encoder_plus_Global_TF-Encoder`."""
    key = re.sub(r"\.{2,}", ".", _UNSAFE.sub("_", str(text).replace("+", " plus ")))
    return key[:100].strip("_.") or "_"


def log_parent_summary(uri: str, parent_id: str, summary: Mapping[str, Mapping[str, float]],
                       prefix: str = "mean") -> dict[str, float]:
    """Per-row summary metrics on the parent run, so its chart view is not empty: `{row: {metric: value}}` ->
    `<prefix>/<row>/<metric>` (e.g. `mean/LGT-Adapter/ap`; prefix "" -> `best/ap`), names made MLflow-safe.
    Idempotent: a value equal to the one logged already is not logged again (a changed one is, at step 0).
    Non-finite values are skipped. Returns every key with its value."""
    keys: dict[str, float] = {}
    rows: dict[str, str] = {}  # MLflow-safe name -> row
    for row, metrics in summary.items():
        base = safe_key(row)
        name, n = base, 1
        while name in rows and rows[name] != row:  # two rows with the same safe name stay apart
            n += 1
            name = f"{base}_{n}"
        rows[name] = row
        for metric, value in metrics.items():
            if value is None or not math.isfinite(float(value)):
                continue
            parts = [prefix, name, *(safe_key(p) for p in mlflow_key(metric).split("/"))]
            keys["/".join(p for p in parts if p)] = float(value)
    log_parent_metrics(uri, parent_id, keys)
    return keys


def log_parent_metrics(uri: str, parent_id: str, metrics: Mapping[str, float]) -> None:
    """Metrics on the parent run at step 0 (names as given: MLflow-safe), each only when it differs from the value
    logged already, so a second report of the same study adds nothing."""
    c = client(uri)
    logged = retry(c.get_run, parent_id).data.metrics
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if logged.get(k) != v]
    for i in range(0, len(items), 1000):
        retry(c.log_batch, parent_id, metrics=items[i:i + 1000])


def start_parent(uri: str, experiment_id: str, run_name: str, tags: dict[str, str],
                 params: dict[str, Any]) -> str:
    c = client(uri)
    run = retry(c.create_run, experiment_id, run_name=run_name, tags={record.ROLE: record.PARENT, **tags})
    log_params(c, run.info.run_id, params)
    return run.info.run_id


def log_params(c: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps params per batch at 100
        retry(c.log_batch, run_id, params=items[i:i + 100])


def set_status(uri: str, run_id: str, status: str) -> None:
    retry(client(uri).set_terminated, run_id, status)


def reopen(uri: str, run_id: str) -> None:
    """A resumed study or retried trial continues its run instead of creating another."""
    retry(client(uri).update_run, run_id, status="RUNNING")


def log_artifacts(uri: str, run_id: str, paths: list[Path], folder: str | None = None) -> None:
    c = client(uri)
    for path in paths:
        retry(c.log_artifact, run_id, str(path), folder)


def children(uri: str, experiment_id: str, parent_id: str) -> list:
    return retry(client(uri).search_runs, [experiment_id],
                 filter_string=record.children_filter(parent_id), max_results=5000)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(\([\w.]+\))?: ")


def error_line(error: BaseException | str) -> str:
    """One line (<= 500 chars) naming a trial's error. A Ray `RayTaskError` (also as text, whose first line is
    `ray::ImplicitFunc.train() (pid=...)`) gives the trial's own exception: `ValueError: bad window`."""
    if isinstance(error, BaseException):
        cause = getattr(error, "cause", None)
        error = cause if isinstance(cause, BaseException) else error
        text = f"{type(error).__name__}: {error}"
    else:
        text = str(error)
    lines = [line.rstrip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    if lines and (lines[0].startswith("ray::") or lines[0].startswith("Traceback")):
        named = [line for line in lines[1:] if _EXCEPTION_LINE.match(line)]
        lines = named[-1:] or lines
    return (lines[0] if lines else "unknown error")[:500]


@dataclass(frozen=True)
class FailedTrial:
    """A Tune trial that ended in error, as the driver sees it in the ResultGrid."""

    error: str  # one line
    tags: dict[str, str] = field(default_factory=dict)  # variant, seed
    params: dict[str, Any] = field(default_factory=dict)  # the trial's Tune config (grid values, samples)


def tune_failures(results: Iterable[Any]) -> dict[str, FailedTrial]:
    """Trial id -> FailedTrial for every result of a Tune ResultGrid with an error, or that reported one
    (TRIAL_ERROR: a deterministic error, which the trial reports instead of raising so that Tune does not
    retry it)."""
    failed = {}
    for result in results:
        reported = (result.metrics or {}).get(TRIAL_ERROR)
        if result.error is None and not reported:
            continue
        trial_id = _trial_id(result)
        if trial_id is None:
            continue
        config = dict(result.config or {})
        tags = {record.VARIANT: str(config.get(record.TRIAL_VARIANT, record.SEARCH))}
        if record.TRIAL_SEED in config:
            tags[record.SEED] = str(config[record.TRIAL_SEED])
        failed[trial_id] = FailedTrial(error_line(result.error if result.error is not None else str(reported)),
                                       tags, config)
    return failed


def _trial_id(result: Any) -> str | None:
    trial_id = (result.metrics or {}).get("trial_id")  # Tune's result key, not the tag
    return trial_id or (Path(result.path).name if getattr(result, "path", None) else None)


def _failure_line(failure: FailedTrial | BaseException | str) -> str:
    return failure.error if isinstance(failure, FailedTrial) else error_line(failure)


def record_failed_trials(uri: str, experiment_id: str, parent_id: str,
                         failures: Mapping[str, FailedTrial | BaseException | str],
                         tags: Mapping[str, str] | None = None) -> list[str]:
    """A FAILED child run, tagged `error`, for each failed trial that has none (it failed before its worker
    created one, e.g. its config raised); tags as TrialRun's plus `tags`, the trial's variant/seed and its Tune
    config as JSON (`tune_config`).
    A FAILED child without an `error` tag gets one. Idempotent. Returns the run ids created."""
    c = client(uri)
    existing: dict[str | None, dict[str | None, Any]] = {}  # trial id -> seed tag -> run
    for run in children(uri, experiment_id, parent_id):
        logged = run.data.tags
        existing.setdefault(record.get(logged, record.TRIAL_ID), {})[record.get(logged, record.SEED)] = run
    created = []
    for trial_id, failure in failures.items():
        line = _failure_line(failure)
        own = failure.tags if isinstance(failure, FailedTrial) else {}
        config = failure.params if isinstance(failure, FailedTrial) else {}
        fused = [str(s) for s in config.get(record.TRIAL_SEEDS, [])]  # a fused trial: a run per seed
        runs = existing.get(trial_id, {})
        seeds: list[str | None] = [*fused] or [record.get(own, record.SEED)]
        for seed in seeds:
            run = runs.get(seed) if fused else next(iter(runs.values()), None)
            if run is not None:
                if run.info.status == "FAILED" and record.ERROR not in run.data.tags:
                    retry(c.set_tag, run.info.run_id, record.ERROR, line)
                continue
            run_tags = {**(tags or {}), **own, record.PARENT_RUN: parent_id, record.ROLE: record.TRIAL,
                        record.TRIAL_ID: trial_id, record.ERROR: line}
            if seed is not None:
                run_tags[record.SEED] = seed
            if config:  # a tag, not params: a later attempt of the trial logs its full config as params
                run_tags[record.TUNE_CONFIG] = json.dumps(config, sort_keys=True, default=str)[:5000]
            name = child_run_name(run_tags.get(record.VARIANT, record.SEARCH), run_tags.get(record.SEED, "?"), trial_id,
                                  sampled(config))
            run_id = retry(c.create_run, experiment_id, run_name=name, tags=run_tags).info.run_id
            retry(c.set_terminated, run_id, "FAILED")
            created.append(run_id)
    return created


def close_unfinished_children(uri: str, experiment_id: str, parent_id: str,
                              failures: Mapping[str, FailedTrial | BaseException | str] | None = None) -> int:
    """After a Tune run that was NOT interrupted: every trial is done, so a child still RUNNING, or KILLED by its
    worker (stopped inside tune.report), was stopped by the scheduler: tag it `stopped_early` and end it KILLED.
    A child whose trial is in `failures` (trial id -> error) ends FAILED with an `error` tag instead; a child
    tagged `interrupted` (its trial was not continued) is left alone. Returns how many were tagged stopped_early."""
    n, c = 0, client(uri)
    failures = failures or {}
    for run in children(uri, experiment_id, parent_id):
        status, tags, run_id = run.info.status, run.data.tags, run.info.run_id
        if status not in ("RUNNING", "KILLED"):
            continue
        if record.get(tags, record.TRIAL_ID) in failures:
            retry(c.set_tag, run_id, record.ERROR, _failure_line(failures[tags[record.TRIAL_ID]]))
            retry(c.set_terminated, run_id, "FAILED")
        elif record.get(tags, record.STOPPED_EARLY) != "true" and record.get(tags, record.INTERRUPTED) != "true":
            retry(c.set_tag, run_id, record.STOPPED_EARLY, "true")
            if status == "RUNNING":
                retry(c.set_terminated, run_id, "KILLED")
            n += 1
    return n


def mark_interrupted_children(uri: str, experiment_id: str, parent_id: str,
                              trial_ids: Iterable[str] = ()) -> int:
    """After a Tune run interrupted by the user (Ctrl-C): children still RUNNING, and KILLED children of
    `trial_ids` (StudyProgress.unfinished_ids: their worker was stopped inside tune.report) without a verdict, end
    KILLED with the tag `interrupted=true` (never `stopped_early`); `--resume` continues them and drops the tag.
    Returns how many were tagged."""
    n, c, unfinished = 0, client(uri), set(trial_ids)
    for run in children(uri, experiment_id, parent_id):
        tags = run.data.tags
        killed_here = (run.info.status == "KILLED" and record.get(tags, record.TRIAL_ID) in unfinished
                       and record.INTERRUPTED not in tags and record.get(tags, record.STOPPED_EARLY) != "true")
        if run.info.status != "RUNNING" and not killed_here:
            continue
        if record.STOPPED_EARLY in run.data.tags:
            retry(c.delete_tag, run.info.run_id, record.STOPPED_EARLY)
        retry(c.set_tag, run.info.run_id, record.INTERRUPTED, "true")
        if run.info.status == "RUNNING":
            retry(c.set_terminated, run.info.run_id, "KILLED")
        n += 1
    return n


class TrialRun:
    """The child run of one Tune trial; a retried or resumed trial continues the same run."""

    def __init__(self, uri: str, experiment_id: str, parent_id: str, trial_id: str, run_name: str,
                 tags: dict[str, str], fused: bool = False):
        """`fused`: the trial trains several seeds, one run each, told apart by the `seed` tag of `tags`."""
        self.uri, self.c = uri, client(uri)
        which = record.trial_filter(parent_id, trial_id, tags[record.SEED] if fused else None)
        existing = retry(self.c.search_runs, [experiment_id], filter_string=which)
        self.tags: dict[str, str] = {}  # the run's tags when it already existed (a retried or resumed trial)
        self.final_logged = False
        self.has_params = False
        if existing:
            self.run_id = existing[0].info.run_id
            self.tags = dict(existing[0].data.tags)
            # a trial that ended just before its driver died is run again from its last checkpoint on --resume
            self.final_logged = record.final_metrics_logged(existing[0].data.metrics)
            # a run recorded by the driver for a trial that failed before its worker got here has no params
            self.has_params = bool(existing[0].data.params)
            reopen(uri, self.run_id)
            self.resumed = True
            for key in (record.STOPPED_EARLY, record.INTERRUPTED, record.ERROR):  # the driver's verdicts
                self.delete_tag(key)
        else:
            run = retry(self.c.create_run, experiment_id, run_name=run_name,
                        tags={record.PARENT_RUN: parent_id, record.ROLE: record.TRIAL, record.TRIAL_ID: trial_id,
                              **tags})
            self.run_id, self.resumed = run.info.run_id, False
        # the epochs logged before (their values, as the x-axis is the global optimisation step)
        self.logged_epochs = {int(m.value) for m in retry(self.c.get_metric_history, self.run_id, record.EPOCH)}

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.has_params:  # params are immutable in MLflow; a resumed run has them already
            log_params(self.c, self.run_id, params)
            self.has_params = True

    def log_epoch(self, epoch: int, metrics: dict[str, float], evaluations: Iterable[Mapping[str, float]] = ()) -> None:
        """One epoch's metrics and its step-wise `evaluations`, each at its global step (`step`: optimisation steps
        so far; an epoch record without one is logged at step=epoch). An epoch already logged (before a crash)
        is not logged twice."""
        if epoch in self.logged_epochs:
            return
        now = int(time.time() * 1000)
        items = []
        for entry in (*evaluations, {**metrics, record.EPOCH: epoch}):
            step = int(entry.get("step", epoch))
            items += [Metric(mlflow_key(k), float(v), now, step) for k, v in entry.items()
                      if k not in ("step", record.EPOCH) and v == v]
        items.append(Metric(record.EPOCH, float(epoch), now, int(metrics.get("step", epoch))))
        for i in range(0, len(items), 1000):
            retry(self.c.log_batch, self.run_id, metrics=items[i:i + 1000])
        self.logged_epochs.add(epoch)

    def backfill(self, history: Sequence[Mapping[str, float]], evaluations: Sequence[Mapping[str, float]] = ()) -> None:
        """After a restore: log epochs (and their step-wise evaluations) that the checkpoint has but the run
        lost (no gaps)."""
        for entry in history:
            epoch = int(entry[record.EPOCH])
            self.log_epoch(epoch, {k: v for k, v in entry.items() if k != record.EPOCH},
                           [e for e in evaluations if int(e[record.EPOCH]) == epoch])

    def log_final(self, metrics: dict[str, float], step: int) -> None:
        """The trial's final metrics, once: a trial run again after it ended does not log them twice."""
        if self.final_logged:
            return
        now = int(time.time() * 1000)
        items = [Metric(record.final_key(k), float(v), now, step) for k, v in metrics.items() if v == v]
        retry(self.c.log_batch, self.run_id, metrics=items)
        self.final_logged = True

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        log_artifacts(self.uri, self.run_id, [path], folder)

    def set_tags(self, tags: dict[str, str]) -> None:
        retry(self.c.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.tags.update({k: str(v) for k, v in tags.items()})

    def delete_tag(self, key: str) -> None:
        """Remove a tag an earlier attempt set (no-op when absent)."""
        if key in self.tags:
            retry(self.c.delete_tag, self.run_id, key)
            del self.tags[key]

    def end(self, status: str) -> None:
        retry(self.c.set_terminated, self.run_id, status)

    def end_if_running(self, status: str) -> None:
        """End the run with `status` unless it has ended already (e.g. FINISHED before a later failure)."""
        if retry(self.c.get_run, self.run_id).info.status == "RUNNING":
            self.end(status)
