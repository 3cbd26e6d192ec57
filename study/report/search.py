"""Search reports: the top trials by the metric the search optimised, trial status counts, Optuna parameter
importances and the final metric against each searched parameter."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Any

import matplotlib.pyplot as plt
import optuna
import pandas as pd

from study.record import (
    CONFIRM,
    DEFAULT_SELECTION,
    EPOCH,
    FINAL,
    FINAL_COLUMN,
    FINAL_VAL_COLUMN,
    OPTUNA_STORAGE,
    OPTUNA_STUDY,
    PLANNED_TRIALS,
    SEARCH,
    SEED,
    STAGE,
    STOPPED_EARLY,
    TRIAL_ID,
    VAL,
    VARIANT,
    column,
    final_objective_key,
    metric_column,
    param_column,
)
from study.record import SELECTION as SELECTION_TAG
from study.report import protocols as registry
from study.report.ablation import STATISTICS, ablation_grid, ablation_notes, ablation_table
from study.report.columns import BEST_EPOCH, CONFIGURATION_INDEX, EPOCHS, RUN_ID, TRIAL_INDEX, Columns, validation
from study.report.context import Context, ReportError, final_metrics, read_protocols, read_replicates, tag
from study.report.notes import Cost, Notes, cost_note, planned, protocol_notes, provenance, study_cost, trial_seconds
from study.report.render import Document, Grid, num, param_text, png, tex_label, to_latex, to_markdown
from study.space import Domain
from study.spec import CONFIRM_BASE, Variant
from study.tracking import sqlite_path
from vadclip.metrics import CORE_METRICS as CORE
from vadclip.metrics import label, percent_scale

TOP_K = 5


def search_report(ctx: Context) -> Document:
    """The confirmed table first when the search had a confirmation stage (children tagged stage=confirm), then
    the search's own ranking, importances and notes."""
    confirmed = confirm_section(ctx)
    cost = study_cost(ctx)  # every trial, the confirmed ones too
    stage = ctx.children.get(column(STAGE), pd.Series(SEARCH, index=ctx.children.index)).fillna(SEARCH)
    confirm_runs = ctx.children[stage == CONFIRM]
    ctx = replace(ctx, children=ctx.children[stage != CONFIRM].reset_index(drop=True))
    spec, metric = ctx.spec, ctx.metric
    finished = ctx.finished
    if FINAL_COLUMN + metric not in finished or finished[FINAL_COLUMN + metric].isna().all():
        raise ReportError(f"no FINISHED trial of parent run {ctx.parent_id} logged {FINAL}{metric}")
    rank = rank_column(ctx.parent, finished, metric)
    table = search_table(spec.space, finished, metric, rank)
    add_protocols(ctx, table, metric)
    counts = status_counts(ctx.children)
    importances, importance_note = stored_importances(ctx) or param_importances(spec.space, table, rank)
    notes = list(search_notes(ctx, counts, importance_note, rank, cost).values())
    grid = search_grid(table, list(spec.space), metric, rank)
    plot_name = f"{spec.name}_params.png"
    name = label(metric)
    ranked_by = f"{'validation' if rank != metric else 'final'} {name}"  # the heading says what ranks the rows
    md = [f"# {spec.name}: {spec.description}", ""]
    tex = ""
    if confirmed is not None:
        confirm_table, confirm_grid, confirm_notes = confirmed
        md += ["## Confirmed on fresh seeds (the headline)", "", to_markdown(confirm_grid), "",
               *[f"- {n}" for n in confirm_notes], ""]
        tex += to_latex(confirm_grid, f"{spec.description}: the top configurations confirmed on fresh seeds",
                        tex_label(spec.name) + "-confirmed", confirm_notes)
        text = to_markdown(confirm_grid)
    else:
        text = to_markdown(grid)
    md += [f"## Top {TOP_K} search trials by {ranked_by}", "", to_markdown(grid), "",
           "## Parameter importances (Optuna fANOVA)", ""]
    md += [to_markdown(importance_grid(importances)), ""] if importances else [f"_{importance_note}_", ""]
    md += ["## Protocol", "", *[f"- {n}" for n in notes], "", f"![final {name} per parameter]({plot_name})", ""]
    tex += to_latex(grid, f"{spec.description}: top {TOP_K} trials by {ranked_by}", tex_label(spec.name), notes)
    if importances:
        tex += to_latex(importance_grid(importances), f"{spec.name}: parameter importances (Optuna fANOVA)",
                        tex_label(spec.name) + "-importance", [])
    csv = table.to_csv(index_label=TRIAL_INDEX)
    if confirmed is not None:
        csv = confirmed[0].to_csv(index_label=CONFIGURATION_INDEX) + "\n" + csv
    budget_name = f"{spec.name}_budget.png"
    md += [f"![best {name} against trial-hours]({budget_name})", ""]
    budget = budget_plot(ctx.children, confirm_runs, confirmed[0] if confirmed else None, metric, rank, spec.name)
    return Document(table, text, notes, "\n".join(md), tex, csv, plot_name,
                    search_plot(table, spec.space, metric, rank, spec.name), {budget_name: budget},
                    cost.metrics() if cost else {})


def budget_curve(runs: pd.DataFrame, rank: str) -> pd.DataFrame:
    """The search's best `rank` metric so far against the trial-hours spent so far, trials in the order they
    ended (every trial's time counts, stopped and failed ones too; only finished ones can set a best)."""
    ended = runs.dropna(subset=["end_time"]).sort_values("end_time")
    hours = (trial_seconds(ended) / 3600).cumsum()
    value = ended[rank].where(ended["status"] == "FINISHED") if rank in ended else pd.Series(math.nan, ended.index)
    return pd.DataFrame({"hours": hours.to_numpy(), "best": value.cummax().ffill().to_numpy()})  # a best holds


def budget_plot(search: pd.DataFrame, confirm: pd.DataFrame, confirmed: pd.DataFrame | None, metric: str, rank: str,
                title: str) -> bytes:
    """The budget curve: the best search metric against trial-hours, and the best confirmed configuration's mean
    test metric once the confirmation stage's hours are spent too."""
    scale, name = percent_scale(metric), label(metric)
    key = (FINAL_VAL_COLUMN if rank != metric else FINAL_COLUMN) + metric  # the children's column of `rank`
    curve = budget_curve(search.assign(**{key: pd.to_numeric(search.get(key), errors="coerce")}), key)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.step(curve["hours"], curve["best"] * scale, where="post", color="tab:blue",
            label=f"best search trial ({'validation' if rank != metric else 'test'} {name})")
    if confirmed is not None and len(confirm) and Columns(metric).mean in confirmed:
        spent = (curve["hours"].iloc[-1] if len(curve) else 0.0) + float(trial_seconds(confirm).sum()) / 3600
        best = confirmed[Columns(metric).mean].max() * scale
        ax.scatter([spent], [best], color="tab:red", marker="*", s=120, zorder=3,
                   label=f"best confirmed (test {name}, mean over seeds)")
    ax.set_xlabel("trial-hours spent")
    ax.set_ylabel(name + (" (%)" if scale == 100 else ""))
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{title}: budget curve", fontsize=10)
    fig.tight_layout()
    return png(fig)


def confirm_section(ctx: Context) -> tuple[pd.DataFrame, Grid, list[str]] | None:
    """The confirmation stage as an ablation over its rows (the base configuration is the reference): its
    table, grid and notes; None without confirm children."""
    if column(STAGE) not in ctx.children:
        return None
    confirm = ctx.children[ctx.children[column(STAGE)] == CONFIRM].reset_index(drop=True)
    if confirm.empty or not (confirm["status"] == "FINISHED").any():
        return None
    names = sorted(confirm[column(VARIANT)].dropna().unique(), key=_confirm_order)
    spec = replace(ctx.spec, kind="ablation", variants=tuple(Variant(n, {}) for n in names), full=CONFIRM_BASE)
    sub = replace(ctx, spec=spec, children=confirm, protocol=registry.SELECTION)
    table = ablation_table(spec, confirm, ctx.metric, registry.SELECTION, read_protocols(sub),
                           read_replicates(sub, ctx.metric), ctx.style)
    grid = ablation_grid(table, ctx.metric, CONFIRM_BASE, reference=CONFIRM_BASE)
    seeds = sorted(confirm[column(SEED)].dropna().unique()) if column(SEED) in confirm else []
    statistics = ablation_notes(sub, table, registry.SELECTION)
    notes = [f"The top {len(names) - 1} search configurations by the validation {label(ctx.metric)} the search "
             f"optimised, re-trained with the base configuration on fresh seeds ({', '.join(seeds)}; the search "
             "ran on one other seed); Δ against the base configuration.",
             *[statistics[name] for name in STATISTICS]]
    return table, grid, notes


def _confirm_order(name: str) -> tuple[int, str]:
    """base first, then top1, top2, ..."""
    if name == CONFIRM_BASE:
        return 0, ""
    head = name.split(" ", 1)[0]
    return (1, f"{int(head[3:]):06d}") if head.startswith("top") and head[3:].isdigit() else (2, name)


def add_protocols(ctx: Context, table: pd.DataFrame, metric: str) -> None:
    """The top trials' `<metric>` under the protocols a search shows (study.report.protocols.shown_in_search: at
    their best test evaluation and at their last, from the histories), beside the selected checkpoint's (the ranked
    val protocol)."""
    top = ctx.finished[ctx.finished[RUN_ID].isin(table[RUN_ID].head(TOP_K))]
    frame = read_protocols(replace(ctx, children=top)) if not top.empty else pd.DataFrame()
    cols = Columns(metric)
    for protocol in registry.shown_in_search():
        key = registry.frame_column(protocol.name, metric)
        table[cols.protocol(protocol.name)] = table[RUN_ID].map(frame[key]) if key in frame else math.nan


# ---------------------------------------------------------------- the table, ranking and importances


def rank_column(parent: pd.Series, finished: pd.DataFrame, metric: str) -> str:
    """What a search is ranked by: the metric it optimised (study.record.final_objective_key), i.e. the selected
    checkpoint's validation metric (`val_<metric>`) under `eval.selection=val`; the test metric under the authors'
    `selection=test` (and where the trials lack the objective)."""
    key = final_objective_key(tag(parent, SELECTION_TAG, DEFAULT_SELECTION), metric)
    return table_column(key) if metric_column(key) in finished else metric


def table_column(key: str) -> str:
    """A final metric key's column in the search table: `final/<m>` -> `<m>`, `final/val/<m>` -> `val_<m>`."""
    name = key[len(FINAL):]
    return validation(name[len(VAL):]) if name.startswith(VAL) else name


def search_table(space: dict[str, Domain], finished: pd.DataFrame, metric: str, rank: str) -> pd.DataFrame:
    """One row per FINISHED trial with a `rank` value, best first: searched params (typed), final test metrics
    and the selected checkpoint's validation metric."""
    index = finished.get(column(TRIAL_ID), finished[RUN_ID]).fillna(finished[RUN_ID])
    table = pd.DataFrame({RUN_ID: finished[RUN_ID].to_numpy()}, index=pd.Index(index.to_numpy(), name=TRIAL_INDEX))
    for key, domain in space.items():
        raw = finished.get(param_column(key), pd.Series(None, index=finished.index))
        table[key] = [_safe_value(v, domain) for v in raw]
    for m in final_metrics(finished):
        table[m] = finished[FINAL_COLUMN + m].to_numpy()
    if FINAL_VAL_COLUMN + metric in finished:
        table[validation(metric)] = finished[FINAL_VAL_COLUMN + metric].to_numpy()
    epochs = metric_column(EPOCH)
    table[EPOCHS] = finished[epochs].to_numpy() if epochs in finished else math.nan
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
    stopped, epochs = column(STOPPED_EARLY), metric_column(EPOCH)
    if stopped in alive:
        early |= alive[stopped].fillna("").str.lower() == "true"
    if epochs in children and children[epochs].notna().any():
        early |= alive[epochs].fillna(0) < children[epochs].max()
    counts["early-stopped"] = int(early.sum())
    return counts


def stored_importances(ctx: Context) -> tuple[dict[str, float], str | None] | None:
    """fANOVA importances (seeded) from the search's own Optuna study (the parent's tags optuna.storage and
    optuna.study): the values the searcher was told; None when the study is not there."""
    url, name = tag(ctx.parent, OPTUNA_STORAGE), tag(ctx.parent, OPTUNA_STUDY)
    if not url or not name or ((path := sqlite_path(url)) is not None and not path.is_file()):
        return None
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=url)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(ctx.spec.space) == 1:
            return {}, f"a single searched parameter ({next(iter(ctx.spec.space))}): its importance is 1"
        if len(complete) < 2:
            return {}, f"importances need at least 2 complete trials in the Optuna study, have {len(complete)}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (KeyError, RuntimeError, ValueError) as err:
        return {}, f"importances could not be computed from the Optuna study {name}: {err}"
    finally:
        optuna.logging.set_verbosity(verbosity)
    return ({k: float(v) for k, v in values.items()},
            f"from the Optuna study {name!r} in {url} (each trial's last reported value, as the searcher saw "
            f"it; open it with `optuna-dashboard {url}`)")


def param_importances(space: dict[str, Domain], table: pd.DataFrame, metric: str) -> tuple[dict[str, float],
                                                                                          str | None]:
    """fANOVA importances (Optuna) of the searched params for `metric`; a note instead when undefined."""
    keys = list(space)
    if len(keys) == 1:
        return {}, f"a single searched parameter ({keys[0]}): its importance is 1 by definition"
    dists = {k: space[k].optuna() for k in keys}
    trials, skipped = [], 0
    for record in table[[*keys, metric]].to_dict("records"):
        try:
            params = {k: space[k].value(record[k]) for k in keys}
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


# ---------------------------------------------------------------- grids, notes, plot


def search_grid(table: pd.DataFrame, keys: list[str], metric: str, rank: str) -> Grid:
    """The top TOP_K trials; the ranked column of the best one in bold."""
    others = [m for m in CORE if m != metric and m in table]
    ranked = [rank] if rank != metric else []
    cols = Columns(metric)
    protocols = [cols.protocol(p.name) for p in registry.shown_in_search() if cols.protocol(p.name) in table]
    labels = [f"{label(metric)} {p.label}" for p in registry.shown_in_search() if cols.protocol(p.name) in table]
    headers = ["Trial", *keys, *[f"{label(metric)} (val, ranked)" for _ in ranked],
               f"{label(metric)} (test)" + ("" if ranked else ", ranked"), *labels, *[label(m) for m in others],
               "best epoch", "epochs"]
    grid = Grid(headers, [])
    for trial, row in table.head(TOP_K).iterrows():
        cells = [str(trial), *[param_text(row[k]) for k in keys]]
        cells += [num(row[r] * percent_scale(metric)) for r in ranked]
        cells += [num(row[metric] * percent_scale(metric))]
        cells += [num(row[p] * percent_scale(metric)) for p in protocols]
        cells += [num(row[m] * percent_scale(m)) for m in others]
        cells += [num(row.get(BEST_EPOCH), 0), num(row.get(EPOCHS), 0)]
        grid.rows.append(cells)
    if grid.rows:
        grid.bold.add((0, len(keys) + 1))
    return grid


def importance_grid(importances: dict[str, float]) -> Grid:
    return Grid(["Parameter", "Importance"], [[k, f"{v:.3f}"] for k, v in importances.items()])


def _rank_text(metric: str, rank: str) -> str:
    if rank != metric:
        return f"the validation {label(metric)} of each trial's selected checkpoint (what the search optimised)"
    return f"the test {label(metric)} of the selected checkpoint (selection on test: the authors' protocol)"


def _beside_text(metric: str) -> str:
    """', and the test AP at … and at …, both from the logged histories': the protocols a search shows."""
    texts = [p.search_text for p in registry.shown_in_search()]
    if not texts:
        return ""
    listed = f"{', '.join(texts[:-1])} and {texts[-1]}" if len(texts) > 1 else texts[0]
    quantifier = {1: "", 2: " both"}.get(len(texts), " all")
    return f", and the test {label(metric)} {listed},{quantifier} from the logged histories"


def search_notes(ctx: Context, counts: dict[str, int], importance_note: str | None, rank: str,
                 cost: Cost | None) -> Notes:
    """The notes by name, in the order shown."""
    statuses = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "early-stopped")
    space = "; ".join(f"{k}: {d.describe()}" for k, d in ctx.spec.space.items())
    scheduler = ", ".join(f"{k}={v}" for k, v in ctx.spec.scheduler.items())
    notes = {"trials": f"Trials: {len(ctx.children)} ({statuses}); early-stopped (tag {STOPPED_EARLY} or fewer epochs "
             f"than the longest trial): {counts['early-stopped']}; failed: {counts.get('FAILED', 0)}.",
             "ranking": f"Ranked by {_rank_text(ctx.metric, rank)}; test metrics of the selected checkpoint beside "
             f"it{_beside_text(ctx.metric)}; one seed per trial, so a ranking is not a comparison: the confirmed "
             "table is; all metrics in percent as the paper.",
             "space": f"Searched space: {space}; scheduler: {scheduler}; "
             f"samples: {planned(ctx.parent, PLANNED_TRIALS, ctx.spec.num_samples)}.",
             **protocol_notes(ctx)}
    if importance_note:
        notes["importances"] = f"Importances: {importance_note}."
    notes.update(cost_note(cost))
    notes["provenance"] = provenance(ctx)
    return notes


def search_plot(table: pd.DataFrame, space: dict[str, Domain], metric: str, rank: str, title: str) -> bytes:
    """`rank` against each searched parameter, one panel each (log x for loguniform); best = star."""
    keys, scale = list(space), percent_scale(metric)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.2 * rows), squeeze=False)
    y = table[rank].to_numpy(dtype=float) * scale
    for ax, key in zip(axes.flat, keys):
        x = space[key].axis(ax, table[key])
        ax.scatter(x, y, color="tab:blue", alpha=0.8)
        ax.scatter(x[:1], y[:1], color="tab:red", marker="*", s=120, zorder=3, label="best")  # table is sorted
        ax.set_xlabel(key)
        ax.set_ylabel(f"{'validation' if rank != metric else 'test'} {label(metric)}"
                      + (" (%)" if scale == 100 else ""))
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    axes[0, 0].legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return png(fig)
