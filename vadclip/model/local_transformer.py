"""Local module of the LGT-Adapter: a CLIP-style transformer whose attention is limited to windows."""

from __future__ import annotations

from functools import partial

import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import nn

from vadclip.model.recompute import recomputed


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
    `windows_as_batch=False`: the authors' masked full-length attention (bench, tests).
    """

    attn_mask: torch.Tensor | None  # buffer; None without a window
    recompute = False  # optim.recompute_activations: each block's activations recomputed in the backward pass
    share_blank_windows = True  # off under torch.func.vmap (fused seeds): the sharing has data-dependent shapes

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: int, length: int,
                 window: int | None = None, overlap: bool = False, windows_as_batch: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, act_layer=QuickGELU) for _ in range(layers))
        mask = None if window is None else additive_mask(local_window(length, window, overlap))
        self.register_buffer("attn_mask", mask, persistent=False)
        self.block_window = window if window is not None and not overlap else None
        self.windows_as_batch = windows_as_batch

    def forward(self, x: torch.Tensor, blank_frames: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, d). `blank_frames` (B, L) bool: frames whose input was all zeros (padding) before
        the position embedding; windows made only of them are computed once per window slot."""
        b, length, d = x.shape
        w = self.block_window
        if self.windows_as_batch and w is not None and length % w == 0:
            # Exact: with block-diagonal attention and position-wise LN/MLP, every layer keeps each
            # window to itself, so the windows run as a batch of short sequences without a mask.
            windows = x.reshape(b * length // w, w, d)
            if blank_frames is None or not self.share_blank_windows:
                out = self._run(windows)
            else:
                out = self._run_sharing_blank_windows(windows, blank_frames.reshape(-1, w).all(-1), length // w)
            return out.reshape(b, length, d)
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        return self._run(x, mask)

    def _run(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = recomputed(self.recompute, partial(block, attn_mask=attn_mask), x)
        return x

    def _run_sharing_blank_windows(self, windows: torch.Tensor, blank: torch.Tensor, slots: int) -> torch.Tensor:
        """windows (B*slots, w, d), sample-major; blank (B*slots,) bool.

        Exact: a window of padding holds the same input (zeros + the position embedding of its
        slot) in every sample and, without a key-padding mask (code), gives the same output; so each
        slot runs once and is shared (under autograd too: the shared window's gradients add up)."""
        if not bool(blank.any()):
            return self._run(windows)
        kept, blank_index = (~blank).nonzero().flatten(), blank.nonzero().flatten()
        # shared[i]: which of the distinct blank slots the i-th blank window is in
        blank_slots, shared = (blank_index % slots).unique(return_inverse=True)
        first = torch.full_like(blank_slots, len(windows)).scatter_reduce(0, shared, blank_index, "amin")
        out = self._run(windows.index_select(0, torch.cat([kept, first])))
        # Row of `out` for every window: kept ones in order, then one per blank slot.
        source = torch.cumsum(~blank, 0) - 1
        source[blank_index] = len(kept) + shared
        # index_select, not out[source]: the latter's backward (index_put_ accumulate) adds the
        # repeated rows with atomics on CPU, so the sum order and the result vary between runs.
        return out.index_select(0, source)


class FramePositionEmbedding(nn.Module):
    """Learnable absolute frame position embedding, N(0, 0.01) (code; not in the paper)."""

    def __init__(self, length: int, width: int):
        super().__init__()
        self.embedding = nn.Embedding(length, width)
        nn.init.normal_(self.embedding.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.embedding.weight[: x.shape[1]]
