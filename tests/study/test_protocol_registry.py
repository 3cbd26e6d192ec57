"""The selection-protocol registry (study.report.protocols.REGISTRY) on hand-built frames: the shipped protocols
give the table columns and headers the reports always had, and one more protocol registered flows through the
protocol frame, the ablation table, its grids and notes and the search grid without anything else changed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from study.report import protocols
from study.report.ablation import ablation_table, protocol_grid, protocols_note
from study.report.columns import Columns
from study.report.search import search_grid, search_notes
from study.spec import parse

SPEC = parse({"name": "ablation_p", "kind": "ablation", "description": "x", "metric": "ap", "seeds": 3,
              "full": "Full", "variants": [{"name": "Base"}, {"name": "Full"}]}, Path("ablation_p.yaml"))
SEARCH = parse({"name": "search_p", "kind": "search", "description": "x", "metric": "ap", "num_samples": 2,
                "space": {"model.window": {"choice": [4, 8]}}}, Path("search_p.yaml"))
# variant -> per seed the (val/ap, test/ap) of three evaluations, steps 10, 20, 30
HISTORIES = {
    "Base": {0: [(0.5, 0.60), (0.7, 0.65), (0.6, 0.70)], 1: [(0.4, 0.55), (0.6, 0.75), (0.8, 0.62)],
             2: [(0.9, 0.50), (0.7, 0.80), (0.6, 0.66)]},
    "Full": {0: [(0.6, 0.70), (0.8, 0.85), (0.7, 0.80)], 1: [(0.5, 0.72), (0.9, 0.84), (0.6, 0.90)],
             2: [(0.7, 0.68), (0.8, 0.88), (0.9, 0.86)]},
}
FIRST = protocols.Protocol("first", "first", "the first-evaluation protocol (test metrics at the first evaluation)",
                           lambda evals, sel: protocols.tests_at(evals, evals.index[0]), "at the first evaluation",
                           "at its first evaluation")


def _evals(history: list[tuple[float, float]]) -> pd.DataFrame:
    return pd.DataFrame({"val/ap": [v for v, _ in history], "test/ap": [t for _, t in history]}, index=[10, 20, 30])


def _runs() -> pd.DataFrame:
    return pd.DataFrame([{"run_id": f"{v}-{s}", "status": "FINISHED", "tags.variant": v, "tags.seed": str(s),
                          "metrics.final/ap": max(h)[1], "metrics.final/auc": 0.9}
                         for v, seeds in HISTORIES.items() for s, h in seeds.items()])


def _protocol_frame() -> pd.DataFrame:
    """What protocols.protocol_frame reads from MLflow, from the synthetic histories."""
    rows = {f"{v}-{s}": protocols.protocol_row(_evals(h), "ap", ["ap"])
            for v, seeds in HISTORIES.items() for s, h in seeds.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def _mean(variant: str, pick: int) -> float:
    return float(np.mean([h[pick][1] for h in HISTORIES[variant].values()]))


@pytest.fixture()
def with_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocols, "REGISTRY", (*protocols.REGISTRY, FIRST))


def test_the_shipped_registry_keeps_the_reports_columns_and_headers() -> None:
    assert protocols.names() == ("selection", "val", "test", "last")
    table = ablation_table(SPEC, _runs(), "ap", protocols=_protocol_frame(),
                           replicates={r: np.full(5, 0.7) for r in _runs()["run_id"]})
    metric = [f"ap_{s}" for s in ("delta", "delta_low", "delta_high", "p", "p_t", "p_wilcoxon", "p_test", "pairs",
                                  "p_holm", "sig", "tost_p", "tost_p_holm", "verdict", "g", "g_low", "g_high",
                                  "superiority", "superiority_low", "superiority_high", "mdd", "val", "test", "last",
                                  "optimism", "optimism_low", "optimism_high", "boot_low", "boot_high")]
    assert list(table.columns) == [f"{m}_{s}" for m in ("auc", "ap") for s in ("mean", "std", "n", "low", "high")] \
        + ["runs", "failed", "unfinished", "reused", *metric]
    # which p is shown (p_test) and best-on-test (protocol "test") are two columns; no field is a protocol's name
    from dataclasses import fields
    assert not {f.name for f in fields(Columns)} & set(protocols.names())
    best_on_test = [max(t for _, t in h) for h in HISTORIES["Base"].values()]
    assert table.loc["Base", "ap_test"] == pytest.approx(np.mean(best_on_test))
    assert table.index.name == "variant"
    grid = protocol_grid(table, "ap")
    assert grid is not None and grid.headers == ["Variant", "AP best-on-val", "AP best-on-test", "AP last",
                                                 "optimism (test − val) [95% CI]"]
    assert table.loc["Base", "ap_last"] == pytest.approx(_mean("Base", -1))
    assert protocols_note("ap").startswith(
        "Selection protocols (AP, test metric): best-on-val = at the evaluation with the best validation score, "
        "best-on-test = at the best test evaluation (what the authors' code prints), last = at the last "
        "evaluation, all derived from each run's logged histories; optimism = best-on-test − best-on-val")


def test_derive_of_an_empty_history_is_undefined_for_every_protocol() -> None:
    empty = pd.DataFrame({"test/ap": pd.Series([], dtype=float)})
    assert {p: math.isnan(v["ap"]) for p, v in protocols.derive(empty, "ap").items()} == \
        {"val": True, "test": True, "last": True}


def test_a_registered_protocol_flows_through_the_tables(with_first: None) -> None:
    assert protocols.names()[-1] == "first" and protocols.get("first") is FIRST
    frame = _protocol_frame()
    assert frame.loc["Base-1", "first/ap"] == 0.55 and frame.loc["Base-1", "last/ap"] == 0.62
    table = ablation_table(SPEC, _runs(), "ap", protocols=frame)
    cols = Columns("ap")
    assert list(table.columns[-4:]) == [cols.protocol("first"), cols.optimism, cols.optimism_low,
                                        cols.optimism_high]
    assert table.loc["Base", cols.protocol("first")] == pytest.approx(_mean("Base", 0))
    grid = protocol_grid(table, "ap")
    assert grid is not None and grid.headers[1:5] == ["AP best-on-val", "AP best-on-test", "AP last", "AP first"]
    assert grid.rows[0][4] == f"{_mean('Base', 0) * 100:.2f}"
    assert "last = at the last evaluation, first = at the first evaluation, all derived" in protocols_note("ap")
    # the table's values under the new protocol
    under = ablation_table(SPEC, _runs(), "ap", "first", frame)
    assert under.loc["Full", cols.mean] == pytest.approx(_mean("Full", 0))
    assert under.loc["Base", cols.delta] == pytest.approx(_mean("Base", 0) - _mean("Full", 0))


def test_a_registered_protocol_shows_in_the_search_grid_and_note(with_first: None) -> None:
    table = pd.DataFrame({"run_id": ["r0"], "model.window": [4], "ap": [0.8], "ap_test": [0.9], "ap_last": [0.7],
                          "ap_first": [0.6], "epochs": [3.0]}, index=pd.Index(["t0"], name="trial"))
    grid = search_grid(table, ["model.window"], "ap", "ap")
    assert grid.headers[2:6] == ["AP (test), ranked", "AP best-on-test", "AP last", "AP first"]
    assert grid.rows[0][2:6] == ["80.00", "90.00", "70.00", "60.00"]


def test_the_search_note_lists_the_protocols_it_shows(with_first: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from study.report import search

    monkeypatch.setattr(search, "protocol_notes", lambda ctx: {})
    monkeypatch.setattr(search, "provenance", lambda ctx: "provenance.")
    ctx = type("Ctx", (), {"children": pd.DataFrame({"status": ["FINISHED"]}), "spec": SEARCH, "metric": "ap",
                           "parent": pd.Series({"run_id": "p"})})()
    notes = search_notes(ctx, {"FINISHED": 1, "early-stopped": 0}, None, "ap", None)  # type: ignore[arg-type]
    assert list(notes) == ["trials", "ranking", "space", "provenance"]
    assert ("and the test AP at the trial's best test evaluation (best-on-test, what the authors' code prints; for "
            "information only: choosing by it is optimistic), at its last evaluation and at its first evaluation, "
            "all from the logged histories; one seed per trial") in notes["ranking"]
