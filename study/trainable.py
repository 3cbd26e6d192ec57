"""The Tune trainable: a plain function, config dict -> VadClipConfig -> vadclip.train.fit."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from study import record
from study.plots import score_curves
from study.reuse import copy_results, find_reusable, trial_fingerprint
from study.spec import apply_trial, sampled
from study.tracking import TRIAL_ERROR, TrialRun, child_run_name, error_line
from vadclip import portable
from vadclip.bootstrap import (
    BOOTSTRAP_FILE,
    TEST_SCORES_FILE,
    TestScores,
    save_bootstrap,
    save_test_scores,
    video_bootstrap,
)
from vadclip.config import ConfigError, VadClipConfig, apply_overrides, flatten
from vadclip.data import VadDataset
from vadclip.errors import VadClipError
from vadclip.evaluate import branch_scores
from vadclip.metrics import mlflow_key
from vadclip.train import CHECKPOINT_LAST, EpochRecord, FitResult, fit, fit_fused, load_checkpoint, seed_folder


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs besides its own params; small and picklable (the data travels separately)."""

    study: str
    base: VadClipConfig  # the study's base config (a search's trials start from it)
    rows: dict[str, VadClipConfig]  # ablation row name -> its config, built and validated by the spec
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    tags: dict[str, str]
    cpus_per_trial: float = 1
    data_fingerprint: str = ""  # study.reuse: with the code digest and a trial's config, a trial's identity
    code_digest: str = ""
    reuse: bool = True  # copy a FINISHED identical run's results instead of training again
    fail_at_epoch: dict[str, int] = field(default_factory=dict)  # tests: variant -> epoch that raises (0: at once)
    objective: str = ""  # the Tune metric the searcher and scheduler rank by


FIT_SECONDS = "time/fit_seconds"  # logged as final/time/fit_seconds: the trial's training and evaluation time


class InjectedFailure(RuntimeError):
    """Raised on purpose by tests of retries and failure accounting."""


class InjectedConfigError(ConfigError):
    """Raised on purpose by tests of deterministic failures (variant names starting with `bad-config`)."""


def _inject(variant: str, epoch: int, ctx: TrialContext, where: str) -> None:
    if ctx.fail_at_epoch.get(variant) == epoch:
        kind = InjectedConfigError if variant.startswith("bad-config") else InjectedFailure
        raise kind(f"injected failure in {variant!r} {where}")


def trial_config(params: dict[str, Any], ctx: TrialContext) -> tuple[VadClipConfig, str]:
    """The row's (or the search base's) config with the trial's seed and sampled values."""
    variant = params.get(record.TRIAL_VARIANT, record.SEARCH)
    seed = params[record.TRIAL_SEED]
    return apply_trial(ctx.rows.get(variant, ctx.base), {**sampled(params), "seed": seed}), variant


def trial_device(requested: str, gpu_ids: Sequence[str | int], cuda_available: bool) -> str:
    """The device of a trial: `auto` means the GPU Ray assigned to it, or the CPU when it was assigned none.

    Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs (so `cuda` is the assigned one), but leaves it untouched
    for a task with no GPU: a `gpu: 0` trial would then see every GPU of the node and `auto` would take one.
    An explicit device (cpu, cuda[:N]) is used as given.
    """
    if requested != "auto":
        return requested
    return "cuda" if gpu_ids and cuda_available else "cpu"


@dataclass
class _SeedRun:
    """One seed of a trial: its config and its MLflow child run."""

    cfg: VadClipConfig
    run: TrialRun
    placement: dict[str, str]


def train_trial(params: dict[str, Any], data: VadDataset, ctx: TrialContext) -> None:
    """One Tune trial: one seed (`seed`), or the seeds of one row trained together (`seeds`, `vadclip.fused`);
    each seed gets its own child run. A VadClipError (the trial's config or data is invalid) would fail every
    retry the same way: reported as TRIAL_ERROR (the driver records the trial FAILED), not raised."""
    try:
        _train_trial(params, data, ctx)
    except VadClipError as err:
        tune.report({**({ctx.objective: float("nan")} if ctx.objective else {}), TRIAL_ERROR: error_line(err)})


def _train_trial(params: dict[str, Any], data: VadDataset, ctx: TrialContext) -> None:
    torch.set_num_threads(max(1, int(ctx.cpus_per_trial)))
    fused = record.TRIAL_SEEDS in params
    seeds = [int(s) for s in params[record.TRIAL_SEEDS]] if fused else [params[record.TRIAL_SEED]]
    configs = [trial_config({**params, record.TRIAL_SEED: seed}, ctx) for seed in seeds]
    variant = configs[0][1]
    _inject(variant, 0, ctx, "before its MLflow run exists")
    trial_id = tune.get_context().get_trial_id()
    gpu_ids = [str(i) for i in ray.get_gpu_ids()]
    device = trial_device(configs[0][0].device, gpu_ids, torch.cuda.is_available())
    if portable.wanted(configs[0][0].portable_kernels, device):  # before the trial's first CPU kernel call
        portable.configure(max(1, int(ctx.cpus_per_trial)))
    node = ray.get_runtime_context().get_node_id()
    group = ",".join(map(str, seeds))
    members = []
    for cfg, _ in configs:
        tags = {**ctx.tags, record.STUDY: ctx.study, record.VARIANT: variant, record.SEED: str(cfg.seed),
                record.SCORE_BRANCH: cfg.score_branch, record.SELECTION: cfg.eval.selection,
                record.SELECTION_METRIC: cfg.selection_metric, record.MAP_PROTOCOL: cfg.eval.map_protocol}
        if fused:
            tags[record.FUSED_GROUP] = group
        run = TrialRun(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, trial_id,
                       run_name=child_run_name(variant, cfg.seed, trial_id, sampled(params)), tags=tags, fused=fused)
        run.log_params(flatten(cfg))
        history = record.get(run.tags, record.RAY_NODES)  # every attempt of the trial appends the node it runs on
        cfg = apply_overrides(cfg, {"device": device})
        placement = {record.RAY_NODE_ID: node, record.RAY_NODES: f"{history},{node}" if history else node,
                     record.RAY_GPU_IDS: ",".join(gpu_ids), record.DEVICE: device,
                     record.FINGERPRINT: trial_fingerprint(cfg, ctx.data_fingerprint, ctx.code_digest,
                                                        seeds if fused else ())}
        members.append(_SeedRun(cfg, run, placement))
    reports, training = [], []
    for member in members:  # a seed identical to a FINISHED run is copied, not trained (once copied, it stays so)
        run = member.run
        source = (ctx.reuse and not run.final_logged
                  and find_reusable(ctx.tracking_uri, member.placement[record.FINGERPRINT], run.run_id))
        if source or record.REUSED_FROM in run.tags:
            run.set_tags(member.placement)
            if source:
                try:
                    reports.append(reuse_results(run, source, member.cfg))
                except BaseException:
                    run.end_if_running("FAILED")
                    raise
            else:
                run.end("FINISHED")
        else:
            training.append(member)
    if not training:
        tune.report({**_mean(reports), "reused": 1})
        return
    _train(training, fused, variant, data, ctx)


def _mean(reports: list[dict[str, float]]) -> dict[str, float]:
    """What a trial of several seeds reports to Tune: each metric's mean over its seeds."""
    keys = {k for r in reports for k in r}
    return {k: float(sum(r[k] for r in reports if k in r) / sum(k in r for r in reports)) for k in keys}


def _train(members: list[_SeedRun], fused: bool, variant: str, data: VadDataset, ctx: TrialContext) -> None:
    """Train the seeds (from the trial's checkpoint on a retry or resume), log each seed's run, report to Tune."""
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        resume = Path(checkpoint.to_directory(tempfile.mkdtemp(prefix="vadclip-restore-")))
    for member in members:
        run, placement = member.run, member.placement
        if resume is not None:
            restored = load_checkpoint((seed_folder(resume, member.cfg.seed) if fused else resume) / CHECKPOINT_LAST)
            placement[record.RESTORED_FROM_EPOCH] = str(restored["epoch"])
            run.backfill(restored["history"], restored.get("evaluations", []))
        else:
            run.delete_tag(record.RESTORED_FROM_EPOCH)  # an earlier attempt's; this one starts from scratch
        placement.update(portable.state().tags())  # the kernels that compute this seed's numbers
        run.set_tags(placement)
    runs = [m.run for m in members]
    out_dir = Path(tempfile.mkdtemp(prefix="vadclip-trial-"))
    reporting = False  # Tune stops a trial by raising inside tune.report (the scheduler, or a Ctrl-C on the driver)

    def on_epoch(records: list[EpochRecord]) -> None:
        _inject(variant, records[0].epoch, ctx, f"at epoch {records[0].epoch}")
        for run, epoch in zip(runs, records):
            run.log_epoch(epoch.epoch, epoch.metrics, epoch.evaluations)
        metrics = _mean([{mlflow_key(k): v for k, v in r.metrics.items()} for r in records])
        nonlocal reporting
        reporting = True
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(out_dir)))
        reporting = False

    cfgs = [m.cfg for m in members]
    try:
        if fused:
            results = fit_fused(cfgs, data, out_dir=out_dir, callbacks=[on_epoch], resume=resume, progress=False)
        else:
            results = [fit(cfgs[0], data, out_dir=out_dir, callbacks=[lambda r: on_epoch([r])], resume=resume,
                           progress=False)]
        for run, result, cfg in zip(runs, results, cfgs):
            # test metrics of the selected checkpoint, and its validation metrics (what a search ranks by)
            run.log_final({**result.metrics["test"], "best_epoch": result.metrics["best_epoch"],
                           **{f"{record.VAL}{k}": v for k, v in result.metrics["val"].items()},
                           FIT_SECONDS: result.seconds},
                          step=int(result.history[-1]["step"]) if result.history else 0)
            log_results(run, result, data, cfg, result.out_dir)
            run.end("FINISHED")
    except BaseException:
        for run in runs:  # a seed of the group may have ended FINISHED before another one failed
            # stopped, not failed; the driver tags why (stopped_early or interrupted), it alone knows
            run.end_if_running("KILLED" if reporting else "FAILED")  # a retry continues the same run
        raise


def log_results(run: TrialRun, result: FitResult, data: VadDataset, cfg: VadClipConfig, out_dir: Path) -> None:
    """The artifacts of a finished trial: config, metrics, history, the selected checkpoint's snippet-level test
    scores with their frame ground truth (a report recomputes test-set uncertainty from them alone), their
    video bootstrap (seeded by the trial's seed) and the score curves."""
    chosen = result.metrics["test_branch"]  # also right for score_branch 'best'
    run.set_tags({record.TEST_BRANCH: chosen})
    if result.test_predictions is None:  # fit always evaluates data.test
        raise RuntimeError("fit returned no test predictions")
    (out_dir / "history.json").write_text(json.dumps(result.history, indent=1))
    for name in ("config.json", "metrics.json", "history.json"):
        run.log_artifact(out_dir / name)
    scores = branch_scores(result.test_predictions).get(chosen)
    if data.test.frame_gt is None or scores is None:
        return
    test = TestScores(scores, data.test.frame_gt, data.test.is_abnormal)
    run.log_artifact(save_test_scores(out_dir / TEST_SCORES_FILE, test))
    run.log_artifact(save_bootstrap(out_dir / BOOTSTRAP_FILE, video_bootstrap(test, seed=cfg.seed), cfg.seed))
    run.log_artifact(score_curves(scores, data.test.frame_gt, data.test.names, out_dir / "scores.png",
                                  cfg.eval.max_plot_videos))


def reuse_results(run: TrialRun, source: str, cfg: VadClipConfig) -> dict[str, float]:
    """A seed identical to the FINISHED run `source` (same config, data and code): its results are copied
    (histories, final metrics, artifacts; tag `reused_from`) instead of training; returns what to report to Tune."""
    copy_results(run.uri, source, run.run_id)
    metrics = run.c.get_run(run.run_id).data.metrics
    report = record.objective_metrics(metrics, cfg.eval.selection)
    run.end("FINISHED")
    return report
