"""The one exception of the data layer (its own module so that every data module can raise it)."""

from __future__ import annotations

from vadclip.errors import VadClipError


class DataError(VadClipError, ValueError):
    """Bad or missing data; the message names the file (and row) and what was expected."""
