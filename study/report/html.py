"""The study report as one self-contained HTML page (MLflow's artifact viewer shows it in a frame, images included).

MLflow 3.17's artifact viewer renders .md with react-markdown, but shows an image with a relative source
(`![AP](ablation_lgt_ap.png)`) as the literal text `[AP](ablation_lgt_ap.png)` and its URL filter drops
`data:` sources (only http(s) would do, which an artifact has no stable one of). A .html artifact is shown
in a sandboxed iframe loaded from a blob: URL, so inline content works there: PNGs as base64 data URIs.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import markdown

_STYLE = """body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;font-size:14px;margin:16px;color:#1f2328}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #d0d7de;padding:3px 8px}
th{background:#f6f8fa}tr:nth-child(even) td{background:#fbfbfc}
img{max-width:100%}code{background:#f6f8fa;padding:0 3px}li{margin:2px 0}"""
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def markdown_to_html(text: str, images: dict[str, str] | None = None) -> str:
    """A report's markdown as HTML (Python-Markdown with pipe tables); `images`: file name -> the URL to use
    instead (a data URI)."""
    images = images or {}
    text = _IMAGE.sub(lambda m: f"![{m.group(1)}]({images.get(Path(m.group(2)).name, m.group(2))})", text)
    return markdown.markdown(text, extensions=["tables"], output_format="html")


def html_report(markdown_text: str, pngs: Iterable[Path | str] | Mapping[str, bytes], title: str | None = None) -> str:
    """One self-contained HTML page of a report: the markdown rendered, each PNG it references by file name
    embedded as a base64 data URI (PNGs it does not reference are appended at the end). `pngs`: files, or
    file name -> PNG bytes (a report still in memory)."""
    if isinstance(pngs, Mapping):
        images = {Path(name).name: _data_uri(data) for name, data in pngs.items()}
    else:
        images = {Path(p).name: _data_uri(Path(p).read_bytes()) for p in pngs}
    referenced = {Path(m.group(2)).name for m in _IMAGE.finditer(markdown_text)}
    body = markdown_to_html(markdown_text, images)
    extra = [f'<p><img alt="{html.escape(name)}" src="{uri}"></p>' for name, uri in images.items()
             if name not in referenced]
    if title is None:
        first = re.search(r"^#\s+(.*)$", markdown_text, re.M)
        title = first.group(1) if first else "report"
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n{body}\n{''.join(extra)}\n</body></html>\n")
