"""One progress line for a study (trials done/running/failed, ETA, best so far), in place of Tune's tables.

Also tells the driver whether the study ended or was interrupted: Tune returns normally from `fit()` after a
Ctrl-C (it stops the running trials, which then look TERMINATED), so the callback notes the signal itself.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any, TextIO

from ray.tune import Callback

from vadclip.metrics import label, percent_scale

DONE, FAILED = "TERMINATED", "ERROR"


class StudyProgress(Callback):
    """Prints `[study] 5/21 done, 2 running, 0 failed · ETA 2m10s · best AP 80.12 (s234 · LGT-Adapter)`.

    On a terminal the line is rewritten in place; otherwise a line is printed each time another tenth of the
    trials has ended (so a log of a long study stays short)."""

    def __init__(self, study: str, total: int, metric_key: str, metric: str, out: TextIO | None = None):
        self.study, self.total, self.metric_key, self.metric = study, total, metric_key, metric
        self._out = out
        self.tty = self.out.isatty()
        self.started = time.monotonic()
        self.done = self.failed = self.running = 0
        self.best: tuple[float, str] | None = None
        self.final_states: dict[str, str] = {}
        self.signalled = False
        self._printed_step = -1
        self._width = 0

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its run config (callbacks included)
        return {**self.__dict__, "_out": None}

    # ---------------------------------------------------------------- Tune hooks

    def setup(self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None,
              **info: Any) -> None:
        """Runs after Tune installed its SIGINT handler (graceful stop): note the signal, then let Tune act."""
        if threading.current_thread() is not threading.main_thread():
            return
        tune_handler = signal.getsignal(signal.SIGINT)

        def on_sigint(sig: int, frame: Any) -> None:
            self.signalled = True
            if callable(tune_handler):
                tune_handler(sig, frame)
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._count(trials)
        self._show()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric_key)
        if isinstance(value, (int, float)) and value == value and (self.best is None or value > self.best[0]):
            self.best = (float(value), _trial_name(trial))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._count(trials, ended=trial)
        self._show()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._count(trials, ended=trial)
        self._show()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.final_states = {t.trial_id: t.status for t in trials}
        self._count(trials)
        self._show(force=self.interrupted)  # the last trial's line already said it all otherwise
        if self.tty:
            self.out.write("\n")
            self.out.flush()

    # ---------------------------------------------------------------- state

    @property
    def interrupted(self) -> bool:
        """True after a Ctrl-C, or when fit() returned with trials that neither finished nor failed."""
        if self.signalled or not self.final_states:
            return True  # interrupted, or the experiment never reached its end
        ended = sum(1 for s in self.final_states.values() if s in (DONE, FAILED))
        return ended < max(self.total, len(self.final_states))

    def _count(self, trials: list, ended: Any = None) -> None:
        states = [t.status for t in trials]
        self.done = states.count(DONE)
        self.failed = states.count(FAILED)
        self.running = states.count("RUNNING")
        if ended is not None and ended.status not in (DONE, FAILED):  # the hook runs before the status changes
            self.running -= ended.status == "RUNNING"
            self.done += 1

    def line(self) -> str:
        ended = self.done + self.failed
        elapsed = time.monotonic() - self.started
        eta = _duration(elapsed / ended * (self.total - ended)) if 0 < ended < self.total else "-"
        best = "-" if self.best is None else \
            f"{self.best[0] * percent_scale(self.metric):.2f} ({self.best[1]})"
        return (f"[{self.study}] {ended}/{self.total} trials ended ({self.done} done, {self.failed} failed), "
                f"{self.running} running · elapsed {_duration(elapsed)} · ETA {eta} · "
                f"best {self.metric_key.split('/')[0]} {label(self.metric)} {best}")

    def _show(self, force: bool = False) -> None:
        text = self.line()
        if self.tty:
            self.out.write("\r" + text.ljust(self._width))
            self._width = len(text)
            self.out.flush()
            return
        step = (self.done + self.failed) * 10 // max(self.total, 1)
        if force or step > self._printed_step and self.done + self.failed > 0:
            self._printed_step = step
            print(text, file=self.out, flush=True)


def _trial_name(trial: Any) -> str:
    config = getattr(trial, "config", {}) or {}
    variant = config.get("variant")
    seed = config.get("seed", ",".join(map(str, config.get("seeds", []))))  # a fused trial: its seeds
    return f"s{seed} · {variant}" if variant else f"s{seed} · {trial.trial_id}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
