"""Objective (Eqs. 8-10): L = L_bce + L_nce + lambda * L_cts, with top-k MIL pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vadclip.config import LossConfig


def topk_k(lengths: torch.Tensor, divisor: int = 16, fixed: int = 0) -> torch.Tensor:
    """k per video: floor(len / divisor) + 1 (code, the XDVioDet rule) or a fixed k, at most len."""
    k = torch.full_like(lengths, fixed) if fixed > 0 else lengths // divisor + 1
    return torch.minimum(k, lengths.clamp_min(1))


def topk_mean(values: torch.Tensor, lengths: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mean of the k largest values over the valid time steps; values (B, L, K) -> (B, K)."""
    steps = torch.arange(values.shape[1], device=values.device)
    padded = values.masked_fill((steps[None, :] >= lengths[:, None])[..., None], float("-inf"))
    top = padded.sort(dim=1, descending=True).values
    take = (steps[None, :] < k[:, None])[..., None]
    return torch.where(take, top, torch.zeros_like(top)).sum(1) / k[:, None].to(values.dtype)


def mil_bce_loss(logits_c: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor,
                 k: torch.Tensor) -> torch.Tensor:
    """L_bce: BCE between the mean top-k anomaly confidence and the video label (1 = abnormal).

    No clamp on the probability, as in the authors' code: PyTorch clamps log(p) at -100, and a clamp
    here would cut the gradient of confidently wrong videos (|mean top-k logit| > ~16).
    """
    video = topk_mean(torch.sigmoid(logits_c), lengths, k).squeeze(-1)
    return F.binary_cross_entropy(video, 1.0 - labels[:, 0])


def mil_align_loss(logits_a: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor,
                   k: torch.Tensor) -> torch.Tensor:
    """L_nce (MIL-Align, Eq. 8): S = mean top-k of M per class (M already holds cos / tau), then
    cross-entropy against label / sum(label) (a soft target for multi-label XD videos)."""
    s = topk_mean(logits_a, lengths, k)
    target = labels / labels.sum(-1, keepdim=True)
    return -(target * F.log_softmax(s, dim=-1)).sum(-1).mean()


def contrastive_loss(t_out: torch.Tensor, form: str = "abs_mean") -> torch.Tensor:
    """L_cts between the normal class embedding (index 0) and each abnormal one.

    form `abs_mean` (code): mean_j |cos(t_n, t_j)|.  form `hinge_sum` (paper Eq. 9): sum_j max(0, cos).
    """
    t = F.normalize(t_out, dim=-1)
    cos = t[1:] @ t[0]
    return cos.abs().mean() if form == "abs_mean" else cos.clamp_min(0).sum()


def total_loss(out, lengths: torch.Tensor, labels: torch.Tensor, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Eq. 10 over the trained branches; returns every term and `loss`."""
    k = topk_k(lengths, cfg.topk_divisor, cfg.topk_fixed)
    terms: dict[str, torch.Tensor] = {}
    if out.logits_c is not None:
        terms["loss_bce"] = mil_bce_loss(out.logits_c, lengths, labels, k)
    if out.logits_a is not None:
        terms["loss_nce"] = mil_align_loss(out.logits_a, lengths, labels, k)
        terms["loss_cts"] = contrastive_loss(out.t_out, cfg.cts_form)
    loss = sum(terms.get(n, 0.0) for n in ("loss_bce", "loss_nce"))
    if not isinstance(loss, torch.Tensor):  # every model trains the C-branch, the A-branch or both
        raise ValueError("total_loss: the model output has neither logits_c nor logits_a")
    if "loss_cts" in terms:
        loss = loss + cfg.cts_weight * terms["loss_cts"]
    terms["loss"] = loss
    return terms
