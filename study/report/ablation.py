"""Ablation reports: one row per variant with mean ± std and a 95 % t-interval over seeds, the paper's values, a
paired comparison of every row against the full model over seeds matched by the `seed` tag (Holm-adjusted across
the rows), a two-level (seeds × test videos) bootstrap interval and the study metric under every selection
protocol."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.patches import Patch

from study.record import (
    FUSED_GROUP,
    PLANNED_SEEDS,
    REUSED_FROM,
    SEED,
    SEEDS_AUTO,
    VARIANT,
    column,
    final_key,
    metric_column,
)
from study.report import protocols as registry
from study.report.columns import FAILED, INDEX, REUSED, RUNS, UNFINISHED, Columns, put, read
from study.report.context import (
    Context,
    ReportError,
    final_metrics,
    finished_runs,
    read_protocols,
    read_replicates,
    tag,
)
from study.report.notes import Cost, Notes, cost_note, paper_note, planned, protocol_notes, provenance, study_cost
from study.report.protocols import BEST_ON_TEST, BEST_ON_VAL, SELECTION, protocol_text
from study.report.render import (
    CLIPPED,
    Document,
    Grid,
    finite,
    interval,
    mean_std,
    num,
    png,
    pvalue,
    signed,
    tex_label,
    to_latex,
    to_markdown,
)
from study.report.stats import (
    WILCOXON_MIN_N,
    Effect,
    Paired,
    holm,
    holm_level,
    optimism,
    paired_comparison,
    paired_effect,
    seed_floor_note,
    significance_mark,
    t_interval,
    tost_p,
    two_level_bootstrap,
    verdict,
)
from study.spec import StudySpec
from vadclip.bootstrap import N_RESAMPLES
from vadclip.metrics import CORE_METRICS as CORE
from vadclip.metrics import label, mlflow_key, percent_scale

NAN = math.nan

# the ablation notes by name (ablation_notes), in the order shown
CELLS, ERROR_BARS, COMPARISON, PROTOCOLS_NOTE = "cells", "error bars", "comparison", "protocols"
VERDICTS_NOTE = "verdicts"
STATISTICS = (CELLS, ERROR_BARS, COMPARISON, VERDICTS_NOTE)  # what the table's numbers are: a confirmed table too


def ablation_report(ctx: Context) -> Document:
    spec = ctx.spec
    if column(VARIANT) not in ctx.children:
        raise ReportError(f"the trials of parent run {ctx.parent_id} carry no `{VARIANT}` tag; cannot group rows")
    protocols = read_protocols(ctx)
    table = ablation_table(spec, ctx.children, ctx.metric, ctx.protocol, protocols,
                           read_replicates(ctx, ctx.metric) if registry.get(ctx.protocol).selected else None,
                           ctx.style)
    grid = ablation_grid(table, ctx.metric, spec.full, spec.columns)
    compact = paper_grid(table, ctx.metric, spec.full, spec.columns)
    cost = study_cost(ctx, len(table))
    notes = list(ablation_notes(ctx, table, ctx.protocol, cost).values())
    text = to_markdown(compact, padded=False)
    plot_name = f"{spec.name}_{ctx.metric}.png"
    paper = f" (paper Table {spec.paper_table})" if spec.paper_table else ""
    caption = f"{spec.description}{paper}. {paper_caption(ctx, table)}"
    md = [f"# {spec.name}: {spec.description}{paper}", "", text, "", paper_caption(ctx, table), "",
          "## Details", "", to_markdown(grid), ""]
    tex = (to_latex(compact, caption, tex_label(spec.name), []) +
           to_latex(grid, f"{spec.name}: details", tex_label(spec.name) + "-details", notes))
    extra = protocol_grid(table, ctx.metric)
    if extra is not None:
        md += [f"## {label(ctx.metric)} under each selection protocol", "", to_markdown(extra), ""]
        tex += to_latex(extra, f"{spec.name}: {label(ctx.metric)} under each selection protocol",
                        tex_label(spec.name) + "-protocols", [])
    md += [*[f"- {n}" for n in notes], "", f"![{label(ctx.metric)} per variant]({plot_name})", ""]
    return Document(table, text, notes, "\n".join(md), tex, table.to_csv(index_label=INDEX), plot_name,
                    ablation_plot(table, ctx.metric, spec.full, spec.name),
                    cost=cost.metrics() if cost else {})


# ---------------------------------------------------------------- the table and its statistics


@dataclass(frozen=True)
class Comparison:
    """A row against the reference row over matched seeds (study.report.stats.paired_comparison), with its p
    Holm-adjusted across the table's rows and the mark of that, the equivalence test within the study's margin
    (TOST, Holm-adjusted), the row's verdict, its effect size and the smallest difference its seeds could detect
    (stats.Effect); the defaults: no comparison (the reference row itself, or no reference). The fields are the
    table's `Columns` of the study metric (`put`, `read`)."""

    delta: float = NAN
    delta_low: float = NAN
    delta_high: float = NAN
    p: float = NAN
    p_t: float = NAN
    p_wilcoxon: float = NAN
    p_test: str = ""  # which p is shown: "t" or "wilcoxon"
    pairs: int = 0
    p_holm: float = NAN
    sig: str = ""
    tost_p: float = NAN
    tost_p_holm: float = NAN
    verdict: str = ""  # better / worse / equivalent / inconclusive (stats.verdict)
    g: float = NAN
    g_low: float = NAN
    g_high: float = NAN
    superiority: float = NAN
    superiority_low: float = NAN
    superiority_high: float = NAN
    mdd: float = NAN

    @classmethod
    def of(cls, paired: Paired | None, p_holm: float, tost: float = NAN, tost_holm: float = NAN,
           effect: Effect | None = None) -> Comparison:
        if paired is None:
            return cls(p_holm=p_holm)
        return cls(paired.delta, paired.ci_low, paired.ci_high, paired.p, paired.p_t, paired.p_wilcoxon,
                   paired.test, paired.n, p_holm, significance_mark(p_holm), tost, tost_holm,
                   verdict(paired.delta, p_holm, tost_holm), **asdict(effect or Effect()))


@dataclass(frozen=True)
class Optimism:
    """best-on-test − best-on-val of a row over its matched seeds: mean and 95 % t-interval (stats.optimism)."""

    optimism: float
    optimism_low: float
    optimism_high: float


@dataclass(frozen=True)
class Bootstrap:
    """A row's two-level (seeds × test videos) percentile bootstrap interval of the mean (stats.two_level_bootstrap)."""

    boot_low: float
    boot_high: float


def run_values(finished: pd.DataFrame, metrics: list[str], protocol: str = SELECTION,
               protocols: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per FINISHED run: the variant and seed tags and, per metric, its test value under `protocol`
    (`selection`: the re-evaluated checkpoint each run selected, `final/<m>`; a derived one, e.g. `val`/`test`/
    `last`: from the run's histories in `protocols`, see study.report.protocols)."""
    out = finished[["run_id", *[c for c in (column(VARIANT), column(SEED)) if c in finished]]].copy()
    selected = registry.get(protocol).selected
    for m in metrics:
        if selected:
            key = metric_column(final_key(m))
            out[m] = finished[key] if key in finished else NAN
        else:
            key = registry.frame_column(protocol, m)
            has = protocols is not None and key in protocols
            out[m] = out["run_id"].map(protocols[key]) if has else NAN  # type: ignore[index]
    return out.reset_index(drop=True)


def ablation_table(spec: StudySpec, children: pd.DataFrame, metric: str, protocol: str = SELECTION,
                   protocols: pd.DataFrame | None = None, replicates: dict[str, np.ndarray] | None = None,
                   style: str = "xd") -> pd.DataFrame:
    """One row per variant (fractions as logged), columns named by study.report.columns: mean/std/n/low/high
    (t-interval) of every final metric under `protocol`, trial counts, the paper's values, the paired comparison
    of the study metric against the full model (`Comparison`, Holm-adjusted), the metric under every derived
    selection protocol with the optimism of best-on-test (`Optimism`; from `protocols`) and the two-level
    bootstrap interval (`Bootstrap`; from each run's video-bootstrap `replicates`)."""
    order = variant_order(spec, children)
    finished = finished_runs(children)
    metrics = final_metrics(finished)
    values = run_values(finished, metrics, protocol, protocols)
    table = aggregate(values, order, metrics)
    for name, counts in trial_counts(children, order).items():
        table[name] = counts
    table[REUSED] = reused_counts(finished, order)
    for m, paper in paper_values(spec, order, style).items():
        table[Columns(m).paper] = paper
    cols = Columns(metric)
    margin = spec.equivalence_margin / percent_scale(metric)  # points -> the metric as logged
    put(table, cols, Comparison, compare(values, order, spec.full, metric, margin))
    if protocols is not None:
        protocol_columns(table, finished, protocols, order, metric)
    if replicates:
        put(table, cols, Bootstrap, bootstrap(values, order, replicates))
    return table


def variant_order(spec: StudySpec, children: pd.DataFrame) -> list[str]:
    """Spec order, then variants logged but no longer in the spec (so nothing logged is hidden)."""
    names = [v.name for v in spec.variants]
    logged = children[column(VARIANT)].dropna().unique() if column(VARIANT) in children else []
    return names + sorted(set(logged) - set(names))


def aggregate(values: pd.DataFrame, order: list[str], metrics: list[str]) -> pd.DataFrame:
    """mean/std (ddof=1)/n and the 95 % t-interval of the mean per variant of each metric, as logged; a row's
    runs in seed order (sums in the order trials finished would change the last digits from run to run)."""
    columns: dict[str, Any] = {}  # built at once: a column at a time fragments the frame
    seed = column(SEED)
    if seed in values:
        seeds = pd.to_numeric(values[seed], errors="coerce")
        values = values.assign(_seed=seeds).sort_values(["_seed", seed], kind="stable").drop(columns="_seed")
    grouped = values.groupby(column(VARIANT))
    for m in metrics:
        cols, runs = Columns(m), grouped[m]
        columns[cols.mean] = runs.mean().reindex(order).to_numpy()
        columns[cols.std] = runs.std().reindex(order).to_numpy()
        columns[cols.n] = runs.count().reindex(order).fillna(0).astype(int).to_numpy()
        intervals = {v: t_interval(x.to_numpy()) for v, x in runs}
        columns[cols.low] = [intervals.get(v, (NAN, NAN))[0] for v in order]
        columns[cols.high] = [intervals.get(v, (NAN, NAN))[1] for v in order]
    return pd.DataFrame(columns, index=pd.Index(order, name=INDEX))


def trial_counts(children: pd.DataFrame, order: list[str]) -> dict[str, pd.Series]:
    """Trials per variant: `RUNS` (FINISHED), `FAILED` (FAILED), `UNFINISHED` (any other status)."""
    status = children.groupby(column(VARIANT))["status"]

    def count(which: Callable[[pd.Series], pd.Series]) -> pd.Series:
        return status.apply(lambda s: int(which(s).sum())).reindex(order).fillna(0).astype(int)

    return {RUNS: count(lambda s: s == "FINISHED"), FAILED: count(lambda s: s == "FAILED"),
            UNFINISHED: count(lambda s: ~s.isin(["FINISHED", "FAILED"]))}


def reused_counts(finished: pd.DataFrame, order: list[str]) -> list[int]:
    """FINISHED trials per variant whose results were copied from an identical earlier run (tag REUSED_FROM)."""
    if column(REUSED_FROM) not in finished:
        return [0] * len(order)
    reused = finished[finished[column(REUSED_FROM)].notna()]
    counts = reused.groupby(column(VARIANT)).size()
    return [int(counts.get(v, 0)) for v in order]


def paper_values(spec: StudySpec, order: list[str], style: str = "xd") -> dict[str, list[float]]:
    """The paper's value per variant of each shown metric the spec quotes for `style` data (NaN where a variant
    has none), keyed by the metric's MLflow name as the table's columns are."""
    papers = {v.name: {mlflow_key(k): x for k, x in v.paper_values(style).items()} for v in spec.variants}
    return {m: [papers.get(v, {}).get(m, NAN) for v in order]
            for m in map(mlflow_key, spec.columns) if any(m in p for p in papers.values())}


def per_seed(values: pd.DataFrame, variant: str, metric: str) -> dict[str, float]:
    """A variant's value per seed (the mean should a seed have run twice)."""
    if metric not in values or column(SEED) not in values:
        return {}
    rows = values[values[column(VARIANT)] == variant].dropna(subset=[metric])
    return {str(k): float(v) for k, v in rows.groupby(column(SEED))[metric].mean().items()}


def compare(values: pd.DataFrame, order: list[str], full: str | None, metric: str,
            margin: float = NAN) -> list[Comparison]:
    """Every row against the full model over matched seeds (study.report.stats.paired_comparison), with the
    shown p-values Holm-adjusted across the rows of the table; the equivalence test within ±`margin` (a fraction,
    as the metric is logged; TOST, Holm-adjusted the same way), the verdict, the effect size and the minimum
    detectable difference at Holm's strictest level (alpha / compared rows)."""
    reference = per_seed(values, full, metric) if full is not None else {}
    rows = {v: per_seed(values, v, metric) for v in order if v != full and reference}
    results = [paired_comparison(rows[v], reference) if v in rows else None for v in order]
    adjusted = holm([NAN if r is None else r.p for r in results])
    tosts = [tost_p(rows[v], reference, margin) if v in rows else NAN for v in order]
    tosts_holm = holm(tosts)
    level = holm_level(len(rows))
    effects = [paired_effect(rows[v], reference, alpha=level) if v in rows else None for v in order]
    return [Comparison.of(*args) for args in zip(results, adjusted, tosts, tosts_holm, effects)]


def protocol_columns(table: pd.DataFrame, finished: pd.DataFrame, protocols: pd.DataFrame, order: list[str],
                     metric: str) -> None:
    """The study metric under each derived selection protocol (mean over seeds) and the optimism of best-on-test:
    best-on-test − best-on-val over the seeds, mean and t-interval."""
    cols = Columns(metric)
    by = {p.name: run_values(finished, [metric], p.name, protocols) for p in registry.derived()}
    for name, values in by.items():
        table[cols.protocol(name)] = values.groupby(column(VARIANT))[metric].mean().reindex(order)
    test, val = by[BEST_ON_TEST.name], by[BEST_ON_VAL.name]
    put(table, cols, Optimism, [Optimism(*optimism(per_seed(test, v, metric), per_seed(val, v, metric))[:3])
                                for v in order])


def bootstrap(values: pd.DataFrame, order: list[str], replicates: dict[str, np.ndarray]) -> list[Bootstrap]:
    """Per row the two-level bootstrap over its runs' video-bootstrap replicates (runs without them left out)."""
    # seed order, not MLflow's start-time order: the interval is the same whichever trial finished first
    ordered = values.sort_values(column(SEED), key=lambda seeds: seeds.map(_seed_key), kind="stable")
    variants = ordered[column(VARIANT)]
    return [Bootstrap(*two_level_bootstrap([replicates[r] for r in ordered.loc[variants == v, "run_id"]
                                            if r in replicates])) for v in order]


# ---------------------------------------------------------------- grid, notes, plot


def _shown_metrics(table: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The spec's columns with a value or a paper number (a dataset without mAP gets no empty mAP column)."""
    return [m for m in map(mlflow_key, columns)
            if ((cols := Columns(m)).mean in table and table[cols.mean].notna().any()) or cols.paper in table]


def _signed_span(mean: Any, low: Any, high: Any, scale: float) -> str:
    """`+1.23 [-0.4, +2.9]` in points; "-" without a mean."""
    value = mean * scale
    span = interval(low * scale, high * scale, signed=True)
    return f"{signed(value)} {span}".strip() if finite(value) else "-"


def ablation_grid(table: pd.DataFrame, metric: str, full: str | None, columns: Sequence[str] = CORE,
                  reference: str = "full") -> Grid:
    """Percent cells `mean ± std [95 % t-interval]`; the best mean per metric in bold, unless every row ties; the
    paired difference to the full model (`reference`: how the table names that row) with its interval, its p and
    the Holm-adjusted p with its mark."""
    shown = _shown_metrics(table, columns)
    cols = Columns(metric)
    boot = cols.boot_low in table
    grid = Grid(_grid_headers(table, metric, shown, boot, reference), [])
    means = {m: table[Columns(m).mean].dropna() for m in shown if Columns(m).mean in table}
    best = {m: v.max() for m, v in means.items() if v.round(9).nunique() > 1}
    scale = percent_scale(metric)
    for r, (variant, row) in enumerate(table.iterrows()):
        marked = variant == full and variant != reference  # "LGT-Adapter (full)"; the confirmed "base" as is
        cells = [f"{variant} ({reference})" if marked else str(variant), str(int(row[RUNS]))]
        for m in shown:
            if row.get(Columns(m).mean) == best.get(m) and finite(best.get(m)):
                grid.bold.add((r, len(cells)))
            cells.append(mean_std(row, m, interval_of_mean=True))
            if Columns(m).paper in table:
                cells.append(num(row[Columns(m).paper]))
        if boot:
            cells.append(interval(row[cols.boot_low] * scale, row[cols.boot_high] * scale))
        cells += ["ref.", "-", "-", "-"] if variant == full else _comparison_cells(read(row, cols, Comparison), scale)
        cells.append(str(int(row[FAILED])))
        grid.rows.append(cells)
    return grid


MARKS = {"better": "↑", "worse": "↓", "equivalent": "≈", "inconclusive": "?"}  # the compact table's verdicts


def paper_grid(table: pd.DataFrame, metric: str, full: str | None, columns: Sequence[str] = CORE,
               reference: str = "full") -> Grid:
    """What a paper prints: one cell per metric, `mean ± half-width` of the 95 % t-interval over seeds (points),
    the best mean in bold; the study metric's cell carries the row's verdict against the full model (MARKS) with
    its significance stars."""
    shown = [m for m in _shown_metrics(table, columns) if Columns(m).mean in table]
    cols = Columns(metric)
    grid = Grid(["Variant", *[label(m) for m in shown]], [])
    means = {m: table[Columns(m).mean].dropna() for m in shown}
    best = {m: v.max() for m, v in means.items() if v.round(9).nunique() > 1}
    for r, (variant, row) in enumerate(table.iterrows()):
        cells = [f"{variant} ({reference})" if variant == full and variant != reference else str(variant)]
        for m in shown:
            c, scale = Columns(m), percent_scale(m)
            if row.get(c.mean) == best.get(m) and finite(best.get(m)):
                grid.bold.add((r, len(cells)))
            half = (row[c.high] - row[c.low]) / 2 * scale
            cell = f"{row[c.mean] * scale:.2f}" + (f" ± {half:.1f}" if finite(half) else "") if finite(
                row[c.mean]) else "-"
            if m == metric and variant != full and (mark := MARKS.get(str(row.get(cols.verdict, "")))):
                sig = str(row.get(cols.sig, ""))
                cell += f" {mark}{sig if sig != 'n.s.' else ''}"
            cells.append(cell)
        grid.rows.append(cells)
    return grid


def paper_caption(ctx: Context, table: pd.DataFrame) -> str:
    """The compact table's caption: n, protocol, test and correction, what the marks mean."""
    n = sorted({int(v) for v in table[RUNS] if v})
    name = label(ctx.metric)
    return (f"Mean ± half-width of the 95 % t-interval over n = {'/'.join(map(str, n)) or 0} seeds per row, in "
            f"percent; test metrics under {protocol_text(ctx.protocol)}. {name} vs the full model: ↑ / ↓ "
            "significantly better / worse (paired t-test, Wilcoxon signed-rank from 6 pairs; Holm over the rows; "
            f"* < 0.05, ** < 0.01, *** < 0.001), ≈ equivalent within ±{ctx.spec.equivalence_margin:g} points "
            "(paired TOST, Holm), ? inconclusive. Details below.")


def _grid_headers(table: pd.DataFrame, metric: str, shown: list[str], boot: bool, reference: str) -> list[str]:
    name = label(metric)
    headers = ["Variant", "n"]
    for m in shown:
        headers += [label(m)] + ([f"{label(m)} (paper)"] if Columns(m).paper in table else [])
    headers += [f"{name} 95% CI (seeds × videos)"] if boot else []
    return headers + [f"Δ{name} vs {reference} [95% CI]", "p", "p (Holm)", "verdict", "failed"]


def _comparison_cells(row: Comparison, scale: float) -> list[str]:
    """Δ [interval], p (W: Wilcoxon), Holm-adjusted p with its mark, the verdict (stats.verdict)."""
    return [_signed_span(row.delta, row.delta_low, row.delta_high, scale),
            pvalue(row.p) + (" (W)" if row.p_test == "wilcoxon" else ""),
            f"{pvalue(row.p_holm)} {row.sig}".strip(), row.verdict or "-"]


def protocol_grid(table: pd.DataFrame, metric: str) -> Grid | None:
    """The study metric per row under each derived selection protocol, and the optimism of best-on-test."""
    cols = Columns(metric)
    shown = [p for p in registry.derived() if cols.protocol(p.name) in table]
    if cols.optimism not in table or table[[cols.protocol(p.name) for p in shown]].isna().all().all():
        return None  # no histories (runs logged by an older version)
    name, scale = label(metric), percent_scale(metric)
    grid = Grid(["Variant", *[f"{name} {p.label}" for p in shown],
                 f"optimism ({BEST_ON_TEST.name} − {BEST_ON_VAL.name}) [95% CI]"], [])
    for variant, row in table.iterrows():
        gap = read(row, cols, Optimism)
        grid.rows.append([str(variant), *[num(row[cols.protocol(p.name)] * scale) for p in shown],
                          _signed_span(gap.optimism, gap.optimism_low, gap.optimism_high, scale)])
    return grid


def fused_note(ctx: Context) -> Notes:
    """Which seeds were trained together (fuse_seeds), when any were."""
    key = column(FUSED_GROUP)
    if key not in ctx.finished or ctx.finished[key].isna().all():
        return {}
    groups = sorted(ctx.finished[key].dropna().unique())
    return {"fused seeds": f"Fused seeds: the seeds of a row were trained together in one vectorised model per trial "
            f"(fuse_seeds; groups {'; '.join(groups)}); each seed keeps its own initialisation and batch order, and "
            "its numbers differ from a lone run's by rounding drift only (docs/speed.md)."}


def ablation_notes(ctx: Context, table: pd.DataFrame, protocol: str = SELECTION, cost: Cost | None = None) -> Notes:
    """The notes by name, in the order shown: what the numbers are (`STATISTICS`), the selection protocols (when
    derived), dataset and evaluation protocol, the paper's numbers, seeds, failures, reuse, cost (when given) and
    provenance."""
    notes = statistics_notes(ctx, table, protocol)
    if Columns(ctx.metric).optimism in table:
        notes[PROTOCOLS_NOTE] = protocols_note(ctx.metric)
    return {**notes, **protocol_notes(ctx), **paper_note(ctx), **run_notes(ctx, table, cost)}


def statistics_notes(ctx: Context, table: pd.DataFrame, protocol: str = SELECTION) -> Notes:
    """CELLS, ERROR_BARS, COMPARISON, VERDICTS_NOTE: what the table's cells, intervals, tests and verdicts are."""
    name = label(ctx.metric)
    n_max = int(table[RUNS].max()) if len(table) else 0
    shown_test = (f"Wilcoxon signed-rank (scipy.stats.wilcoxon; rows with ≥ {WILCOXON_MIN_N} pairs, marked W) or "
                  if n_max >= WILCOXON_MIN_N else "")
    boot = (f"; the column '{name} 95% CI (seeds × videos)' also captures test-video sampling: a two-level "
            f"percentile bootstrap (resample the seeds, then the test videos; {N_RESAMPLES} resamples from each "
            "run's video bootstrap, seeded by its seed)" if Columns(ctx.metric).boot_low in table else "")
    return {
        CELLS: f"Test metrics under {protocol_text(protocol)}. Cells: mean ± sample std (ddof=1) over seeds of "
        "FINISHED trials [95 % Student-t confidence interval of the mean over seeds, scipy.stats.t.interval; "
        f"{CLIPPED} = the interval crossed the metric's range 0-100 and is cut at the bound: with few seeds the "
        "t-interval overshoots], all in percent as the paper (AUC/AP/AnoAUC are logged as fractions); best mean "
        "per metric in bold; n = finished trials of the row.",
        ERROR_BARS: "The error bars capture the variation over seeds (model initialisation and batch order) on one "
        f"fixed test set{boot}.",
        COMPARISON: f"Against the full model {ctx.spec.full!r}: Δ = row − full in points over seeds matched by the "
        f"{SEED} tag, with its 95 % t-interval; p: two-sided {shown_test}paired t-test (scipy.stats.ttest_rel) of "
        f"{name}; p (Holm): Holm-adjusted across the rows of this table (statsmodels multipletests); n.s. = not "
        "significant at 0.05, * < 0.05, ** < 0.01, *** < 0.001; '-' with fewer than 2 pairs or zero variance.",
        VERDICTS_NOTE: verdicts_note(ctx, table),
    }


def verdicts_note(ctx: Context, table: pd.DataFrame) -> str:
    """The verdict column, the equivalence margin, what this many seeds can show, and where the effect sizes are."""
    compared = int(table[Columns(ctx.metric).pairs].gt(0).sum()) if Columns(ctx.metric).pairs in table else 0
    pairs = int(table[Columns(ctx.metric).pairs].max()) if compared else 0
    return (f"Verdict: better / worse = the difference is significant after Holm; else equivalent = within "
            f"±{ctx.spec.equivalence_margin:g} points of the full model by paired TOST (statsmodels ttost_paired, "
            "Holm-adjusted); else inconclusive = neither: the seeds cannot tell 'no effect' from 'too few seeds'. "
            f"{seed_floor_note(pairs, compared)} Hedges' g of the paired differences, the fraction of seeds on "
            "which a row beats the full model and the minimum difference its seeds could detect (80 % power at "
            "Holm's strictest level): the CSV (docs/statistics.md).")


def protocols_note(metric: str) -> str:
    """The derived selection protocols (study.report.protocols) and the optimism of best-on-test."""
    test, val = BEST_ON_TEST.label, BEST_ON_VAL.label
    return (f"Selection protocols ({label(metric)}, test metric): {registry.definitions()}, all derived from each "
            f"run's logged histories; optimism = {test} − {val}, mean [95 % t-interval] over seeds. With "
            "eval.reload_best (the authors' reload of the best checkpoint every epoch) the selection feeds back into "
            f"training, so {test} derived from a selection=val run is {test} along this run's trajectory, not the "
            "authors' protocol; that one is eval.selection=test.")


def run_notes(ctx: Context, table: pd.DataFrame, cost: Cost | None) -> Notes:
    """The seeds planned and seen, how they were chosen and fused, failed and reused trials, cost, provenance."""
    seed = column(SEED)
    seeds = sorted(ctx.finished[seed].dropna().unique(), key=_seed_key) if seed in ctx.finished else []
    failed, total = int(table[FAILED].sum()), len(ctx.children)
    unfinished = int(table[UNFINISHED].sum())
    reused = int(table[REUSED].sum()) if REUSED in table else 0
    return {
        "seeds": f"Seeds: {planned(ctx.parent, PLANNED_SEEDS, ctx.spec.seeds)} per variant planned; {len(seeds)} seen "
        f"({', '.join(map(str, seeds))}).",
        **seeds_auto_note(ctx),
        **fused_note(ctx),
        "failed": f"Failed trials (status FAILED): {failed} of {total}"
        + (f"; unfinished (RUNNING/KILLED): {unfinished}" if unfinished else "") + ".",
        "reused": f"Reused trials: {reused} of {len(ctx.finished)} finished (results copied from an identical "
        f"FINISHED run: same resolved config and seed, data fingerprint and code digest; tag {REUSED_FROM}).",
        **cost_note(cost),
        "provenance": provenance(ctx),
    }


def seeds_auto_note(ctx: Context) -> Notes:
    """What `--seeds auto` decided, from the parent's tags."""
    reason = tag(ctx.parent, SEEDS_AUTO)
    return {"seeds auto": f"Seeds chosen by --seeds auto: {reason}."} if reason else {}


def _seed_key(seed: str) -> tuple[int, float | str]:
    try:
        return 0, float(seed)
    except ValueError:
        return 1, seed


def ablation_plot(table: pd.DataFrame, metric: str, full: str | None, title: str) -> bytes:
    """Horizontal bars (long variant names) of the main metric with std error bars; paper values as diamonds."""
    scale, cols = percent_scale(metric), Columns(metric)
    means = table.get(cols.mean, pd.Series(NAN, index=table.index)) * scale
    stds = table.get(cols.std, pd.Series(NAN, index=table.index)).fillna(0) * scale
    y = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(table) + 1.2))
    colors = ["tab:orange" if v == full else "tab:blue" for v in table.index]
    ax.barh(y, means.fillna(0), xerr=stds, color=colors, capsize=3)
    handles: list[Artist] = [Patch(color="tab:orange", label="full model")]
    if cols.paper in table:
        handles.append(ax.scatter(table[cols.paper], y, marker="D", s=20, color="black", zorder=3, label="paper"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_yticks(y, [str(v) for v in table.index], fontsize=8)
    ax.invert_yaxis()  # spec order top to bottom, like the table
    ax.set_xlabel(f"{label(metric)} (%), mean ± std over seeds")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return png(fig)
