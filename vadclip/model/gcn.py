"""Global module of the LGT-Adapter: GCN over a similarity and a distance adjacency (Eqs. 1-3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from vadclip.model.recompute import recomputed


def valid_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L) bool: True on the unpadded frames."""
    return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]


def similarity_adjacency(x: torch.Tensor, lengths: torch.Tensor, threshold: float = 0.7,
                         filter: str = "zero") -> torch.Tensor:
    """Eq. 2: H_sim = cosine similarity, thresholded, row softmax over the valid frames; (B, L, L).

    filter `zero` (code): entries <= threshold become 0 and still take part in the softmax.
    filter `drop` (a reading of "filter weak relations"): they are removed from the softmax.
    Padded rows and columns are 0.
    """
    norms = x.norm(dim=-1, keepdim=True)
    cos = (x @ x.transpose(1, 2)) / (norms @ norms.transpose(1, 2)).clamp_min(1e-20)
    valid = valid_mask(lengths, x.shape[1])
    pair = valid[:, :, None] & valid[:, None, :]
    if filter == "zero":
        logits = F.threshold(cos, threshold, 0.0)
        keep = pair
    else:
        eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)[None]
        keep = pair & ((cos > threshold) | eye)  # a frame always keeps itself: no empty rows
        logits = cos
    adj = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.nan_to_num(adj, nan=0.0) * pair  # all-padding rows give NaN -> 0


def distance_adjacency(length: int, sigma: float = math.e, kernel: str = "exp",
                       lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3: relative-position adjacency.

    kernel `exp` (code): exp(-|i-j| / sigma) over all L positions, not normalised; (L, L).
    kernel `softmax` (paper): row softmax of -|i-j| / sigma over each video's valid frames; needs
    `lengths` and returns (B, L, L) with padded rows/cols 0.
    """
    idx = torch.arange(length, dtype=torch.float32)
    neg_dist = -(idx[:, None] - idx[None, :]).abs() / sigma
    if kernel == "exp":
        return neg_dist.exp()
    if lengths is None:
        raise ValueError("distance_adjacency(kernel='softmax') needs the valid lengths")
    neg_dist = neg_dist.to(lengths.device)
    valid = valid_mask(lengths, length)
    pair = valid[:, :, None] & valid[:, None, :]
    adj = torch.softmax(neg_dist[None].masked_fill(~pair, float("-inf")), dim=-1)
    return torch.nan_to_num(adj, nan=0.0) * pair


class GraphConvolution(nn.Module):
    """out = A (X W) + residual(X); residual = identity, or Conv1d(k=5) when widths differ (code)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        nn.init.xavier_uniform_(self.weight)
        self.residual = (nn.Identity() if in_features == out_features
                         else nn.Conv1d(in_features, out_features, kernel_size=5, padding=2))

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        res = x if isinstance(self.residual, nn.Identity) else self.residual(x.transpose(1, 2)).transpose(1, 2)
        return adj @ (x @ self.weight) + res


class TwoStackGCN(nn.Module):
    """The code's global module: two 2-layer GCN stacks (similarity, distance), QuickGELU, concat -> d."""

    def __init__(self, width: int):
        super().__init__()
        half = width // 2
        self.sim1, self.sim2 = GraphConvolution(width, half), GraphConvolution(half, half)
        self.dis1, self.dis2 = GraphConvolution(width, half), GraphConvolution(half, half)
        self.act = QuickGELU()

    def forward(self, x: torch.Tensor, h_sim: torch.Tensor, h_dis: torch.Tensor) -> torch.Tensor:
        a = self.act(self.sim2(self.act(self.sim1(x, h_sim)), h_sim))
        b = self.act(self.dis2(self.act(self.dis1(x, h_dis)), h_dis))
        return torch.cat([a, b], dim=-1)


class SingleWeightGCN(nn.Module):
    """Eq. 1 (paper): X_g = X_l + gelu([H_sim X_l ; H_dis X_l] W), one weight W, with the residual
    the paper mentions ("both local transformer and GCN layer employ residual connection")."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(2 * width, width))
        nn.init.xavier_uniform_(self.weight)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, h_sim: torch.Tensor, h_dis: torch.Tensor) -> torch.Tensor:
        return x + self.act(torch.cat([h_sim @ x, h_dis @ x], dim=-1) @ self.weight)


class GlobalGCN(nn.Module):
    """Builds both adjacencies and applies the chosen GCN. The fixed `exp` distance adjacency is
    built once (a buffer), not on every forward as in the authors' code (`rebuild_distance=True`)."""

    fixed_distance: torch.Tensor | None  # buffer; None unless kernel == "exp"
    recompute = False  # optim.recompute_activations: adjacencies and GCN recomputed in the backward pass

    def __init__(self, width: int, length: int, gcn: str, threshold: float, filter: str,
                 kernel: str, sigma: float, rebuild_distance: bool = False):
        super().__init__()
        self.threshold, self.filter, self.kernel, self.sigma = threshold, filter, kernel, sigma
        self.gcn = TwoStackGCN(width) if gcn == "two_stack" else SingleWeightGCN(width)
        fixed = distance_adjacency(length, sigma, "exp") if kernel == "exp" else None
        self.register_buffer("fixed_distance", fixed, persistent=False)
        self.rebuild_distance = rebuild_distance

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return recomputed(self.recompute, self._forward, x, lengths)

    def _forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h_sim = similarity_adjacency(x, lengths, self.threshold, self.filter)
        length = x.shape[1]
        if self.kernel != "exp":
            h_dis = distance_adjacency(length, self.sigma, "softmax", lengths)
        elif self.rebuild_distance:
            h_dis = distance_adjacency(length, self.sigma, "exp").to(x.device)
        elif self.fixed_distance is None:  # built in __init__ whenever kernel == "exp"
            raise RuntimeError("GlobalGCN: kernel 'exp' without its fixed distance adjacency")
        else:
            h_dis = self.fixed_distance[:length, :length]
        return self.gcn(x, h_sim, h_dis)
