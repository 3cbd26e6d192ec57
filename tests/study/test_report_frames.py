"""The report's parts on hand-built DataFrames shaped like MLflow's rows: no tracking store."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from study.report import summary
from study.report.ablation import ablation_grid, ablation_table, aggregate, run_values, variant_order
from study.report.context import final_metrics
from study.report.render import Grid, mean_std, num, pvalue, signed, tex_escape, tex_label, to_latex, to_markdown
from study.report.search import TOP_K, rank_column, search_grid, search_table, status_counts
from study.spec import parse

_ABLATION_RAW = {
    "name": "ablation_f", "kind": "ablation", "description": "x", "metric": "ap", "seeds": 3, "full": "Full",
    "variants": [{"name": "Base", "paper": {"ap": 70.0}}, {"name": "Full", "paper": {"ap": 80.0}}],
}
ABLATION = parse(_ABLATION_RAW, Path("ablation_f.yaml"))
SEARCH = parse({
    "name": "search_f", "kind": "search", "description": "x", "metric": "ap", "num_samples": 4,
    "space": {"model.window": {"choice": [4, 8, 16]}, "loss.cts_weight": {"loguniform": [1.0e-5, 1.0]}},
}, Path("search_f.yaml"))
# seed -> (auc, ap); Base's seeds out of order, Full has a seed (3) Base lacks
BASE = {2: (0.92, 0.71), 0: (0.90, 0.70), 1: (0.91, 0.75)}
FULL = {0: (0.88, 0.84), 1: (0.89, 0.85), 2: (0.87, 0.88), 3: (0.86, 0.90)}


def _row(variant: str, seed: int, status: str = "FINISHED", **metrics: float) -> dict[str, object]:
    row: dict[str, object] = {"run_id": f"{variant}-{seed}", "status": status, "tags.variant": variant,
                              "tags.seed": str(seed)}  # MLflow tags are strings
    row.update({f"metrics.final/{k.replace('__', '/')}": v for k, v in metrics.items()})
    return row


def _ablation_runs() -> pd.DataFrame:
    rows = [_row("Base", s, auc=auc, ap=ap) for s, (auc, ap) in BASE.items()]
    rows += [_row("Full", s, auc=auc, ap=ap) for s, (auc, ap) in FULL.items()]
    rows += [_row("Base", 4, "FAILED"), _row("Full", 5, "RUNNING"), _row("Old", 0, auc=0.5, ap=0.5)]
    return pd.DataFrame(rows)


def _finished(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "FINISHED"]


# ---------------------------------------------------------------- ablation statistics


def test_aggregate_is_mean_sample_std_count_and_t_interval_per_variant() -> None:
    values = run_values(_finished(_ablation_runs()), ["auc", "ap"])
    table = aggregate(values, ["Base", "Full", "Missing"], ["auc", "ap"])
    for variant, seeds in (("Base", BASE), ("Full", FULL)):
        ap = np.array([v[1] for v in seeds.values()])
        assert table.loc[variant, "ap_mean"] == pytest.approx(ap.mean())
        assert table.loc[variant, "ap_std"] == pytest.approx(ap.std(ddof=1))
        assert table.loc[variant, "ap_n"] == len(ap)
        low, high = stats.t.interval(0.95, len(ap) - 1, loc=ap.mean(), scale=stats.sem(ap))
        assert table.loc[variant, "ap_low"] == pytest.approx(low)
        assert table.loc[variant, "ap_high"] == pytest.approx(high)
    assert table.loc["Missing", "ap_n"] == 0 and math.isnan(table.loc["Missing", "ap_mean"])
    assert list(table.columns) == [f"{m}_{s}" for m in ("auc", "ap") for s in ("mean", "std", "n", "low", "high")]


def test_paired_comparison_over_matched_seeds_with_holm_across_rows() -> None:
    runs = _ablation_runs()
    runs = pd.concat([runs, pd.DataFrame([_row("Third", s, ap=FULL[s][1] - 0.01 * (s + 1)) for s in range(4)])])
    spec = parse({**_ABLATION_RAW, "variants": [*_ABLATION_RAW["variants"], {"name": "Third"}]},
                 Path("ablation_f.yaml"))
    table = ablation_table(spec, runs, "ap")
    seeds = [0, 1, 2]  # Full's seed 3 has no partner in Base
    base, full = [BASE[s][1] for s in seeds], [FULL[s][1] for s in seeds]
    assert table.loc["Base", "ap_p"] == pytest.approx(stats.ttest_rel(base, full).pvalue)
    assert table.loc["Base", "ap_delta"] == pytest.approx(np.mean(base) - np.mean(full))
    assert table.loc["Base", "ap_pairs"] == 3 and table.loc["Third", "ap_pairs"] == 4
    raw = [table.loc[v, "ap_p"] for v in ("Base", "Third")]
    assert [table.loc[v, "ap_p_holm"] for v in ("Base", "Third")] == pytest.approx(
        list(multipletests(raw, method="holm")[1]))
    assert math.isnan(table.loc["Full", "ap_p_holm"]) and table.loc["Full", "ap_sig"] == ""
    assert table.loc["Base", "ap_sig"] == ("n.s." if table.loc["Base", "ap_p_holm"] >= 0.05 else "*")


def test_identical_rows_give_zero_difference() -> None:
    same = pd.DataFrame([_row(v, s, ap=0.5 + 0.1 * s) for v in ("Base", "Full") for s in range(3)])
    table = ablation_table(ABLATION, same, "ap")
    assert table.loc["Base", "ap_delta"] == 0.0 and table.loc["Base", "ap_p"] == 1.0
    assert table.loc["Base", "ap_sig"] == "n.s."


def test_ablation_table_rows_counts_paper_and_test() -> None:
    runs = _ablation_runs()
    table = ablation_table(ABLATION, runs, "ap")
    assert list(table.index) == ["Base", "Full", "Old"] == variant_order(ABLATION, runs)  # logged-only row last
    assert table["runs"].tolist() == [3, 4, 1]
    assert table["failed"].tolist() == [1, 0, 0] and table["unfinished"].tolist() == [0, 1, 0]
    assert table.loc["Base", "ap_paper"] == 70.0 and math.isnan(table.loc["Old", "ap_paper"])
    assert "auc_paper" not in table
    base, full = [BASE[s][1] for s in range(3)], [FULL[s][1] for s in range(3)]
    assert table.loc["Base", "ap_p"] == pytest.approx(stats.ttest_rel(base, full).pvalue)
    assert table.loc["Base", "ap_pairs"] == 3 and math.isnan(table.loc["Full", "ap_p"])
    assert table.loc["Full", "ap_mean"] == pytest.approx(np.mean([v[1] for v in FULL.values()]))


def test_ablation_grid_percent_bold_and_reference() -> None:
    table = ablation_table(ABLATION, _ablation_runs(), "ap")
    grid = ablation_grid(table, "ap", "Full")
    assert grid.headers[:5] == ["Variant", "n", "AUC", "AP", "AP (paper)"]
    base, full = grid.rows[0], grid.rows[1]
    column = grid.headers.index("ΔAP vs full [95% CI]")
    assert full[0] == "Full (full)" and full[column] == "ref."
    assert base[column].startswith(signed(table.loc["Base", "ap_delta"] * 100) + " [")
    assert base[grid.headers.index("AP")] == mean_std(table.loc["Base"], "ap", interval_of_mean=True)
    assert base[grid.headers.index("p (Holm)")].endswith(table.loc["Base", "ap_sig"])
    assert (0, grid.headers.index("AUC")) in grid.bold and (1, grid.headers.index("AP")) in grid.bold
    assert base[grid.headers.index("failed")] == "1"


def test_summary_of_an_ablation_table_is_the_means() -> None:
    table = ablation_table(ABLATION, _ablation_runs(), "ap")
    result = summary(ABLATION, table)
    assert result["Base"] == {"auc": pytest.approx(0.91), "ap": pytest.approx(0.72)}


# ---------------------------------------------------------------- search ranking


def _search_runs(selection: str = "val") -> tuple[pd.Series, pd.DataFrame]:
    # (window, cts_weight, test ap, validation ap): the best on test is the worst on validation
    trials = [(4, 1e-4, 0.90, 0.60), (8, 1e-2, 0.70, 0.95), (16, 0.5, 0.80, 0.75), (8, 3e-5, 0.85, math.nan)]
    rows = [{**_row("search", i, ap=ap, auc=0.9, val__ap=val), "tags.trial_id": f"t{i}" if i else None,
             "params.model.window": str(w), "params.loss.cts_weight": str(c), "metrics.epoch": 4.0}
            for i, (w, c, ap, val) in enumerate(trials)]
    return pd.Series({"run_id": "parent", "tags.selection": selection}), pd.DataFrame(rows)


def test_search_ranks_by_val_ap_when_the_parent_selected_on_val() -> None:
    parent, runs = _search_runs("val")
    rank = rank_column(parent, runs, "ap")
    assert rank == "val_ap"
    table = search_table(SEARCH.space, runs, "ap", rank)
    assert table["model.window"].tolist() == [8, 16, 4]  # typed; the trial without a validation AP is dropped
    assert table["val_ap"].tolist() == [0.95, 0.75, 0.60] and table["ap"].tolist() == [0.70, 0.80, 0.90]
    assert list(table.index) == ["t1", "t2", "search-0"]  # trial_id, else the run id
    grid = search_grid(table, list(SEARCH.space), "ap", rank)
    assert grid.headers[3:5] == ["AP (val, ranked)", "AP (test)"] and grid.rows[0][3] == "95.00"
    assert summary(SEARCH, table)["best"]["val_ap"] == 0.95


def test_search_ranks_by_test_ap_otherwise() -> None:
    parent, runs = _search_runs("test")
    assert rank_column(parent, runs, "ap") == "ap"
    table = search_table(SEARCH.space, runs, "ap", "ap")
    assert table["ap"].tolist() == [0.90, 0.85, 0.80, 0.70]
    assert search_grid(table, list(SEARCH.space), "ap", "ap").headers[3] == "AP (test), ranked"
    parent, runs = _search_runs("val")
    assert rank_column(parent, runs.drop(columns="metrics.final/val/ap"), "ap") == "ap"
    assert rank_column(parent.drop("tags.selection"), runs, "ap") == "val_ap"  # val is the default


def test_search_grid_shows_the_top_k() -> None:
    parent, runs = _search_runs("test")
    many = pd.concat([runs] * 3, ignore_index=True)
    assert len(search_grid(search_table(SEARCH.space, many, "ap", "ap"), list(SEARCH.space), "ap", "ap").rows) \
        == TOP_K


def test_status_counts_on_frames() -> None:
    runs = pd.DataFrame({"status": ["FINISHED", "FINISHED", "KILLED", "FAILED", "RUNNING"],
                         "metrics.epoch": [4.0, 2.0, 4.0, 1.0, 1.0],
                         "tags.stopped_early": [None, None, "True", None, None]})
    assert status_counts(runs) == {"FINISHED": 2, "KILLED": 1, "FAILED": 1, "RUNNING": 1, "early-stopped": 2}


def test_final_metrics_order() -> None:
    runs = pd.DataFrame(columns=["metrics.final/zeta", "metrics.final/map_iou0.5", "metrics.final/ap",
                                 "metrics.final/auc", "metrics.final/map_iou0.1", "metrics.final/val/ap"])
    assert final_metrics(runs) == ["auc", "ap", "map_iou0.1", "map_iou0.5", "zeta"]


# ---------------------------------------------------------------- rendering


def test_numbers() -> None:
    assert num(0.123456) == "0.12" and num(3.0, 0) == "3" and num(math.nan) == "-" and num(None) == "-"
    assert pvalue(0.0123) == "0.012" and pvalue(1.5e-5) == "1.5e-05" and pvalue(math.nan) == "-"
    assert signed(1.234) == "+1.23" and signed(-0.5) == "-0.50" and signed(math.nan) == "-"
    row = pd.Series({"ap_mean": 0.85, "ap_std": 0.01, "ap_n": 3, "runs": 3})
    assert mean_std(row, "ap") == "85.00 ± 1.00"
    assert mean_std(pd.Series({**row, "ap_n": 1}), "ap") == "85.00 (n=1)"
    assert mean_std(pd.Series({**row, "ap_mean": math.nan}), "ap") == "-"


def test_markdown_and_latex_escape() -> None:
    grid = Grid(["Variant", "a_b"], [["x|y", "50%"], ["z", "-"]], bold={(0, 1), (1, 1)})
    md = to_markdown(grid)
    assert r"x\|y" in md and "**50%**" in md and "**-**" not in md
    tex = to_latex(grid, "cap & more", tex_label("my_study"), ["note ±"])
    assert r"\textbf{50\%}" in tex and r"a\_b" in tex and r"\caption{cap \& more}" in tex
    assert r"\label{tab:my-study}" in tex and r"note $\pm$" in tex
    assert tex_escape("Δ~^") == r"$\Delta$\textasciitilde{}\textasciicircum{}"


def test_two_level_bootstrap_interval_does_not_depend_on_the_order_runs_are_read() -> None:
    runs = _ablation_runs()
    rng = np.random.default_rng(0)
    replicates = {r: rng.normal(0.8, 0.02, 200) for r in runs["run_id"]}
    one = ablation_table(ABLATION, runs, "ap", replicates=replicates)
    other = ablation_table(ABLATION, runs.iloc[::-1].reset_index(drop=True), "ap", replicates=replicates)
    assert one["ap_boot_low"].tolist() == other["ap_boot_low"].tolist()
    assert one["ap_boot_high"].tolist() == other["ap_boot_high"].tolist()
    assert one.loc["Full", "ap_boot_low"] < 0.8 < one.loc["Full", "ap_boot_high"]
