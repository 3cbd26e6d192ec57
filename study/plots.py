"""Figures logged as artifacts: anomaly score against ground truth per test video (paper Fig. 4). (The study
report as one self-contained HTML page is study.report.html.)"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from vadclip.data.conventions import SNIPPET_FRAMES

matplotlib.use("Agg")  # files only, also on a machine with a display


def score_curves(scores: list[np.ndarray], frame_gt: np.ndarray, names: list[str], path: Path,
                 max_videos: int = 4, snippet_frames: int = SNIPPET_FRAMES) -> Path:
    """Blue: frame anomaly score; pink: ground-truth abnormal frames. Picks abnormal videos first."""
    starts = np.concatenate([[0], np.cumsum([len(s) * snippet_frames for s in scores])])
    gts = [frame_gt[starts[i]:starts[i + 1]] for i in range(len(scores))]
    order = sorted(range(len(scores)), key=lambda i: -float(gts[i].max()))
    picked = order[: max(1, max_videos - 1)] + [i for i in order[::-1] if gts[i].max() == 0][:1]
    fig, axes = plt.subplots(len(picked), 1, figsize=(7, 1.8 * len(picked)), squeeze=False)
    for ax, i in zip(axes[:, 0], picked):
        frames = np.arange(len(gts[i]))
        ax.fill_between(frames, 0, gts[i], color="pink", alpha=0.6, step="post", label="ground truth")
        ax.plot(frames, np.repeat(scores[i], snippet_frames), color="tab:blue", label="anomaly score")
        ax.set_ylim(0, 1.05)
        ax.set_title(names[i], fontsize=8)
    axes[0, 0].legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("frame")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
