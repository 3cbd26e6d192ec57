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
    """Mean of the k largest values over the valid time steps; values (B, L, K) -> (B, K).

    Selects as the authors' `torch.topk` does (`topk_order`): the value is the sorted path's, and where equal
    scores straddle the k-th place the gradient goes to the snippets their call picks.
    """
    steps = torch.arange(values.shape[1], device=values.device)
    padded = values.masked_fill((steps[None, :] >= lengths[:, None])[..., None], float("-inf"))
    top = padded.gather(1, topk_order(padded, lengths, k))
    take = (steps[None, :] < k[:, None])[..., None]
    return torch.where(take, top, torch.zeros_like(top)).sum(1) / k[:, None].to(values.dtype)


def topk_order(padded: torch.Tensor, lengths: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Time indices of `padded` (B, L, K; padding -inf) in descending order, (B, L, K); the first k[b] of a
    video with a tie at its k-th place are replaced by the authors' top-k indices.

    A sort and `torch.topk` agree on the k largest values but, among equal values, pick different snippets;
    the mean is the same, the gradient is not. Only those videos leave the vectorised path."""
    order = padded.detach().sort(dim=1, descending=True).indices
    tied = boundary_ties(padded.detach().gather(1, order), lengths, k)
    if not bool(tied.any()):  # the usual case; one device sync per call
        return order
    order = order.clone()
    for b in torch.nonzero(tied).flatten().tolist():
        n, kb = int(lengths[b]), int(k[b])
        order[b, :kb] = authors_topk_indices(padded.detach()[b, :n], kb)
    return order


def boundary_ties(top: torch.Tensor, lengths: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B,) bool: a video whose k-th and (k+1)-th largest valid values are equal in some column of `top`
    (B, L, K, sorted descending), i.e. where the choice among equal scores decides the top-k set."""
    last = (k - 1).clamp_min(0)[:, None, None].expand(-1, 1, top.shape[2])
    after = k.clamp_max(top.shape[1] - 1)[:, None, None].expand(-1, 1, top.shape[2])
    equal = (top.gather(1, last) == top.gather(1, after)).squeeze(1)
    return (equal & (k < lengths)[:, None]).any(1)


def authors_topk_indices(valid: torch.Tensor, k: int) -> torch.Tensor:
    """The authors' call on one video's valid rows (n, K) -> (k, K) indices: CLAS2 passes the 1-D scores,
    `torch.topk(x, k=k, largest=True)`, CLASM the (n, C) map, `torch.topk(x, k=k, largest=True, dim=0)`."""
    valid = valid.contiguous()  # their slices are of contiguous tensors
    if valid.shape[1] == 1:
        return torch.topk(valid[:, 0], k=k, largest=True).indices[:, None]
    return torch.topk(valid, k=k, largest=True, dim=0).indices


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
