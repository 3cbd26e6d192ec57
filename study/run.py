"""`python -m study.run NAME`: run a named study on Ray Tune, track it in MLflow, write its report."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from study import record, stages
from study import spec as specs
from study.interrupt import SigintLatch
from study.tracking import (
    check_tracking_uri,
    client,
    close_unfinished_children,
    code_version,
    default_tracking_uri,
    ensure_experiment,
    log_artifacts,
    log_parent_metrics,
    log_parent_summary,
    mark_interrupted_children,
    prepare_store,
    record_failed_trials,
    reopen,
    set_status,
    sqlite_path,
    start_parent,
    tune_failures,
    ui_url,
)
from study.tracking import children as child_runs
from vadclip.cli import Override, Parser, add_config_flags, flag_overrides, infer_dataset, nonnegative_int, positive_int
from vadclip.config import VadClipConfig, flatten
from vadclip.errors import VadClipError
from vadclip.metrics import mlflow_key

# the options that decide an invocation's trials (with its flags), and how a user writes each one
PLAN_OPTIONS = {"dataset": "--dataset {}", "seeds": "--seeds {}", "seeds_auto": "--seeds auto",
                "ci_target": "--ci-target {}", "mdd_target": "--mdd-target {}", "seeds_cap": "--seeds-cap {}",
                "num_samples": "--num-samples {}",
                "max_epochs": "max_epochs={}", "confirm_top": "--confirm-top {}", "confirm_seeds": "--confirm-seeds {}",
                "fuse_seeds": "--fuse-seeds {}", "reuse": "--no-reuse"}
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
    reuse: bool = True  # False (--no-reuse): train every trial even when an identical FINISHED run exists
    seeds_auto: bool = False  # --seeds auto: add seeds until the full row's CI half-width meets the target
    ci_target: float | None = None  # points (default: the spec's seeds_auto.target)
    mdd_target: float | None = None  # points: stop on the rows' minimum detectable difference instead
    seeds_cap: int | None = None
    confirm_top: int | None = None  # a search's confirmation stage (default: the spec's confirm.top; 0 = none)
    confirm_seeds: int | None = None
    fuse_seeds: int | str | None = None  # seeds of a row per trial (vadclip.fused); default: the spec's fuse_seeds
    equivalence_margin: float | None = None  # points (default: the spec's equivalence_margin); the report's verdicts
    dry_run: bool = False
    project: Path = field(default_factory=Path.cwd)
    reports_dir: Path | None = None
    num_cpus: int | None = None  # local Ray only
    fail_at_epoch: dict[str, int] = field(default_factory=dict)  # tests only
    verbose: int = 0  # 0: one progress line; 1: Tune's status tables and the workers' output; 2: + trial results

    def invocation(self) -> dict[str, Any]:
        """What decides this invocation's trials: stored with its resume pointer, restored by --resume."""
        return {**{name: getattr(self, name) for name in PLAN_OPTIONS},
                "flags": [[o.key, o.value, o.flag] for o in self.flags]}

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
    confirm_top: int = 0  # a search's confirmation stage: its top configurations (0 = no such stage)
    confirm_seeds: tuple[int, ...] = ()  # and the fresh seeds they (and the base) are trained on
    fuse: int = 1  # seeds of a row trained together in one trial (1: a trial per seed)

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
    if opts.seeds_auto and spec.kind != "ablation":
        raise StudyError(f"--seeds auto: for ablations (a search confirms its winners with --confirm-seeds); "
                         f"{spec.name} is a {spec.kind}")
    if not opts.seeds_auto:
        for flag, bound in (("--ci-target", opts.ci_target), ("--mdd-target", opts.mdd_target),
                            ("--seeds-cap", opts.seeds_cap)):
            if bound is not None:
                raise StudyError(f"{flag} {bound}: only with --seeds auto")
    if opts.ci_target is not None and opts.mdd_target is not None:
        raise StudyError(f"--ci-target {opts.ci_target} and --mdd-target {opts.mdd_target}: --seeds auto stops on "
                         "one of them; give one")
    for flag, bound in (("--ci-target", opts.ci_target), ("--mdd-target", opts.mdd_target)):
        if opts.seeds_auto and bound is not None and not bound > 0:
            raise StudyError(f"{flag} must be > 0 (points), got {bound}")
    # --seeds auto starts from the spec's seeds, at least 2 (an interval needs them), and adds more later
    start = max(spec.seeds, 2)
    if opts.seeds_auto and (opts.seeds_cap or spec.seeds_auto["cap"]) < start:
        cap, source = (opts.seeds_cap, "--seeds-cap") if opts.seeds_cap else (spec.seeds_auto["cap"],
                                                                              f"{spec.path.name}: seeds_auto.cap")
        raise StudyError(f"{source} {cap} is below the {start} seeds per row --seeds auto starts from")
    seeds = [base.seed + i for i in range(start if opts.seeds_auto else opts.seeds or spec.seeds)]
    if spec.kind == "search":
        seeds = seeds[:1]  # a searcher proposes configs; repeats over seeds belong to ablations
    trials = ([(v.name, s) for v in spec.variants for s in seeds] if spec.kind == "ablation"
              else [("search", seeds[0])] * (opts.num_samples or spec.num_samples))
    top = opts.confirm_top if opts.confirm_top is not None else spec.confirm["top"]
    fresh = tuple(seeds[0] + 1 + i for i in range(opts.confirm_seeds or spec.confirm["seeds"]))  # never the search's
    fuse = spec.fuse_size(None if opts.fuse_seeds is None else specs.check_fuse_seeds(opts.fuse_seeds, "--fuse-seeds"))
    if fuse > 1:
        from vadclip.train import fused_conflict

        for where, cfg in [("the base configuration (every row)", base),
                           *((f"row {row!r}", c) for row, c in resolved.rows.items())]:
            if conflict := fused_conflict(cfg):
                raise StudyError(f"study {spec.name}, {where}: {conflict}")
    return Plan(resolved, seeds, trials, spec.resolve_metric(base.style),
                confirm_top=top if spec.kind == "search" else 0, confirm_seeds=fresh, fuse=fuse)


def print_plan(spec: specs.StudySpec, p: Plan) -> None:
    print(f"study {spec.name} ({spec.kind}): {spec.description}")
    print(f"dataset {p.dataset}, metric {p.metric}, selection on {p.base.eval.selection}, "
          f"resources per trial {spec.resources}, epochs {p.base.optim.epochs}")
    if spec.kind == "ablation":
        for i, (variant, seed) in enumerate(p.trials):
            row = next(v for v in spec.variants if v.name == variant)
            extra = f" (variant {row.variant})" if row.variant else ""
            print(f"  trial {i:3d}: {variant:40s} seed {seed}  {row.overrides}{extra}")
    else:
        print(f"  {len(p.trials)} trials sampled by Optuna (TPE) with seed {p.seeds[0]}, "
              f"scheduler {spec.scheduler}, from:")
        for key, domain in spec.space.items():
            print(f"    {key}: {domain.describe()}")
        top, fresh = p.confirm_top, p.confirm_seeds
        if top:
            print(f"  then a confirmation stage: the top {top} configurations by validation {p.metric} and the base "
                  f"on {len(fresh)} fresh seeds ({fresh[0]}..{fresh[-1]}): up to {(top + 1) * len(fresh)} more "
                  f"trials")
    groups = len(specs.seed_groups(p.seeds, p.fuse))
    fused = (f"; fused (fuse_seeds {p.fuse}): {len(p.resolved.rows) * groups} Tune trials of up to {p.fuse} seeds each"
             if p.fuse > 1 and spec.kind == "ablation" else "")
    print(f"{len(p.trials)} trials{fused}")
    if line := statistics_line(spec, p):
        print(line)


def statistics_line(spec: specs.StudySpec, p: Plan) -> str | None:
    """What the study's seed count can show (an ablation compared with its full row), before it starts."""
    if spec.kind != "ablation" or spec.full is None:
        return None
    from study.report.stats import seed_floor_note  # scipy/statsmodels: only when there is something to say

    return f"statistics: {seed_floor_note(len(p.seeds), len(spec.variants) - 1)}"


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
    check_writable(Path(storage), "--storage")


def check_writable(folder: Path, what: str) -> None:
    """A folder the study writes to can be written (or created) there, checked before any trial runs and
    without creating it: bad input leaves nothing behind."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise StudyError(f"{what} {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StudyError(f"{what} {folder}: {'folder' if existing == folder else existing} is not writable")


def _state_path(opts: RunOptions, study: str) -> Path:
    return opts.project / STATE_DIR / f"{study}.json"


def _given(options: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Option name (or a flag's config key) -> (value, the flag as the user wrote it), for the options that
    differ from the defaults."""
    defaults = RunOptions()
    out = {name: (str(options[name]), PLAN_OPTIONS[name].format(options[name])) for name in PLAN_OPTIONS
           if name in options and options[name] != getattr(defaults, name)}
    return {**out, **{key: (str(value), flag) for key, value, flag in options.get("flags", [])}}


def restore_invocation(opts: RunOptions, stored: dict[str, Any], study: str) -> RunOptions:
    """--resume: the options the interrupted invocation was started with. An option given again with the same
    value is fine; one that differs (or is new) would plan other trials than the invocation runs: refused,
    naming the flags."""
    started = {name: stored.get(name, getattr(RunOptions(), name)) for name in PLAN_OPTIONS}
    started["flags"] = [list(f) for f in stored.get("flags", [])]
    given, before = _given(opts.invocation()), _given(started)
    conflicts = [text for name, (value, text) in given.items() if before.get(name, ("",))[0] != value]
    if conflicts:
        was = " ".join(text for _, text in before.values()) or "no flags"
        raise StudyError(f"--resume: {' '.join(conflicts)} conflicts with how the run of {study} was started "
                         f"({was}); leave the flags out to continue it as started, or start a new run without "
                         f"--resume")
    flags = [Override(key, value, flag) for key, value, flag in started["flags"]]
    return replace(opts, flags=flags, **{name: started[name] for name in PLAN_OPTIONS})


def resume_command(spec: specs.StudySpec) -> str:
    return f"python -m study.run {spec.name if spec.path.parent == specs.SPEC_DIR else spec.path} --resume"


def new_run_name(study: str) -> str:
    """The parent run's name, also its Tune folder's: unique, so that two invocations started in the same second
    do not share a folder (or a resume pointer)."""
    return f"{study}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


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
    options: dict[str, Any]  # RunOptions.invocation(): what --resume restores
    reports: Path

    def state(self) -> dict[str, Any]:
        return {"run_name": self.run_name, "parent_run_id": self.parent_id, "storage": self.storage,
                "experiment_id": self.experiment_id, "tracking_uri": self.uri, "invocation": self.options}


def run_study(name: str, opts: RunOptions) -> dict[str, Any]:
    """Run (or resume) a study; returns a summary with the report paths.

    Raises VadClipError subclasses for bad input (nothing created) and StudyInterrupted on Ctrl-C."""
    spec = specs.load(name)
    if opts.equivalence_margin is not None:
        spec = replace(spec, equivalence_margin=specs.check_margin(opts.equivalence_margin, "--equivalence-margin"))
    opts.project = opts.project.resolve()
    state_file = _state_path(opts, spec.name)
    previous: dict[str, Any] = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if opts.resume and not previous:
        raise StudyError(f"--resume: no earlier run of {spec.name} recorded in {state_file}")
    if opts.resume:
        opts = restore_invocation(opts, previous.get("invocation", {}), spec.name)
    p = plan(spec, opts)
    if opts.dry_run:
        print_plan(spec, p)
        return {"dry_run": True, "trials": p.trials}
    # a resumed study goes on logging where it started unless told otherwise
    uri = opts.tracking_uri or (previous["tracking_uri"] if opts.resume else default_tracking_uri(opts.project))
    check_tracking_uri(uri)
    storage = previous["storage"] if opts.resume else (opts.storage or str(opts.project / "ray_results"))
    if "://" not in storage and not Path(storage).is_absolute():
        storage = str((opts.project / storage).resolve())
    check_storage(storage)
    reports = Path(opts.reports_dir or opts.project / "reports")
    for folder, what in ((reports, "reports folder"), (state_file.parent, "study state folder"),
                         (opts.project / "mlartifacts", "MLflow artifact folder")):
        check_writable(folder, what)
    check_address(opts.address)

    from study.reuse import data_fingerprint, package_versions, source_digest
    from vadclip.data import load_dataset
    from vadclip.data.dataset import describe
    from vadclip.model.clip import RANDOM_WEIGHTS_WARNING

    data = load_dataset(p.base)  # once per study: trials share it through Ray's object store
    print(describe(data), file=sys.stderr)
    if line := statistics_line(spec, p):
        print(line, file=sys.stderr)
    if p.base.clip.weights is None:
        # once here; the trials' copies stay in their logs (shown with -v)
        print(RANDOM_WEIGHTS_WARNING.format(model=p.base.clip.model), file=sys.stderr)
    _start_ray(opts)
    if not opts.verbose:
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"

    prepare_store(uri)
    experiment_id = ensure_experiment(uri, spec.name, opts.project / "mlartifacts", description=spec.description)
    tags = {record.STUDY: spec.name, record.STUDY_KIND: spec.kind, record.DATASET: p.dataset,
            record.SELECTION: p.base.eval.selection, record.MAP_PROTOCOL: p.base.eval.map_protocol,
            record.CODE_VERSION: code_version(), record.SOURCE_DIGEST: source_digest(),
            record.DATA_FINGERPRINT: data_fingerprint(p.base), record.PACKAGES: package_versions()}
    if opts.resume:
        run_name, parent_id = previous["run_name"], previous["parent_run_id"]
        reopen(uri, parent_id)
    else:
        run_name = new_run_name(spec.name)
        parent_id = start_parent(uri, experiment_id, run_name, tags,
                                 {record.PLANNED_TRIALS: len(p.trials), record.PLANNED_SEEDS: len(p.seeds),
                                  **flatten(p.base)})
        client(uri).log_text(parent_id, spec.text(), f"{spec.name}.yaml")
    invocation = Invocation(uri, experiment_id, parent_id, run_name, storage, tags, state_file, opts.invocation(),
                            reports)
    try:
        with SigintLatch() as latch:
            return _tune(spec, opts, p, data, invocation, latch)
    except StudyInterrupted:
        set_status(uri, parent_id, "KILLED")  # --resume continues it
        raise
    except KeyboardInterrupt:  # a second Ctrl-C while the report is written
        set_status(uri, parent_id, "KILLED")
        raise StudyInterrupted(f"study {spec.name} interrupted while writing its report; every trial has ended. "
                               f"Write it with: {resume_command(spec)}") from None
    except BaseException:
        set_status(uri, parent_id, "FAILED")
        raise


@dataclass
class Stage:
    """One Tune experiment of an invocation: the trials of an ablation or search, or a search's confirmation."""

    name: str  # "ablation", "search" or "confirm": the children's `stage` tag
    experiment: str  # Tune's experiment name (its folder under the storage path)
    rows: dict[str, VadClipConfig]  # variant -> config (a search: {}, its trials sample the space)
    seeds: list[int]
    total: int  # trials


def _tune(spec: specs.StudySpec, opts: RunOptions, p: Plan, data: Any, inv: Invocation,
          latch: SigintLatch) -> dict[str, Any]:
    """Tune's part: the stages' trials, then the failure accounting, the report and the parent's summary.
    A Ctrl-C once every trial of a stage has ended stops before the next stage, or, after the last one, lets
    the report be written."""
    from study.report import build_report
    from study.reuse import code_digest

    uri, parent_id = inv.uri, inv.parent_id
    fingerprints = {"data_fingerprint": inv.tags[record.DATA_FINGERPRINT], "code_digest": code_digest()}
    first = Stage(spec.kind, inv.run_name, p.resolved.rows, p.seeds, len(p.trials))
    failures = _fit_stage(spec, opts, p, data, inv, first, fingerprints, latch)
    stopped = close_unfinished_children(uri, inv.experiment_id, parent_id, failures)
    if opts.seeds_auto and spec.kind == "ablation":
        failures = {**failures, **_more_seeds(spec, opts, p, data, inv, fingerprints, latch)}
    if p.confirm_top > 0:
        _stop_if_signalled(spec, latch, "before the confirmation stage")
        rows = confirm_rows(spec, p, inv, p.confirm_top)
        seeds = list(p.confirm_seeds)
        confirm = Stage(record.CONFIRM, f"{inv.run_name}-confirm", rows, seeds, len(rows) * len(seeds))
        more = _fit_stage(spec, opts, p, data, inv, confirm, fingerprints, latch)
        stopped += close_unfinished_children(uri, inv.experiment_id, parent_id, more)
        failures = {**failures, **more}
    if latch.hits:
        print(f"study {spec.name}: every trial has ended; writing the report (Ctrl-C again to abort)",
              file=sys.stderr)
    files = build_report(spec, uri, inv.reports, parent_run_id=parent_id)
    log_artifacts(uri, parent_id, [files.md, files.html, files.tex, files.csv, *files.plots], "report")
    log_parent_summary(uri, parent_id, files.summary, prefix="mean" if spec.kind == "ablation" else "")
    log_parent_metrics(uri, parent_id, files.cost)
    set_status(uri, parent_id, "FINISHED")
    return {"parent_run_id": parent_id, "experiment_id": inv.experiment_id, "tracking_uri": uri,
            "failed": len(failures), "stopped_early": stopped, "report": files,
            "storage": f"{inv.storage.rstrip('/')}/{inv.run_name}"}


def _stop_if_signalled(spec: specs.StudySpec, latch: SigintLatch, where: str) -> None:
    if latch.hits:
        raise StudyInterrupted(f"study {spec.name} interrupted {where} (every trial so far has ended); no report "
                               f"written. Continue it with: {resume_command(spec)}")


def _more_seeds(spec: specs.StudySpec, opts: RunOptions, p: Plan, data: Any, inv: Invocation,
                fingerprints: dict[str, str], latch: SigintLatch) -> dict[str, Any]:
    """`--seeds auto`: add one seed to every row at a time (each round its own Tune experiment, so --resume
    continues round by round) until the full row's 95 % t-interval half-width on the study metric is at most the
    target (or, with --mdd-target, every row's minimum detectable difference), or the cap is reached; the
    parent's tag `seeds.auto` says which."""
    rule = stages.SeedsRule(detectable=opts.mdd_target is not None,
                            target=next(t for t in (opts.mdd_target, opts.ci_target, spec.seeds_auto["target"])
                                        if t is not None),
                            cap=opts.seeds_cap or spec.seeds_auto["cap"])
    failures: dict[str, Any] = {}
    n = len(p.seeds)
    while True:
        value = rule.measure(trial_views(inv), spec.full, p.metric, p.base.seed + n)
        verdict = rule.verdict(value, n, spec.full, p.metric)
        if verdict.stop:
            client(inv.uri).set_tag(inv.parent_id, record.SEEDS_AUTO, verdict.reason)
            return failures
        _stop_if_signalled(spec, latch, f"before seed round {n + 1}")
        seed = p.base.seed + n
        n += 1
        stage = Stage("ablation", f"{inv.run_name}-seeds{n}", p.resolved.rows, [seed], len(p.resolved.rows))
        more = _fit_stage(spec, opts, p, data, inv, stage, fingerprints, latch)
        close_unfinished_children(inv.uri, inv.experiment_id, inv.parent_id, more)
        failures.update(more)


def trial_views(inv: Invocation) -> list[record.TrialView]:
    """The invocation's trial runs so far, as the stage policies read them."""
    return [record.TrialView.of(r) for r in child_runs(inv.uri, inv.experiment_id, inv.parent_id)]


def optuna_storage_url(uri: str, project: Path) -> str:
    """Where a search's Optuna study lives: an SQLite file beside the MLflow SQLite store (`optuna.db`), or in the
    project folder when MLflow is a server. `optuna-dashboard <url>` opens it."""
    store = sqlite_path(uri)
    folder = store.parent if store is not None else project
    return f"sqlite:///{folder / 'optuna.db'}"


def optuna_storage(inv: Invocation, opts: RunOptions) -> Any:
    """The search's Optuna storage (its study is named after the invocation, so --resume loads it again),
    recorded on the parent run (tags optuna.storage, optuna.study) for the report and the dashboard."""
    import optuna


    if not opts.verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in RDB ..."
    url = optuna_storage_url(inv.uri, opts.project)
    client(inv.uri).set_tag(inv.parent_id, record.OPTUNA_STORAGE, url)
    client(inv.uri).set_tag(inv.parent_id, record.OPTUNA_STUDY, inv.run_name)
    return optuna.storages.RDBStorage(url)


def confirm_rows(spec: specs.StudySpec, p: Plan, inv: Invocation, top: int) -> dict[str, VadClipConfig]:
    """The confirmation stage's rows: the base configuration and the `top` distinct configurations of the search
    trials by the validation metric the search optimised (test metric under selection=test), ties by trial id;
    read from MLflow, so a resumed invocation picks the same ones."""
    key, candidates = stages.confirm_candidates(trial_views(inv), spec.space, p.base.eval.selection, p.metric, top)
    if not candidates:
        raise StudyError(f"study {spec.name}: no FINISHED search trial logged {key}; nothing to confirm")
    rows = {specs.CONFIRM_BASE: p.base}
    for i, candidate in enumerate(candidates, 1):
        rows[f"top{i} · {candidate.shown}"] = specs.apply_trial(p.base, dict(candidate.values))
    return rows


def _fit_stage(spec: specs.StudySpec, opts: RunOptions, p: Plan, data: Any, inv: Invocation, stage: Stage,
               fingerprints: dict[str, str], latch: SigintLatch) -> dict[str, Any]:
    """Run (or, with --resume, restore) one stage's Tune experiment; returns its failed trials (trial id ->
    FailedTrial), recorded as FAILED children. Raises StudyInterrupted on Ctrl-C."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
    from ray.tune.search import ConcurrencyLimiter, Searcher
    from ray.tune.search.optuna import OptunaSearch

    from study.progress import StudyProgress
    from study.trainable import TrialContext, train_trial

    uri, experiment_id, parent_id = inv.uri, inv.experiment_id, inv.parent_id
    base = p.base
    tags = {**inv.tags, record.STAGE: stage.name}
    metric = mlflow_key(record.objective_key(base.eval.selection, p.metric))
    ctx = TrialContext(study=spec.name, base=base, rows=stage.rows, tracking_uri=uri, experiment_id=experiment_id,
                       parent_run_id=parent_id, tags=tags, cpus_per_trial=spec.resources["cpu"],
                       reuse=opts.reuse, fail_at_epoch=dict(opts.fail_at_epoch), objective=metric, **fingerprints)
    trainable = tune.with_resources(tune.with_parameters(train_trial, data=data, ctx=ctx), spec.resources)
    label = spec.name if stage.name != record.CONFIRM else f"{spec.name} confirm"
    # the Tune trials of a grid stage: one per row and group of fused seeds (a group of one: a plain seed trial)
    groups = specs.seed_groups(stage.seeds, p.fuse) if stage.name != record.SEARCH else []
    fused = any(len(g) > 1 for g in groups)
    progress = StudyProgress(label, len(stage.rows) * len(groups) if fused else stage.total, metric, p.metric)
    run_config = tune.RunConfig(
        name=stage.experiment, storage_path=inv.storage, verbose=opts.verbose, callbacks=[progress],
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # two: a driver killed between a checkpoint's deletion and Tune's next snapshot resumes from the other one
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
    )
    path = f"{inv.storage.rstrip('/')}/{stage.experiment}"
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
        if stage.name != record.SEARCH:  # a grid of rows × seeds: an ablation, or a search's confirmation
            seeds: dict[str, Any] = ({record.TRIAL_SEEDS: tune.grid_search(groups)} if fused
                                     else {record.TRIAL_SEED: tune.grid_search(stage.seeds)})
            param_space = {record.TRIAL_VARIANT: tune.grid_search(list(stage.rows)), **seeds}
            tune_config = tune.TuneConfig(num_samples=1, max_concurrent_trials=spec.max_concurrent or None,
                                          trial_dirname_creator=trial_id, trial_name_creator=trial_id,
                                          reuse_actors=spec.reuse_workers)
        else:
            param_space = {record.TRIAL_SEED: stage.seeds[0], **{k: d.tune() for k, d in spec.space.items()}}
            searcher: Searcher = OptunaSearch(metric=metric, mode="max", seed=stage.seeds[0],
                                              study_name=inv.run_name, storage=optuna_storage(inv, opts))
            if spec.max_concurrent:
                searcher = ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent)
            # max_t past the last epoch: ASHA stops only losers, a trial that trains to the end finishes itself
            scheduler: TrialScheduler = (
                ASHAScheduler(time_attr="training_iteration", metric=metric, mode="max",
                              max_t=base.optim.epochs + 1, grace_period=spec.scheduler.get("grace_period", 1),
                              reduction_factor=spec.scheduler.get("reduction_factor", 2))
                if spec.scheduler["type"] == "asha" else FIFOScheduler())
            tune_config = tune.TuneConfig(num_samples=stage.total, search_alg=searcher, scheduler=scheduler,
                                          trial_dirname_creator=trial_id, trial_name_creator=trial_id,
                                          reuse_actors=spec.reuse_workers)
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
        mark_interrupted_children(uri, experiment_id, parent_id, progress.unfinished_ids)
        raise StudyInterrupted(f"study {spec.name} interrupted ({stage.name} stage): {progress.line()}; no report "
                               f"written. Continue it with: {resume_command(spec)}")
    latch.hits += progress.signalled  # a Ctrl-C after the stage's last trial ended
    failures = tune_failures(results)
    record_failed_trials(uri, experiment_id, parent_id, failures, tags)  # also those failing before their run
    return failures


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


def seeds_arg(text: str) -> int | str:
    """argparse type of --seeds: a count >= 1 or 'auto'."""
    return "auto" if text == "auto" else positive_int(text)


def list_studies(out=sys.stdout) -> None:
    print("studies (python -m study.run NAME):", file=out)
    for name, path in specs.available().items():
        try:
            description = specs.load(path).description
        except specs.SpecError as err:
            description = f"(invalid: {err})"
        print(f"  {name:24s} {description}", file=out)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m study.run", description=__doc__.splitlines()[0])
    p.add_argument("name", nargs="?", help="study name (a YAML in search_spaces/) or a path to a study YAML")
    add_config_flags(p, epochs_flag="--max-epochs")
    p.add_argument("--seeds", type=seeds_arg, help="seeds per ablation row, or 'auto': add seeds until the full "
                   "row's 95%% CI half-width on the study metric is at most --ci-target (or --seeds-cap is reached)")
    p.add_argument("--ci-target", type=float, help="--seeds auto: target half-width in points (default: the spec's "
                   "seeds_auto.target)")
    p.add_argument("--mdd-target", type=float, help="--seeds auto: stop instead when every row's minimum detectable "
                   "difference against the full row (80%% power, Holm's strictest level) is at most this many points")
    p.add_argument("--seeds-cap", type=positive_int, help="--seeds auto: most seeds per row (default: the spec's "
                   "seeds_auto.cap)")
    p.add_argument("--num-samples", type=positive_int, help="trials of a search")
    p.add_argument("--address", default="", help="'' = start a local Ray (default); auto = join a cluster; "
                   "HOST:PORT = that cluster")
    p.add_argument("--storage", help="Ray storage path or URI (default: ./ray_results)")
    p.add_argument("--tracking-uri", help="MLflow URI (default: sqlite:///./mlruns.db)")
    p.add_argument("--resume", action="store_true", help="continue the latest interrupted run of this study")
    p.add_argument("--confirm-top", type=nonnegative_int, help="a search's confirmation stage: re-train the top "
                   "K configurations by the validation metric with the base on fresh seeds (0 = none)")
    p.add_argument("--confirm-seeds", type=positive_int, help="fresh seeds of the confirmation stage")
    p.add_argument("--fuse-seeds", help="seeds of a row trained together in one trial (1 = each its own; default: "
                   "the spec's fuse_seeds, auto = up to 5 when trials have a GPU)")
    p.add_argument("--no-reuse", dest="reuse", action="store_false",
                   help="train every trial, even one identical (config, data, code) to a FINISHED run in the store")
    p.add_argument("--equivalence-margin", type=float, help="points of the study metric within which a row is "
                   "'equivalent' to the full model (paired TOST; default: the spec's equivalence_margin, 1)")
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
        auto = args.seeds == "auto"
        opts = RunOptions(dataset=args.dataset, flags=flag_overrides(args), seeds=None if auto else args.seeds,
                          seeds_auto=auto, ci_target=args.ci_target, mdd_target=args.mdd_target,
                          seeds_cap=args.seeds_cap,
                          num_samples=args.num_samples, address=args.address, storage=args.storage,
                          tracking_uri=args.tracking_uri, resume=args.resume, reuse=args.reuse, dry_run=args.dry_run,
                          confirm_top=args.confirm_top, confirm_seeds=args.confirm_seeds,
                          fuse_seeds=args.fuse_seeds, num_cpus=args.num_cpus, verbose=args.verbose,
                          equivalence_margin=args.equivalence_margin)
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
