"""What a run did (`ExtractSummary`), its progress bars, and one video's outcome recorded: shared by a local run
and a cluster run."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vadclip.extract.jobs import VideoJob
from vadclip.extract.write import write_features

log = logging.getLogger("vadclip.extract")  # one logger for the package: its name is in every log line


@dataclass
class ExtractSummary:
    out_dir: Path
    list_path: Path | None  # None when no video succeeded
    extracted: list[str] = field(default_factory=list)  # encoded in this run (paths relative to VIDEOS)
    skipped: list[str] = field(default_factory=list)  # all crops already there (resume)
    failed: dict[str, str] = field(default_factory=dict)  # video → reason
    frames: int = 0  # frames decoded in this run
    snippets: int = 0  # rows written per crop in this run (sum of T)
    seconds: float = 0.0  # decode + encode + write, model loading excluded
    load_seconds: float = 0.0  # building CLIP

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def report(self) -> str:
        lines = [f"extracted {len(self.extracted)}, skipped {len(self.skipped)} (complete), "
                 f"failed {len(self.failed)}; {self.frames} frames → {self.snippets} snippets in "
                 f"{self.seconds:.1f} s ({self.fps:.1f} frames/s)"]
        lines += [f"  FAILED {video}: {reason}" for video, reason in self.failed.items()]
        lines.append(f"list: {self.list_path}" if self.list_path else "list: not written (no video succeeded)")
        return "\n".join(lines)


@contextlib.contextmanager
def progress_bars(total: int, summary: ExtractSummary, progress: bool) -> Iterator[tuple[tqdm, tqdm]]:
    """The bar over videos and the one over decoded frames, log lines above them; `summary.seconds` is the time
    spent inside. `progress` false hides them (else tqdm's own rule: none when stderr is not a terminal)."""
    hide = None if progress else True
    t0 = time.perf_counter()
    videos_bar = tqdm(total=total, desc="videos", unit="video", disable=hide, position=0)
    frames_bar = tqdm(desc="frames", unit="frame", disable=hide, position=1)
    try:
        with logging_redirect_tqdm():
            yield videos_bar, frames_bar
    finally:
        summary.seconds = time.perf_counter() - t0
        frames_bar.close()
        videos_bar.close()


def record_video(summary: ExtractSummary, job: VideoJob, out_dir: Path, feats: np.ndarray | None,
                 error: str | None) -> None:
    """One video's outcome: its features written and counted, or why it could not be read (logged)."""
    if feats is None:
        summary.failed[job.rel] = str(error)
        log.warning("skipping unreadable video %s: %s", job.rel, error)
        return
    write_features(job, out_dir, feats)
    summary.extracted.append(job.rel)
    summary.snippets += feats.shape[1]
