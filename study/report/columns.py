"""The column names of a report's tables (the DataFrames behind the grids and the CSV), one home.

An ablation table has one row per variant (index `INDEX`), the row's trial counts (`RUNS`, `FAILED`,
`UNFINISHED`, `REUSED`) and per metric the columns `Columns(metric)` names, `<metric>_<field>`: `Columns("ap").
delta_low == "ap_delta_low"`. The per-row results written there (study.report.ablation's `Comparison`,
`Optimism`, `Bootstrap`) are frozen dataclasses whose field names are those of `Columns`: `put` writes them,
`read` reads one back from a table row.
A search table has one row per trial: `RUN_ID`, the searched params, the final test metrics by name,
`validation(metric)`, `EPOCHS` and `Columns(metric).protocol(p)` for the protocols it shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, TypeVar

import pandas as pd

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Row = TypeVar("Row", bound="DataclassInstance")

INDEX = "variant"  # an ablation table's index (and the CSV's first header)
RUNS, FAILED, UNFINISHED, REUSED = "runs", "failed", "unfinished", "reused"  # trials of a row by outcome
RUN_ID = "run_id"  # a search table's (as MLflow's frames name it)
EPOCHS = "epochs"  # a search trial's epochs trained
BEST_EPOCH = "best_epoch"  # read by the search grid but never written: its "best epoch" cells show "-"
TRIAL_INDEX = "trial"  # a search table's index (and its CSV's first header)
CONFIGURATION_INDEX = "configuration"  # a confirmed table's CSV's first header (its rows: the configurations)
VALIDATION_PREFIX = "val_"  # a search table's validation metric of the selected checkpoint


def validation(metric: str) -> str:
    """The search table's column of the selected checkpoint's validation `metric` (`val_ap`)."""
    return f"{VALIDATION_PREFIX}{metric}"


@dataclass(frozen=True)
class Columns:
    """The ablation table's columns of one metric (MLflow name: `ap`, `map_iou0.1`), `<metric>_<field name>`.

    Every metric: mean, std, n and the 95 % t-interval low/high over seeds, the paper's value. The study metric
    also: the paired comparison against the full model (delta … sig, see ablation.Comparison), its value under
    each derived selection protocol (`protocol(name)`), the optimism of best-on-test and the two-level bootstrap
    interval. The equivalence test, verdict, effect size and minimum detectable difference: ablation.Comparison."""

    metric: str
    mean: str = field(init=False)
    std: str = field(init=False)
    n: str = field(init=False)
    low: str = field(init=False)
    high: str = field(init=False)
    paper: str = field(init=False)
    delta: str = field(init=False)
    delta_low: str = field(init=False)
    delta_high: str = field(init=False)
    p: str = field(init=False)
    p_t: str = field(init=False)
    p_wilcoxon: str = field(init=False)
    p_test: str = field(init=False)
    pairs: str = field(init=False)
    p_holm: str = field(init=False)
    sig: str = field(init=False)
    tost_p: str = field(init=False)
    tost_p_holm: str = field(init=False)
    verdict: str = field(init=False)
    g: str = field(init=False)
    g_low: str = field(init=False)
    g_high: str = field(init=False)
    superiority: str = field(init=False)
    superiority_low: str = field(init=False)
    superiority_high: str = field(init=False)
    mdd: str = field(init=False)
    optimism: str = field(init=False)
    optimism_low: str = field(init=False)
    optimism_high: str = field(init=False)
    boot_low: str = field(init=False)
    boot_high: str = field(init=False)

    def __post_init__(self) -> None:
        for f in fields(self)[1:]:
            object.__setattr__(self, f.name, f"{self.metric}_{f.name}")

    def protocol(self, name: str) -> str:
        """The metric under a selection protocol (study.report.protocols), mean over seeds: `ap_last`; no field of
        this class may be a protocol's name (which p is shown is `p_test`, not `test`: best-on-test's)."""
        return f"{self.metric}_{name}"


def put(table: pd.DataFrame, cols: Columns, kind: type[Row], rows: Sequence[Row]) -> None:
    """Write per-row results (instances of the dataclass `kind`, one per table row, whose field names are
    `Columns` fields) as the table's columns of `cols.metric`, in field order."""
    for f in fields(kind):
        table[getattr(cols, f.name)] = [getattr(row, f.name) for row in rows]


def read(row: pd.Series, cols: Columns, kind: type[Row]) -> Row:
    """One row's result (the dataclass `kind`) back from its columns of `cols.metric`, values as the table holds."""
    return kind(**{f.name: row[getattr(cols, f.name)] for f in fields(kind)})
