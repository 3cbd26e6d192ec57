"""`python -m study.run NAME`: run a named study on Ray Tune, track it in MLflow, write its report."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study import spec as specs
from study.tracking import (
    check_tracking_uri,
    client,
    close_unfinished_children,
    code_version,
    default_tracking_uri,
    ensure_experiment,
    log_artifacts,
    reopen,
    set_status,
    start_parent,
    ui_url,
)
from vadclip.cli import Override, add_config_flags, flag_overrides, infer_dataset, positive_int
from vadclip.config import VadClipConfig, flatten
from vadclip.errors import VadClipError
from vadclip.metrics import mlflow_key

STATE_DIR = ".study_state"  # per-project pointers to the latest resumable invocation of each study
EXIT_FAILED_TRIALS, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


@dataclass
class RunOptions:
    dataset: str | None = None  # synthetic | ucf | xd (default: inferred from --lists, else the study's preset)
    flags: list[Override] = field(default_factory=list)  # --lists/--features/--clip-weights/--set as overrides
    seeds: int | None = None
    num_samples: int | None = None
    max_epochs: int | None = None  # for callers without flags; the CLI's --max-epochs arrives in `flags`
    address: str = ""  # "" = start a local Ray; "auto" = join a running cluster; or HOST:PORT
    storage: str | None = None  # Ray storage_path (absolute path or URI)
    tracking_uri: str | None = None
    resume: bool = False
    dry_run: bool = False
    project: Path = field(default_factory=Path.cwd)
    reports_dir: Path | None = None
    num_cpus: int | None = None  # local Ray only
    fail_at_epoch: dict[str, int] = field(default_factory=dict)  # tests only
    verbose: int = 0  # 0: one progress line; 1: Tune's status tables and the workers' output; 2: + trial results

    def all_flags(self) -> list[Override]:
        extra = [Override("optim.epochs", self.max_epochs, f"--max-epochs {self.max_epochs}")] \
            if self.max_epochs is not None else []
        return [*self.flags, *extra]


class StudyError(VadClipError, RuntimeError):
    """Bad input found before anything was started; printed as one line."""


class StudyInterrupted(VadClipError, KeyboardInterrupt):
    """Ctrl-C: trials stopped, the parent run left KILLED, no report; the message says how to resume."""


@dataclass(frozen=True)
class Plan:
    resolved: specs.Resolved
    seeds: list[int]
    trials: list[tuple[str, int]]  # (row or "search", seed)
    metric: str  # the study metric, resolved for the data style

    @property
    def base(self) -> VadClipConfig:
        return self.resolved.base

    @property
    def dataset(self) -> str:
        return self.resolved.dataset


def plan(spec: specs.StudySpec, opts: RunOptions) -> Plan:
    """Validate everything a run needs and describe the trials; touches nothing."""
    flags = opts.all_flags()
    lists = next((str(o.value) for o in flags if o.key == "data.lists"), None)
    resolved = specs.resolve(spec, infer_dataset(opts.dataset, lists), flags)
    base = resolved.base
    if resolved.dataset != "synthetic":
        for key, flag in (("lists", "--lists"), ("features", "--features")):
            folder = getattr(base.data, key)
            if folder is None:
                raise StudyError(f"--dataset {resolved.dataset} needs {flag} DIR")
            if not Path(folder).is_dir():
                raise StudyError(f"{flag} {folder}: folder does not exist")
    for name, value in (("--seeds", opts.seeds), ("--num-samples", opts.num_samples)):
        if value is not None and value < 1:
            raise StudyError(f"{name} must be >= 1, got {value}")
    seeds = [base.seed + i for i in range(opts.seeds or spec.seeds)]
    if spec.kind == "search":
        seeds = seeds[:1]  # a searcher proposes configs; repeats over seeds belong to ablations
    trials = ([(v.name, s) for v in spec.variants for s in seeds] if spec.kind == "ablation"
              else [("search", seeds[0])] * (opts.num_samples or spec.num_samples))
    return Plan(resolved, seeds, trials, spec.resolve_metric(base.style))


def print_plan(spec: specs.StudySpec, p: Plan) -> None:
    print(f"study {spec.name} ({spec.kind}): {spec.description}")
    print(f"dataset {p.dataset}, metric {p.metric}, selection on {p.base.eval.selection}, "
          f"resources per trial {spec.resources}, epochs {p.base.optim.epochs}")
    if spec.kind == "ablation":
        for i, (variant, seed) in enumerate(p.trials):
            overrides = next(v.overrides for v in spec.variants if v.name == variant)
            print(f"  trial {i:3d}: {variant:40s} seed {seed}  {overrides}")
    else:
        print(f"  {len(p.trials)} trials sampled by Optuna (TPE) with seed {p.seeds[0]}, "
              f"scheduler {spec.scheduler}, from:")
        for key, domain in spec.space.items():
            print(f"    {key}: {domain.describe()}")
    print(f"{len(p.trials)} trials")


def check_address(address: str, timeout: float = 10.0) -> None:
    """A HOST:PORT that nothing answers on fails here, in seconds (ray.init would retry for minutes)."""
    if address in ("", "auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise StudyError(f"--address {address!r}: expected HOST:PORT, 'auto' or ''")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except OSError as err:
        raise StudyError(f"--address {address}: no Ray cluster answers there ({err}); start one with "
                         f"`ray start --head` or `ray up cluster.yaml`, or leave --address out for a local Ray") \
            from err


def check_storage(storage: str) -> None:
    if "://" in storage:
        return  # cloud storage: Tune reports its own errors
    path = Path(storage)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StudyError(f"--storage {storage}: cannot create the folder ({err})") from err
    if not os.access(path, os.W_OK):
        raise StudyError(f"--storage {storage}: folder is not writable")


def _state_path(opts: RunOptions, study: str) -> Path:
    return opts.project / STATE_DIR / f"{study}.json"


def resume_command(spec: specs.StudySpec) -> str:
    return f"python -m study.run {spec.name if spec.path.parent == specs.SPEC_DIR else spec.path} --resume"


def _start_ray(opts: RunOptions) -> None:
    import ray

    if ray.is_initialized():
        return
    # quiet by default: the trials' output (banners, checkpoint lines) stays in their logs; -v shows it
    log_to_driver, level = opts.verbose >= 1, logging.INFO if opts.verbose else logging.ERROR
    if opts.address:
        ray.init(address=opts.address, log_to_driver=log_to_driver, logging_level=level)
    else:
        ray.init(num_cpus=opts.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=log_to_driver,
                 logging_level=level)


@dataclass(frozen=True)
class Invocation:
    """Where one invocation of a study logs and checkpoints (a resumed one: where it started)."""

    uri: str
    experiment_id: str
    parent_id: str
    run_name: str
    storage: str
    tags: dict[str, str]
    state_file: Path

    def state(self) -> dict[str, str]:
        return {"run_name": self.run_name, "parent_run_id": self.parent_id, "storage": self.storage,
                "experiment_id": self.experiment_id, "tracking_uri": self.uri}


def run_study(name: str, opts: RunOptions) -> dict[str, Any]:
    """Run (or resume) a study; returns a summary with the report paths.

    Raises VadClipError subclasses for bad input (nothing created) and StudyInterrupted on Ctrl-C."""
    spec = specs.load(name)
    opts.project = opts.project.resolve()
    p = plan(spec, opts)
    if opts.dry_run:
        print_plan(spec, p)
        return {"dry_run": True, "trials": p.trials}
    state_file = _state_path(opts, spec.name)
    previous: dict[str, str] = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if opts.resume and not previous:
        raise StudyError(f"--resume: no earlier run of {spec.name} recorded in {state_file}")
    # a resumed study goes on logging where it started unless told otherwise
    uri = opts.tracking_uri or (previous["tracking_uri"] if opts.resume else default_tracking_uri(opts.project))
    check_tracking_uri(uri)
    storage = previous["storage"] if opts.resume else (opts.storage or str(opts.project / "ray_results"))
    if "://" not in storage and not Path(storage).is_absolute():
        storage = str((opts.project / storage).resolve())
    check_storage(storage)
    check_address(opts.address)

    from vadclip.data import load_dataset
    from vadclip.model.clip import RANDOM_WEIGHTS_WARNING

    data = load_dataset(p.base)  # once per study: trials share it through Ray's object store
    if p.base.clip.weights is None:
        # once here; the trials' copies stay in their logs (shown with -v)
        print(RANDOM_WEIGHTS_WARNING.format(model=p.base.clip.model), file=sys.stderr)
    _start_ray(opts)
    if not opts.verbose:
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"

    experiment_id = ensure_experiment(uri, spec.name, opts.project / "mlartifacts", description=spec.description)
    tags = {"study": spec.name, "study.kind": spec.kind, "dataset": p.dataset,
            "selection": p.base.eval.selection, "map_protocol": p.base.eval.map_protocol,
            "code_version": code_version()}
    if opts.resume:
        run_name, parent_id = previous["run_name"], previous["parent_run_id"]
        reopen(uri, parent_id)
    else:
        run_name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent_id = start_parent(uri, experiment_id, run_name, tags,
                                 {"study.trials": len(p.trials), "study.seeds": len(p.seeds), **flatten(p.base)})
        client(uri).log_text(parent_id, spec.text(), f"{spec.name}.yaml")
    invocation = Invocation(uri, experiment_id, parent_id, run_name, storage, tags, state_file)
    try:
        return _tune(spec, opts, p, data, invocation)
    except StudyInterrupted:
        set_status(uri, parent_id, "KILLED")  # --resume continues it
        raise
    except BaseException:
        set_status(uri, parent_id, "FAILED")
        raise


def _tune(spec: specs.StudySpec, opts: RunOptions, p: Plan, data: Any, inv: Invocation) -> dict[str, Any]:
    """Tune's part: trials, then the failure accounting, the report and the parent's summary."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
    from ray.tune.search import ConcurrencyLimiter, Searcher
    from ray.tune.search.optuna import OptunaSearch

    from study.progress import StudyProgress
    from study.report import build_report
    from study.tracking import (
        log_parent_summary,
        mark_interrupted_children,
        record_failed_trials,
        tune_failures,
        unfinished_trials,
    )
    from study.trainable import TrialContext, train_trial

    uri, experiment_id, parent_id = inv.uri, inv.experiment_id, inv.parent_id

    base = p.base
    ctx = TrialContext(study=spec.name, base=base, rows=p.resolved.rows, tracking_uri=uri,
                       experiment_id=experiment_id, parent_run_id=parent_id, tags=inv.tags,
                       cpus_per_trial=spec.resources["cpu"], fail_at_epoch=dict(opts.fail_at_epoch))
    trainable = tune.with_resources(tune.with_parameters(train_trial, data=data, ctx=ctx), spec.resources)
    metric = mlflow_key(f"{base.eval.selection}/{p.metric}")
    progress = StudyProgress(spec.name, len(p.trials), metric, p.metric)
    run_config = tune.RunConfig(
        name=inv.run_name, storage_path=inv.storage, verbose=opts.verbose, callbacks=[progress],
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
    )
    path = f"{inv.storage.rstrip('/')}/{inv.run_name}"
    if opts.resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   param_space=None)
        assert tuner._local_tuner is not None  # a local (not Ray Client) tuner
        restored = tuner._local_tuner.get_run_config()  # the pickled one: this driver's callback and verbosity
        restored.callbacks, restored.verbose = [progress], opts.verbose
    else:
        def trial_id(trial: Any) -> str:
            return trial.trial_id

        param_space: dict[str, Any]
        if spec.kind == "ablation":
            param_space = {"variant": tune.grid_search([v.name for v in spec.variants]),
                           "seed": tune.grid_search(p.seeds)}
            tune_config = tune.TuneConfig(num_samples=1, max_concurrent_trials=spec.max_concurrent or None,
                                          trial_dirname_creator=trial_id, trial_name_creator=trial_id)
        else:
            param_space = {"seed": p.seeds[0], **{k: d.tune() for k, d in spec.space.items()}}
            searcher: Searcher = OptunaSearch(metric=metric, mode="max", seed=p.seeds[0])
            if spec.max_concurrent:
                searcher = ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent)
            # max_t past the last epoch: ASHA stops only losers, a trial that trains to the end finishes itself
            scheduler: TrialScheduler = (
                ASHAScheduler(time_attr="training_iteration", metric=metric, mode="max",
                              max_t=base.optim.epochs + 1, grace_period=spec.scheduler.get("grace_period", 1),
                              reduction_factor=spec.scheduler.get("reduction_factor", 2))
                if spec.scheduler["type"] == "asha" else FIFOScheduler())
            tune_config = tune.TuneConfig(num_samples=len(p.trials), search_alg=searcher, scheduler=scheduler,
                                          trial_dirname_creator=trial_id, trial_name_creator=trial_id)
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    # from here on this invocation is the one --resume continues
    inv.state_file.parent.mkdir(parents=True, exist_ok=True)
    inv.state_file.write_text(json.dumps(inv.state()))
    results: Any = []
    try:
        with _environment({"RAY_AIR_NEW_OUTPUT": "0"} if not opts.verbose else {}):
            results = tuner.fit()  # quiet: Tune's new output engine prints its boxes even at verbose=0
    except KeyboardInterrupt:  # a second Ctrl-C skips Tune's own graceful stop
        progress.final_states = {}
    if progress.interrupted:  # Tune returns normally after a Ctrl-C
        mark_interrupted_children(uri, experiment_id, parent_id, unfinished_trials(results))
        raise StudyInterrupted(f"study {spec.name} interrupted: {progress.line()}; no report written. "
                               f"Continue it with: {resume_command(spec)}")
    failures = tune_failures(results)
    record_failed_trials(uri, experiment_id, parent_id, failures, inv.tags)  # also those failing before their run
    stopped = close_unfinished_children(uri, experiment_id, parent_id, failures)
    reports = Path(opts.reports_dir or opts.project / "reports")
    files = build_report(spec, uri, reports, parent_run_id=parent_id)
    log_artifacts(uri, parent_id, [files.md, files.html, files.tex, files.csv, *files.plots], "report")
    log_parent_summary(uri, parent_id, files.summary, prefix="mean" if spec.kind == "ablation" else "")
    set_status(uri, parent_id, "FINISHED")
    return {"parent_run_id": parent_id, "experiment_id": experiment_id, "tracking_uri": uri,
            "failed": len(failures), "stopped_early": stopped, "report": files, "storage": path}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Environment variables set for the duration of a block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
    p.add_argument("name", nargs="?", help="study name (a YAML in search_spaces/) or a path to a study YAML")
    add_config_flags(p, epochs_flag="--max-epochs")
    p.add_argument("--seeds", type=positive_int, help="seeds per ablation row")
    p.add_argument("--num-samples", type=positive_int, help="trials of a search")
    p.add_argument("--address", default="", help="'' = start a local Ray (default); auto = join a cluster; "
                   "HOST:PORT = that cluster")
    p.add_argument("--storage", help="Ray storage path or URI (default: ./ray_results)")
    p.add_argument("--tracking-uri", help="MLflow URI (default: sqlite:///./mlruns.db)")
    p.add_argument("--resume", action="store_true", help="continue the latest interrupted run of this study")
    p.add_argument("--dry-run", action="store_true", help="print the trials and exit")
    p.add_argument("--num-cpus", type=positive_int, help="CPUs of the local Ray instance")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="-v: Tune's status tables and the trials' output; -vv: also every trial result")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.name:
        list_studies()
        return 0
    if args.name not in specs.available() and not (args.name.endswith(".yaml") and Path(args.name).is_file()):
        print(f"error: unknown study {args.name!r}", file=sys.stderr)
        list_studies(sys.stderr)
        return EXIT_BAD_INPUT
    t0 = time.perf_counter()
    try:
        opts = RunOptions(dataset=args.dataset, flags=flag_overrides(args), seeds=args.seeds,
                          num_samples=args.num_samples, address=args.address, storage=args.storage,
                          tracking_uri=args.tracking_uri, resume=args.resume, dry_run=args.dry_run,
                          num_cpus=args.num_cpus, verbose=args.verbose)
        summary = run_study(args.name, opts)
    except StudyInterrupted as err:
        print(f"\n{err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except VadClipError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if summary.get("dry_run"):
        return 0
    files = summary["report"]
    print(files.text)
    print(f"report: {files.md} (also .tex, .csv, .html); mlflow: {summary['tracking_uri']} "
          f"(parent run {summary['parent_run_id']}); failed trials {summary['failed']}; "
          f"wall time {time.perf_counter() - t0:.0f} s")
    page = ui_url(summary["tracking_uri"], summary["experiment_id"])
    served = "" if summary["tracking_uri"].startswith("http") else \
        f"mlflow ui --backend-store-uri {summary['tracking_uri']}, then "
    print(f"{served}open {page}")
    if summary["failed"]:
        print(f"error: {summary['failed']} trial(s) failed (see the report's failed column and MLflow)",
              file=sys.stderr)
        return EXIT_FAILED_TRIALS
    return 0


if __name__ == "__main__":
    sys.exit(main())
