"""The project's one exception root: every CLI catches `VadClipError` and prints its one-line message."""

from __future__ import annotations


class VadClipError(Exception):
    """Bad input or state found by the project; the message names the file, key or value and what was expected."""
