"""The project's one exception root: every CLI catches `VadClipError` and prints its one-line message; `Parser`
reports a bad flag the same way. The lowest module of `vadclip`: every layer may import it."""

from __future__ import annotations

import argparse
from typing import NoReturn


class VadClipError(Exception):
    """Bad input or state found by the project; the message names the file, key or value and what was expected."""


class Parser(argparse.ArgumentParser):
    """argparse whose bad flag prints one line (not the usage first) and exits 2, as every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} -h)\n")
