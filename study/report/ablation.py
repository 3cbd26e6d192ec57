"""Ablation reports: one row per variant with mean ± std and a 95 % t-interval over seeds, the paper's values, a
paired comparison of every row against the full model over seeds matched by the `seed` tag (Holm-adjusted across
the rows), a two-level (seeds × test videos) bootstrap interval and the study metric under every selection
protocol."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.patches import Patch

from study.report.context import FINAL, Context, ReportError, final_metrics, finished_runs, read_replicates, tag
from study.report.notes import paper_note, planned, protocol_notes, provenance
from study.report.protocols import PROTOCOLS, SELECTION, protocol_text, read_protocols
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
    holm,
    optimism,
    paired_comparison,
    significance_mark,
    t_interval,
    two_level_bootstrap,
)
from study.reuse import REUSED_FROM_TAG
from study.spec import StudySpec
from study.tracking import FUSED_GROUP_TAG
from vadclip.bootstrap import N_RESAMPLES
from vadclip.metrics import CORE_METRICS as CORE
from vadclip.metrics import label, mlflow_key, percent_scale


def ablation_report(ctx: Context) -> Document:
    spec = ctx.spec
    if "tags.variant" not in ctx.children:
        raise ReportError(f"the trials of parent run {ctx.parent_id} carry no `variant` tag; cannot group rows")
    protocols = read_protocols(ctx)
    table = ablation_table(spec, ctx.children, ctx.metric, ctx.protocol, protocols,
                           read_replicates(ctx, ctx.metric) if ctx.protocol == SELECTION else None, ctx.style)
    grid = ablation_grid(table, ctx.metric, spec.full, spec.columns)
    notes = ablation_notes(ctx, table, ctx.protocol)
    text = to_markdown(grid)
    plot_name = f"{spec.name}_{ctx.metric}.png"
    paper = f" (paper Table {spec.paper_table})" if spec.paper_table else ""
    md = [f"# {spec.name}: {spec.description}{paper}", "", text, ""]
    tex = to_latex(grid, f"{spec.description}{paper}", tex_label(spec.name), notes)
    extra = protocol_grid(table, ctx.metric)
    if extra is not None:
        md += [f"## {label(ctx.metric)} under each selection protocol", "", to_markdown(extra), ""]
        tex += to_latex(extra, f"{spec.name}: {label(ctx.metric)} under each selection protocol",
                        tex_label(spec.name) + "-protocols", [])
    md += [*[f"- {n}" for n in notes], "", f"![{label(ctx.metric)} per variant]({plot_name})", ""]
    return Document(table, text, notes, "\n".join(md), tex, table.to_csv(index_label="variant"), plot_name,
                    ablation_plot(table, ctx.metric, spec.full, spec.name))


# ---------------------------------------------------------------- the table and its statistics


def run_values(finished: pd.DataFrame, metrics: list[str], protocol: str = SELECTION,
               protocols: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per FINISHED run: `tags.variant`, `tags.seed` and, per metric, its test value under `protocol`
    (`selection`: the re-evaluated checkpoint each run selected, `final/<m>`; `val`/`test`/`last`: derived from
    the run's histories in `protocols`, see study.report.protocols)."""
    out = finished[["run_id", *[c for c in ("tags.variant", "tags.seed") if c in finished]]].copy()
    for m in metrics:
        if protocol == SELECTION:
            out[m] = finished[FINAL + m] if FINAL + m in finished else math.nan
        else:
            column = f"{protocol}/{m}"
            has = protocols is not None and column in protocols
            out[m] = out["run_id"].map(protocols[column]) if has else math.nan  # type: ignore[index]
    return out.reset_index(drop=True)


def ablation_table(spec: StudySpec, children: pd.DataFrame, metric: str, protocol: str = SELECTION,
                   protocols: pd.DataFrame | None = None, replicates: dict[str, np.ndarray] | None = None,
                   style: str = "xd") -> pd.DataFrame:
    """One row per variant (fractions as logged): `<m>_mean/_std/_n/_low/_high` (t-interval) of every final
    metric under `protocol`, trial counts, the paper's values (`<m>_paper`), the paired comparison of the study
    metric against the full model (`<metric>_delta/_delta_low/_delta_high/_p/_test/_pairs`, Holm-adjusted
    `<metric>_p_holm` and its mark `<metric>_sig`), the metric under every selection protocol with the optimism
    of best-on-test (`<metric>_<protocol>`, `<metric>_optimism/_low/_high`; from `protocols`) and the two-level
    bootstrap interval (`<metric>_boot_low/_high`; from each run's video-bootstrap `replicates`)."""
    order = variant_order(spec, children)
    finished = finished_runs(children)
    metrics = final_metrics(finished)
    values = run_values(finished, metrics, protocol, protocols)
    table = aggregate(values, order, metrics)
    for column, counts in trial_counts(children, order).items():
        table[column] = counts
    table["reused"] = reused_counts(finished, order)
    for m, paper in paper_values(spec, order, style).items():
        table[f"{m}_paper"] = paper
    compare(table, values, order, spec.full, metric)
    if protocols is not None:
        protocol_columns(table, finished, protocols, order, metric)
    if replicates:
        # seed order, not MLflow's start-time order: the interval is the same whichever trial finished first
        ordered = values.sort_values("tags.seed", key=lambda seeds: seeds.map(_seed_key), kind="stable")
        table[f"{metric}_boot_low"], table[f"{metric}_boot_high"] = zip(*[
            two_level_bootstrap([replicates[r] for r in ordered.loc[ordered["tags.variant"] == v, "run_id"]
                                 if r in replicates]) for v in order])
    return table


def variant_order(spec: StudySpec, children: pd.DataFrame) -> list[str]:
    """Spec order, then variants logged but no longer in the spec (so nothing logged is hidden)."""
    names = [v.name for v in spec.variants]
    logged = children["tags.variant"].dropna().unique() if "tags.variant" in children else []
    return names + sorted(set(logged) - set(names))


def aggregate(values: pd.DataFrame, order: list[str], metrics: list[str]) -> pd.DataFrame:
    """mean/std (ddof=1)/n and the 95 % t-interval of the mean per variant of each metric, as logged; a row's
    runs in seed order (sums in the order trials finished would change the last digits from run to run)."""
    columns: dict[str, Any] = {}  # built at once: a column at a time fragments the frame
    if "tags.seed" in values:
        seeds = pd.to_numeric(values["tags.seed"], errors="coerce")
        values = values.assign(_seed=seeds).sort_values(["_seed", "tags.seed"], kind="stable").drop(columns="_seed")
    grouped = values.groupby("tags.variant")
    for m in metrics:
        column = grouped[m]
        columns[f"{m}_mean"] = column.mean().reindex(order).to_numpy()
        columns[f"{m}_std"] = column.std().reindex(order).to_numpy()
        columns[f"{m}_n"] = column.count().reindex(order).fillna(0).astype(int).to_numpy()
        intervals = {v: t_interval(x.to_numpy()) for v, x in column}
        columns[f"{m}_low"] = [intervals.get(v, (math.nan, math.nan))[0] for v in order]
        columns[f"{m}_high"] = [intervals.get(v, (math.nan, math.nan))[1] for v in order]
    return pd.DataFrame(columns, index=pd.Index(order, name="variant"))


def trial_counts(children: pd.DataFrame, order: list[str]) -> dict[str, pd.Series]:
    """Trials per variant: `runs` (FINISHED), `failed` (FAILED), `unfinished` (any other status)."""
    status = children.groupby("tags.variant")["status"]

    def count(which: Callable[[pd.Series], pd.Series]) -> pd.Series:
        return status.apply(lambda s: int(which(s).sum())).reindex(order).fillna(0).astype(int)

    return {"runs": count(lambda s: s == "FINISHED"), "failed": count(lambda s: s == "FAILED"),
            "unfinished": count(lambda s: ~s.isin(["FINISHED", "FAILED"]))}


def reused_counts(finished: pd.DataFrame, order: list[str]) -> list[int]:
    """FINISHED trials per variant whose results were copied from an identical earlier run (tag reused_from)."""
    if f"tags.{REUSED_FROM_TAG}" not in finished:
        return [0] * len(order)
    reused = finished[finished[f"tags.{REUSED_FROM_TAG}"].notna()]
    counts = reused.groupby("tags.variant").size()
    return [int(counts.get(v, 0)) for v in order]


def paper_values(spec: StudySpec, order: list[str], style: str = "xd") -> dict[str, list[float]]:
    """The paper's value per variant of each shown metric the spec quotes for `style` data (NaN where a variant
    has none), keyed by the metric's MLflow name as the table's columns are."""
    papers = {v.name: {mlflow_key(k): x for k, x in v.paper_values(style).items()} for v in spec.variants}
    return {m: [papers.get(v, {}).get(m, math.nan) for v in order]
            for m in map(mlflow_key, spec.columns) if any(m in p for p in papers.values())}


def per_seed(values: pd.DataFrame, variant: str, metric: str) -> dict[str, float]:
    """A variant's value per seed (the mean should a seed have run twice)."""
    if metric not in values or "tags.seed" not in values:
        return {}
    rows = values[values["tags.variant"] == variant].dropna(subset=[metric])
    return {str(k): float(v) for k, v in rows.groupby("tags.seed")[metric].mean().items()}


def compare(table: pd.DataFrame, values: pd.DataFrame, order: list[str], full: str | None, metric: str) -> None:
    """Every row against the full model over matched seeds (study.report.stats.paired_comparison), with the
    shown p-values Holm-adjusted across the rows of the table."""
    reference = per_seed(values, full, metric) if full is not None else {}
    results = [paired_comparison(per_seed(values, v, metric), reference) if v != full and reference else None
               for v in order]
    nan = math.nan
    for name, get in (("delta", lambda r: r.delta), ("delta_low", lambda r: r.ci_low),
                      ("delta_high", lambda r: r.ci_high), ("p", lambda r: r.p), ("p_t", lambda r: r.p_t),
                      ("p_wilcoxon", lambda r: r.p_wilcoxon)):
        table[f"{metric}_{name}"] = [nan if r is None else get(r) for r in results]
    table[f"{metric}_test"] = ["" if r is None else r.test for r in results]
    table[f"{metric}_pairs"] = [0 if r is None else r.n for r in results]
    table[f"{metric}_p_holm"] = holm(table[f"{metric}_p"].tolist())
    table[f"{metric}_sig"] = ["" if r is None else significance_mark(p)
                              for r, p in zip(results, table[f"{metric}_p_holm"])]


def protocol_columns(table: pd.DataFrame, finished: pd.DataFrame, protocols: pd.DataFrame, order: list[str],
                     metric: str) -> None:
    """The study metric under each selection protocol (mean over seeds) and the optimism of best-on-test:
    best-on-test − best-on-val over the seeds, mean and t-interval."""
    by = {protocol: run_values(finished, [metric], protocol, protocols) for protocol in PROTOCOLS}
    for protocol, values in by.items():
        table[f"{metric}_{protocol}"] = values.groupby("tags.variant")[metric].mean().reindex(order)
    gaps = [optimism(per_seed(by["test"], v, metric), per_seed(by["val"], v, metric)) for v in order]
    table[f"{metric}_optimism"], table[f"{metric}_optimism_low"], table[f"{metric}_optimism_high"], _ = zip(*gaps)


# ---------------------------------------------------------------- grid, notes, plot


def _shown_metrics(table: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The spec's columns with a value or a paper number (a dataset without mAP gets no empty mAP column)."""
    return [m for m in map(mlflow_key, columns)
            if (f"{m}_mean" in table and table[f"{m}_mean"].notna().any()) or f"{m}_paper" in table]


def ablation_grid(table: pd.DataFrame, metric: str, full: str | None, columns: Sequence[str] = CORE,
                  reference: str = "full") -> Grid:
    """Percent cells `mean ± std [95 % t-interval]`; the best mean per metric in bold, unless every row ties; the
    paired difference to the full model (`reference`: how the table names that row) with its interval, its p and
    the Holm-adjusted p with its mark."""
    shown = _shown_metrics(table, columns)
    name = label(metric)
    boot = f"{metric}_boot_low" in table
    headers = ["Variant", "n"]
    for m in shown:
        headers += [label(m)] + ([f"{label(m)} (paper)"] if f"{m}_paper" in table else [])
    headers += [f"{name} 95% CI (seeds × videos)"] if boot else []
    headers += [f"Δ{name} vs {reference} [95% CI]", "p", "p (Holm)", "failed"]
    grid = Grid(headers, [])
    means = {m: table[f"{m}_mean"].dropna() for m in shown if f"{m}_mean" in table}
    best = {m: v.max() for m, v in means.items() if v.round(9).nunique() > 1}
    scale = percent_scale(metric)
    for r, (variant, row) in enumerate(table.iterrows()):
        marked = variant == full and variant != reference  # "LGT-Adapter (full)"; the confirmed "base" as is
        cells = [f"{variant} ({reference})" if marked else str(variant), str(int(row["runs"]))]
        for m in shown:
            if row.get(f"{m}_mean") == best.get(m) and finite(best.get(m)):
                grid.bold.add((r, len(cells)))
            cells.append(mean_std(row, m, interval_of_mean=True))
            if f"{m}_paper" in table:
                cells.append(num(row[f"{m}_paper"]))
        if boot:
            cells.append(interval(row[f"{metric}_boot_low"] * scale, row[f"{metric}_boot_high"] * scale))
        if variant == full:
            cells += ["ref.", "-", "-"]
        else:
            delta = row[f"{metric}_delta"] * scale
            span = interval(row[f"{metric}_delta_low"] * scale, row[f"{metric}_delta_high"] * scale, signed=True)
            cells += [f"{signed(delta)} {span}".strip() if finite(delta) else "-",
                      pvalue(row[f"{metric}_p"]) + (" (W)" if row[f"{metric}_test"] == "wilcoxon" else ""),
                      f"{pvalue(row[f'{metric}_p_holm'])} {row[f'{metric}_sig']}".strip()]
        cells.append(str(int(row["failed"])))
        grid.rows.append(cells)
    return grid


def protocol_grid(table: pd.DataFrame, metric: str) -> Grid | None:
    """The study metric per row under the three selection protocols, and the optimism of best-on-test."""
    if f"{metric}_optimism" not in table or table[[f"{metric}_{p}" for p in PROTOCOLS]].isna().all().all():
        return None  # no histories (runs logged by an older version)
    name, scale = label(metric), percent_scale(metric)
    grid = Grid(["Variant", f"{name} best-on-val", f"{name} best-on-test", f"{name} last",
                 "optimism (test − val) [95% CI]"], [])
    for variant, row in table.iterrows():
        gap = row[f"{metric}_optimism"] * scale
        span = interval(row[f"{metric}_optimism_low"] * scale, row[f"{metric}_optimism_high"] * scale, signed=True)
        grid.rows.append([str(variant), *[num(row[f"{metric}_{p}"] * scale) for p in PROTOCOLS],
                          f"{signed(gap)} {span}".strip() if finite(gap) else "-"])
    return grid


def fused_note(ctx: Context) -> list[str]:
    """Which seeds were trained together (fuse_seeds), when any were."""
    column = f"tags.{FUSED_GROUP_TAG}"
    if column not in ctx.finished or ctx.finished[column].isna().all():
        return []
    groups = sorted(ctx.finished[column].dropna().unique())
    return [f"Fused seeds: the seeds of a row were trained together in one vectorised model per trial (fuse_seeds; "
            f"groups {'; '.join(groups)}); each seed keeps its own initialisation and batch order, and its numbers "
            "differ from a lone run's by rounding drift only (docs/speed.md)."]


def ablation_notes(ctx: Context, table: pd.DataFrame, protocol: str = SELECTION) -> list[str]:
    seeds = sorted(ctx.finished["tags.seed"].dropna().unique(), key=_seed_key) if "tags.seed" in ctx.finished \
        else []
    failed, total = int(table["failed"].sum()), len(ctx.children)
    unfinished = int(table["unfinished"].sum())
    reused = int(table["reused"].sum()) if "reused" in table else 0
    name = label(ctx.metric)
    n_max = int(table["runs"].max()) if len(table) else 0
    shown_test = (f"Wilcoxon signed-rank (scipy.stats.wilcoxon; rows with ≥ {WILCOXON_MIN_N} pairs, marked W) or "
                  if n_max >= WILCOXON_MIN_N else "")
    notes = [
        f"Test metrics under {protocol_text(protocol)}. Cells: mean ± sample std (ddof=1) over seeds of FINISHED "
        "trials [95 % Student-t confidence interval of the mean over seeds, scipy.stats.t.interval; "
        f"{CLIPPED} = the interval crossed the metric's range 0-100 and is cut at the bound: with few seeds the "
        "t-interval overshoots], all in percent as the paper (AUC/AP/AnoAUC are logged as fractions); best mean "
        "per metric in bold; n = finished trials of the row.",
        "The error bars capture the variation over seeds (model initialisation and batch order) on one fixed "
        "test set" + (f"; the column '{name} 95% CI (seeds × videos)' also captures test-video sampling: a "
                       f"two-level percentile bootstrap (resample the seeds, then the test videos; {N_RESAMPLES} "
                       "resamples from each run's video bootstrap, seeded by its seed)"
                       if f"{ctx.metric}_boot_low" in table else "") + ".",
        f"Against the full model {ctx.spec.full!r}: Δ = row − full in points over seeds matched by the seed tag, "
        f"with its 95 % t-interval; p: two-sided {shown_test}paired t-test (scipy.stats.ttest_rel) of {name}; "
        "p (Holm): Holm-adjusted across the rows of this table (statsmodels multipletests); n.s. = not "
        "significant at 0.05, * < 0.05, ** < 0.01, *** < 0.001; '-' with fewer than 2 pairs or zero variance.",
        *protocol_notes(ctx),
        *paper_note(ctx),
        f"Seeds: {planned(ctx.parent, 'study.seeds', ctx.spec.seeds)} per variant planned; {len(seeds)} seen "
        f"({', '.join(map(str, seeds))}).",
        *seeds_auto_note(ctx),
        *fused_note(ctx),
        f"Failed trials (status FAILED): {failed} of {total}" + (f"; unfinished (RUNNING/KILLED): {unfinished}"
                                                                   if unfinished else "") + ".",
        f"Reused trials: {reused} of {len(ctx.finished)} finished (results copied from an identical FINISHED run: "
        "same resolved config and seed, data fingerprint and code digest; tag reused_from).",
        provenance(ctx),
    ]
    if f"{ctx.metric}_optimism" in table:
        notes.insert(3, f"Selection protocols ({name}, test metric): best-on-val = at the evaluation with the best "
                        "validation score, best-on-test = at the best test evaluation (what the authors' code "
                        "prints), last = at the last evaluation, all derived from each run's logged histories; "
                        "optimism = best-on-test − best-on-val, mean [95 % t-interval] over seeds. With "
                        "eval.reload_best (the authors' reload of the best checkpoint every epoch) the selection "
                        "feeds back into training, so best-on-test derived from a selection=val run is best-on-test "
                        "along this run's trajectory, not the authors' protocol; that one is eval.selection=test.")
    return notes


def seeds_auto_note(ctx: Context) -> list[str]:
    """What `--seeds auto` decided, from the parent's tags."""
    reason = tag(ctx.parent, "seeds.auto")
    return [f"Seeds chosen by --seeds auto: {reason}."] if reason else []


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
