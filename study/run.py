"""`python -m study.run NAME`: run a named study on Ray Tune, track it in MLflow, write its report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# CheckpointConfig(num_to_keep=1) makes Tune snapshot the experiment state after every trial
# checkpoint (so a resume never points at a deleted one): by design here, so its "snapshotting
# triggered multiple times" warning (100+ lines per study) is off. Slow snapshots still warn.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

from study import spec as specs  # noqa: E402
from study.tracking import (  # noqa: E402
    TrackingError,
    check_tracking_uri,
    client,
    close_unfinished_children,
    code_version,
    default_tracking_uri,
    ensure_experiment,
    log_artifacts,
    metric_key,
    reopen,
    set_status,
    start_parent,
)
from vadclip.config import ConfigError, flatten  # noqa: E402
from vadclip.data import DataError  # noqa: E402

STATE_DIR = ".study_state"  # per-project pointers to the latest invocation of each study (for --resume)


@dataclass
class RunOptions:
    dataset: str | None = None  # synthetic | ucf | xd (default: the study's preset)
    lists: str | None = None
    features: str | None = None
    clip_weights: str | None = None
    seeds: int | None = None
    num_samples: int | None = None
    max_epochs: int | None = None
    address: str = ""  # "" = start a local Ray; "auto" = join a running cluster
    storage: str | None = None  # Ray storage_path (absolute path or URI)
    tracking_uri: str | None = None
    resume: bool = False
    dry_run: bool = False
    project: Path = field(default_factory=Path.cwd)
    reports_dir: Path | None = None
    num_cpus: int | None = None  # local Ray only
    overrides: dict[str, Any] = field(default_factory=dict)
    fail_at_epoch: dict[str, int] = field(default_factory=dict)  # tests only
    verbose: int = 1


class StudyError(RuntimeError):
    """Bad input found before anything was started; printed as one line."""


def _extra_overrides(opts: RunOptions) -> dict[str, Any]:
    extra = dict(opts.overrides)
    for key, value in (("data.lists", opts.lists), ("data.features", opts.features),
                       ("clip.weights", opts.clip_weights), ("optim.epochs", opts.max_epochs)):
        if value is not None:
            extra[key] = value
    if opts.clip_weights and (opts.dataset or "synthetic") != "synthetic":
        extra.setdefault("clip.model", "ViT-B-16")
    return extra


def plan(spec: specs.StudySpec, opts: RunOptions) -> dict[str, Any]:
    """Validate everything a run needs and describe the trials; touches nothing."""
    dataset = opts.dataset or spec.preset
    if dataset not in specs.DATASETS:
        raise StudyError(f"--dataset {dataset!r} unknown; allowed: {', '.join(specs.DATASETS)}")
    extra = _extra_overrides(opts)
    base = specs.base_config(spec, dataset, extra)
    specs.trial_configs(spec, dataset, extra)  # every row must build a valid config for this dataset
    if dataset != "synthetic":
        for key in ("lists", "features"):
            folder = getattr(base.data, key)
            if folder is None:
                raise StudyError(f"--dataset {dataset} needs --{key} DIR")
            if not Path(folder).is_dir():
                raise StudyError(f"--{key} {folder}: folder does not exist")
    seeds = [base.seed + i for i in range(opts.seeds or spec.seeds)]
    if spec.kind == "search":
        seeds = seeds[:1]  # a searcher proposes configs; repeats over seeds belong to ablations
    trials = ([(v.name, s) for v in spec.variants for s in seeds] if spec.kind == "ablation"
              else [("search", seeds[0])] * (opts.num_samples or spec.num_samples))
    return {"dataset": dataset, "base": base, "seeds": seeds, "trials": trials,
            "metric": spec.resolve_metric(base.style)}


def print_plan(spec: specs.StudySpec, p: dict[str, Any]) -> None:
    print(f"study {spec.name} ({spec.kind}): {spec.description}")
    print(f"dataset {p['dataset']}, metric {p['metric']}, selection on {p['base'].eval.selection}, "
          f"resources per trial {spec.resources}, epochs {p['base'].optim.epochs}")
    if spec.kind == "ablation":
        for i, (variant, seed) in enumerate(p["trials"]):
            overrides = next(v.overrides for v in spec.variants if v.name == variant)
            print(f"  trial {i:3d}: {variant:40s} seed {seed}  {overrides}")
    else:
        print(f"  {len(p['trials'])} trials sampled by Optuna (TPE) with seed {p['seeds'][0]}, "
              f"scheduler {spec.scheduler}, from:")
        for key, domain in spec.space.items():
            print(f"    {key}: {domain}")
    print(f"{len(p['trials'])} trials")


def _tune_domain(domain: dict[str, list]):
    from ray import tune

    (kind, args), = domain.items()
    if kind == "choice":
        return tune.choice(args)
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "loguniform":
        return tune.loguniform(*args)
    if kind == "randint":
        return tune.randint(int(args[0]), int(args[1]))
    return tune.quniform(*args)


def _state_path(opts: RunOptions, study: str) -> Path:
    return opts.project / STATE_DIR / f"{study}.json"


def run_study(name: str, opts: RunOptions) -> dict[str, Any]:
    """Run (or resume) a study; returns a summary with the report paths. Raises StudyError/SpecError."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from study.report import build_report
    from study.trainable import TrialContext, train_trial
    from vadclip.data import load_dataset

    spec = specs.load(name)
    opts.project = opts.project.resolve()
    p = plan(spec, opts)
    if opts.dry_run:
        print_plan(spec, p)
        return {"dry_run": True, "trials": p["trials"]}
    state_file = _state_path(opts, spec.name)
    previous = json.loads(state_file.read_text()) if state_file.is_file() else None
    if opts.resume and previous is None:
        raise StudyError(f"--resume: no earlier run of {spec.name} recorded in {state_file}")
    # a resumed study goes on logging where it started unless told otherwise
    uri = opts.tracking_uri or (previous["tracking_uri"] if opts.resume else default_tracking_uri(opts.project))
    check_tracking_uri(uri)
    storage = opts.storage or str(opts.project / "ray_results")
    if "://" not in storage and not Path(storage).is_absolute():
        storage = str((opts.project / storage).resolve())
    base = p["base"]
    data = load_dataset(base)  # once per study: trials share it through Ray's object store

    experiment_id = ensure_experiment(uri, spec.name, opts.project / "mlartifacts")
    tags = {"study": spec.name, "study.kind": spec.kind, "dataset": p["dataset"],
            "selection": base.eval.selection, "map_protocol": base.eval.map_protocol,
            "code_version": code_version()}
    if opts.resume:
        run_name, parent_id = previous["run_name"], previous["parent_run_id"]
        storage = previous["storage"]
        reopen(uri, parent_id)
    else:
        run_name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent_id = start_parent(uri, experiment_id, run_name, tags,
                                 {"study.trials": len(p["trials"]), **flatten(base)})
        client(uri).log_text(parent_id, spec.text(), f"{spec.name}.yaml")
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"run_name": run_name, "parent_run_id": parent_id, "storage": storage,
                                          "experiment_id": experiment_id, "tracking_uri": uri}))

    ctx = TrialContext(study=spec.name, base=flatten(base), variants={v.name: v.overrides for v in spec.variants},
                       tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent_id, tags=tags,
                       cpus_per_trial=spec.resources["cpu"], fail_at_epoch=dict(opts.fail_at_epoch))
    if not ray.is_initialized():
        if opts.address:
            ray.init(address=opts.address)
        else:
            ray.init(num_cpus=opts.num_cpus or os.cpu_count(), include_dashboard=False)
    trainable = tune.with_resources(tune.with_parameters(train_trial, data=data, ctx=ctx), spec.resources)
    metric = f"val/{p['metric']}" if base.eval.selection == "val" else f"test/{p['metric']}"
    metric = metric_key(metric)
    run_config = tune.RunConfig(
        name=run_name, storage_path=storage, verbose=opts.verbose,
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
    )
    path = f"{storage.rstrip('/')}/{run_name}"
    if opts.resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        if spec.kind == "ablation":
            param_space = {"variant": tune.grid_search([v.name for v in spec.variants]),
                           "seed": tune.grid_search(p["seeds"])}
            tune_config = tune.TuneConfig(num_samples=1, max_concurrent_trials=spec.max_concurrent or None,
                                          trial_dirname_creator=lambda t: t.trial_id,
                                          trial_name_creator=lambda t: t.trial_id)
        else:
            param_space = {"seed": p["seeds"][0], **{k: _tune_domain(d) for k, d in spec.space.items()}}
            searcher = OptunaSearch(metric=metric, mode="max", seed=p["seeds"][0])
            if spec.max_concurrent:
                searcher = ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent)
            # max_t past the last epoch: ASHA stops only losers, a trial that trains to the end finishes itself
            scheduler = (ASHAScheduler(time_attr="training_iteration", metric=metric, mode="max",
                                       max_t=base.optim.epochs + 1, grace_period=spec.scheduler.get("grace_period", 1),
                                       reduction_factor=spec.scheduler.get("reduction_factor", 2))
                         if spec.scheduler["type"] == "asha" else FIFOScheduler())
            tune_config = tune.TuneConfig(num_samples=len(p["trials"]), search_alg=searcher, scheduler=scheduler,
                                          trial_dirname_creator=lambda t: t.trial_id,
                                          trial_name_creator=lambda t: t.trial_id)
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    results = tuner.fit()
    errors = sum(1 for r in results if r.error is not None)
    stopped = close_unfinished_children(uri, experiment_id, parent_id)
    reports = Path(opts.reports_dir or opts.project / "reports")
    try:
        files = build_report(spec, uri, reports, parent_run_id=parent_id)
        log_artifacts(uri, parent_id, [files.md, files.tex, files.csv, *files.plots], "report")
    finally:  # the trials' results are in MLflow whatever happens to the report
        set_status(uri, parent_id, "FINISHED")
    return {"parent_run_id": parent_id, "experiment_id": experiment_id, "tracking_uri": uri, "failed": errors,
            "stopped_early": stopped, "report": files, "storage": path}


def list_studies(out=sys.stdout) -> None:
    print("studies (python -m study.run NAME):", file=out)
    for name, path in specs.available().items():
        try:
            description = specs.load(path).description
        except specs.SpecError as err:
            description = f"(invalid: {err})"
        print(f"  {name:24s} {description}", file=out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m study.run", description=__doc__.splitlines()[0])
    p.add_argument("name", nargs="?", help="study name (a YAML in search_spaces/)")
    p.add_argument("--dataset", help="synthetic | ucf | xd (default: the study's preset)")
    p.add_argument("--lists", help="the authors' list/ folder")
    p.add_argument("--features", help="the feature folder")
    p.add_argument("--clip-weights", help="local CLIP checkpoint")
    p.add_argument("--seeds", type=int, help="seeds per ablation row")
    p.add_argument("--num-samples", type=int, help="trials of a search")
    p.add_argument("--max-epochs", type=int, help="epochs per trial")
    p.add_argument("--address", default="", help="'' = start a local Ray (default); auto = join a cluster")
    p.add_argument("--storage", help="Ray storage path or URI (default: ./ray_results)")
    p.add_argument("--tracking-uri", help="MLflow URI (default: sqlite:///./mlruns.db)")
    p.add_argument("--resume", action="store_true", help="continue the latest interrupted run of this study")
    p.add_argument("--dry-run", action="store_true", help="print the trials and exit")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every trial")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.name:
        list_studies()
        return 0
    if args.name not in specs.available() and not (args.name.endswith(".yaml") and Path(args.name).is_file()):
        print(f"error: unknown study {args.name!r}", file=sys.stderr)
        list_studies(sys.stderr)
        return 2
    from study.report import ReportError
    from vadclip.train import parse_set

    try:
        opts = RunOptions(dataset=args.dataset, lists=args.lists, features=args.features,
                          clip_weights=args.clip_weights, seeds=args.seeds, num_samples=args.num_samples,
                          max_epochs=args.max_epochs, address=args.address, storage=args.storage,
                          tracking_uri=args.tracking_uri, resume=args.resume, dry_run=args.dry_run,
                          num_cpus=args.num_cpus, overrides=parse_set(args.set))
        t0 = time.perf_counter()
        summary = run_study(args.name, opts)
    except (specs.SpecError, StudyError, TrackingError, ConfigError, DataError, FileNotFoundError,
            ReportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary.get("dry_run"):
        return 0
    files = summary["report"]
    print(files.md.read_text())
    print(f"report: {files.md} {files.tex} {files.csv}")
    print(f"mlflow: {summary['tracking_uri']} (parent run {summary['parent_run_id']}); "
          f"failed trials {summary['failed']}; wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
