"""Ablation reports: one row per variant with mean ± std over seeds, the paper's values and a paired t-test of
every row against the full model over seeds matched by the `seed` tag."""

from __future__ import annotations

import math
from collections.abc import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.patches import Patch
from scipy import stats

from study.report.context import FINAL, Context, ReportError, final_metrics, finished_runs
from study.report.notes import paper_note, planned, protocol_notes, provenance
from study.report.render import (
    Document,
    Grid,
    finite,
    mean_std,
    num,
    png,
    pvalue,
    signed,
    tex_label,
    to_latex,
    to_markdown,
)
from study.spec import StudySpec
from vadclip.metrics import CORE_METRICS as CORE
from vadclip.metrics import label, percent_scale


def ablation_report(ctx: Context) -> Document:
    spec = ctx.spec
    if "tags.variant" not in ctx.children:
        raise ReportError(f"the trials of parent run {ctx.parent_id} carry no `variant` tag; cannot group rows")
    table = ablation_table(spec, ctx.children, ctx.metric)
    grid = ablation_grid(table, ctx.metric, spec.full)
    notes = ablation_notes(ctx, table)
    text = to_markdown(grid)
    plot_name = f"{spec.name}_{ctx.metric}.png"
    paper = f" (paper Table {spec.paper_table})" if spec.paper_table else ""
    md = [f"# {spec.name}: {spec.description}{paper}", "", text, "", *[f"- {n}" for n in notes], "",
          f"![{label(ctx.metric)} per variant]({plot_name})", ""]
    tex = to_latex(grid, f"{spec.description}{paper}", tex_label(spec.name), notes)
    return Document(table, text, notes, "\n".join(md), tex, table.to_csv(index_label="variant"), plot_name,
                    ablation_plot(table, ctx.metric, spec.full, spec.name))


# ---------------------------------------------------------------- the table and its statistics


def ablation_table(spec: StudySpec, children: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per variant (fractions as logged): `<m>_mean/_std/_n` of every final metric, trial counts, the
    paper's values (`<m>_paper`) and `<metric>_delta/_p/_pairs` of the paired test against the full model."""
    order = variant_order(spec, children)
    finished = finished_runs(children)
    table = aggregate(finished, order, final_metrics(finished))
    for column, counts in trial_counts(children, order).items():
        table[column] = counts
    for m, values in paper_values(spec, order).items():
        table[f"{m}_paper"] = values
    tests = [paired_test(finished, v, spec.full, metric) if v != spec.full else (math.nan, math.nan, 0)
             for v in order]
    table[f"{metric}_delta"], table[f"{metric}_p"], table[f"{metric}_pairs"] = zip(*tests)
    return table


def variant_order(spec: StudySpec, children: pd.DataFrame) -> list[str]:
    """Spec order, then variants logged but no longer in the spec (so nothing logged is hidden)."""
    names = [v.name for v in spec.variants]
    logged = children["tags.variant"].dropna().unique() if "tags.variant" in children else []
    return names + sorted(set(logged) - set(names))


def aggregate(finished: pd.DataFrame, order: list[str], metrics: list[str]) -> pd.DataFrame:
    """mean/std (ddof=1)/n per variant of each final metric, as logged (fractions for auc/ap/ano_auc)."""
    grouped = finished.groupby("tags.variant")[[FINAL + m for m in metrics]]
    parts = {"mean": grouped.mean(), "std": grouped.std(), "n": grouped.count()}
    table = pd.DataFrame(index=pd.Index(order, name="variant"))
    for m in metrics:
        for stat, frame in parts.items():
            table[f"{m}_{stat}"] = frame[FINAL + m].reindex(order)
        table[f"{m}_n"] = table[f"{m}_n"].fillna(0).astype(int)
    return table


def trial_counts(children: pd.DataFrame, order: list[str]) -> dict[str, pd.Series]:
    """Trials per variant: `runs` (FINISHED), `failed` (FAILED), `unfinished` (any other status)."""
    status = children.groupby("tags.variant")["status"]

    def count(which: Callable[[pd.Series], pd.Series]) -> pd.Series:
        return status.apply(lambda s: int(which(s).sum())).reindex(order).fillna(0).astype(int)

    return {"runs": count(lambda s: s == "FINISHED"), "failed": count(lambda s: s == "FAILED"),
            "unfinished": count(lambda s: ~s.isin(["FINISHED", "FAILED"]))}


def paper_values(spec: StudySpec, order: list[str]) -> dict[str, list[float]]:
    """The paper's value per variant of each core metric the spec quotes (NaN where a variant has none)."""
    papers = {v.name: v.paper for v in spec.variants}
    return {m: [papers.get(v, {}).get(m, math.nan) for v in order]
            for m in CORE if any(m in p for p in papers.values())}


def paired_test(finished: pd.DataFrame, variant: str, full: str | None, metric: str) -> tuple[float, float, int]:
    """(mean of row - full, two-sided ttest_rel p, pairs) over seeds present in both rows (none without a full row)."""
    col = FINAL + metric
    if col not in finished or "tags.seed" not in finished:
        return math.nan, math.nan, 0
    runs = finished.dropna(subset=[col])
    per_seed = runs.groupby(["tags.seed", "tags.variant"])[col].mean().unstack("tags.variant")
    if full is None or variant not in per_seed or full not in per_seed:
        return math.nan, math.nan, 0
    pairs = per_seed[[variant, full]].dropna()
    diff = (pairs[variant] - pairs[full]).to_numpy()
    if len(diff) == 0:
        return math.nan, math.nan, 0
    if len(diff) < 2 or np.ptp(diff) == 0:  # the t statistic is undefined
        return float(diff.mean()), math.nan, len(diff)
    return float(diff.mean()), float(stats.ttest_rel(pairs[variant], pairs[full]).pvalue), len(diff)


# ---------------------------------------------------------------- grid, notes, plot


def _shown_metrics(table: pd.DataFrame) -> list[str]:
    """Core metrics with a value or a paper number (a dataset without mAP gets no empty mAP column)."""
    return [m for m in CORE if (f"{m}_mean" in table and table[f"{m}_mean"].notna().any()) or f"{m}_paper" in table]


def ablation_grid(table: pd.DataFrame, metric: str, full: str | None) -> Grid:
    """Percent cells; the best mean per metric in bold, unless every row ties."""
    shown = _shown_metrics(table)
    headers = ["Variant", "n"]
    for m in shown:
        headers += [label(m)] + ([f"{label(m)} (paper)"] if f"{m}_paper" in table else [])
    headers += [f"Δ{label(metric)} vs full", "p", "failed"]
    grid = Grid(headers, [])
    means = {m: table[f"{m}_mean"].dropna() for m in shown if f"{m}_mean" in table}
    best = {m: v.max() for m, v in means.items() if v.round(9).nunique() > 1}
    for r, (variant, row) in enumerate(table.iterrows()):
        name = f"{variant} (full)" if variant == full else str(variant)
        cells = [name, str(int(row["runs"]))]
        for m in shown:
            if row.get(f"{m}_mean") == best.get(m) and finite(best.get(m)):
                grid.bold.add((r, len(cells)))
            cells.append(mean_std(row, m))
            if f"{m}_paper" in table:
                cells.append(num(row[f"{m}_paper"]))
        delta = "ref." if variant == full else signed(row[f"{metric}_delta"] * percent_scale(metric))
        cells += [delta, pvalue(row[f"{metric}_p"]), str(int(row["failed"]))]
        grid.rows.append(cells)
    return grid


def ablation_notes(ctx: Context, table: pd.DataFrame) -> list[str]:
    seeds = sorted(ctx.finished["tags.seed"].dropna().unique(), key=_seed_key) if "tags.seed" in ctx.finished \
        else []
    failed, total = int(table["failed"].sum()), len(ctx.children)
    unfinished = int(table["unfinished"].sum())
    name = label(ctx.metric)
    return [
        "Mean ± sample std (ddof=1) over seeds of FINISHED trials, all in percent as the paper (AUC/AP/AnoAUC are "
        "logged as fractions); best mean per metric in bold; n = finished trials of the row.",
        *protocol_notes(ctx),
        *paper_note(ctx),
        f"Seeds: {planned(ctx.parent, 'study.seeds', ctx.spec.seeds)} per variant planned; {len(seeds)} seen "
        f"({', '.join(map(str, seeds))}).",
        f"Paired comparison against the full model {ctx.spec.full!r}: two-sided scipy.stats.ttest_rel of {name} "
        f"over seeds matched by the seed tag; Δ = row - full in points; p '-' with fewer than 2 pairs or zero "
        "variance.",
        f"Failed trials (status FAILED): {failed} of {total}" + (f"; unfinished (RUNNING/KILLED): {unfinished}"
                                                                   if unfinished else "") + ".",
        provenance(ctx),
    ]


def _seed_key(seed: str) -> tuple[int, float | str]:
    try:
        return 0, float(seed)
    except ValueError:
        return 1, seed


def ablation_plot(table: pd.DataFrame, metric: str, full: str | None, title: str) -> bytes:
    """Horizontal bars (long variant names) of the main metric with std error bars; paper values as diamonds."""
    scale = percent_scale(metric)
    means = table.get(f"{metric}_mean", pd.Series(math.nan, index=table.index)) * scale
    stds = table.get(f"{metric}_std", pd.Series(math.nan, index=table.index)).fillna(0) * scale
    y = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(table) + 1.2))
    colors = ["tab:orange" if v == full else "tab:blue" for v in table.index]
    ax.barh(y, means.fillna(0), xerr=stds, color=colors, capsize=3)
    handles: list[Artist] = [Patch(color="tab:orange", label="full model")]
    if f"{metric}_paper" in table:
        handles.append(ax.scatter(table[f"{metric}_paper"], y, marker="D", s=20, color="black", zorder=3,
                                  label="paper"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_yticks(y, [str(v) for v in table.index], fontsize=8)
    ax.invert_yaxis()  # spec order top to bottom, like the table
    ax.set_xlabel(f"{label(metric)} (%), mean ± std over seeds")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return png(fig)
