"""Dual branch: C-branch (Eq. 4), visual prompts (Eq. 6), instance-specific class embedding (Eq. 7)
and the alignment map M."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from vadclip.model.gcn import valid_mask
from vadclip.model.recompute import recomputed


def ffn(width: int, ratio: int = 4) -> nn.Sequential:
    """Transformer FFN (the code's QuickGELU; the paper: "ReLU is replaced with GELU")."""
    return nn.Sequential(nn.Linear(width, width * ratio), QuickGELU(), nn.Linear(width * ratio, width))


class ClassificationBranch(nn.Module):
    """Eq. 4 (pre-sigmoid): logits = FC(FFN(X) + X); A = sigmoid(logits); (B, L, 1)."""

    recompute = False  # optim.recompute_activations: the FFN's activations recomputed in the backward pass

    def __init__(self, width: int, ratio: int = 4):
        super().__init__()
        self.ffn = ffn(width, ratio)
        self.fc = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x + recomputed(self.recompute, self.ffn, x))


def anomaly_focus_prompt(x: torch.Tensor, logits: torch.Tensor, lengths: torch.Tensor,
                         weights: str = "logits") -> torch.Tensor:
    """Eq. 6: V = Norm(A^T X); (B, 1, d).

    weights `logits` (code): the raw C-branch logits over all L positions, padding included.
    weights `sigmoid` (paper): A = sigmoid(logits) over the valid frames.
    """
    if weights == "sigmoid":
        w = torch.sigmoid(logits) * valid_mask(lengths, x.shape[1])[..., None]
    else:
        w = logits
    return F.normalize(w.transpose(1, 2) @ x, dim=-1)


def average_frame_prompt(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Table 7's average-frame visual prompt: V = Norm(mean of X over the valid frames); (B, 1, d)."""
    mask = valid_mask(lengths, x.shape[1])[..., None].to(x.dtype)
    return F.normalize((mask * x).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1), dim=-1)


class AlignmentBranch(nn.Module):
    """T from t_out and V (Eq. 7), then M = cos(X, T) / tau; (B, L, C).

    residual `prompted` (code): T = (t_out + V) + FFN(t_out + V).
    residual `class` (paper Eq. 7): T = FFN(t_out + V) + t_out.
    Without a visual prompt T = t_out (the FFN belongs to the visual prompt).
    """

    def __init__(self, width: int, visual_prompt: str, prompt_weights: str, residual: str,
                 temperature: float, ratio: int = 4):
        super().__init__()
        self.visual_prompt, self.prompt_weights = visual_prompt, prompt_weights
        self.residual, self.temperature = residual, temperature
        self.ffn = ffn(width, ratio) if visual_prompt != "none" else None

    def class_embeddings(self, t_out: torch.Tensor, x: torch.Tensor, lengths: torch.Tensor,
                         logits_c: torch.Tensor | None) -> torch.Tensor:
        """Instance-specific class embeddings T; (B, C, d), or (1, C, d) without a visual prompt."""
        if self.visual_prompt == "none":
            return t_out[None]
        if self.ffn is None:  # built in __init__ for every visual prompt but "none"
            raise RuntimeError(f"AlignmentBranch: visual prompt {self.visual_prompt!r} without its FFN")
        if self.visual_prompt == "anomaly_focus":
            if logits_c is None:  # the config rejects anomaly_focus without the C-branch
                raise ValueError("visual_prompt='anomaly_focus' needs the C-branch logits (model.branches 'c+a')")
            v = anomaly_focus_prompt(x, logits_c, lengths, self.prompt_weights)
        else:
            v = average_frame_prompt(x, lengths)
        prompted = t_out[None] + v
        base = prompted if self.residual == "prompted" else t_out[None]
        return base + self.ffn(prompted)

    def forward(self, x: torch.Tensor, t_out: torch.Tensor, lengths: torch.Tensor,
                logits_c: torch.Tensor | None) -> torch.Tensor:
        t = self.class_embeddings(t_out, x, lengths, logits_c)
        return F.normalize(x, dim=-1) @ F.normalize(t, dim=-1).transpose(1, 2) / self.temperature
