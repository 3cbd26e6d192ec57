"""Atomic file writes: a temporary name in the same folder, then os.replace, so a crash never leaves
a half-written checkpoint, feature file or metrics file behind."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def temp_name(path: Path) -> Path:
    """Hidden sibling `.NAME.PID.tmp` (same filesystem, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write` fills a binary file object (its return value is ignored); it lands at `path` whole or not at all."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:  # a file object: np.save would append `.npy` to a plain name
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_atomically(contents: dict[Path, bytes]) -> None:
    """Several files, all or none: each to its temporary name first, then all renamed. Files get the usual
    permissions (0644 under the common umask 022), as any file the user writes."""
    temps: dict[Path, Path] = {}
    try:
        for path, data in contents.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            temps[path] = temp_name(path)
            temps[path].write_bytes(data)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    for path, tmp in temps.items():
        os.replace(tmp, path)
