"""`python -m study.compare A B`: two studies row by row, with a verdict per matched row and what differs.

A and B are study names (or study YAML paths): two studies in one store, the same study in two stores
(`--store-b`), or two runs of one study (`--parent-b RUN_ID`: a named parent run against the latest). Rows are
matched by their resolved config, the params their trials logged less the seed and where files lie
(`NOT_IDENTITY`), not by their names. Per matched row: Δ = B − A of the study metric over the seeds both ran
(paired; Welch's t over all seeds when they share fewer than 2), its 95 % interval, p, Holm across the matched rows,
TOST within ± the equivalence margin and the verdict (study.report.stats.verdict). Then what differs between the two
sides: config keys, the data fingerprint, the code digest and version, the package versions."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sp
from statsmodels.stats.weightstats import ttost_ind

from study import record
from study.report.context import Context, finished_runs, read_context, tag
from study.report.render import Grid, num, pvalue, signed, to_markdown
from study.report.stats import ALPHA, holm, paired_comparison, t_interval, tost_p, verdict
from study.spec import check_margin, load
from study.tracking import default_tracking_uri
from vadclip.errors import Parser, VadClipError
from vadclip.metrics import label, percent_scale

# params that say where a trial ran or where its files lie, not what it trained: a row's identity leaves them out
NOT_IDENTITY = ("seed", "device", "data.cache_dir", "data.lists", "data.features", "clip.weights")
SIDE_TAGS = (record.DATA_FINGERPRINT, record.SOURCE_DIGEST, record.CODE_VERSION, record.PACKAGES)


class CompareError(VadClipError, RuntimeError):
    """Nothing to compare (no matched row, a metric one side lacks); the message says what."""


@dataclass(frozen=True)
class Side:
    """One side of a comparison: its runs, its rows' configs and the study metric per row and seed."""

    name: str
    ctx: Context
    configs: dict[str, dict[str, str]]  # row -> its resolved config (params less NOT_IDENTITY)
    values: dict[str, dict[str, float]]  # row -> seed -> the study metric (final, as logged)


def read_side(name: str, uri: str, parent: str | None, metric: str | None = None) -> Side:
    ctx = read_context(load(name), uri, parent)
    runs = finished_runs(ctx.children)
    if record.column(record.STAGE) in runs and (runs[record.column(record.STAGE)] == record.CONFIRM).any():
        runs = runs[runs[record.column(record.STAGE)] == record.CONFIRM]  # a search's rows: its confirmed configs
    key = record.metric_column(record.final_key(metric or ctx.metric))
    if key not in runs:
        raise CompareError(f"{name}: no finished trial logged {key[len('metrics.'):]}")
    params = [c for c in runs.columns if c.startswith("params.") and c[len("params."):] not in NOT_IDENTITY]
    variant, seed = record.column(record.VARIANT), record.column(record.SEED)
    configs: dict[str, dict[str, str]] = {}
    values: dict[str, dict[str, float]] = {}
    for row, group in runs.groupby(variant if variant in runs else "run_id", sort=False):
        configs[str(row)] = {c[len("params."):]: str(group[c].iloc[0]) for c in params if group[c].notna().any()}
        values[str(row)] = {str(s): float(v) for s, v in zip(group[seed], group[key]) if math.isfinite(v)}
    order = [v.name for v in ctx.spec.variants if v.name in configs] + [r for r in configs if r not in
                                                                          {v.name for v in ctx.spec.variants}]
    return Side(ctx.spec.name, ctx, {r: configs[r] for r in order}, values)


def match(a: Side, b: Side, rows: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(row of A, row of B) whose configs are equal, in A's order; `rows`: only these (names of either side)."""
    pairs = [(ra, rb) for ra, ca in a.configs.items() for rb, cb in b.configs.items() if ca == cb]
    return [(ra, rb) for ra, rb in pairs if not rows or ra in rows or rb in rows]


def _unpaired(x: list[float], y: list[float], margin: float) -> tuple[float, float, float, float, float]:
    """Δ = mean(y) − mean(x), Welch's interval and p, TOST p (independent samples)."""
    delta = float(np.mean(y) - np.mean(x))
    if len(x) < 2 or len(y) < 2:
        return delta, math.nan, math.nan, math.nan, math.nan
    test = sp.ttest_ind(y, x, equal_var=False)
    low, high = test.confidence_interval(1 - ALPHA)
    tost = float(ttost_ind(np.asarray(y), np.asarray(x), -margin, margin, usevar="unequal")[0])
    return delta, float(low), float(high), float(test.pvalue), tost


def compare(a: Side, b: Side, margin_points: float, rows: Sequence[str] = ()) -> pd.DataFrame:
    """One row per matched pair: seeds, Δ (B − A) with its interval, p, Holm, TOST and the verdict."""
    pairs = match(a, b, rows)
    if not pairs:
        raise CompareError(f"no row of {a.name} has the resolved config of a row of {b.name}" +
                           (f" among {list(rows)}" if rows else ""))
    metric = a.ctx.metric
    margin = margin_points / percent_scale(metric)
    out = []
    for ra, rb in pairs:
        x, y = a.values[ra], b.values[rb]
        shared = x.keys() & y.keys()
        if len(shared) >= 2:
            paired = paired_comparison(y, x)
            low, high = paired.ci_low, paired.ci_high
            if paired.n >= 2 and math.isnan(low):
                low, high = t_interval([y[s] - x[s] for s in shared])
            found = (paired.delta, low, high, paired.p, tost_p(y, x, margin), "paired", len(shared))
        else:
            found = (*_unpaired(list(x.values()), list(y.values()), margin), "Welch", 0)
        out.append({"row A": ra, "row B": rb, "n A": len(x), "n B": len(y), "pairs": found[6], "test": found[5],
                    "delta": found[0], "delta_low": found[1], "delta_high": found[2], "p": found[3],
                    "tost_p": found[4]})
    table = pd.DataFrame(out)
    table["p_holm"] = holm(table["p"].tolist())
    table["tost_p_holm"] = holm(table["tost_p"].tolist())
    table["verdict"] = [verdict(d, p, t) for d, p, t in zip(table["delta"], table["p_holm"], table["tost_p_holm"])]
    return table


def differences(a: Side, b: Side) -> list[tuple[str, str, str]]:
    """(what, A's value, B's value) for every side-level fact that differs: the config keys whose values differ
    between the two sides (over all rows, as sets), the data fingerprint, code digest and version, packages."""
    out: list[tuple[str, str, str]] = []
    for key in sorted({k for c in [*a.configs.values(), *b.configs.values()] for k in c}):
        va = sorted({c.get(key, "-") for c in a.configs.values()})
        vb = sorted({c.get(key, "-") for c in b.configs.values()})
        if va != vb:
            out.append((f"config {key}", ", ".join(va), ", ".join(vb)))
    for name in SIDE_TAGS:
        ta, tb = _side_tag(a, name), _side_tag(b, name)
        if ta != tb:
            out.append((name, ta or "-", tb or "-"))
    return out


def _side_tag(side: Side, name: str) -> str:
    """The parent's tag, else the single value its trials carry (older parents lack the newer tags)."""
    return tag(side.ctx.parent, name) or tag(finished_runs(side.ctx.children), name)


def render(a: Side, b: Side, table: pd.DataFrame, margin_points: float) -> str:
    metric = a.ctx.metric
    scale, name = percent_scale(metric), label(metric)
    grid = Grid(["row A", "row B", "n (A/B, pairs)", f"Δ{name} (B − A) [95% CI]", "test", "p", "p (Holm)", "verdict"],
                [])
    for _, r in table.iterrows():
        span = f"{signed(r['delta'] * scale)} [{num(r['delta_low'] * scale)}, {num(r['delta_high'] * scale)}]"
        grid.rows.append([r["row A"], r["row B"], f"{r['n A']}/{r['n B']}, {r['pairs']}", span, r["test"],
                          pvalue(r["p"]), pvalue(r["p_holm"]), r["verdict"] or "-"])
    diffs = differences(a, b)
    lines = [f"# {a.name} (A, parent {a.ctx.parent_id}) vs {b.name} (B, parent {b.ctx.parent_id})", "",
             to_markdown(grid), "",
             f"Rows matched by their resolved config (params less {', '.join(NOT_IDENTITY)}); {name} as logged "
             f"(final, the selection protocol of each run); verdict: better/worse = significant after Holm over the "
             f"{len(table)} matched row(s), equivalent = within ±{margin_points:g} points (TOST, Holm), else "
             "inconclusive.", "", "## What differs between A and B", ""]
    lines += [f"- {what}: A `{va}`, B `{vb}`" for what, va, vb in diffs] or ["- nothing recorded differs"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m study.compare", description=(__doc__ or "").splitlines()[0])
    p.add_argument("a", help="study A (a name in search_spaces/ or a study YAML)")
    p.add_argument("b", help="study B (may be A again, with --parent-b or --store-b)")
    p.add_argument("--store", default=default_tracking_uri(Path.cwd()),
                   help="MLflow tracking URI of A (and of B unless --store-b; default: ./mlruns.db)")
    p.add_argument("--store-b", help="MLflow tracking URI of B (default: --store)")
    p.add_argument("--parent-a", help="A's parent run id (default: its newest with a finished trial)")
    p.add_argument("--parent-b", help="B's parent run id (default: its newest with a finished trial)")
    p.add_argument("--rows", nargs="+", default=(), help="only these rows (names on either side)")
    p.add_argument("--equivalence-margin", type=float, help="points (default: A's spec equivalence_margin)")
    p.add_argument("--out", type=Path, default=Path("reports"), help="folder of the written Markdown (reports/)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        a = read_side(args.a, args.store, args.parent_a)
        b = read_side(args.b, args.store_b or args.store, args.parent_b, a.ctx.metric)
        margin = (check_margin(args.equivalence_margin, "--equivalence-margin") if args.equivalence_margin
                  is not None else a.ctx.spec.equivalence_margin)
        text = render(a, b, compare(a, b, margin, args.rows), margin)
    except VadClipError as err:
        print(f"study.compare: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compare-{a.name}-vs-{b.name}.md"
    path.write_text(text)
    print(text + f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
