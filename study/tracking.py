"""MLflow tracking: one parent run per study invocation (driver), one child run per trial (worker).

Everything goes through an explicit MlflowClient and tracking URI, never the fluent global state, so
it behaves the same in the driver and in Ray workers on other nodes.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

T = TypeVar("T")
PARENT, TRIAL = "parent", "trial"


class TrackingError(RuntimeError):
    """The tracking URI cannot be used; the message names it."""


def default_tracking_uri(project: Path) -> str:
    return f"sqlite:///{(project / 'mlruns.db').resolve()}"


def metric_key(name: str) -> str:
    """MLflow metric names allow no '@': `map@0.1` -> `map_iou0.1`."""
    return name.replace("@", "_iou")


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
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
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


def ensure_experiment(uri: str, name: str, artifact_root: Path | None = None) -> str:
    c = client(uri)
    exp = retry(c.get_experiment_by_name, name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if artifact_root is not None and uri.startswith("sqlite:"):
        location = (artifact_root / name).resolve().as_uri()  # beside the SQLite store, not in cwd
    return retry(c.create_experiment, name, artifact_location=location)


def start_parent(uri: str, experiment_id: str, run_name: str, tags: dict[str, str],
                 params: dict[str, Any]) -> str:
    c = client(uri)
    run = retry(c.create_run, experiment_id, run_name=run_name, tags={"vadclip.role": PARENT, **tags})
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
                 filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=5000)


def close_unfinished_children(uri: str, experiment_id: str, parent_id: str) -> int:
    """Trials stopped by the scheduler never end their own run: mark them KILLED."""
    n, c = 0, client(uri)
    for run in children(uri, experiment_id, parent_id):
        if run.info.status == "RUNNING":
            retry(c.set_tag, run.info.run_id, "stopped_early", "true")
            retry(c.set_terminated, run.info.run_id, "KILLED")
            n += 1
    return n


class TrialRun:
    """The child run of one Tune trial; a retried or resumed trial continues the same run."""

    def __init__(self, uri: str, experiment_id: str, parent_id: str, trial_id: str, run_name: str,
                 tags: dict[str, str]):
        self.uri, self.c = uri, client(uri)
        existing = retry(self.c.search_runs, [experiment_id],
                         filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.trial_id = '{trial_id}'")
        self.tags: dict[str, str] = {}  # the run's tags when it already existed (a retried or resumed trial)
        self.final_logged = False
        if existing:
            self.run_id = existing[0].info.run_id
            self.tags = dict(existing[0].data.tags)
            # a trial that ended just before its driver died is run again from its last checkpoint on --resume
            self.final_logged = any(k.startswith("final/") for k in existing[0].data.metrics)
            reopen(uri, self.run_id)
            self.resumed = True
        else:
            run = retry(self.c.create_run, experiment_id, run_name=run_name,
                        tags={"mlflow.parentRunId": parent_id, "vadclip.role": TRIAL, "trial_id": trial_id,
                              **tags})
            self.run_id, self.resumed = run.info.run_id, False
        self.logged_epochs = set(self._logged_steps("epoch"))

    def _logged_steps(self, key: str) -> list[int]:
        return [m.step for m in retry(self.c.get_metric_history, self.run_id, key)]

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.resumed:  # params are immutable in MLflow; a resumed run has them already
            log_params(self.c, self.run_id, params)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Per-epoch metrics at step=epoch; an epoch already logged (before a crash) is not logged twice."""
        if epoch in self.logged_epochs:
            return
        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), now, epoch) for k, v in metrics.items() if v == v]
        items.append(Metric("epoch", float(epoch), now, epoch))
        for i in range(0, len(items), 1000):
            retry(self.c.log_batch, self.run_id, metrics=items[i:i + 1000])
        self.logged_epochs.add(epoch)

    def backfill(self, history: list[dict[str, float]]) -> None:
        """After a restore: log epochs that the checkpoint has but the run lost (no gaps)."""
        for record in history:
            self.log_epoch(int(record["epoch"]), {k: v for k, v in record.items() if k != "epoch"})

    def log_final(self, metrics: dict[str, float], step: int) -> None:
        """The trial's final metrics, once: a trial run again after it ended does not log them twice."""
        if self.final_logged:
            return
        now = int(time.time() * 1000)
        items = [Metric(f"final/{metric_key(k)}", float(v), now, step) for k, v in metrics.items() if v == v]
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
