"""Study reports built from MLflow alone: `python -m study.report NAME [--tracking-uri URI] [--parent RUN_ID]`.

Ablations: one row per variant (spec order) with mean ± std and n over seeds of the FINISHED trials, the
paper's numbers, a paired t-test of every row against the full model over seeds matched by the `seed` tag
and the failed trials. Searches: the top 5 trials by the final metric, trial status counts, Optuna
parameter importances and the final metric against each searched parameter. Every output (md, tex, csv,
png) is computed in memory first and then written atomically, so a failure leaves nothing partial.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optuna
import pandas as pd
from matplotlib.patches import Patch
from mlflow.tracking import MlflowClient
from scipy import stats

from study.space import Domain
from study.spec import StudySpec, load
from study.tracking import PARENT, TRIAL, default_tracking_uri
from study.tracking import client as tracking_client
from vadclip.errors import VadClipError
from vadclip.io import write_atomically
from vadclip.metrics import CORE_METRICS as CORE
from vadclip.metrics import label as _label
from vadclip.metrics import percent_scale as _scale

matplotlib.use("Agg")
AP_NOTE = "AP = sklearn average_precision_score, not trapezoidal AUC-PR"
MAP_NOTES = {"official": "all test videos and classes incl. normal", "paper": "abnormal videos and classes only"}
TOP_K = 5
FINAL = "metrics.final/"
FINAL_VAL = "metrics.final/val/"  # the validation metrics of the selected checkpoint
SYNTHETIC_NOTE = "synthetic data: the paper's values are for the real dataset, shown for orientation only"


class ReportError(VadClipError, RuntimeError):
    """Nothing to report (no experiment, no parent run, no finished trial); the message says what is missing."""


@dataclass(eq=False)
class ReportFiles:
    md: Path
    tex: Path
    csv: Path
    plots: list[Path]
    table: pd.DataFrame  # ablation: one row per variant (fractions); search: one row per finished trial
    text: str = ""  # the main markdown table, for the console
    notes: list[str] = field(default_factory=list)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)  # row -> metric -> mean, for the parent


@dataclass(frozen=True)
class Context:
    """What every part of a report needs to know about the runs it describes."""

    spec: StudySpec
    uri: str
    parent: pd.Series
    children: pd.DataFrame  # every trial run of the parent, any status
    dataset: str
    style: str
    metric: str  # the spec's main metric resolved for the data style
    date: str

    @property
    def finished(self) -> pd.DataFrame:
        return self.children[self.children["status"] == "FINISHED"]

    @property
    def parent_id(self) -> str:
        return str(self.parent["run_id"])


# ---------------------------------------------------------------- reading MLflow


def _client(uri: str) -> MlflowClient:
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        # MLflow would silently create an empty store; a report must not write anything
        raise ReportError(f"no MLflow store at {uri} (the file does not exist)")
    return tracking_client(uri)


def _runs(client: MlflowClient, experiment_id: str, filter_string: str) -> pd.DataFrame:
    """Runs as rows with `status`, `start_time`, `metrics.*`, `params.*`, `tags.*` (mlflow.search_runs's names)."""
    rows, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=5000, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        for run in page:
            row: dict[str, Any] = {"run_id": run.info.run_id, "status": run.info.status,
                                   "start_time": run.info.start_time, "end_time": run.info.end_time}
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            row.update({f"params.{k}": v for k, v in run.data.params.items()})
            row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
            rows.append(row)
        token = page.token
        if not token:
            return pd.DataFrame(rows, columns=None if rows else ["run_id", "status", "start_time", "end_time"])


def _experiment(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        raise ReportError(f"no MLflow experiment {name!r} in {uri}; run the study first")
    return exp.experiment_id


def _parent(client: MlflowClient, experiment_id: str, name: str, parent_run_id: str | None) -> pd.Series:
    parents = _runs(client, experiment_id, f"tags.`vadclip.role` = '{PARENT}'")
    if parent_run_id is not None:
        match = parents[parents["run_id"] == parent_run_id]
        if match.empty:
            raise ReportError(f"run {parent_run_id} is not a parent run (vadclip.role={PARENT}) of study {name!r}")
        return match.iloc[0]
    # the newest invocation with results: one that failed at its start or was interrupted before any trial
    # finished has nothing to show
    for _, parent in parents.sort_values("start_time", ascending=False).iterrows():
        runs = _runs(client, experiment_id, f"tags.mlflow.parentRunId = '{parent['run_id']}' and "
                                            "attributes.status = 'FINISHED'")
        if not runs.empty:
            return parent
    raise ReportError(f"study {name!r} has no parent run (vadclip.role={PARENT}) with a FINISHED trial; "
                      f"{len(parents)} parent run(s) without results")


def _children(client: MlflowClient, experiment_id: str, parent: pd.Series, name: str) -> pd.DataFrame:
    runs = _runs(client, experiment_id, f"tags.mlflow.parentRunId = '{parent['run_id']}'")
    if "tags.vadclip.role" in runs:
        runs = runs[runs["tags.vadclip.role"].fillna(TRIAL) == TRIAL]
    if runs.empty or not (runs["status"] == "FINISHED").any():
        counts = runs["status"].value_counts().to_dict() if not runs.empty else {}
        raise ReportError(f"parent run {parent['run_id']} of study {name!r} has no FINISHED trial runs "
                          f"(trials by status: {counts or 'none'})")
    return runs.reset_index(drop=True)


def _tag(row: pd.Series | pd.DataFrame, key: str, default: str = "") -> str:
    value = row.get(f"tags.{key}")
    if isinstance(value, pd.Series):  # a column: its single value, or the default when mixed/absent
        values = value.dropna().unique()
        return str(values[0]) if len(values) == 1 else default
    return default if value is None or value != value else str(value)


def _style(dataset: str, children: pd.DataFrame) -> str:
    """ucf or xd; synthetic data carries its convention in the `data.synthetic.style` param."""
    if dataset == "synthetic" and "params.data.synthetic.style" in children:
        styles = children["params.data.synthetic.style"].dropna().unique()
        return "ucf" if list(styles) == ["ucf"] else "xd"
    return "ucf" if dataset == "ucf" else "xd"


def _context(spec: StudySpec, uri: str, parent_run_id: str | None) -> Context:
    client = _client(uri)
    experiment_id = _experiment(client, spec.name, uri)
    parent = _parent(client, experiment_id, spec.name, parent_run_id)
    children = _children(client, experiment_id, parent, spec.name)
    dataset = _tag(parent, "dataset") or _tag(children, "dataset") or spec.preset
    style = _style(dataset, children)
    date = _date(datetime.now(timezone.utc).timestamp() * 1000)
    return Context(spec, uri, parent, children, dataset, style, spec.resolve_metric(style), date)


# ---------------------------------------------------------------- numbers and text


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float, np.number)) and math.isfinite(float(x))


def _num(x: Any, digits: int = 2) -> str:
    return f"{float(x):.{digits}f}" if _finite(x) else "-"


def _pvalue(p: Any) -> str:
    if not _finite(p):
        return "-"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def final_metrics(runs: pd.DataFrame) -> list[str]:
    """The `final/*` metric names present, core ones first (paper order), then mAP levels, then the rest."""
    names = [c[len(FINAL):] for c in runs.columns if c.startswith(FINAL) and "/" not in c[len(FINAL):]]
    levels = sorted(n for n in names if n.startswith("map_iou"))
    rest = sorted(n for n in names if n not in CORE and n not in levels)
    return [m for m in CORE if m in names] + levels + rest


@dataclass
class Grid:
    """A rendered table: header, rows of text cells, cells to set in bold."""

    headers: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)


def to_markdown(grid: Grid) -> str:
    def cell(text: str, r: int, c: int) -> str:
        text = text.replace("|", r"\|")
        return f"**{text}**" if (r, c) in grid.bold and text != "-" else text

    frame = pd.DataFrame([[cell(t, r, c) for c, t in enumerate(row)] for r, row in enumerate(grid.rows)],
                         columns=[h.replace("|", r"\|") for h in grid.headers])
    align = ["left"] + ["right"] * (len(grid.headers) - 1)
    return frame.to_markdown(index=False, disable_numparse=True, colalign=align)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "Δ": r"$\Delta$",
        "−": "-", "<": r"\textless{}", ">": r"\textgreater{}"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def to_latex(grid: Grid, caption: str, label: str, notes: list[str]) -> str:
    """A booktabs table float; needs only \\usepackage{booktabs}."""
    def cell(text: str, r: int, c: int) -> str:
        body = tex_escape(text)
        return rf"\textbf{{{body}}}" if (r, c) in grid.bold and text != "-" else body

    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{tex_escape(caption)}}}",
             rf"\label{{{label}}}", r"\begin{tabular}{l" + "r" * (len(grid.headers) - 1) + "}",
             r"\toprule", " & ".join(tex_escape(h) for h in grid.headers) + r" \\", r"\midrule"]
    lines += [" & ".join(cell(t, r, c) for c, t in enumerate(row)) + r" \\" for r, row in enumerate(grid.rows)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if notes:
        lines.append(r"\par\smallskip\footnotesize " + r" \\ ".join(tex_escape(n) for n in notes))
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def _tex_label(name: str) -> str:
    """A \\label key: no escaping there, so only safe characters."""
    return "tab:" + "".join(ch if ch.isalnum() else "-" for ch in name)


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")  # keeps a legend placed outside
    plt.close(fig)
    return buffer.getvalue()


def _per_variant(ctx: Context, key: str, param: str | None = None) -> dict[str, str]:
    """A trial's value per variant ('' where the variant's trials disagree): the config param where it is
    logged (it is the trial's own config; the runner's tags may carry the study's base value), else the tag."""
    children = ctx.children
    column = f"params.{param}" if param and f"params.{param}" in children else f"tags.{key}"
    if column not in children or "tags.variant" not in children:
        return {}
    return {str(v): _single(rows[column]) for v, rows in children.groupby("tags.variant", sort=False)}


def _single(values: pd.Series) -> str:
    distinct = values.dropna().unique()
    return str(distinct[0]) if len(distinct) == 1 else ""


def _describe(ctx: Context, key: str, param: str | None = None, explain: Callable[[str], str] = str) -> str:
    """A trial's common value, with the rows that differ (e.g. the one row that switches the mAP protocol)."""
    values = _per_variant(ctx, key, param)
    counts = Counter(values.values())
    common = counts.most_common(1)[0][0] if counts else ""
    if not common and len(counts) <= 1:  # the trials lack it: the parent's tag
        return explain(_tag(ctx.parent, key) or "unknown")
    exceptions = [f"{v}: {explain(val) if val else 'mixed'}" for v, val in values.items() if val != common]
    return (explain(common) if common else "mixed") + (f"; except {'; '.join(exceptions)}" if exceptions else "")


def _protocol_notes(ctx: Context) -> list[str]:
    """Dataset, model selection, AP and mAP definitions."""
    selection = _describe(ctx, "selection", "eval.selection")
    protocol = _describe(ctx, "map_protocol", "eval.map_protocol",
                         lambda p: f"{p} ({MAP_NOTES.get(p, 'unknown protocol')})")
    notes = [f"Dataset: {ctx.dataset} ({ctx.style}-style labels); model selection on {selection}; the selected "
             "checkpoint re-evaluated on test.", AP_NOTE + ".", f"mAP protocol: {protocol}."]
    branch = _describe(ctx, "score_branch")
    if branch != "unknown":
        notes.append(f"Scores from branch: {branch}.")
    return notes


def _provenance(ctx: Context) -> str:
    status = str(ctx.parent["status"])
    partial = f" ({status}: partial results)" if status != "FINISHED" else ""
    code = _tag(ctx.parent, "code_version") or "unknown"
    started = _date(ctx.parent.get("start_time"))
    return (f"MLflow {display_uri(ctx.uri)}, experiment {ctx.spec.name}, parent run {ctx.parent_id}{partial} "
            f"started {started}, code version {code}; report generated {ctx.date}.")


def display_uri(uri: str) -> str:
    """A SQLite store inside the current folder as a relative URI: reports carry no machine path."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        try:
            return f"sqlite:///{path.resolve().relative_to(Path.cwd().resolve())}"
        except ValueError:
            return uri
    return uri


def _paper_note(ctx: Context) -> list[str]:
    return [SYNTHETIC_NOTE + "."] if ctx.dataset == "synthetic" else []


def _date(millis: Any) -> str:
    if not _finite(millis):
        return "at an unknown time"
    return datetime.fromtimestamp(float(millis) / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ---------------------------------------------------------------- ablations


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


def paired_test(finished: pd.DataFrame, variant: str, full: str, metric: str) -> tuple[float, float, int]:
    """(mean of row - full, two-sided ttest_rel p, pairs) over seeds present in both rows."""
    col = FINAL + metric
    if col not in finished or "tags.seed" not in finished:
        return math.nan, math.nan, 0
    runs = finished.dropna(subset=[col])
    per_seed = runs.groupby(["tags.seed", "tags.variant"])[col].mean().unstack("tags.variant")
    if variant not in per_seed or full not in per_seed:
        return math.nan, math.nan, 0
    pairs = per_seed[[variant, full]].dropna()
    diff = (pairs[variant] - pairs[full]).to_numpy()
    if len(diff) == 0:
        return math.nan, math.nan, 0
    if len(diff) < 2 or np.ptp(diff) == 0:  # the t statistic is undefined
        return float(diff.mean()), math.nan, len(diff)
    return float(diff.mean()), float(stats.ttest_rel(pairs[variant], pairs[full]).pvalue), len(diff)


def ablation_table(ctx: Context) -> pd.DataFrame:
    spec, children, main = ctx.spec, ctx.children, ctx.metric
    order = variant_order(spec, children)
    metrics = final_metrics(ctx.finished)
    table = aggregate(ctx.finished, order, metrics)
    status = children.groupby("tags.variant")["status"]
    table["runs"] = status.apply(lambda s: int((s == "FINISHED").sum())).reindex(order).fillna(0).astype(int)
    table["failed"] = status.apply(lambda s: int((s == "FAILED").sum())).reindex(order).fillna(0).astype(int)
    table["unfinished"] = status.apply(lambda s: int((~s.isin(["FINISHED", "FAILED"])).sum())) \
        .reindex(order).fillna(0).astype(int)
    papers = {v.name: v.paper for v in spec.variants}
    for m in CORE:
        if any(m in p for p in papers.values()):
            table[f"{m}_paper"] = [papers.get(v, {}).get(m, math.nan) for v in order]
    tests = [paired_test(ctx.finished, v, spec.full, main) if v != spec.full else (math.nan, math.nan, 0)
             for v in order]
    table[f"{main}_delta"], table[f"{main}_p"], table[f"{main}_pairs"] = zip(*tests)
    return table


def _shown_metrics(table: pd.DataFrame) -> list[str]:
    """Core metrics with a value or a paper number (a dataset without mAP gets no empty mAP column)."""
    return [m for m in CORE if (f"{m}_mean" in table and table[f"{m}_mean"].notna().any()) or f"{m}_paper" in table]


def ablation_grid(ctx: Context, table: pd.DataFrame) -> Grid:
    main, full = ctx.metric, ctx.spec.full
    shown = _shown_metrics(table)
    headers = ["Variant", "n"]
    for m in shown:
        headers += [_label(m)] + ([f"{_label(m)} (paper)"] if f"{m}_paper" in table else [])
    headers += [f"Δ{_label(main)} vs full", "p", "failed"]
    grid = Grid(headers, [])
    means = {m: table[f"{m}_mean"].dropna() for m in shown if f"{m}_mean" in table}
    best = {m: v.max() for m, v in means.items() if v.round(9).nunique() > 1}  # no bold when every row ties
    for r, (variant, row) in enumerate(table.iterrows()):
        name = f"{variant} (full)" if variant == full else str(variant)
        cells = [name, str(int(row["runs"]))]
        for m in shown:
            if row.get(f"{m}_mean") == best.get(m) and _finite(best.get(m)):
                grid.bold.add((r, len(cells)))
            cells.append(_mean_std(row, m))
            if f"{m}_paper" in table:
                cells.append(_num(row[f"{m}_paper"]))
        delta = "ref." if variant == full else _signed(row[f"{main}_delta"] * _scale(main))
        cells += [delta, _pvalue(row[f"{main}_p"]), str(int(row["failed"]))]
        grid.rows.append(cells)
    return grid


def _mean_std(row: pd.Series, metric: str) -> str:
    mean, std, n = row.get(f"{metric}_mean"), row.get(f"{metric}_std"), int(row.get(f"{metric}_n", 0) or 0)
    if not _finite(mean):
        return "-"
    scale = _scale(metric)
    text = f"{mean * scale:.2f} ± {std * scale:.2f}" if n >= 2 and _finite(std) else f"{mean * scale:.2f}"
    return text if n == row["runs"] else f"{text} (n={n})"


def _signed(x: float) -> str:
    return f"{x:+.2f}" if _finite(x) else "-"


def ablation_notes(ctx: Context, table: pd.DataFrame) -> list[str]:
    seeds = sorted(ctx.finished["tags.seed"].dropna().unique(), key=_seed_key) if "tags.seed" in ctx.finished \
        else []
    failed, total = int(table["failed"].sum()), len(ctx.children)
    unfinished = int(table["unfinished"].sum())
    label = _label(ctx.metric)
    return [
        "Mean ± sample std (ddof=1) over seeds of FINISHED trials, all in percent as the paper (AUC/AP/AnoAUC are "
        "logged as fractions); best mean per metric in bold; n = finished trials of the row.",
        *_protocol_notes(ctx),
        *_paper_note(ctx),
        f"Seeds: {_planned(ctx, 'study.seeds', ctx.spec.seeds)} per variant planned; {len(seeds)} seen "
        f"({', '.join(map(str, seeds))}).",
        f"Paired comparison against the full model {ctx.spec.full!r}: two-sided scipy.stats.ttest_rel of {label} "
        f"over seeds matched by the seed tag; Δ = row - full in points; p '-' with fewer than 2 pairs or zero "
        "variance.",
        f"Failed trials (status FAILED): {failed} of {total}" + (f"; unfinished (RUNNING/KILLED): {unfinished}"
                                                                   if unfinished else "") + ".",
        _provenance(ctx),
    ]


def _seed_key(seed: str) -> tuple[int, float | str]:
    try:
        return 0, float(seed)
    except ValueError:
        return 1, seed


def ablation_plot(ctx: Context, table: pd.DataFrame) -> bytes:
    """Horizontal bars (long variant names) of the main metric with std error bars; paper values as diamonds."""
    main, scale = ctx.metric, _scale(ctx.metric)
    means = table.get(f"{main}_mean", pd.Series(math.nan, index=table.index)) * scale
    stds = table.get(f"{main}_std", pd.Series(math.nan, index=table.index)).fillna(0) * scale
    y = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(table) + 1.2))
    colors = ["tab:orange" if v == ctx.spec.full else "tab:blue" for v in table.index]
    ax.barh(y, means.fillna(0), xerr=stds, color=colors, capsize=3)
    handles = [Patch(color="tab:orange", label="full model")]
    if f"{main}_paper" in table:
        handles.append(ax.scatter(table[f"{main}_paper"], y, marker="D", s=20, color="black", zorder=3,
                                  label="paper"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_yticks(y, [str(v) for v in table.index], fontsize=8)
    ax.invert_yaxis()  # spec order top to bottom, like the table
    ax.set_xlabel(f"{_label(main)} (%), mean ± std over seeds")
    ax.set_title(ctx.spec.name, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _ablation(ctx: Context, out_dir: Path) -> tuple[dict[Path, bytes], ReportFiles]:
    spec = ctx.spec
    if "tags.variant" not in ctx.children:
        raise ReportError(f"the trials of parent run {ctx.parent_id} carry no `variant` tag; cannot group rows")
    table = ablation_table(ctx)
    grid = ablation_grid(ctx, table)
    notes = ablation_notes(ctx, table)
    text = to_markdown(grid)
    plot = out_dir / f"{spec.name}_{ctx.metric}.png"
    paper = f" (paper Table {spec.paper_table})" if spec.paper_table else ""
    md = [f"# {spec.name}: {spec.description}{paper}", "", text, "", *[f"- {n}" for n in notes], "",
          f"![{_label(ctx.metric)} per variant]({plot.name})", ""]
    tex = to_latex(grid, f"{spec.description}{paper}", _tex_label(spec.name), notes)
    files = ReportFiles(out_dir / f"{spec.name}.md", out_dir / f"{spec.name}.tex", out_dir / f"{spec.name}.csv",
                        [plot], table, text, notes)
    contents = {files.md: "\n".join(md).encode(), files.tex: _tex_file(tex, ctx).encode(),
                files.csv: table.to_csv(index_label="variant").encode(), plot: ablation_plot(ctx, table)}
    return contents, files


def _tex_file(body: str, ctx: Context) -> str:
    return (f"% {ctx.spec.name}: generated by `python -m study.report` from MLflow parent run {ctx.parent_id}.\n"
            "% Needs \\usepackage{booktabs}.\n" + body)


# ---------------------------------------------------------------- searches


def rank_column(ctx: Context) -> str:
    """What a search is ranked by: the metric it optimised, i.e. the selected checkpoint's validation metric
    (`val_<metric>`) under `eval.selection=val`; the test metric under the authors' `selection=test`."""
    if _tag(ctx.parent, "selection", "val") == "val" and FINAL_VAL + ctx.metric in ctx.finished:
        return f"val_{ctx.metric}"
    return ctx.metric


def search_table(ctx: Context) -> pd.DataFrame:
    """One row per FINISHED trial, best first by `rank_column`: searched params (typed), final test metrics
    and the selected checkpoint's validation metric."""
    runs = ctx.finished
    if FINAL + ctx.metric not in runs or runs[FINAL + ctx.metric].isna().all():
        raise ReportError(f"no FINISHED trial of parent run {ctx.parent_id} logged final/{ctx.metric}")
    index = runs.get("tags.trial_id", runs["run_id"]).fillna(runs["run_id"])
    table = pd.DataFrame({"run_id": runs["run_id"].to_numpy()}, index=pd.Index(index.to_numpy(), name="trial"))
    for key, domain in ctx.spec.space.items():
        raw = runs.get(f"params.{key}", pd.Series(None, index=runs.index))
        table[key] = [_safe_value(v, domain) for v in raw]
    for m in final_metrics(runs):
        table[m] = runs[FINAL + m].to_numpy()
    if FINAL_VAL + ctx.metric in runs:
        table[f"val_{ctx.metric}"] = runs[FINAL_VAL + ctx.metric].to_numpy()
    table["epochs"] = runs["metrics.epoch"].to_numpy() if "metrics.epoch" in runs else math.nan
    rank = rank_column(ctx)
    return table.dropna(subset=[rank]).sort_values(rank, ascending=False, kind="stable")


def _safe_value(raw: Any, domain: Domain) -> Any:
    if raw is None or raw != raw:
        return None
    try:
        return domain.value(raw)
    except ValueError:
        return raw  # kept as logged; the importance step skips it


def status_counts(children: pd.DataFrame) -> dict[str, int]:
    """Trials per MLflow status, plus `early-stopped`: not failed, tagged so or with fewer epochs than the longest."""
    counts = {str(k): int(v) for k, v in children["status"].value_counts().items()}
    alive = children[~children["status"].isin(["FAILED", "RUNNING"])]  # running: not stopped (yet)
    early = pd.Series(False, index=alive.index)
    if "tags.stopped_early" in alive:
        early |= alive["tags.stopped_early"].fillna("").str.lower() == "true"
    if "metrics.epoch" in children and children["metrics.epoch"].notna().any():
        early |= alive["metrics.epoch"].fillna(0) < children["metrics.epoch"].max()
    counts["early-stopped"] = int(early.sum())
    return counts


def param_importances(spec: StudySpec, table: pd.DataFrame, metric: str) -> tuple[dict[str, float], str | None]:
    """fANOVA importances (Optuna) of the searched params for the final metric; a note instead when undefined."""
    keys = list(spec.space)
    if len(keys) == 1:
        return {}, f"a single searched parameter ({keys[0]}): its importance is 1 by definition"
    dists = {k: spec.space[k].optuna() for k in keys}
    trials, skipped = [], 0
    for record in table[[*keys, metric]].to_dict("records"):
        try:
            params = {k: spec.space[k].value(record[k]) for k in keys}
            trials.append(optuna.trial.create_trial(params=params, distributions=dists, value=float(record[metric])))
        except (ValueError, TypeError):  # a param missing or outside the spec's space (spec edited since)
            skipped += 1
    skip_note = f" ({skipped} trial(s) skipped: params outside the space)" if skipped else ""
    if len(trials) < 2:
        return {}, f"importances need at least 2 finished trials, have {len(trials)}{skip_note}"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line per report
    try:
        study = optuna.create_study(direction="maximize")
        study.add_trials(trials)
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # seeded: reproducible reports
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as err:  # e.g. all trials scored the same
        return {}, f"importances could not be computed: {err}{skip_note}"
    finally:
        optuna.logging.set_verbosity(verbosity)
    return {k: float(v) for k, v in values.items()}, (skip_note.strip(" ()") or None)


def _param_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def search_grid(ctx: Context, table: pd.DataFrame) -> Grid:
    main, rank = ctx.metric, rank_column(ctx)
    others = [m for m in CORE if m != main and m in table]
    ranked = [rank] if rank != main else []
    headers = ["Trial", *ctx.spec.space, *[f"{_label(main)} (val, ranked)" for _ in ranked],
               f"{_label(main)} (test)" + ("" if ranked else ", ranked"), *[_label(m) for m in others],
               "best epoch", "epochs"]
    grid = Grid(headers, [])
    for trial, row in table.head(TOP_K).iterrows():
        cells = [str(trial), *[_param_text(row[k]) for k in ctx.spec.space]]
        cells += [_num(row[rank] * _scale(main)) for rank in ranked]
        cells += [_num(row[m] * _scale(m)) for m in (main, *others)]
        cells += [_num(row.get("best_epoch"), 0), _num(row.get("epochs"), 0)]
        grid.rows.append(cells)
    if grid.rows:
        grid.bold.add((0, len(ctx.spec.space) + 1))
    return grid


def importance_grid(importances: dict[str, float]) -> Grid:
    return Grid(["Parameter", "Importance"], [[k, f"{v:.3f}"] for k, v in importances.items()])


def search_plot(ctx: Context, table: pd.DataFrame) -> bytes:
    """The final metric against each searched parameter, one panel each (log x for loguniform); best = star."""
    keys, main, scale = list(ctx.spec.space), rank_column(ctx), _scale(ctx.metric)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.2 * rows), squeeze=False)
    y = table[main].to_numpy(dtype=float) * scale
    for ax, key in zip(axes.flat, keys):
        x = ctx.spec.space[key].axis(ax, table[key])
        ax.scatter(x, y, color="tab:blue", alpha=0.8)
        ax.scatter(x[:1], y[:1], color="tab:red", marker="*", s=120, zorder=3, label="best")  # table is sorted
        ax.set_xlabel(key)
        ax.set_ylabel(f"{'validation' if main != ctx.metric else 'test'} {_label(ctx.metric)}"
                      + (" (%)" if scale == 100 else ""))
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    axes[0, 0].legend(loc="best", fontsize=8)
    fig.suptitle(ctx.spec.name, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _planned(ctx: Context, param: str, default: Any) -> str:
    """The invocation's value (the parent's `study.trials`/`study.seeds` params count --num-samples/--seeds
    overrides; the YAML's value does not)."""
    planned = ctx.parent.get(f"params.{param}")
    return str(planned) if planned is not None and planned == planned else str(default)


def _rank_text(ctx: Context) -> str:
    if rank_column(ctx) != ctx.metric:
        return f"the validation {_label(ctx.metric)} of each trial's selected checkpoint (what the search optimised)"
    return f"the test {_label(ctx.metric)} of the selected checkpoint (selection on test: the authors' protocol)"


def search_notes(ctx: Context, counts: dict[str, int], importance_note: str | None) -> list[str]:
    statuses = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "early-stopped")
    space = "; ".join(f"{k}: {d.describe()}" for k, d in ctx.spec.space.items())
    scheduler = ", ".join(f"{k}={v}" for k, v in ctx.spec.scheduler.items())
    notes = [f"Trials: {len(ctx.children)} ({statuses}); early-stopped (tag stopped_early or fewer epochs than "
             f"the longest trial): {counts['early-stopped']}; failed: {counts.get('FAILED', 0)}.",
             f"Ranked by {_rank_text(ctx)}; test metrics of the selected checkpoint beside it; all metrics in "
             "percent as the paper.",
             f"Searched space: {space}; scheduler: {scheduler}; "
             f"samples: {_planned(ctx, 'study.trials', ctx.spec.num_samples)}.",
             *_protocol_notes(ctx)]
    if importance_note:
        notes.append(f"Importances: {importance_note}.")
    notes.append(_provenance(ctx))
    return notes


def _search(ctx: Context, out_dir: Path) -> tuple[dict[Path, bytes], ReportFiles]:
    spec = ctx.spec
    table = search_table(ctx)
    counts = status_counts(ctx.children)
    importances, importance_note = param_importances(spec, table, rank_column(ctx))
    notes = search_notes(ctx, counts, importance_note)
    grid = search_grid(ctx, table)
    text = to_markdown(grid)
    plot = out_dir / f"{spec.name}_params.png"
    label = _label(ctx.metric)
    md = [f"# {spec.name}: {spec.description}", "", f"## Top {TOP_K} trials by final {label}", "", text, "",
          "## Parameter importances (Optuna fANOVA)", ""]
    md += [to_markdown(importance_grid(importances)), ""] if importances else [f"_{importance_note}_", ""]
    md += ["## Protocol", "", *[f"- {n}" for n in notes], "", f"![final {label} per parameter]({plot.name})", ""]
    tex = to_latex(grid, f"{spec.description}: top {TOP_K} trials by final {label}", _tex_label(spec.name), notes)
    if importances:
        tex += to_latex(importance_grid(importances), f"{spec.name}: parameter importances (Optuna fANOVA)",
                        _tex_label(spec.name) + "-importance", [])
    files = ReportFiles(out_dir / f"{spec.name}.md", out_dir / f"{spec.name}.tex", out_dir / f"{spec.name}.csv",
                        [plot], table, text, notes)
    contents = {files.md: "\n".join(md).encode(), files.tex: _tex_file(tex, ctx).encode(),
                files.csv: table.to_csv(index_label="trial").encode(), plot: search_plot(ctx, table)}
    return contents, files


# ---------------------------------------------------------------- writing and CLI


def build_report(spec: StudySpec, tracking_uri: str, out_dir: Path, parent_run_id: str | None = None) -> ReportFiles:
    """Read the study's runs from MLflow, compute the report in memory, then write md/tex/csv/png to out_dir."""
    ctx = _context(spec, tracking_uri, parent_run_id)
    out_dir = Path(out_dir)
    contents, files = (_ablation if spec.kind == "ablation" else _search)(ctx, out_dir)
    files.summary = _summary(spec, files.table)
    write_atomically(contents)
    return files


def _summary(spec: StudySpec, table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per ablation row the mean of each core metric; for a search the best trial's metrics (fractions as
    logged): what the parent run shows in MLflow's chart view."""
    if spec.kind == "ablation":
        return {str(v): {m: float(row[f"{m}_mean"]) for m in CORE if _finite(row.get(f"{m}_mean"))}
                for v, row in table.iterrows()}
    if table.empty:
        return {}
    best = table.iloc[0]
    return {"best": {m: float(best[m]) for m in (*CORE, *[c for c in table if c.startswith("val_")])
                     if m in table and _finite(best[m])}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.report", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="study name (search_spaces/NAME.yaml) or a spec path")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI")
                        or default_tracking_uri(Path.cwd()),
                        help="MLflow tracking URI (default: ./mlruns.db, as python -m study.run)")
    parser.add_argument("--parent", default=None, help="parent run id (default: the newest with a finished trial)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output folder (default: reports/)")
    args = parser.parse_args(argv)
    try:
        files = build_report(load(args.name), args.tracking_uri, args.out, args.parent)
    except VadClipError as err:
        print(f"study.report: {err}", file=sys.stderr)
        return 2
    print(files.text)
    print()
    for path in (files.md, files.tex, files.csv, *files.plots):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
