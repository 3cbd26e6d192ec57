"""Encoding: CLIP's image tower over a video's batches of crops, one raw embedding per snippet and crop (a video
file or a frame folder alike)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import torch
from torch import nn

from vadclip.extract.errors import VideoError
from vadclip.extract.preprocess import Preprocess
from vadclip.extract.video import DecodeStats, FrameFolder, crop_batches, prefetch
from vadclip.model.clip import create_clip

RANDOM_WEIGHTS_SEED = 0  # random-weight runs are reproducible, so a resumed run matches the first one


class _SnippetMeans:
    """Running per-snippet sums of frame embeddings, grown as snippets arrive."""

    def __init__(self, n_crops: int) -> None:
        self.n_crops = n_crops
        self.sums: np.ndarray | None = None
        self.counts = np.zeros(0, dtype=np.int64)

    def add(self, ids: np.ndarray, emb: np.ndarray) -> None:  # emb: (F, n_crops, D)
        if self.sums is None:
            self.sums = np.zeros((64, self.n_crops, emb.shape[-1]), dtype=np.float64)
            self.counts = np.zeros(64, dtype=np.int64)
        need = int(ids[-1]) + 1
        if need > len(self.counts):
            grow = max(need, 2 * len(self.counts))
            self.sums = np.concatenate([self.sums, np.zeros((grow - len(self.sums), *self.sums.shape[1:]))])
            self.counts = np.concatenate([self.counts, np.zeros(grow - len(self.counts), dtype=np.int64)])
        np.add.at(self.sums, ids, emb)
        np.add.at(self.counts, ids, 1)

    def means(self, n_snippets: int) -> np.ndarray:
        """(n_crops, T, D) float32."""
        assert self.sums is not None and (self.counts[:n_snippets] > 0).all()
        mean = self.sums[:n_snippets] / self.counts[:n_snippets, None, None]
        return np.ascontiguousarray(mean.transpose(1, 0, 2), dtype=np.float32)


@torch.inference_mode()
def encode_video(path: Path | FrameFolder, model: open_clip.CLIP, preprocess: Preprocess, *, crops: int,
                 snippet: str, batch_size: int, on_frames: Callable[[int], None] | None = None) -> np.ndarray:
    """`(crops, T, D)` float32: raw `encode_image` output (never L2-normalised, as the authors'), one row
    per snippet, `mean` over its frames or its `middle` frame. `path`: a video file, or a frame folder
    (`VideoJob.source` gives either)."""
    stats = DecodeStats()
    acc = _SnippetMeans(crops)
    for batch in prefetch(crop_batches(path, crops, snippet, batch_size, stats)):
        emb = model.encode_image(preprocess(batch.crops)).float().cpu().numpy()
        acc.add(batch.snippet_ids, emb.reshape(len(batch.snippet_ids), crops, -1))
        if on_frames is not None:
            on_frames(batch.new_frames)
    if stats.frames == 0:
        raise VideoError("no frames decoded")
    return acc.means(stats.snippets)


def load_clip(clip_model: str, clip_weights: str | None, device: torch.device) -> nn.Module:
    """create_clip; random weights (with its loud warning) are seeded so reruns give the same features."""
    if clip_weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            return create_clip(clip_model, None, device=device)
    return create_clip(clip_model, clip_weights, device=device)
