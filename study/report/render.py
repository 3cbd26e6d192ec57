"""Rendering: `Grid` tables as Markdown and booktabs LaTeX, number and date formatting, PNG bytes of a figure."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from study.report.columns import RUNS, Columns
from vadclip.metrics import percent_scale, shown_range

matplotlib.use("Agg")


@dataclass
class Grid:
    """A rendered table: header, rows of text cells, cells to set in bold."""

    headers: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)


@dataclass
class Document:
    """One report in memory, before anything is written."""

    table: pd.DataFrame
    text: str  # the main markdown table, for the console
    notes: list[str]
    md: str
    tex: str  # the table floats, without the file header
    csv: str
    plot_name: str
    plot: bytes
    more_plots: dict[str, bytes] = field(default_factory=dict)  # file name -> png (a search's budget curve)
    cost: dict[str, float] = field(default_factory=dict)  # the parent's cost metrics (notes.Cost.metrics)


# ---------------------------------------------------------------- numbers and dates


def finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float, np.number)) and math.isfinite(float(x))


def num(x: Any, digits: int = 2) -> str:
    return f"{float(x):.{digits}f}" if finite(x) else "-"


def pvalue(p: Any) -> str:
    if not finite(p):
        return "-"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def signed(x: float) -> str:
    return f"{x:+.2f}" if finite(x) else "-"


def interval(low: Any, high: Any, signed: bool = False) -> str:
    """`[low, high]` with one decimal (signed: `[-1.2, +0.4]`); "" when undefined."""
    if not (finite(low) and finite(high)):
        return ""
    fmt = "+.1f" if signed else ".1f"
    return f"[{low:{fmt}}, {high:{fmt}}]"


CLIPPED = "†"  # a t-interval that crossed the metric's range, cut at the bound


def mean_std(row: pd.Series, metric: str, interval_of_mean: bool = False) -> str:
    """`mean ± std` in percent where logged as fractions, with the row's `[low, high]` interval of the mean when
    asked; `(n=…)` when fewer runs than the row's finished ones."""
    cols = Columns(metric)
    mean, std, n = row.get(cols.mean), row.get(cols.std), int(row.get(cols.n, 0) or 0)
    if not finite(mean):
        return "-"
    scale = percent_scale(metric)
    text = f"{mean * scale:.2f} ± {std * scale:.2f}" if n >= 2 and finite(std) else f"{mean * scale:.2f}"
    low, high = row.get(cols.low, math.nan) * scale, row.get(cols.high, math.nan) * scale
    bounds = shown_range(metric)
    clipped = bounds is not None and finite(low) and finite(high) and (low < bounds[0] or high > bounds[1])
    if clipped and bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    if interval_of_mean and (span := interval(low, high)):
        text = f"{text} {span}{CLIPPED if clipped else ''}"
    return text if n == row[RUNS] else f"{text} (n={n})"


def param_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def date_text(millis: Any) -> str:
    if not finite(millis):
        return "at an unknown time"
    return datetime.fromtimestamp(float(millis) / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


# ---------------------------------------------------------------- Markdown and LaTeX


def to_markdown(grid: Grid, padded: bool = True) -> str:
    """A pipe table, first column left-aligned and the others right; `padded=False`: no padding to the column
    widths (the compact paper table stays as narrow as its widest row)."""
    def cell(text: str, r: int, c: int) -> str:
        text = text.replace("|", r"\|")
        return f"**{text}**" if (r, c) in grid.bold and text != "-" else text

    rows = [[cell(t, r, c) for c, t in enumerate(row)] for r, row in enumerate(grid.rows)]
    headers = [h.replace("|", r"\|") for h in grid.headers]
    if not padded:
        return "\n".join(["| " + " | ".join(headers) + " |", "|:--" + "|--:" * (len(headers) - 1) + "|",
                          *["| " + " | ".join(row) + " |" for row in rows]])
    frame = pd.DataFrame(rows, columns=headers)
    align = ["left"] + ["right"] * (len(grid.headers) - 1)
    return frame.to_markdown(index=False, disable_numparse=True, colalign=align)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "Δ": r"$\Delta$",
        "−": "-", "<": r"\textless{}", ">": r"\textgreater{}", "†": r"\textdagger{}", "↑": r"$\uparrow$",
        "↓": r"$\downarrow$", "≈": r"$\approx$"}


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


def tex_label(name: str) -> str:
    """A \\label key: no escaping there, so only safe characters."""
    return "tab:" + "".join(ch if ch.isalnum() else "-" for ch in name)


def tex_file(body: str, study: str, parent_id: str) -> str:
    return (f"% {study}: generated by `python -m study.report` from MLflow parent run {parent_id}.\n"
            "% Needs \\usepackage{booktabs}.\n" + body)


# ---------------------------------------------------------------- figures


def png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")  # keeps a legend placed outside
    plt.close(fig)
    return buffer.getvalue()
