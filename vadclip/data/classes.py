"""Class codes, prompts and label parsing of the two benchmarks (index 0 = normal).

UCF-Crime labels are class folder names (`Abuse`, ..., `Normal`); XD-Violence labels are codes
joined by `-` and padded with `0` (`B1-0-0`, `B2-G-B6`, `G`, `A` = normal).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from vadclip.data.errors import DataError

CLASS_CODES: dict[str, list[str]] = {
    "ucf": ["Normal", "Abuse", "Arrest", "Arson", "Assault", "Burglary", "Explosion", "Fighting",
            "RoadAccidents", "Robbery", "Shooting", "Shoplifting", "Stealing", "Vandalism"],
    "xd": ["A", "B1", "B2", "B4", "B5", "B6", "G"],
}
# The authors' label_map values, in the same order as CLASS_CODES (`roadAccidents` is one word).
CLASS_PROMPTS: dict[str, list[str]] = {
    "ucf": ["normal", "abuse", "arrest", "arson", "assault", "burglary", "explosion", "fighting",
            "roadAccidents", "robbery", "shooting", "shoplifting", "stealing", "vandalism"],
    "xd": ["normal", "fighting", "shooting", "riot", "abuse", "car accident", "explosion"],
}
XD_PAD = "0"  # filler code in XD labels (`B1-0-0`)
# Frame/segment ground truth labels every normal video `A`, in both datasets.
GT_NORMAL = "A"


def check_style(style: str) -> None:
    if style not in CLASS_CODES:
        raise ValueError(f"unknown label style {style!r}; expected one of {sorted(CLASS_CODES)}")


def parse_label(style: str, label: str, where: str) -> tuple[int, ...]:
    """Class indices (sorted, unique) of a list label; DataError naming `where` (file:line) if unknown."""
    check_style(style)
    codes = CLASS_CODES[style]
    label = str(label).strip()
    if style == "ucf":
        if label not in codes:
            raise DataError(f"{where}: unknown UCF-Crime label {label!r}; expected a class folder name, "
                            f"one of {', '.join(codes)}")
        return (codes.index(label),)
    parts = [p.strip() for p in label.split("-")]
    unknown = [p for p in parts if p not in codes and p != XD_PAD]
    if unknown:
        raise DataError(f"{where}: unknown XD-Violence code(s) {', '.join(map(repr, unknown))} in label "
                        f"{label!r}; expected codes from {', '.join(codes)} joined by '-' (padding '0')")
    indices = sorted({codes.index(p) for p in parts if p != XD_PAD})
    if not indices:
        raise DataError(f"{where}: XD-Violence label {label!r} has no class code; expected e.g. 'A' or 'B1-0-0'")
    if 0 in indices and len(indices) > 1:
        raise DataError(f"{where}: XD-Violence label {label!r} mixes the normal code 'A' with anomaly codes")
    return tuple(indices)


def multi_hot(indices: Iterable[int], num_classes: int) -> np.ndarray:
    """float32 (num_classes,) with ones at `indices` (normal = one-hot at 0)."""
    out = np.zeros(num_classes, dtype=np.float32)
    out[list(indices)] = 1.0
    return out
