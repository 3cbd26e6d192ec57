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

from study.plots import score_curves
from study.reuse import FINGERPRINT_TAG, copy_results, find_reusable, trial_fingerprint
from study.spec import apply_trial, sampled
from study.tracking import TrialRun, child_run_name
from vadclip.bootstrap import (
    BOOTSTRAP_FILE,
    TEST_SCORES_FILE,
    TestScores,
    save_bootstrap,
    save_test_scores,
    video_bootstrap,
)
from vadclip.config import VadClipConfig, apply_overrides, flatten
from vadclip.data import VadDataset
from vadclip.evaluate import branch_scores
from vadclip.metrics import mlflow_key
from vadclip.train import CHECKPOINT_LAST, EpochRecord, FitResult, fit, load_checkpoint


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


FIT_SECONDS = "time/fit_seconds"  # logged as final/time/fit_seconds: the trial's training and evaluation time


class InjectedFailure(RuntimeError):
    """Raised on purpose by tests of retries and failure accounting."""


def trial_config(params: dict[str, Any], ctx: TrialContext) -> tuple[VadClipConfig, str]:
    """The row's (or the search base's) config with the trial's seed and sampled values."""
    variant = params.get("variant", "search")
    return apply_trial(ctx.rows.get(variant, ctx.base), {**sampled(params), "seed": params["seed"]}), variant


def trial_device(requested: str, gpu_ids: Sequence[str | int], cuda_available: bool) -> str:
    """The device of a trial: `auto` means the GPU Ray assigned to it, or the CPU when it was assigned none.

    Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs (so `cuda` is the assigned one), but leaves it untouched
    for a task with no GPU: a `gpu: 0` trial would then see every GPU of the node and `auto` would take one.
    An explicit device (cpu, cuda[:N]) is used as given.
    """
    if requested != "auto":
        return requested
    return "cuda" if gpu_ids and cuda_available else "cpu"


def train_trial(params: dict[str, Any], data: VadDataset, ctx: TrialContext) -> None:
    torch.set_num_threads(max(1, int(ctx.cpus_per_trial)))
    cfg, variant = trial_config(params, ctx)
    if ctx.fail_at_epoch.get(variant) == 0:
        raise InjectedFailure(f"injected failure in {variant!r} before its MLflow run exists")
    trial_id = tune.get_context().get_trial_id()
    gpu_ids = [str(i) for i in ray.get_gpu_ids()]
    device = trial_device(cfg.device, gpu_ids, torch.cuda.is_available())
    run = TrialRun(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, trial_id,
                   run_name=child_run_name(variant, cfg.seed, trial_id, sampled(params)),
                   tags={**ctx.tags, "study": ctx.study, "variant": variant, "seed": str(cfg.seed),
                         "score_branch": cfg.score_branch, "selection": cfg.eval.selection,
                         "selection_metric": cfg.selection_metric,
                         "map_protocol": cfg.eval.map_protocol})
    run.log_params(flatten(cfg))
    node = ray.get_runtime_context().get_node_id()
    history = run.tags.get("ray.nodes")  # every attempt of the trial appends the node it runs on
    placement = {"ray.node_id": node, "ray.nodes": f"{history},{node}" if history else node,
                 "ray.gpu_ids": ",".join(gpu_ids), "device": device}
    cfg = apply_overrides(cfg, {"device": device})
    fingerprint = trial_fingerprint(cfg, ctx.data_fingerprint, ctx.code_digest)
    placement[FINGERPRINT_TAG] = fingerprint
    if ctx.reuse and not run.final_logged and (source := find_reusable(ctx.tracking_uri, fingerprint, run.run_id)):
        run.set_tags(placement)
        try:
            reuse_results(run, source, cfg)
        except BaseException:
            if run.c.get_run(run.run_id).info.status == "RUNNING":
                run.end("FAILED")
            raise
        return
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        resume = Path(checkpoint.to_directory(tempfile.mkdtemp(prefix="vadclip-restore-")))
        restored = load_checkpoint(resume / CHECKPOINT_LAST)
        placement["restored_from_epoch"] = str(restored["epoch"])
        run.backfill(restored["history"], restored.get("evaluations", []))
    else:
        run.delete_tag("restored_from_epoch")  # an earlier attempt's; this one starts from scratch
    run.set_tags(placement)
    out_dir = Path(tempfile.mkdtemp(prefix="vadclip-trial-"))
    reporting = False  # Tune stops a trial by raising inside tune.report (the scheduler, or a Ctrl-C on the driver)

    def on_epoch(record: EpochRecord) -> None:
        if ctx.fail_at_epoch.get(variant) == record.epoch:
            raise InjectedFailure(f"injected failure in {variant!r} at epoch {record.epoch}")
        run.log_epoch(record.epoch, record.metrics, record.evaluations)
        metrics = {mlflow_key(k): v for k, v in record.metrics.items()}
        nonlocal reporting
        reporting = True
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(record.out_dir)))
        reporting = False

    try:
        result = fit(cfg, data, out_dir=out_dir, callbacks=[on_epoch], resume=resume, progress=False)
        # test metrics of the selected checkpoint, and its validation metrics (what a search ranks by)
        run.log_final({**result.metrics["test"], "best_epoch": result.metrics["best_epoch"],
                       **{f"val/{k}": v for k, v in result.metrics["val"].items()},
                       FIT_SECONDS: result.seconds},
                      step=int(result.history[-1]["step"]) if result.history else 0)
        log_results(run, result, data, cfg, out_dir)
        run.end("FINISHED")
    except BaseException:
        if reporting:  # stopped, not failed; the driver tags why (stopped_early or interrupted), it alone knows
            run.end("KILLED")
        else:
            run.end("FAILED")  # a retry sets it RUNNING again and continues the same run
        raise


def log_results(run: TrialRun, result: FitResult, data: VadDataset, cfg: VadClipConfig, out_dir: Path) -> None:
    """The artifacts of a finished trial: config, metrics, history, the selected checkpoint's snippet-level test
    scores with their frame ground truth (a report recomputes test-set uncertainty from them alone), their
    video bootstrap (seeded by the trial's seed) and the score curves."""
    chosen = result.metrics["test_branch"]  # also right for score_branch 'best'
    run.set_tags({"test_branch": chosen})
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


def reuse_results(run: TrialRun, source: str, cfg: VadClipConfig) -> None:
    """A trial identical to the FINISHED run `source` (same config, data and code): its results are copied
    (histories, final metrics, artifacts; tag `reused_from`) and reported to Tune once, instead of training."""
    copy_results(run.uri, source, run.run_id)
    metrics = run.c.get_run(run.run_id).data.metrics
    split = "val/" if cfg.eval.selection == "val" else ""
    report = {mlflow_key(f"{cfg.eval.selection}/{k[len('final/' + split):]}"): v for k, v in metrics.items()
              if k.startswith(f"final/{split}") and "/" not in k[len(f"final/{split}"):]}
    run.end("FINISHED")
    tune.report({**report, "reused": 1})
