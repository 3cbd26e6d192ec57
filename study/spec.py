"""Study specs: one YAML per study in search_spaces/, validated once on load into a StudySpec, then resolved
against one invocation (dataset, flags) into the configs its trials run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from study.space import Domain, SpaceError, validate_points
from vadclip.cli import Override, as_dict, blame
from vadclip.config import ConfigError, VadClipConfig, apply_overrides, coerce, field_type, preset
from vadclip.errors import VadClipError
from vadclip.metrics import CORE_METRICS, MAP_LEVELS

SPEC_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
KINDS = ("ablation", "search")
DATASETS = ("synthetic", "ucf", "xd")
SCHEDULERS = ("asha", "fifo")
TOP_KEYS = {
    "name": str, "kind": str, "description": str, "preset": str, "variant": str, "metric": str,
    "seeds": int, "num_samples": int, "max_concurrent": int, "max_failures": int,
    "resources": dict, "base": dict, "variants": list, "full": str, "space": dict, "scheduler": dict,
    "paper_table": int, "confirm": dict, "columns": list, "seeds_auto": dict, "reuse_workers": bool,
    "fuse_seeds": (int, str),
}
VARIANT_KEYS = {"name": str, "set": dict, "paper": dict, "variant": str}
PAPER_METRICS = (*CORE_METRICS, *MAP_LEVELS)  # what a row may quote from the paper and a table may show
STYLES = ("ucf", "xd")
VARIANTS = ("official", "paper")  # vadclip.config presets: the authors' code, the paper's text
RESOURCE_KEYS = {"cpu": (int, float), "gpu": (int, float)}
SCHEDULER_KEYS = {"type": str, "grace_period": int, "reduction_factor": int}
CONFIRM_KEYS = {"top": int, "seeds": int}
SEEDS_AUTO_KEYS = {"target": (int, float), "cap": int}
SEEDS_AUTO_DEFAULT = {"target": 1.0, "cap": 10}  # --seeds auto: CI half-width (points) and most seeds per row
CONFIRM_DEFAULT = {"top": 3, "seeds": 3}  # a search's confirmation stage: top-k configs × fresh seeds, with the base
FUSE_AUTO_MOST = 5  # fuse_seeds auto: at most this many seeds of a row in one trial (on a GPU)
CONFIRM_BASE = "base"  # that stage's reference row (the search's base configuration), for the run and the report


class SpecError(VadClipError, ValueError):
    """A study YAML that cannot be run; the message names the file, the key and what is allowed."""


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]
    paper: dict[str, Any] = field(default_factory=dict)  # the paper's numbers: {metric: v} or {style: {metric: v}}
    variant: str | None = None  # the preset variant of this row (official | paper); None: the study's

    def paper_values(self, style: str) -> dict[str, float]:
        """The paper's numbers for this row on `style` data (ucf | xd)."""
        if any(k in STYLES for k in self.paper):
            return dict(self.paper.get(style, {}))
        return dict(self.paper)


@dataclass(frozen=True)
class StudySpec:
    name: str
    kind: str
    description: str
    path: Path
    preset: str = "synthetic"
    variant: str = "official"
    metric: str = "auto"  # auto: AUC for UCF-style data, AP for XD-style
    seeds: int = 3
    num_samples: int = 1
    max_concurrent: int = 0  # 0 = as many as resources allow
    max_failures: int = 1  # retries of a failed trial (from its last checkpoint)
    reuse_workers: bool = True  # trials run one after another in the same Ray worker processes (Tune's reuse_actors)
    # seeds of one row trained together in one trial (vadclip.fused); auto: up to FUSE_AUTO_MOST when a trial has a
    # GPU, else 1 (on a CPU the fused step costs what the seeds cost apart: docs/speed.md)
    fuse_seeds: int | str = "auto"
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    base: dict[str, Any] = field(default_factory=dict)
    variants: tuple[Variant, ...] = ()
    full: str | None = None  # the ablation row every other row is compared with
    space: dict[str, Domain] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha"})
    paper_table: int | None = None
    columns: tuple[str, ...] = CORE_METRICS  # the metrics an ablation table shows, in order
    seeds_auto: dict[str, float] = field(default_factory=lambda: dict(SEEDS_AUTO_DEFAULT))
    confirm: dict[str, int] = field(default_factory=lambda: dict(CONFIRM_DEFAULT))  # search only; top 0 = none

    def resolve_metric(self, style: str) -> str:
        return self.metric if self.metric != "auto" else ("auc" if style == "ucf" else "ap")

    def text(self) -> str:
        return self.path.read_text()

    def fuse_size(self, fuse_seeds: int | str | None = None) -> int:
        """How many seeds of a row one trial trains together: `fuse_seeds` (an invocation's override) or the
        spec's; 1 = every seed its own trial."""
        value = self.fuse_seeds if fuse_seeds is None else fuse_seeds
        if value == "auto":
            return FUSE_AUTO_MOST if self.resources.get("gpu", 0) > 0 else 1
        return int(value)


def seed_groups(seeds: Sequence[int], size: int) -> list[list[int]]:
    """The seeds of a row in the trials that train them: consecutive groups of `size` (the last may be smaller)."""
    seeds = list(seeds)
    return [seeds[i:i + max(size, 1)] for i in range(0, len(seeds), max(size, 1))]


def check_fuse_seeds(value: Any, where: str) -> int | str:
    """`fuse_seeds`: a positive int or auto; SpecError naming `where` otherwise."""
    if value == "auto" or isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str) and value.isdigit() and int(value) >= 1:
        return int(value)
    raise SpecError(f"{where}: fuse_seeds must be auto or an integer >= 1 (1 = no fusing), got {value!r}")


@dataclass(frozen=True)
class Resolved:
    """A spec applied to one invocation: the configs its trials start from, each built and validated once."""

    dataset: str
    base: VadClipConfig  # the study's base config with the invocation's flags
    rows: dict[str, VadClipConfig]  # ablation row -> its config (a search: {} ; its trials sample the space)


def available() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SPEC_DIR.glob("*.yaml"))}


def load(name_or_path: str | Path) -> StudySpec:
    """Load a study by name (search_spaces/NAME.yaml) or path; SpecError on anything invalid."""
    path = Path(name_or_path)
    if not path.suffix:
        studies = available()
        if str(name_or_path) not in studies:
            raise SpecError(f"unknown study {str(name_or_path)!r}; available: {', '.join(studies)}")
        path = studies[str(name_or_path)]
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: malformed YAML: {err}") from err
    except OSError as err:
        raise SpecError(f"{path}: cannot read: {err}") from err
    return parse(raw, path)


def _check_keys(raw: dict, allowed: dict[str, Any], where: str) -> None:
    for key, value in raw.items():
        if key not in allowed:
            raise SpecError(f"{where}: unknown key {key!r}; allowed: {', '.join(allowed)}")
        if not isinstance(value, allowed[key]) or isinstance(value, bool) and allowed[key] is not bool:
            expected = allowed[key]
            names = "/".join(t.__name__ for t in expected) if isinstance(expected, tuple) else expected.__name__
            raise SpecError(f"{where}: key {key!r} must be a {names}, got {value!r}")


def _check_overrides(values: dict, where: str) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        try:
            out[key] = coerce(key, value)
        except ConfigError as err:
            raise SpecError(f"{where}: {err}") from err
    return out


def _check_domain(key: str, raw: Any, where: str) -> Domain:
    try:
        return Domain.parse(key, raw)
    except SpaceError as err:
        raise SpecError(f"{where}: space.{key}: {err}") from err


def parse(raw: Any, path: Path) -> StudySpec:
    where = str(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a mapping of study keys, got {type(raw).__name__}")
    _check_keys(raw, TOP_KEYS, where)
    for key in ("kind", "description"):
        if key not in raw:
            raise SpecError(f"{where}: missing required key {key!r}")
    # the file's name is the study's name: experiment, resume state and reports are keyed by it
    if raw.get("name", path.stem) != path.stem:
        raise SpecError(f"{where}: name {raw['name']!r} differs from the file's name {path.stem!r}; the study "
                        f"name is the file name (rename the file or drop the 'name' key)")
    if raw["kind"] not in KINDS:
        raise SpecError(f"{where}: kind {raw['kind']!r} unknown; allowed: {', '.join(KINDS)}")
    if raw.get("metric", "auto") not in (*CORE_METRICS, "auto"):
        raise SpecError(f"{where}: metric {raw['metric']!r} unknown; allowed: auto, {', '.join(CORE_METRICS)}")
    resources = raw.get("resources", {"cpu": 1, "gpu": 0})
    _check_keys(resources, RESOURCE_KEYS, f"{where}: resources")
    if any(v < 0 for v in resources.values()) or resources.get("cpu", 1) <= 0:
        raise SpecError(f"{where}: resources need cpu > 0 and gpu >= 0, got {resources}")
    base = _check_overrides(raw.get("base", {}), f"{where}: base")
    variants = []
    for i, v in enumerate(raw.get("variants", [])):
        vwhere = f"{where}: variants[{i}]"
        if not isinstance(v, dict):
            raise SpecError(f"{vwhere}: expected a mapping with name/set/paper, got {v!r}")
        _check_keys(v, VARIANT_KEYS, vwhere)
        if "name" not in v:
            raise SpecError(f"{vwhere}: missing required key 'name'")
        paper = v.get("paper", {})
        styled = any(k in STYLES for k in paper)
        for style, numbers in (paper.items() if styled else [("", paper)]):
            if style not in (*STYLES, ""):
                raise SpecError(f"{vwhere}: paper: mix of styles and metrics; use {{metric: value}} or "
                                f"{{ucf: {{...}}, xd: {{...}}}}, got key {style!r}")
            bad = [k for k in numbers if k not in PAPER_METRICS]
            if bad or not isinstance(numbers, dict):
                raise SpecError(f"{vwhere}: paper metric {(bad or [numbers])[0]!r} unknown; allowed: "
                                f"{', '.join(PAPER_METRICS)}")
        if v.get("variant", "official") not in VARIANTS:
            raise SpecError(f"{vwhere}: variant {v['variant']!r} unknown; allowed: {', '.join(VARIANTS)}")
        variants.append(Variant(v["name"], _check_overrides(v.get("set", {}), vwhere), paper, v.get("variant")))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise SpecError(f"{where}: variant names must be unique, got {names}")
    space = {k: _check_domain(k, d, where) for k, d in raw.get("space", {}).items()}
    scheduler = raw.get("scheduler", {"type": "asha"})
    _check_keys(scheduler, SCHEDULER_KEYS, f"{where}: scheduler")
    if scheduler.get("type", "asha") not in SCHEDULERS:
        raise SpecError(f"{where}: scheduler.type {scheduler['type']!r} unknown; allowed: {', '.join(SCHEDULERS)}")
    for key in ("grace_period", "reduction_factor"):
        if scheduler.get(key, 2) < 1 or key == "reduction_factor" and scheduler.get(key, 2) < 2:
            raise SpecError(f"{where}: scheduler.{key} must be >= {1 if key == 'grace_period' else 2}, "
                            f"got {scheduler[key]}")
    if raw["kind"] == "ablation":
        if not variants:
            raise SpecError(f"{where}: an ablation needs a non-empty 'variants' list")
        if space:
            raise SpecError(f"{where}: 'space' belongs to kind 'search', not 'ablation'")
        if raw.get("full") is not None and raw["full"] not in names:
            raise SpecError(f"{where}: full {raw['full']!r} is not one of the variants {names}")
    else:
        if not space:
            raise SpecError(f"{where}: a search needs a non-empty 'space'")
        for key in ("variants", "full"):
            if key in raw:
                raise SpecError(f"{where}: {key!r} belongs to kind 'ablation', not 'search'")
    bad_columns = [c for c in raw.get("columns", []) if c not in PAPER_METRICS]
    if bad_columns:
        raise SpecError(f"{where}: columns: metric {bad_columns[0]!r} unknown; allowed: {', '.join(PAPER_METRICS)}")
    if raw.get("variant", "official") not in VARIANTS:
        raise SpecError(f"{where}: variant {raw['variant']!r} unknown; allowed: {', '.join(VARIANTS)}")
    seeds_auto = raw.get("seeds_auto", {})
    _check_keys(seeds_auto, SEEDS_AUTO_KEYS, f"{where}: seeds_auto")
    if seeds_auto.get("target", 1) <= 0 or seeds_auto.get("cap", 2) < 2:
        raise SpecError(f"{where}: seeds_auto needs target > 0 (points) and cap >= 2, got {seeds_auto}")
    confirm = raw.get("confirm", {})
    _check_keys(confirm, CONFIRM_KEYS, f"{where}: confirm")
    if raw["kind"] != "search" and confirm:
        raise SpecError(f"{where}: 'confirm' belongs to kind 'search' (its confirmation stage), not 'ablation'")
    if confirm.get("top", 0) < 0 or confirm.get("seeds", 1) < 1:
        raise SpecError(f"{where}: confirm needs top >= 0 (0 = no confirmation stage) and seeds >= 1, got {confirm}")
    if raw.get("preset", "synthetic") not in DATASETS:
        raise SpecError(f"{where}: preset {raw['preset']!r} unknown; allowed: {', '.join(DATASETS)}")
    for key in ("seeds", "num_samples", "max_failures"):
        if raw.get(key, 1) < (0 if key == "max_failures" else 1):
            raise SpecError(f"{where}: {key} must be >= {0 if key == 'max_failures' else 1}, got {raw[key]}")
    if raw.get("max_concurrent", 0) < 0:
        raise SpecError(f"{where}: max_concurrent must be >= 0 (0 = as many as resources allow), "
                        f"got {raw['max_concurrent']}")
    fuse_seeds = check_fuse_seeds(raw.get("fuse_seeds", "auto"), where)
    spec = StudySpec(
        name=path.stem, kind=raw["kind"], description=raw["description"], path=path,
        preset=raw.get("preset", "synthetic"), variant=raw.get("variant", "official"),
        metric=raw.get("metric", "auto"), seeds=raw.get("seeds", 3 if raw["kind"] == "ablation" else 1),
        num_samples=raw.get("num_samples", 1),
        max_concurrent=raw.get("max_concurrent", 0), max_failures=raw.get("max_failures", 1),
        reuse_workers=raw.get("reuse_workers", True), fuse_seeds=fuse_seeds,
        resources={"cpu": 1, "gpu": 0, **resources}, base=base,
        variants=tuple(variants),
        full=raw.get("full", names[-1] if names else None), space=space,
        scheduler={"type": "asha", **scheduler}, paper_table=raw.get("paper_table"),
        columns=tuple(raw.get("columns", CORE_METRICS)), seeds_auto={**SEEDS_AUTO_DEFAULT, **seeds_auto},
        confirm={**CONFIRM_DEFAULT, **confirm} if raw["kind"] == "search" else {"top": 0, "seeds": 1},
    )
    resolve(spec, spec.preset)  # every row and every point of the space must build a valid config
    return spec


def resolve(spec: StudySpec, dataset: str | None = None, flags: Sequence[Override] = ()) -> Resolved:
    """Build the base config and every row's config for `dataset` with the invocation's `flags`, and check
    every point of a search space against it. Errors name the study file, or the flag when a flag is the cause."""
    dataset = dataset or spec.preset
    if dataset not in DATASETS:
        raise SpecError(f"--dataset {dataset!r} unknown; allowed: {', '.join(DATASETS)}")
    try:
        return _build(spec, dataset, flags)
    except (ConfigError, SpaceError) as err:
        failure = err
    # built again only to say whose fault it is: the spec alone (for this dataset), else the flags
    try:
        _build(spec, dataset, ())
    except (ConfigError, SpaceError) as own:
        on = f" (with --dataset {dataset})" if dataset != spec.preset else ""
        raise SpecError(f"{spec.path}{on}: {own}") from own
    culprits = blame(flags, lambda some: _build(spec, dataset, some))
    raise SpecError(f"{culprits} (study {spec.path.name}): {failure}") from failure


def _build(spec: StudySpec, dataset: str, flags: Sequence[Override]) -> Resolved:
    extra = as_dict(flags)
    base = preset(dataset, spec.variant, {**spec.base, **extra})
    rows = {v.name: preset(dataset, v.variant or spec.variant, {**spec.base, **v.overrides, **extra})
            for v in spec.variants}
    validate_points(spec.space, lambda point: apply_trial(base, point))
    return Resolved(dataset, base, rows)


def sampled(params: dict[str, Any]) -> dict[str, Any]:
    """A search trial's sampled config values from its Tune params (dotted keys; the others are variant, seed)."""
    return {k: v for k, v in params.items() if "." in k}


def apply_trial(base: VadClipConfig, overrides: dict[str, Any]) -> VadClipConfig:
    """A trial's config: base + its overrides (Tune hands floats for ints; they are rounded here)."""
    fixed = {k: (round(v) if isinstance(v, float) and field_type(k) is int else v) for k, v in overrides.items()}
    return apply_overrides(base, fixed)


__all__ = ["SpecError", "StudySpec", "Variant", "Resolved", "available", "load", "parse", "resolve", "apply_trial",
           "sampled", "seed_groups", "check_fuse_seeds"]
