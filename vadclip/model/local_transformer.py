"""Local module of the LGT-Adapter: a CLIP-style transformer whose attention is limited to windows."""

from __future__ import annotations

import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import nn


def local_window(length: int, window: int, overlap: bool = False) -> torch.Tensor:
    """(L, L) bool: True where frame i may attend to frame j.

    Code: non-overlapping blocks of `window` frames (block-diagonal). Paper text ("equal-length and
    overlapping windows"): each frame attends to the `window` frames of the window centred on it.
    """
    idx = torch.arange(length)
    if not overlap:
        return (idx[:, None] // window) == (idx[None, :] // window)
    start = idx[:, None] - window // 2
    return (idx[None, :] >= start) & (idx[None, :] < start + window)


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """Bool mask -> additive float mask (0 inside, -inf outside), as the authors build it."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


class TemporalTransformer(nn.Module):
    """Pre-LN CLIP blocks (1 head by default, MLP x4, QuickGELU) over (B, L, d).

    `window=None` is the global TF-encoder of the Table 5 ablations. No key-padding mask (code).
    """

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: int, length: int,
                 window: int | None = None, overlap: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, act_layer=QuickGELU) for _ in range(layers))
        mask = None if window is None else additive_mask(local_window(length, window, overlap))
        self.register_buffer("attn_mask", mask, persistent=False)
        self.block_window = window if window is not None and not overlap else None
        self.windows_as_batch = True  # False = the authors' masked full-length attention (bench, tests)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        w = self.block_window
        if self.windows_as_batch and w is not None and length % w == 0:
            # Exact: with block-diagonal attention and position-wise LN/MLP, every layer keeps each
            # window to itself, so the windows run as a batch of short sequences without a mask.
            x = x.reshape(b * length // w, w, d)
            for block in self.blocks:
                x = block(x)
            return x.reshape(b, length, d)
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        return x


class FramePositionEmbedding(nn.Module):
    """Learnable absolute frame position embedding, N(0, 0.01) (code; not in the paper)."""

    def __init__(self, length: int, width: int):
        super().__init__()
        self.embedding = nn.Embedding(length, width)
        nn.init.normal_(self.embedding.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.embedding.weight[: x.shape[1]]
