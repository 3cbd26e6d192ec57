"""Outputs: one atomic `.npy` per video and crop, the list CSV, and the manifest that a resumed run must match."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vadclip.data.conventions import CLASS_CODES, SNIPPET_FRAMES, crop_glob
from vadclip.extract.errors import ExtractError
from vadclip.extract.jobs import VideoJob
from vadclip.extract.options import CROP_SIZE, RESIZE_WH
from vadclip.io import atomic_write, atomic_write_text

MANIFEST_NAME = "extract_config.json"
# The normal class codes, UCF `Normal` and XD `A`, in any case: listed last, as in the authors' lists.
NORMAL_LABELS = frozenset(codes[0].lower() for codes in CLASS_CODES.values())


def save_npy_atomic(array: np.ndarray, path: Path) -> None:
    """A crash never leaves a half-written `.npy` (see `vadclip.io.temp_name` for the stray pattern)."""
    atomic_write(path, lambda f: np.save(f, array))


def write_features(job: VideoJob, out_dir: Path, feats: np.ndarray) -> None:
    """`feats` (crops, T, D) → one file per crop; each file is atomic, and a video counts as done (resume)
    only once all its crops exist."""
    (out_dir / job.label).mkdir(parents=True, exist_ok=True)
    for k, feat in enumerate(feats):
        save_npy_atomic(feat, job.output(out_dir, k))


def remove_stray_temps(job: VideoJob, out_dir: Path) -> None:
    for stray in (out_dir / job.label).glob(f".{crop_glob(job.name)}.*.tmp"):  # vadclip.io.temp_name
        stray.unlink(missing_ok=True)


def is_complete(job: VideoJob, out_dir: Path, crops: int) -> bool:
    return all(job.output(out_dir, k).is_file() for k in range(crops))


def write_list(jobs: Sequence[VideoJob], out_dir: Path, crops: int, path: Path) -> None:
    """`path,label` rows with absolute paths; abnormal videos first, normal last (authors' order), crops
    0..n-1 of a video consecutive."""
    ordered = sorted(jobs, key=lambda j: (j.label.lower() in NORMAL_LABELS, j.label, j.name))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label"])
    for job in ordered:
        writer.writerows([str(job.output(out_dir, k)), job.label] for k in range(crops))
    atomic_write_text(buf.getvalue(), path)


def manifest(clip_model: str, clip_weights: str | None, crops: int, snippet: str) -> dict[str, Any]:
    return {"clip_model": clip_model, "clip_weights": Path(clip_weights).name if clip_weights else None,
            "crops": crops, "snippet": snippet, "clip_len": SNIPPET_FRAMES, "resize_wh": list(RESIZE_WH),
            "crop_size": CROP_SIZE}


def check_manifest(out_dir: Path, wanted: dict[str, Any], overwrite: bool) -> None:
    """Refuse to resume into an OUT made with other settings (skipped files would silently differ)."""
    path = out_dir / MANIFEST_NAME
    if path.is_file() and not overwrite:
        found = json.loads(path.read_text())
        diff = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
        if diff:
            what = ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in diff.items())
            raise ExtractError(f"OUT {str(out_dir)!r} holds features made with {what}; "
                               f"use another OUT or --overwrite (overwrite=True)")
    atomic_write_text(json.dumps(wanted, indent=2) + "\n", path)
