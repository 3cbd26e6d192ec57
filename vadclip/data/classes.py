"""Label parsing of the two benchmarks' lists (class codes and prompts: `conventions`, index 0 = normal).

UCF-Crime labels are class folder names (`Abuse`, ..., `Normal`); XD-Violence labels are codes
joined by `-` and padded with `0` (`B1-0-0`, `B2-G-B6`, `G`, `A` = normal); the binary ShanghaiTech and
UBnormal lists `Normal` / `Anomaly`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from vadclip.data.conventions import CLASS_CODES, DATASET_NAMES, XD_PAD, check_style
from vadclip.data.errors import DataError


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
    if style != "xd":  # binary: one code per video
        if label not in codes:
            raise DataError(f"{where}: unknown {DATASET_NAMES[style]} label {label!r}; expected one of "
                            f"{', '.join(codes)}")
        return (codes.index(label),)
    parts = [p.strip() for p in label.split("-")]
    unknown = [p for p in parts if p not in codes and p != XD_PAD]
    if unknown:
        raise DataError(f"{where}: unknown XD-Violence code(s) {', '.join(map(repr, unknown))} in label "
                        f"{label!r}; expected codes from {', '.join(codes)} joined by '-' (padding {XD_PAD!r})")
    indices = sorted({codes.index(p) for p in parts if p != XD_PAD})
    if not indices:
        raise DataError(f"{where}: XD-Violence label {label!r} has no class code; expected e.g. 'A' or 'B1-0-0'")
    if 0 in indices and len(indices) > 1:
        raise DataError(f"{where}: XD-Violence label {label!r} mixes the normal code {codes[0]!r} with anomaly codes")
    return tuple(indices)


def multi_hot(indices: Iterable[int], num_classes: int) -> np.ndarray:
    """float32 (num_classes,) with ones at `indices` (normal = one-hot at 0)."""
    out = np.zeros(num_classes, dtype=np.float32)
    out[list(indices)] = 1.0
    return out
