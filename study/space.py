"""The search-space grammar, in one place: `{choice: [...]}`, `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`,
`{randint: [lo, hi]}` (hi excluded, as in Tune) and `{quniform: [lo, hi, q]}` over one dotted config key.

A `Domain` is parsed and checked once, from the study YAML; it then knows every form the value takes on its
way: the Tune domain the driver samples from, Optuna's twin distribution, the values to validate before any
trial starts, an MLflow param string read back, and the x axis of a plot.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from vadclip.config import ConfigError, choices, coerce, field_type
from vadclip.errors import VadClipError

Kind = Literal["choice", "uniform", "loguniform", "randint", "quniform"]
KINDS: tuple[str, ...] = get_args(Kind)
ENUMERATE_AT_MOST = 1024  # an integer range up to this size is checked value by value, else at its corners


class SpaceError(VadClipError, ValueError):
    """A domain that cannot be searched; `str()` is the reason without the file (the spec adds it)."""


@dataclass(frozen=True)
class Domain:
    key: str  # dotted config key, e.g. model.window
    kind: Kind
    args: tuple[Any, ...]  # choice: the values (coerced to the field's type); ranges: low, high[, q]

    # ---------------------------------------------------------------- parsing

    @classmethod
    def parse(cls, key: str, raw: Any) -> Domain:
        """From the YAML form `{kind: [args]}`; SpaceError naming the key and what is allowed."""
        try:
            field_type(key)
        except ConfigError as err:
            raise SpaceError(str(err)) from err
        if not isinstance(raw, dict) or len(raw) != 1:
            raise SpaceError(f"expected one of {{{', '.join(KINDS)}}}: [...], got {raw!r}")
        ((kind, args),) = raw.items()
        if kind not in KINDS:
            raise SpaceError(f"unknown domain {kind!r}; allowed: {', '.join(KINDS)}")
        if not isinstance(args, list) or not args:
            raise SpaceError(f"{kind} needs a non-empty list, got {args!r}")
        if kind == "choice":
            return cls(key, kind, tuple(_coerce(key, v) for v in args))
        allowed = choices(key)
        if allowed is not None:
            raise SpaceError(f"{key} takes one of {list(allowed)}; use choice, not {kind}")
        need = 3 if kind == "quniform" else 2
        if len(args) != need or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise SpaceError(f"{kind} needs {need} numbers, got {args!r}")
        low, high = args[0], args[1]
        if not low < high:
            raise SpaceError(f"{kind} needs low < high, got {args!r}")
        if kind == "loguniform" and low <= 0:
            raise SpaceError(f"loguniform needs low > 0 (Optuna cannot express a log range from {low})")
        if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
            raise SpaceError(f"randint needs integer bounds, got {args!r}")
        if kind == "quniform" and not args[2] > 0:
            raise SpaceError(f"quniform needs a step q > 0, got {args[2]!r}")
        domain = cls(key, kind, tuple(int(a) if kind == "randint" else a for a in args))
        for value in domain.corners():  # both ends must be values of the field
            _coerce(key, value)
        return domain

    # ---------------------------------------------------------------- the values it can produce

    def corners(self) -> list[Any]:
        """The extreme values a trial can receive (as sampled; `spec.apply_trial` rounds floats for int keys)."""
        if self.kind == "choice":
            return list(self.args)
        low, high = self.args[0], self.args[1]
        if self.kind == "randint":
            return [low, high - 1]
        if self.kind == "quniform":  # Optuna's step grid: low + k*q up to high
            return [low, low + math.floor((high - low) / self.args[2] + 1e-9) * self.args[2]]
        return [low, high]

    def points(self) -> list[Any]:
        """Every value a trial can receive where that is a small set (choices, short integer ranges, short
        quniform grids), else the corners: `validate_points` builds a config for each before anything starts."""
        if self.kind == "choice":
            return list(self.args)
        low, high = self.corners()
        if field_type(self.key) is int and round(high) - round(low) < ENUMERATE_AT_MOST:
            return list(range(round(low), round(high) + 1))
        if self.kind == "quniform" and (high - low) / self.args[2] < ENUMERATE_AT_MOST:
            return [low + i * self.args[2] for i in range(round((high - low) / self.args[2]) + 1)]
        return [low, high]

    # ---------------------------------------------------------------- its forms

    def tune(self) -> Any:
        """The Ray Tune domain (the driver samples from it through Optuna)."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "randint":
            return tune.randint(*self.args)
        return getattr(tune, self.kind)(*self.args)

    def optuna(self) -> Any:
        """Optuna's twin distribution: Tune's randint excludes its upper bound, Optuna's IntDistribution includes it."""
        import optuna

        if self.kind == "choice":
            return optuna.distributions.CategoricalDistribution(self.args)
        low, high = self.args[0], self.args[1]
        if self.kind == "randint":
            return optuna.distributions.IntDistribution(int(low), int(high) - 1)
        if self.kind == "quniform":
            return optuna.distributions.FloatDistribution(float(low), float(high), step=float(self.args[2]))
        return optuna.distributions.FloatDistribution(float(low), float(high), log=self.kind == "loguniform")

    def value(self, raw: Any) -> Any:
        """An MLflow param string back to the domain's type (choice values by their str, as MLflow stored them);
        ValueError when it is none of the domain's values."""
        if self.kind == "choice":
            for choice in self.args:
                if str(choice) == str(raw):
                    return choice
            for choice in self.args:  # `16` logged as `16.0` by a float-typed path
                if isinstance(choice, (int, float)) and not isinstance(choice, bool) and _float_eq(raw, choice):
                    return choice
            raise ValueError(f"{raw!r} is not one of {list(self.args)}")
        value = float(raw)
        return int(round(value)) if self.kind == "randint" else value

    def axis(self, ax: Any, values: Iterable[Any]) -> np.ndarray:
        """x positions of logged values on a matplotlib axis that spans the searched domain."""
        from matplotlib.ticker import NullFormatter

        if self.kind == "choice":  # categorical: one x position per choice, in the spec's order
            position = {str(c): i for i, c in enumerate(self.args)}
            ax.set_xticks(range(len(self.args)), [str(c) for c in self.args], fontsize=8)
            ax.set_xlim(-0.5, len(self.args) - 0.5)
            return np.array([position.get(str(v), math.nan) for v in values], dtype=float)
        low, high = float(self.args[0]), float(self.args[1])
        if self.kind == "loguniform":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short log ranges
            ax.set_xlim(low / 1.2, high * 1.2)
        else:
            pad = 0.05 * (high - low)
            ax.set_xlim(low - pad, high + pad)
        return np.array([_to_float(v) for v in values], dtype=float)

    def describe(self) -> str:
        return f"{self.kind} {list(self.args)}"


def validate_points(space: dict[str, Domain], build: Callable[[dict[str, Any]], Any],
                    cap: int = 4096) -> None:
    """Build a config for every point the space can produce (the product of each domain's `points`, or, when
    that is larger than `cap`, each domain's points with the others at their first point). `build` raises
    ConfigError for a bad combination; re-raised as SpaceError naming the key(s) and the value(s)."""
    keys = list(space)
    values = [space[k].points() for k in keys]
    if math.prod(len(v) for v in values) <= cap:
        combos: Iterable[tuple[Any, ...]] = itertools.product(*values)
    else:
        first = [v[0] for v in values]
        combos = (tuple(first[:i]) + (x,) + tuple(first[i + 1:]) for i, v in enumerate(values) for x in v)
    for combo in combos:
        point = dict(zip(keys, combo))
        try:
            build(point)
        except ConfigError as err:
            shown = ", ".join(f"space.{k}={v!r}" for k, v in point.items()) if len(point) > 1 else \
                f"space.{keys[0]}: value {combo[0]!r}"
            raise SpaceError(f"{shown} is not a valid config: {err}") from err


def _coerce(key: str, value: Any) -> Any:
    try:
        return coerce(key, value)
    except ConfigError as err:
        raise SpaceError(str(err)) from err


def _float_eq(raw: Any, value: float) -> bool:
    try:
        return math.isclose(float(raw), float(value))
    except (TypeError, ValueError):
        return False


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
