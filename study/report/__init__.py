"""Study reports built from MLflow alone: `python -m study.report NAME [--tracking-uri URI] [--parent RUN_ID]`.

Ablations: one row per variant (spec order) with mean ± std and n over seeds of the FINISHED trials, the
paper's numbers, a paired t-test of every row against the full model over seeds matched by the `seed` tag
and the failed trials. Searches: the top 5 trials by the final metric, trial status counts, Optuna
parameter importances and the final metric against each searched parameter. Every output (md, tex, csv,
png) is computed in memory first and then written atomically, so a failure leaves nothing partial.

Modules: `context` (MLflow -> `Context`), `protocols` (the selection-protocol registry), `columns` (the tables'
column names), `ablation`, `search` (tables, statistics, grids, notes, plots on DataFrames), `notes` (protocol and
provenance notes), `render` (Markdown, LaTeX, numbers, PNG), `html` (the report as one self-contained page).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from study.report import protocols
from study.report.ablation import ablation_report
from study.report.columns import VALIDATION_PREFIX, Columns
from study.report.context import ReportError, read_context
from study.report.html import html_report
from study.report.protocols import SELECTION
from study.report.render import finite, tex_file
from study.report.search import search_report
from study.spec import StudySpec, check_margin, load
from study.tracking import default_tracking_uri
from vadclip.cli import Parser
from vadclip.errors import VadClipError
from vadclip.io import write_atomically
from vadclip.metrics import CORE_METRICS as CORE

__all__ = ["ReportError", "ReportFiles", "build_report", "main"]


@dataclass(eq=False)
class ReportFiles:
    md: Path
    tex: Path
    csv: Path
    html: Path  # the md with its plot embedded: MLflow's artifact viewer shows it whole
    plots: list[Path]
    table: pd.DataFrame  # ablation: one row per variant (fractions); search: one row per finished trial
    text: str = ""  # the main markdown table, for the console
    notes: list[str] = field(default_factory=list)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)  # row -> metric -> mean, for the parent
    cost: dict[str, float] = field(default_factory=dict)  # the parent's cost metrics (notes.Cost.metrics)


def build_report(spec: StudySpec, tracking_uri: str, out_dir: Path, parent_run_id: str | None = None,
                 protocol: str = SELECTION) -> ReportFiles:
    """Read the study's runs from MLflow, compute the report in memory, then write md/tex/csv/html/png.
    `protocol`: which test values the tables show (a study.report.protocols.REGISTRY name)."""
    ctx = read_context(spec, tracking_uri, parent_run_id, protocol)
    out_dir = Path(out_dir)
    doc = (ablation_report if spec.kind == "ablation" else search_report)(ctx)
    plots = [out_dir / doc.plot_name, *map(out_dir.joinpath, doc.more_plots)]
    files = ReportFiles(out_dir / f"{spec.name}.md", out_dir / f"{spec.name}.tex", out_dir / f"{spec.name}.csv",
                        out_dir / f"{spec.name}.html", plots, doc.table, doc.text, doc.notes, summary(spec, doc.table),
                        doc.cost)
    pngs = {doc.plot_name: doc.plot, **doc.more_plots}
    write_atomically({files.md: doc.md.encode(), files.tex: tex_file(doc.tex, spec.name, ctx.parent_id).encode(),
                      files.csv: doc.csv.encode(), **{out_dir / n: png for n, png in pngs.items()},
                      files.html: html_report(doc.md, pngs).encode()})
    return files


def summary(spec: StudySpec, table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per ablation row the mean of each core metric; for a search the best trial's metrics (fractions as
    logged): what the parent run shows in MLflow's chart view."""
    if spec.kind == "ablation":
        return {str(v): {m: float(row[Columns(m).mean]) for m in CORE if finite(row.get(Columns(m).mean))}
                for v, row in table.iterrows()}
    if table.empty:
        return {}
    best = table.iloc[0]
    return {"best": {m: float(best[m]) for m in (*CORE, *[c for c in table if c.startswith(VALIDATION_PREFIX)])
                     if m in table and finite(best[m])}}


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m study.report", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="study name (search_spaces/NAME.yaml) or a spec path")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI")
                        or default_tracking_uri(Path.cwd()),
                        help="MLflow tracking URI (default: ./mlruns.db, as python -m study.run)")
    parser.add_argument("--parent", default=None, help="parent run id (default: the newest with a finished trial)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output folder (default: reports/)")
    derived = ", ".join(p.name if p.label == p.name else f"{p.name} ({p.label})" for p in protocols.derived())
    parser.add_argument("--protocol", choices=protocols.names(), default=SELECTION,
                        help="test values shown: each trial's own selection (default: its eval.selection, val unless "
                        f"set), or derived from the histories: {derived}")
    parser.add_argument("--equivalence-margin", type=float, help="points of the study metric within which a row is "
                        "'equivalent' to the full model (default: the spec's equivalence_margin, 1)")
    args = parser.parse_args(argv)
    try:
        spec = load(args.name)
        if args.equivalence_margin is not None:
            spec = replace(spec, equivalence_margin=check_margin(args.equivalence_margin, "--equivalence-margin"))
        files = build_report(spec, args.tracking_uri, args.out, args.parent, args.protocol)
    except VadClipError as err:
        print(f"study.report: {err}", file=sys.stderr)
        return 2
    print(files.text)
    print()
    for path in (files.md, files.tex, files.csv, files.html, *files.plots):
        print(f"wrote {path}")
    return 0
