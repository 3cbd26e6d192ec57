"""Ctrl-C outside Tune's own handling: noted, not raised, so that a study whose trials have all ended still writes
its report (what the trials paid for); a second Ctrl-C aborts."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any


class SigintLatch:
    """While active (main thread only), the first Ctrl-C increments `hits` and says what happens; the next one
    raises KeyboardInterrupt. Tune installs its own handler during `Tuner.fit()` and restores this one after."""

    def __init__(self) -> None:
        self.hits = 0
        self._previous: Any = None
        self._active = False

    def __enter__(self) -> SigintLatch:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._active:
            signal.signal(signal.SIGINT, self._previous)

    def _on_sigint(self, sig: int, frame: FrameType | None) -> None:
        self.hits += 1
        if self.hits > 1:
            raise KeyboardInterrupt
        print("\nCtrl-C: finishing what has ended already (Ctrl-C again to abort)", file=sys.stderr, flush=True)
