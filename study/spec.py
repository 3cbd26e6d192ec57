"""Study specs: one YAML per study in search_spaces/, validated once on load into a StudySpec, then resolved
against one invocation (dataset, flags) into the configs its trials run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, Self, get_args, get_origin, get_type_hints

import yaml

from study.space import Domain, SpaceError, validate_points
from vadclip.cli import Override, as_dict, blame
from vadclip.config import ConfigError, VadClipConfig, apply_overrides, auto_metric, coerce, field_type, preset
from vadclip.errors import VadClipError
from vadclip.metrics import CORE_METRICS, MAP_LEVELS

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

SPEC_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
KINDS = ("ablation", "search")
DATASETS = ("synthetic", "ucf", "xd", "sht", "ubnormal")
SCHEDULERS = ("asha", "fifo")
PAPER_METRICS = (*CORE_METRICS, *MAP_LEVELS)  # what a row may quote from the paper and a table may show
STYLES = ("ucf", "xd", "sht", "ubnormal")  # the datasets a row's paper numbers may be keyed by
PAPER_DATASETS = ("ucf", "xd")  # the paper's own tables: a row's unkeyed `paper:` numbers are for these
VARIANTS = ("official", "paper")  # vadclip.config presets: the authors' code, the paper's text
FUSE_AUTO_MOST = 5  # fuse_seeds auto: at most this many seeds of a row in one trial (on a GPU)
CONFIRM_BASE = "base"  # a search's confirmation stage's reference row (its base configuration), for run and report


class SpecError(VadClipError, ValueError):
    """A study YAML that cannot be run; the message names the file, the key and what is allowed."""


# ---------------------------------------------------------------- the schema: a dataclass field is a YAML key
# StudySpec, Variant and the blocks are read the same way: the YAML's keys are the fields' names, their types the
# fields' types (a tuple written as a list, a block or dict as a mapping), a key left out takes the field's default.
# What a type cannot say (allowed values, a minimum, how to read the value) is the field's _Rule, in its metadata.

_RULE = "study.spec"  # the metadata key of a field's _Rule
_Reader = Callable[[Any, str], Any]  # (the YAML's value, where for errors) -> the field's value


@dataclass(frozen=True)
class _Rule:
    """What a field's type cannot say about its YAML value."""

    choices: tuple[str, ...] = ()  # the allowed values, in the order the error lists them
    least: int | None = None  # the smallest allowed value
    note: str = ""  # said after that bound in its error: what the bound means
    read: _Reader | None = None  # builds the field's value from the YAML's (checked) value
    key: str | None = None  # the YAML key when it is not the field's name; "" = not a YAML key


_NO_RULE = _Rule()


def _rule(*, choices: tuple[str, ...] = (), least: int | None = None, note: str = "", read: _Reader | None = None,
          key: str | None = None) -> dict[str, _Rule]:
    """A field's metadata: `field(default=..., metadata=_rule(...))`."""
    return {_RULE: _Rule(choices, least, note, read, key)}


class _Entry(NamedTuple):
    field: Field[Any]
    yaml: type | tuple[type, ...]  # the type its YAML value must have
    rule: _Rule
    block: type[Block] | None  # the value is a nested block: read by its from_yaml


def _yaml_type(hint: Any) -> type | tuple[type, ...]:
    """The YAML type a field type is written as; `X | None` is X (null is refused: leave the key out instead)."""
    if isinstance(hint, UnionType):  # str | None, int | float
        types = tuple(t for t in get_args(hint) if t is not type(None))
        return _yaml_type(types[0]) if len(types) == 1 else types
    origin = get_origin(hint) or hint
    return list if origin is tuple else dict if issubclass(origin, dict) else origin


@cache
def _schema(cls: type[DataclassInstance]) -> dict[str, _Entry]:
    """The YAML keys of dataclass `cls`, in its field order (the order errors list them and check them)."""
    hints = get_type_hints(cls)
    entries = {}
    for f in fields(cls):
        rule = f.metadata.get(_RULE, _NO_RULE)
        block = hints[f.name] if isinstance(hints[f.name], type) and issubclass(hints[f.name], Block) else None
        if rule.key != "":
            entries[f.name if rule.key is None else rule.key] = _Entry(f, _yaml_type(hints[f.name]), rule, block)
    return entries


def _required(cls: type[DataclassInstance]) -> list[str]:
    """The YAML keys of `cls` without a default."""
    return [k for k, e in _schema(cls).items() if e.field.default is MISSING and e.field.default_factory is MISSING]


def _check_keys(raw: dict[str, Any], cls: type[DataclassInstance], where: str) -> None:
    """Every key of `raw` is a YAML key of `cls`, its value of that key's type (a bool is no number)."""
    allowed = {k: e.yaml for k, e in _schema(cls).items()}
    for key, value in raw.items():
        if key not in allowed:
            raise SpecError(f"{where}: unknown key {key!r}; allowed: {', '.join(allowed)}")
        if not isinstance(value, allowed[key]) or isinstance(value, bool) and allowed[key] is not bool:
            expected = allowed[key]
            names = "/".join(t.__name__ for t in expected) if isinstance(expected, tuple) else expected.__name__
            raise SpecError(f"{where}: key {key!r} must be a {names}, got {value!r}")


def _values(cls: type[DataclassInstance], raw: dict[str, Any], where: str, label: str = "") -> dict[str, Any]:
    """The field values of `cls` that `raw` (keys and types checked) writes, each checked against its rule and
    read, in field order: a file with several errors reports its first field's."""
    values = {}
    for key, (f, _, rule, block) in _schema(cls).items():
        if key not in raw:
            continue
        value = raw[key]
        if rule.choices and value not in rule.choices:
            raise SpecError(f"{where}: {label}{key} {value!r} unknown; allowed: {', '.join(rule.choices)}")
        if rule.least is not None and value < rule.least:
            raise SpecError(f"{where}: {label}{key} must be >= {rule.least}{rule.note}, got {value}")
        if block is not None:
            value = block.from_yaml(value, where, key)
        elif rule.read is not None:
            value = rule.read(value, where)
        values[f.name] = value
    return values


# ---------------------------------------------------------------- readers: a YAML value into a field's value


def _overrides(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Config overrides {dotted key: value}, each checked and coerced by vadclip.config."""
    out = {}
    for key, value in values.items():
        try:
            out[key] = coerce(key, value)
        except ConfigError as err:
            raise SpecError(f"{where}: {err}") from err
    return out


def _base(values: dict[str, Any], where: str) -> dict[str, Any]:
    return _overrides(values, f"{where}: base")


def _paper(paper: dict[str, Any], where: str) -> dict[str, Any]:
    """A row's paper numbers: {metric: value} or {style: {metric: value}}."""
    styled = any(k in STYLES for k in paper)
    for style, numbers in (paper.items() if styled else [("", paper)]):
        if style not in (*STYLES, ""):
            raise SpecError(f"{where}: paper: mix of styles and metrics; use {{metric: value}} or "
                            f"{{ucf: {{...}}, xd: {{...}}}}, got key {style!r}")
        bad = [k for k in numbers if k not in PAPER_METRICS]
        if bad or not isinstance(numbers, dict):
            raise SpecError(f"{where}: paper metric {(bad or [numbers])[0]!r} unknown; allowed: "
                            f"{', '.join(PAPER_METRICS)}")
    return paper


def _check_domain(key: str, raw: Any, where: str) -> Domain:
    try:
        return Domain.parse(key, raw)
    except SpaceError as err:
        raise SpecError(f"{where}: space.{key}: {err}") from err


def _space(raw: dict[str, Any], where: str) -> dict[str, Domain]:
    return {k: _check_domain(k, d, where) for k, d in raw.items()}


def _columns(raw: list[Any], where: str) -> tuple[str, ...]:
    bad = [c for c in raw if c not in PAPER_METRICS]
    if bad:
        raise SpecError(f"{where}: columns: metric {bad[0]!r} unknown; allowed: {', '.join(PAPER_METRICS)}")
    return tuple(raw)


def check_margin(value: Any, where: str) -> float:
    """`equivalence_margin`: points (> 0) of the study metric within which a row counts as equivalent."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise SpecError(f"{where}: equivalence_margin must be a number of points > 0, got {value!r}")


def check_fuse_seeds(value: Any, where: str) -> int | str:
    """`fuse_seeds`: a positive int or auto; SpecError naming `where` otherwise."""
    if value == "auto" or isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str) and value.isdigit() and int(value) >= 1:
        return int(value)
    raise SpecError(f"{where}: fuse_seeds must be auto or an integer >= 1 (1 = no fusing), got {value!r}")


# ---------------------------------------------------------------- nested blocks


@dataclass(frozen=True, eq=False, repr=False)
class Block(dict[str, Any]):
    """A nested mapping of a study YAML (resources, scheduler, ...): a frozen dataclass of its keys that is also the
    read-only dict of them its callers have always read (spec.resources["cpu"]; Tune's with_resources takes only a
    dict; run and report print them), so equality, repr and JSON stay the dict's."""

    def __post_init__(self) -> None:
        dict.update(self, self._shown())

    def _shown(self) -> dict[str, Any]:
        """The dict view: every field, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_yaml(cls, raw: dict[str, Any], where: str, key: str) -> Self:
        """The block written under `key`: its keys, types and fields' rules, then the block's own check."""
        _check_keys(raw, cls, f"{where}: {key}")
        block = cls(**_values(cls, raw, where, f"{key}."))
        problem = block.problem(raw)
        if problem:
            raise SpecError(f"{where}: {problem}")
        return block

    def problem(self, raw: dict[str, Any]) -> str | None:
        """What is wrong across fields, quoting the block as written (`raw`); None when nothing."""
        return None

    def _frozen(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(f"{type(self).__name__} is frozen; use dataclasses.replace")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _frozen

    def __reduce__(self) -> tuple[Any, ...]:
        # copy and pickle rebuild it from its fields (dict's own way refills it through the refused __setitem__)
        return type(self), tuple(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True, eq=False, repr=False)
class Resources(Block):
    """What one trial reserves (Tune's resources per trial)."""

    cpu: int | float = 1
    gpu: int | float = 0

    def problem(self, raw: dict[str, Any]) -> str | None:
        if self.cpu <= 0 or self.gpu < 0:
            return f"resources need cpu > 0 and gpu >= 0, got {raw}"
        return None


@dataclass(frozen=True, eq=False, repr=False)
class Scheduler(Block):
    """A search's trial scheduler; the dict holds type and only the keys the YAML sets (in its order), as the
    report prints them; study.run defaults the rest (grace_period 1, reduction_factor 2)."""

    type: str = field(default="asha", metadata=_rule(choices=SCHEDULERS))
    grace_period: int | None = field(default=None, metadata=_rule(least=1))  # None: not set
    reduction_factor: int | None = field(default=None, metadata=_rule(least=2))  # None: not set
    # the YAML's key order, for the dict view (the report prints k=v in it); not itself a YAML key
    order: tuple[str, ...] = field(default=("grace_period", "reduction_factor"), metadata=_rule(key=""))

    def _shown(self) -> dict[str, Any]:
        later = (k for k in self.order if k != "type" and getattr(self, k) is not None)
        return {"type": self.type, **{k: getattr(self, k) for k in later}}

    @classmethod
    def from_yaml(cls, raw: dict[str, Any], where: str, key: str) -> Self:
        return replace(super().from_yaml(raw, where, key), order=tuple(raw))


@dataclass(frozen=True, eq=False, repr=False)
class Confirm(Block):
    """A search's confirmation stage: its top configs by validation and the base, retrained on fresh seeds."""

    top: int = 3  # 0 = no confirmation stage
    seeds: int = 3

    def problem(self, raw: dict[str, Any]) -> str | None:
        if self.top < 0 or self.seeds < 1:
            return f"confirm needs top >= 0 (0 = no confirmation stage) and seeds >= 1, got {raw}"
        return None


@dataclass(frozen=True, eq=False, repr=False)
class SeedsAuto(Block):
    """--seeds auto: add seeds to an ablation's rows until the CI half-width is `target` points, at most `cap`."""

    target: int | float = 1.0
    cap: int = 10

    def problem(self, raw: dict[str, Any]) -> str | None:
        if self.target <= 0 or self.cap < 2:
            return f"seeds_auto needs target > 0 (points) and cap >= 2, got {raw}"
        return None


# ---------------------------------------------------------------- rows and the study


@dataclass(frozen=True)
class Variant:
    """An ablation row; written {name, set, paper, variant}."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict, metadata=_rule(key="set", read=_overrides))
    # the paper's numbers: {metric: v} or {style: {metric: v}}
    paper: dict[str, Any] = field(default_factory=dict, metadata=_rule(read=_paper))
    # the preset variant of this row (official | paper); None: the study's
    variant: str | None = field(default=None, metadata=_rule(choices=VARIANTS))

    @classmethod
    def from_yaml(cls, raw: Any, where: str) -> Variant:
        """The row written at `where` (variants[i]); SpecError naming it otherwise."""
        if not isinstance(raw, dict):
            raise SpecError(f"{where}: expected a mapping with name/set/paper, got {raw!r}")
        _check_keys(raw, cls, where)
        for key in _required(cls):
            if key not in raw:
                raise SpecError(f"{where}: missing required key {key!r}")
        return cls(**_values(cls, raw, where))

    def paper_values(self, style: str) -> dict[str, float]:
        """The paper's numbers for this row on `style` data: those keyed by it, else unkeyed ones, which are the
        paper's own datasets' (ucf | xd; the paper reports no ablation on sht or ubnormal)."""
        if any(k in STYLES for k in self.paper):
            return dict(self.paper.get(style, {}))
        return dict(self.paper) if style in PAPER_DATASETS else {}


def _variants(raw: list[Any], where: str) -> tuple[Variant, ...]:
    variants = tuple(Variant.from_yaml(v, f"{where}: variants[{i}]") for i, v in enumerate(raw))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise SpecError(f"{where}: variant names must be unique, got {names}")
    return variants


@dataclass(frozen=True)
class StudySpec:
    """A study YAML, checked (see parse): every field but `path` is the top-level key of its name. The field order
    is the order an unknown key's error lists the keys and the order they are checked in; seeds, full and confirm
    also depend on kind (_by_kind)."""

    name: str  # the file's name; a `name` key must equal it
    kind: str = field(metadata=_rule(choices=KINDS))
    description: str
    path: Path = field(metadata=_rule(key=""))
    preset: str = field(default="synthetic", metadata=_rule(choices=DATASETS))
    variant: str = field(default="official", metadata=_rule(choices=VARIANTS))
    # auto: AUC for UCF-style data, AP for XD-style
    metric: str = field(default="auto", metadata=_rule(choices=("auto", *CORE_METRICS)))
    seeds: int = field(default=3, metadata=_rule(least=1))  # a search's: 1
    num_samples: int = field(default=1, metadata=_rule(least=1))
    max_concurrent: int = field(default=0, metadata=_rule(least=0, note=" (0 = as many as resources allow)"))
    # retries of a failed trial (from its last checkpoint)
    max_failures: int = field(default=1, metadata=_rule(least=0))
    resources: Resources = field(default_factory=Resources)
    base: dict[str, Any] = field(default_factory=dict, metadata=_rule(read=_base))
    variants: tuple[Variant, ...] = field(default=(), metadata=_rule(read=_variants))
    full: str | None = None  # the ablation row every other row is compared with (an ablation's: its last row)
    space: dict[str, Domain] = field(default_factory=dict, metadata=_rule(read=_space))
    scheduler: Scheduler = field(default_factory=Scheduler)
    paper_table: int | None = None
    confirm: Confirm = field(default_factory=Confirm)  # search only (an ablation's: top 0, none)
    # the metrics an ablation table shows, in order
    columns: tuple[str, ...] = field(default=CORE_METRICS, metadata=_rule(read=_columns))
    seeds_auto: SeedsAuto = field(default_factory=SeedsAuto)
    reuse_workers: bool = True  # trials run one after another in the same Ray worker processes (Tune's reuse_actors)
    # seeds of one row trained together in one trial (vadclip.fused); auto: up to FUSE_AUTO_MOST when a trial has a
    # GPU, else 1 (on a CPU the fused step costs what the seeds cost apart: docs/speed.md)
    fuse_seeds: int | str = field(default="auto", metadata=_rule(read=check_fuse_seeds))
    # a row within ± this many points of the reference (paired TOST) is "equivalent" (study.report.stats.verdict)
    equivalence_margin: int | float = field(default=1.0, metadata=_rule(read=check_margin))

    def resolve_metric(self, style: str) -> str:
        return self.metric if self.metric != "auto" else auto_metric(style)

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


def parse(raw: Any, path: Path) -> StudySpec:
    """A study YAML's mapping as a StudySpec, the way a config dict maps onto its dataclass: each key is the field
    of its name, checked against the field's type and rule; then every row and every point of the space is built
    once. SpecError naming `path` and the key otherwise."""
    where = str(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a mapping of study keys, got {type(raw).__name__}")
    _check_keys(raw, StudySpec, where)
    for key in _required(StudySpec):
        if key not in raw and key != "name":  # the name comes from the file
            raise SpecError(f"{where}: missing required key {key!r}")
    # the file's name is the study's name: experiment, resume state and reports are keyed by it
    if raw.get("name", path.stem) != path.stem:
        raise SpecError(f"{where}: name {raw['name']!r} differs from the file's name {path.stem!r}; the study "
                        f"name is the file name (rename the file or drop the 'name' key)")
    values = _by_kind(raw, _values(StudySpec, raw, where), where)
    spec = StudySpec(**{**values, "name": path.stem, "path": path})
    resolve(spec, spec.preset)  # every row and every point of the space must build a valid config
    return spec


def _by_kind(raw: dict[str, Any], values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` with the defaults that depend on kind, after the checks that do: an ablation compares its variants
    with `full` (by default its last), a search samples its space (and confirms its best, see Confirm)."""
    if raw["kind"] == "search":
        if not raw.get("space"):
            raise SpecError(f"{where}: a search needs a non-empty 'space'")
        for key in ("variants", "full"):
            if key in raw:
                raise SpecError(f"{where}: {key!r} belongs to kind 'ablation', not 'search'")
        return {"seeds": 1, **values}  # every sampled config trains once
    names = [v.name for v in values.get("variants", ())]
    if not names:
        raise SpecError(f"{where}: an ablation needs a non-empty 'variants' list")
    if raw.get("space"):
        raise SpecError(f"{where}: 'space' belongs to kind 'search', not 'ablation'")
    if raw.get("full", names[-1]) not in names:
        raise SpecError(f"{where}: full {raw['full']!r} is not one of the variants {names}")
    if raw.get("confirm"):
        raise SpecError(f"{where}: 'confirm' belongs to kind 'search' (its confirmation stage), not 'ablation'")
    return {"full": names[-1], **values, "confirm": Confirm(top=0, seeds=1)}  # no confirmation stage


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


__all__ = ["SpecError", "StudySpec", "Variant", "Block", "Resources", "Scheduler", "Confirm", "SeedsAuto", "Resolved",
           "available", "load", "parse", "resolve", "apply_trial", "sampled", "seed_groups", "check_fuse_seeds"]
