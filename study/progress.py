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

from study import record
from study.tracking import TRIAL_ERROR
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
        self.errored: set[str] = set()  # trials that ended by reporting TRIAL_ERROR (a deterministic error)
        # Tune leaves the trials a Ctrl-C stopped (or that never started) TERMINATED, like finished ones, and calls
        # no hook for them: a trial ended only when a hook said so, or when it had ended before this fit began
        self.ended_before: set[str] | None = None
        self.completed: set[str] = set()
        self.unfinished_ids: list[str] = []
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

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.ended_before is None:  # the first step: a resumed experiment's ended trials are restored by now
            self.ended_before = {t.trial_id for t in trials if t.status in (DONE, FAILED)}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._count(trials)
        self._show()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if TRIAL_ERROR in result and trial.trial_id not in self.errored:
            self.errored.add(trial.trial_id)
            self._print(f"[{self.study}] trial {_trial_name(trial)} failed: {result[TRIAL_ERROR]} (not retried: "
                        f"it would fail the same way)")
            return
        value = result.get(self.metric_key)
        if isinstance(value, (int, float)) and value == value and (self.best is None or value > self.best[0]):
            self.best = (float(value), _trial_name(trial))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.completed.add(trial.trial_id)
        self._count(trials, ended=trial)
        self._show()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.completed.add(trial.trial_id)
        self._count(trials, ended=trial)
        self._show()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.final_states = {t.trial_id: t.status for t in trials}
        # no step ran (a restored experiment whose trials had all ended): only restored trials exist, as they were
        before = self.ended_before if self.ended_before is not None else {
            t.trial_id for t in trials if t.status in (DONE, FAILED)}
        self.unfinished_ids = [t.trial_id for t in trials if t.status == DONE and t.trial_id not in self.completed
                               and t.trial_id not in before]
        self._count(trials)
        self._show(force=self.interrupted)  # the last trial's line already said it all otherwise
        if self.tty:
            self.out.write("\n")
            self.out.flush()

    # ---------------------------------------------------------------- state

    @property
    def interrupted(self) -> bool:
        """True when fit() returned with trials that neither ended nor failed (a Ctrl-C), or never reached the
        experiment's end. A Ctrl-C after every trial ended is not an interruption: `signalled` tells of it."""
        if not self.final_states or self.unfinished_ids:
            return True
        ended = sum(1 for s in self.final_states.values() if s in (DONE, FAILED))
        return ended < max(self.total, len(self.final_states))

    def _count(self, trials: list, ended: Any = None) -> None:
        states = [t.status for t in trials]
        errored = sum(t.trial_id in self.errored for t in trials)  # these end TERMINATED
        self.done = states.count(DONE)
        self.failed = states.count(FAILED)
        self.running = states.count("RUNNING")
        if ended is not None and ended.status not in (DONE, FAILED):  # the hook runs before the status changes
            self.running -= ended.status == "RUNNING"
            self.done += 1
        self.done -= errored + len(self.unfinished_ids)
        self.failed += errored

    def line(self) -> str:
        ended = self.done + self.failed
        elapsed = time.monotonic() - self.started
        eta = _duration(elapsed / ended * (self.total - ended)) if 0 < ended < self.total else "-"
        best = "-" if self.best is None else \
            f"{self.best[0] * percent_scale(self.metric):.2f} ({self.best[1]})"
        stopped = f", {len(self.unfinished_ids)} interrupted or never started" if self.unfinished_ids else \
            f", {self.running} running"
        return (f"[{self.study}] {ended}/{self.total} trials ended ({self.done} done, {self.failed} failed)"
                f"{stopped} · elapsed {_duration(elapsed)} · ETA {eta} · best {self._objective()} {best}")

    def _objective(self) -> str:
        """What a trial is ranked by: the validation set holds training videos with video labels only."""
        split = self.metric_key.split("/")[0]
        where = "validation (video-level)" if split == "val" else "test"
        return f"{where} {label(self.metric)}"

    def _print(self, text: str) -> None:
        if self.tty:
            self.out.write("\r" + " " * self._width + "\r")
            self._width = 0
        print(text, file=self.out, flush=True)

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
    variant = config.get(record.TRIAL_VARIANT)
    seed = config.get(record.TRIAL_SEED, ",".join(map(str, config.get(record.TRIAL_SEEDS, []))))  # fused: its seeds
    return f"s{seed} · {variant}" if variant else f"s{seed} · {trial.trial_id}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
