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
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from scipy import stats  # noqa: E402

from study.spec import SpecError, StudySpec, load  # noqa: E402
from study.tracking import PARENT, TRIAL, default_tracking_uri  # noqa: E402
from study.tracking import client as tracking_client  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
CORE = ("auc", "ap", "ano_auc", "map_avg")
LABELS = {"auc": "AUC", "ap": "AP", "ano_auc": "AnoAUC", "map_avg": "mAP AVG"}
AP_NOTE = "AP = sklearn average_precision_score, not trapezoidal AUC-PR"
MAP_NOTES = {"official": "all test videos and classes incl. normal", "paper": "abnormal videos and classes only"}
TOP_K = 5
FINAL = "metrics.final/"
ALIVE = ("FINISHED", "RUNNING")  # parents a report may describe


class ReportError(RuntimeError):
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
    alive = parents[parents["status"].isin(ALIVE)]
    if alive.empty:
        raise ReportError(f"study {name!r} has no FINISHED or RUNNING parent run (vadclip.role={PARENT}); "
                          f"{len(parents)} parent run(s) in other states")
    return alive.sort_values("start_time", ascending=False).iloc[0]


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


def is_fraction(metric: str) -> bool:
    """auc/ap/ano_auc (also per branch: c_auc, a_ap) are logged as fractions; mAP is already percent."""
    base = metric[2:] if metric[:2] in ("c_", "a_") else metric
    return base in ("auc", "ap", "ano_auc")


def _scale(metric: str) -> float:
    return 100.0 if is_fraction(metric) else 1.0


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float, np.number)) and math.isfinite(float(x))


def _num(x: Any, digits: int = 2) -> str:
    return f"{float(x):.{digits}f}" if _finite(x) else "-"


def _pvalue(p: Any) -> str:
    if not _finite(p):
        return "-"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def _label(metric: str) -> str:
    if metric in LABELS:
        return LABELS[metric]
    if metric.startswith("map_iou"):
        return f"mAP@{metric[len('map_iou'):]}"
    return metric


def final_metrics(runs: pd.DataFrame) -> list[str]:
    """The `final/*` metric names present, core ones first (paper order), then mAP levels, then the rest."""
    names = [c[len(FINAL):] for c in runs.columns if c.startswith(FINAL)]
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
    running = ctx.parent["status"] == "RUNNING" and (ctx.children["status"] == "RUNNING").any()
    partial = " (still RUNNING: partial results)" if running else ""
    code = _tag(ctx.parent, "code_version") or "unknown"
    started = _date(ctx.parent.get("start_time"))
    return (f"MLflow {ctx.uri}, experiment {ctx.spec.name}, parent run {ctx.parent_id}{partial} started {started}, "
            f"code version {code}; report generated {ctx.date}.")


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
        f"Seeds: {ctx.spec.seeds} per variant in the spec; {len(seeds)} seen ({', '.join(map(str, seeds))}).",
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


def distribution(domain: dict[str, list]) -> optuna.distributions.BaseDistribution:
    """Optuna's twin of a spec domain (Tune's randint excludes its upper bound, Optuna's includes it)."""
    (kind, args), = domain.items()
    if kind == "choice":
        return optuna.distributions.CategoricalDistribution(tuple(args))
    low, high = args[0], args[1]
    if kind == "randint":
        return optuna.distributions.IntDistribution(int(low), int(high) - 1)
    if kind == "quniform":
        return optuna.distributions.FloatDistribution(float(low), float(high), step=float(args[2]))
    return optuna.distributions.FloatDistribution(float(low), float(high), log=kind == "loguniform")


def param_value(raw: Any, domain: dict[str, list]) -> Any:
    """An MLflow param string back to the domain's type (choice values by their str, as MLflow stored them)."""
    (kind, args), = domain.items()
    if kind == "choice":
        for choice in args:
            if str(choice) == str(raw):
                return choice
        for choice in args:  # `16` logged as `16.0` by a float-typed path
            if isinstance(choice, (int, float)) and not isinstance(choice, bool) and _float_eq(raw, choice):
                return choice
        raise ValueError(f"{raw!r} is not one of {args}")
    value = float(raw)
    return int(round(value)) if kind == "randint" else value


def _float_eq(raw: Any, value: float) -> bool:
    try:
        return math.isclose(float(raw), float(value))
    except (TypeError, ValueError):
        return False


def search_table(ctx: Context) -> pd.DataFrame:
    """One row per FINISHED trial with the final metric: its searched params (typed) and final metrics."""
    main = FINAL + ctx.metric
    runs = ctx.finished
    if main not in runs or runs[main].isna().all():
        raise ReportError(f"no FINISHED trial of parent run {ctx.parent_id} logged final/{ctx.metric}")
    runs = runs.dropna(subset=[main]).sort_values(main, ascending=False, kind="stable")
    index = runs.get("tags.trial_id", runs["run_id"]).fillna(runs["run_id"])
    table = pd.DataFrame({"run_id": runs["run_id"].to_numpy()}, index=pd.Index(index.to_numpy(), name="trial"))
    for key, domain in ctx.spec.space.items():
        raw = runs.get(f"params.{key}", pd.Series(None, index=runs.index))
        table[key] = [_safe_value(v, domain) for v in raw]
    for m in final_metrics(runs):
        table[m] = runs[FINAL + m].to_numpy()
    table["epochs"] = runs["metrics.epoch"].to_numpy() if "metrics.epoch" in runs else math.nan
    return table


def _safe_value(raw: Any, domain: dict[str, list]) -> Any:
    if raw is None or raw != raw:
        return None
    try:
        return param_value(raw, domain)
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
    dists = {k: distribution(spec.space[k]) for k in keys}
    trials, skipped = [], 0
    for record in table[[*keys, metric]].to_dict("records"):
        try:
            params = {k: param_value(record[k], spec.space[k]) for k in keys}
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
    main = ctx.metric
    others = [m for m in CORE if m != main and m in table]
    headers = ["Trial", *ctx.spec.space, f"{_label(main)} (final)", *[_label(m) for m in others], "best epoch",
               "epochs"]
    grid = Grid(headers, [])
    for trial, row in table.head(TOP_K).iterrows():
        cells = [str(trial), *[_param_text(row[k]) for k in ctx.spec.space]]
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
    keys, main, scale = list(ctx.spec.space), ctx.metric, _scale(ctx.metric)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.2 * rows), squeeze=False)
    y = table[main].to_numpy(dtype=float) * scale
    for ax, key in zip(axes.flat, keys):
        x = _param_axis(ax, ctx.spec.space[key], table[key])
        ax.scatter(x, y, color="tab:blue", alpha=0.8)
        ax.scatter(x[:1], y[:1], color="tab:red", marker="*", s=120, zorder=3, label="best")  # table is sorted
        ax.set_xlabel(key)
        ax.set_ylabel(f"final {_label(main)}" + (" (%)" if scale == 100 else ""))
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    axes[0, 0].legend(loc="best", fontsize=8)
    fig.suptitle(ctx.spec.name, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _param_axis(ax: plt.Axes, domain: dict[str, list], values: pd.Series) -> np.ndarray:
    """x positions of a parameter's values; the axis spans the searched domain."""
    (kind, args), = domain.items()
    if kind == "choice":  # categorical: one x position per choice, in the spec's order
        position = {str(c): i for i, c in enumerate(args)}
        ax.set_xticks(range(len(args)), [str(c) for c in args], fontsize=8)
        ax.set_xlim(-0.5, len(args) - 0.5)
        return np.array([position.get(str(v), math.nan) for v in values], dtype=float)
    low, high = float(args[0]), float(args[1])
    if kind == "loguniform":
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short log ranges
        ax.set_xlim(low / 1.2, high * 1.2)
    else:
        pad = 0.05 * (high - low)
        ax.set_xlim(low - pad, high + pad)
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)


def _planned_trials(ctx: Context) -> str:
    # the parent's `study.trials` param counts a --num-samples override; the YAML's value does not
    planned = ctx.parent.get("params.study.trials")
    return str(planned) if planned is not None and planned == planned else str(ctx.spec.num_samples)


def search_notes(ctx: Context, counts: dict[str, int], importance_note: str | None) -> list[str]:
    statuses = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "early-stopped")
    space = "; ".join(f"{k}: {kind} {args}" for k, d in ctx.spec.space.items() for kind, args in d.items())
    scheduler = ", ".join(f"{k}={v}" for k, v in ctx.spec.scheduler.items())
    notes = [f"Trials: {len(ctx.children)} ({statuses}); early-stopped (tag stopped_early or fewer epochs than "
             f"the longest trial): {counts['early-stopped']}; failed: {counts.get('FAILED', 0)}.",
             f"Ranked by final/{ctx.metric} (the selected checkpoint on test); all metrics in percent as the paper.",
             f"Searched space: {space}; scheduler: {scheduler}; samples: {_planned_trials(ctx)}.",
             *_protocol_notes(ctx)]
    if importance_note:
        notes.append(f"Importances: {importance_note}.")
    notes.append(_provenance(ctx))
    return notes


def _search(ctx: Context, out_dir: Path) -> tuple[dict[Path, bytes], ReportFiles]:
    spec = ctx.spec
    table = search_table(ctx)
    counts = status_counts(ctx.children)
    importances, importance_note = param_importances(spec, table, ctx.metric)
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


def write_atomically(contents: dict[Path, bytes]) -> None:
    """All files to temporary names first, then renamed: a failure leaves no partial report."""
    temps: dict[Path, Path] = {}
    try:
        for path, data in contents.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps[path] = Path(tmp)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    for path, tmp in temps.items():
        os.replace(tmp, path)


def build_report(spec: StudySpec, tracking_uri: str, out_dir: Path, parent_run_id: str | None = None) -> ReportFiles:
    """Read the study's runs from MLflow, compute the report in memory, then write md/tex/csv/png to out_dir."""
    ctx = _context(spec, tracking_uri, parent_run_id)
    out_dir = Path(out_dir)
    contents, files = (_ablation if spec.kind == "ablation" else _search)(ctx, out_dir)
    write_atomically(contents)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.report", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="study name (search_spaces/NAME.yaml) or a spec path")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI")
                        or default_tracking_uri(PROJECT), help="MLflow tracking URI (default: %(default)s)")
    parser.add_argument("--parent", default=None, help="parent run id (default: the latest finished or running)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output folder (default: reports/)")
    args = parser.parse_args(argv)
    try:
        files = build_report(load(args.name), args.tracking_uri, args.out, args.parent)
    except (SpecError, ReportError) as err:
        print(f"study.report: {err}", file=sys.stderr)
        return 2
    print(files.text)
    print()
    for path in (files.md, files.tex, files.csv, *files.plots):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
