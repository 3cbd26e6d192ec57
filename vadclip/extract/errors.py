"""The extractor's two errors: bad input or options (no extraction), and one video that cannot be decoded."""

from __future__ import annotations

from vadclip.errors import VadClipError


class ExtractError(VadClipError, ValueError):
    """Bad input or options: one clear message, no extraction."""


class VideoError(RuntimeError):
    """One video could not be decoded; it is reported and skipped."""

