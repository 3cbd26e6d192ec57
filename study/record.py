"""The MLflow record of a study: every tag name, metric-key prefix and the objective-key rule, in one place.

Writers (study.tracking, study.trainable, study.run, study.reuse) and readers (study.report, study.stages,
study.progress) name a tag or key only through this module; tests/study/test_record.py writes one trial through
the tracking layer and reads it back through the report, the protocols and the confirm selection, so a tag
written but never read (or read but never written) fails there.

A study invocation is one parent run (ROLE=PARENT) and one child run per trial seed (ROLE=TRIAL, PARENT_RUN =
the parent's id). A report reads runs as DataFrame rows named as `mlflow.search_runs` names them: `column(tag)`
is `tags.<tag>`, `metric_column(key)` is `metrics.<key>`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from vadclip.config import EvalConfig
from vadclip.metrics import mlflow_key
from vadclip.portable import KERNEL_TAGS as KERNEL_TAGS  # the kernels that computed a trial's numbers

# ---------------------------------------------------------------- run roles
ROLE = "vadclip.role"
PARENT, TRIAL = "parent", "trial"
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: the UI nests a child under its parent by it

# ---------------------------------------------------------------- a parent's tags (study.run)
STUDY = "study"  # also on every trial
STUDY_KIND = "study.kind"
DATASET = "dataset"
CODE_VERSION = "code_version"
SOURCE_DIGEST = "source_digest"  # study.reuse.source_digest() of the code that ran it
DATA_FINGERPRINT = "data_fingerprint"  # a parent's: study.reuse.data_fingerprint of its data (read by study.compare)
PACKAGES = "packages"  # a parent's: the versions of the packages its numbers depend on (study.reuse.package_versions)
SEEDS_AUTO = "seeds.auto"  # what `--seeds auto` decided, as a sentence
OPTUNA_STORAGE, OPTUNA_STUDY = "optuna.storage", "optuna.study"  # where a search's Optuna study lives

# a parent's params besides the base config's: how many trials and seeds the invocation planned (its flags counted)
PLANNED_TRIALS, PLANNED_SEEDS = "study.trials", "study.seeds"

# ---------------------------------------------------------------- a trial's tags (study.trainable)
VARIANT = "variant"  # the ablation row (SEARCH for a search trial)
SEED = "seed"
STAGE = "stage"  # the stage whose Tune experiment ran it: SEARCH, CONFIRM or "ablation"
TRIAL_ID = "trial_id"  # Tune's trial id; the seeds of a fused trial share it
SELECTION = "selection"  # eval.selection (also the parent's: the study's base value)
DEFAULT_SELECTION = EvalConfig.selection  # what a run without the tag (an older version's) selected on
SELECTION_METRIC = "selection_metric"  # the resolved eval.selection_metric
MAP_PROTOCOL = "map_protocol"  # eval.map_protocol (also the parent's)
SCORE_BRANCH = "score_branch"  # the resolved eval.score_branch
TEST_BRANCH = "test_branch"  # the branch whose scores the test metrics are of (resolves `best`)
FUSED_GROUP = "fused_group"  # a fused seed's run: the seeds trained with it in one trial, e.g. "234,235,236"
FINGERPRINT = "vadclip.fingerprint"  # study.reuse.trial_fingerprint: a trial's identity for reuse
REUSED_FROM = "reused_from"  # the run whose results this one copied
RESTORED_FROM_EPOCH = "restored_from_epoch"  # a retried or resumed trial's checkpoint epoch
DEVICE = "device"
RAY_NODE_ID, RAY_NODES, RAY_GPU_IDS = "ray.node_id", "ray.nodes", "ray.gpu_ids"  # ray.nodes: every attempt's node
# the driver's verdicts on a trial run (study.tracking), for the invocation that sets them
STOPPED_EARLY, INTERRUPTED, ERROR = "stopped_early", "interrupted", "error"
TUNE_CONFIG = "tune_config"  # a run the driver created for a trial that failed before its worker did: its config

SEARCH, CONFIRM = "search", "confirm"  # the variant of a search trial; the stages of a search

TAGS = frozenset({ROLE, STUDY, STUDY_KIND, DATASET, CODE_VERSION, SOURCE_DIGEST, DATA_FINGERPRINT, PACKAGES,
                  SEEDS_AUTO, OPTUNA_STORAGE,
                  OPTUNA_STUDY, VARIANT, SEED, STAGE, TRIAL_ID, SELECTION, SELECTION_METRIC, MAP_PROTOCOL,
                  SCORE_BRANCH, TEST_BRANCH, FUSED_GROUP, FINGERPRINT, REUSED_FROM, RESTORED_FROM_EPOCH, DEVICE,
                  RAY_NODE_ID, RAY_NODES, RAY_GPU_IDS, STOPPED_EARLY, INTERRUPTED, ERROR, TUNE_CONFIG, *KERNEL_TAGS})
# read back only inside a trial (study.trainable, study.reuse in a Ray worker): a retried trial's node history, the
# identity of a run to reuse
READ_IN_TRIALS = frozenset({RAY_NODES, FINGERPRINT})
# written for the person reading the run in MLflow (where it ran, on what, from which attempt); no code reads them
FOR_PEOPLE = frozenset({STUDY, STUDY_KIND, RAY_NODE_ID, RAY_GPU_IDS, RESTORED_FROM_EPOCH, TUNE_CONFIG,
                        TEST_BRANCH, ERROR})

# ---------------------------------------------------------------- a trial's Tune config (study.run's param space)
TRIAL_VARIANT, TRIAL_SEED, TRIAL_SEEDS = "variant", "seed", "seeds"  # TRIAL_SEEDS: a fused trial's seeds

# ---------------------------------------------------------------- metric keys
VAL, TEST = "val/", "test/"  # an evaluation's metrics (vadclip.train), logged at its global step
FINAL = "final/"  # the selected checkpoint re-evaluated: test metrics, `final/val/*` its validation metrics
EPOCH = "epoch"


def final_key(metric: str) -> str:
    """`auc` -> `final/auc`: the selected checkpoint's test metric."""
    return f"{FINAL}{mlflow_key(metric)}"


def objective_key(selection: str, metric: str) -> str:
    """The evaluation key a trial selects its checkpoint by and a search optimises: `val/<m>` under
    eval.selection=val, `test/<m>` under the authors' selection=test (vadclip.config.VadClipConfig.objective_key)."""
    return f"{selection}/{metric}"


def _final_split(selection: str) -> str:
    """Where a trial's end logs the metrics of the split it selects on: `final/val/` (val) or `final/` (test)."""
    return f"{FINAL}{VAL}" if selection == "val" else FINAL


def final_objective_key(selection: str, metric: str) -> str:
    """The objective of the selected checkpoint as logged at a trial's end: `final/val/<m>` or `final/<m>`."""
    return f"{_final_split(selection)}{metric}"


def objective_metrics(metrics: Mapping[str, float], selection: str) -> dict[str, float]:
    """A finished run's final metrics of the split it was selected on, keyed as its trial reported them to Tune
    (`final/val/ap` -> `val/ap` under selection=val; `final/ap` -> `test/ap` under selection=test)."""
    prefix = _final_split(selection)
    return {mlflow_key(f"{selection}/{k[len(prefix):]}"): v for k, v in metrics.items()
            if k.startswith(prefix) and "/" not in k[len(prefix):]}


def final_metrics_logged(metrics: Mapping[str, float]) -> bool:
    return any(k.startswith(FINAL) for k in metrics)


_reads: set[str] | None = None  # while `traced_reads()` runs: the tags read back


@contextlib.contextmanager
def traced_reads() -> Iterator[set[str]]:
    """Collect the names of the tags read back through `column` and `TrialView` in a block (the round-trip test
    holds them against the tags written)."""
    global _reads
    outer, _reads = _reads, set()
    try:
        yield _reads
    finally:
        _reads = outer


def _read(tag: str) -> str:
    if _reads is not None:
        _reads.add(tag)
    return tag


def column(tag: str) -> str:
    """A tag's column in a frame of runs (mlflow.search_runs's naming); every reader of a tag from a frame asks
    here."""
    return f"tags.{_read(tag)}"


def tag_columns(tags: Mapping[str, str]) -> dict[str, str]:
    """A run's tags as a frame row's columns (writing the frame reads no tag)."""
    return {f"tags.{k}": v for k, v in tags.items()}


def get(tags: Mapping[str, str], tag: str, default: str | None = None) -> str | None:
    """A tag of a run's tag mapping (`run.data.tags`), for a driver reading a run back."""
    return tags.get(_read(tag), default)


def metric_column(key: str) -> str:
    return f"metrics.{key}"


def param_column(key: str) -> str:
    return f"params.{key}"


FINAL_COLUMN = metric_column(FINAL)  # prefix of the final metrics' columns
FINAL_VAL_COLUMN = metric_column(FINAL + VAL)  # the validation metrics of the selected checkpoint


def children_filter(parent_id: str) -> str:
    """MLflow's filter for the child runs of a parent."""
    return f"tags.{PARENT_RUN} = '{parent_id}'"


def trial_filter(parent_id: str, trial_id: str, seed: str | None = None) -> str:
    """The run of a trial (of one seed of a fused trial)."""
    which = f"{children_filter(parent_id)} and tags.{_read(TRIAL_ID)} = '{trial_id}'"
    return which + (f" and tags.{_read(SEED)} = '{seed}'" if seed is not None else "")


def fingerprint_filter(fingerprint: str) -> str:
    """The FINISHED runs of one trial identity (study.reuse)."""
    return f"tags.`{_read(FINGERPRINT)}` = '{fingerprint}' and attributes.status = 'FINISHED'"


def parents_filter() -> str:
    return f"tags.`{_read(ROLE)}` = '{PARENT}'"


@dataclass(frozen=True)
class TrialView:
    """One trial run as the driver reads it back (study.stages): status, its identity tags, final metrics, params."""

    run_id: str
    status: str
    variant: str | None
    seed: str | None
    stage: str
    trial_id: str
    metrics: Mapping[str, float] = field(repr=False)
    params: Mapping[str, str] = field(repr=False)
    tags: Mapping[str, str] = field(repr=False)

    @classmethod
    def of(cls, run: Any) -> TrialView:
        """From an `mlflow.entities.Run`."""
        tags = dict(run.data.tags)
        return cls(run.info.run_id, run.info.status, get(tags, VARIANT), get(tags, SEED), get(tags, STAGE, SEARCH)
                   or SEARCH, get(tags, TRIAL_ID, "") or "", dict(run.data.metrics), dict(run.data.params), tags)

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    @property
    def seed_number(self) -> int | None:
        """The seed as an int; None for a run without one or with another kind (a fused group)."""
        return int(self.seed) if self.seed is not None and self.seed.isdigit() else None
