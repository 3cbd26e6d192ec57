"""Study specs: one YAML per study in search_spaces/, validated on load into a StudySpec."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vadclip.config import ConfigError, apply_overrides, choices, coerce, field_type, preset

SPEC_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
KINDS = ("ablation", "search")
DATASETS = ("synthetic", "ucf", "xd")
METRICS = ("auc", "ap", "ano_auc", "map_avg")
DOMAINS = ("choice", "uniform", "loguniform", "randint", "quniform")
SCHEDULERS = ("asha", "fifo")
TOP_KEYS = {
    "name": str, "kind": str, "description": str, "preset": str, "variant": str, "metric": str,
    "seeds": int, "num_samples": int, "max_epochs": int, "max_concurrent": int, "max_failures": int,
    "resources": dict, "base": dict, "variants": list, "full": str, "space": dict, "scheduler": dict,
    "paper_table": int, "paper_metrics": list,
}
VARIANT_KEYS = {"name": str, "set": dict, "paper": dict}
RESOURCE_KEYS = {"cpu": (int, float), "gpu": (int, float)}
SCHEDULER_KEYS = {"type": str, "grace_period": int, "reduction_factor": int}


class SpecError(ValueError):
    """A study YAML that cannot be run; the message names the file, the key and what is allowed."""


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]
    paper: dict[str, float] = field(default_factory=dict)  # the paper's numbers for this row


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
    max_epochs: int | None = None
    max_concurrent: int = 0  # 0 = as many as resources allow
    max_failures: int = 1  # retries of a failed trial (from its last checkpoint)
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    base: dict[str, Any] = field(default_factory=dict)
    variants: tuple[Variant, ...] = ()
    full: str | None = None  # the ablation row every other row is compared with
    space: dict[str, dict[str, list]] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha"})
    paper_table: int | None = None
    paper_metrics: tuple[str, ...] = ()

    def resolve_metric(self, style: str) -> str:
        return self.metric if self.metric != "auto" else ("auc" if style == "ucf" else "ap")

    def text(self) -> str:
        return self.path.read_text()


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


def _check_domain(key: str, domain: Any, where: str) -> dict[str, list]:
    where = f"{where}: space.{key}"
    try:
        field_type(key)
    except ConfigError as err:
        raise SpecError(f"{where}: {err}") from err
    if not isinstance(domain, dict) or len(domain) != 1:
        raise SpecError(f"{where}: expected one of {{{', '.join(DOMAINS)}}}: [...], got {domain!r}")
    (kind, args), = domain.items()
    if kind not in DOMAINS:
        raise SpecError(f"{where}: unknown domain {kind!r}; allowed: {', '.join(DOMAINS)}")
    if not isinstance(args, list) or not args:
        raise SpecError(f"{where}: {kind} needs a non-empty list, got {args!r}")
    if kind == "choice":
        return {kind: [_check_overrides({key: v}, where)[key] for v in args]}
    if choices(key) is not None:
        raise SpecError(f"{where}: {key} takes one of {list(choices(key))}; use choice, not {kind}")
    need = 3 if kind == "quniform" else 2
    if len(args) != need or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise SpecError(f"{where}: {kind} needs {need} numbers, got {args!r}")
    low, high = args[0], args[1]
    if not low < high:
        raise SpecError(f"{where}: {kind} needs low < high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise SpecError(f"{where}: loguniform needs low > 0 (Optuna cannot express a log range from {low})")
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise SpecError(f"{where}: randint needs integer bounds, got {args!r}")
    for bound in (low, high):  # both ends must be valid values of the field
        _check_overrides({key: int(bound) if kind == "randint" else bound}, where)
    return {kind: list(args)}


def parse(raw: Any, path: Path) -> StudySpec:
    where = str(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a mapping of study keys, got {type(raw).__name__}")
    _check_keys(raw, TOP_KEYS, where)
    for key in ("name", "kind", "description"):
        if key not in raw:
            raise SpecError(f"{where}: missing required key {key!r}")
    if raw["kind"] not in KINDS:
        raise SpecError(f"{where}: kind {raw['kind']!r} unknown; allowed: {', '.join(KINDS)}")
    if raw.get("metric", "auto") not in (*METRICS, "auto"):
        raise SpecError(f"{where}: metric {raw['metric']!r} unknown; allowed: auto, {', '.join(METRICS)}")
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
        bad = [k for k in paper if k not in METRICS]
        if bad:
            raise SpecError(f"{vwhere}: paper metric {bad[0]!r} unknown; allowed: {', '.join(METRICS)}")
        variants.append(Variant(v["name"], _check_overrides(v.get("set", {}), vwhere), paper))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise SpecError(f"{where}: variant names must be unique, got {names}")
    space = {k: _check_domain(k, d, where) for k, d in raw.get("space", {}).items()}
    scheduler = raw.get("scheduler", {"type": "asha"})
    _check_keys(scheduler, SCHEDULER_KEYS, f"{where}: scheduler")
    if scheduler.get("type", "asha") not in SCHEDULERS:
        raise SpecError(f"{where}: scheduler.type {scheduler['type']!r} unknown; allowed: {', '.join(SCHEDULERS)}")
    if raw["kind"] == "ablation":
        if not variants:
            raise SpecError(f"{where}: an ablation needs a non-empty 'variants' list")
        if space:
            raise SpecError(f"{where}: 'space' belongs to kind 'search', not 'ablation'")
        if raw.get("full") is not None and raw["full"] not in names:
            raise SpecError(f"{where}: full {raw['full']!r} is not one of the variants {names}")
    elif not space:
        raise SpecError(f"{where}: a search needs a non-empty 'space'")
    if raw.get("preset", "synthetic") not in DATASETS:
        raise SpecError(f"{where}: preset {raw['preset']!r} unknown; allowed: {', '.join(DATASETS)}")
    for key in ("seeds", "num_samples"):
        if raw.get(key, 1) < 1:
            raise SpecError(f"{where}: {key} must be >= 1, got {raw[key]}")
    bad = [m for m in raw.get("paper_metrics", []) if m not in METRICS]
    if bad:
        raise SpecError(f"{where}: paper_metrics {bad[0]!r} unknown; allowed: {', '.join(METRICS)}")
    spec = StudySpec(
        name=raw["name"], kind=raw["kind"], description=raw["description"], path=path,
        preset=raw.get("preset", "synthetic"), variant=raw.get("variant", "official"),
        metric=raw.get("metric", "auto"), seeds=raw.get("seeds", 3 if raw["kind"] == "ablation" else 1),
        num_samples=raw.get("num_samples", 1), max_epochs=raw.get("max_epochs"),
        max_concurrent=raw.get("max_concurrent", 0), max_failures=raw.get("max_failures", 1),
        resources={"cpu": 1, "gpu": 0, **resources}, base=base, variants=tuple(variants),
        full=raw.get("full", names[-1] if names else None), space=space,
        scheduler={"type": "asha", **scheduler}, paper_table=raw.get("paper_table"),
        paper_metrics=tuple(raw.get("paper_metrics", [])),
    )
    trial_configs(spec, spec.preset)  # every row must build a valid config
    return spec


def trial_configs(spec: StudySpec, dataset: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build (and so validate) the config of each ablation row, or of the search's lower corner."""
    rows = spec.variants or (Variant("search", {k: _corner(d) for k, d in spec.space.items()}),)
    return {row.name: base_config(spec, dataset, {**(extra or {}), **row.overrides}) for row in rows}


def _corner(domain: dict[str, list]) -> Any:
    (kind, args), = domain.items()
    return int(args[0]) if kind == "randint" else args[0]


def base_config(spec: StudySpec, dataset: str, extra: dict[str, Any] | None = None):
    try:
        return preset(dataset, spec.variant, {**spec.base, **(extra or {})})
    except ConfigError as err:
        raise SpecError(f"{spec.path}: {err}") from err


def apply_trial(base, overrides: dict[str, Any]):
    """A trial's config: base + its overrides (Tune hands floats for ints; coerce fixes that)."""
    fixed = {k: (round(v) if isinstance(v, float) and field_type(k) is int else v) for k, v in overrides.items()}
    return apply_overrides(base, fixed)


__all__ = ["SpecError", "StudySpec", "Variant", "available", "load", "parse", "trial_configs", "base_config",
           "apply_trial"]
