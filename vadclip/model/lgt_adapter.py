"""LGT-Adapter and its Table 5 ablations: `temporal` picks the modules, then the FC gives X."""

from __future__ import annotations

import torch
from torch import nn

from vadclip.config import ModelConfig
from vadclip.model.gcn import GlobalGCN
from vadclip.model.local_transformer import FramePositionEmbedding, TemporalTransformer


class TemporalAdapter(nn.Module):
    """X_clip -> [position embedding] -> [local | global TF] -> [GCN] -> FC -> X.

    Rows of Table 5: none, local, global_tf, gcn, local+gcn (LGT-Adapter), global_tf+gcn,
    local+global_tf. `straightforward`: the exact speed-ups off (see `VadCLIP`).
    """

    def __init__(self, cfg: ModelConfig, straightforward: bool = False):
        super().__init__()
        parts = [] if cfg.temporal == "none" else cfg.temporal.split("+")
        d, length = cfg.embed_dim, cfg.visual_length
        has_tf = "local" in parts or "global_tf" in parts
        self.position = FramePositionEmbedding(length, d) if has_tf and cfg.position_embedding else None
        self.local = (TemporalTransformer(d, cfg.local_layers, cfg.heads, cfg.mlp_ratio, length,
                                          window=cfg.window, overlap=cfg.window_overlap,
                                          windows_as_batch=not straightforward)
                      if "local" in parts else None)
        self.global_tf = (TemporalTransformer(d, cfg.global_tf_layers, cfg.heads, cfg.mlp_ratio, length)
                          if "global_tf" in parts else None)
        self.gcn = (GlobalGCN(d, length, cfg.gcn, cfg.similarity_threshold, cfg.similarity_filter,
                              cfg.distance_kernel, cfg.sigma, rebuild_distance=straightforward)
                    if "gcn" in parts else None)
        self.fc = nn.Linear(d, d)  # "after temporal modeling, X_g is fed into an FC layer"

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        blank = (x == 0).all(dim=-1) if self.local is not None else None  # padding, for the local module
        if self.position is not None:
            x = self.position(x)
        if self.local is not None:
            x = self.local(x, blank)
        if self.global_tf is not None:
            x = self.global_tf(x)
        if self.gcn is not None:
            x = self.gcn(x, lengths)
        return self.fc(x)
