"""Top-k on tied scores: the snippets (hence the gradient) are those of the authors' `torch.topk` calls in CLAS2 and
CLASM, where a sort picks others; the loss values agree to float32 rounding."""

from __future__ import annotations

import torch

from tests.reference import clas2, clasm
from vadclip.losses import mil_align_loss, mil_bce_loss, topk_k, topk_mean

L = 24  # padded length; padding holds large values that must never be picked


def _tied_scores() -> tuple[torch.Tensor, torch.Tensor]:
    """(2, L) scores and lengths: video 0 (20 valid, k = 2) has 17 equal scores below one larger one, so the second
    place is a tie; video 1 (24 valid, k = 2) has distinct scores."""
    scores = torch.full((2, L), 9.0)
    scores[0, :20] = torch.tensor([0.3] * 17 + [0.1] * 3)
    scores[0, 5] = 0.8
    scores[1] = torch.linspace(-1.0, 1.0, L)
    return scores, torch.tensor([20, L])


def _picked(grad: torch.Tensor) -> list[int]:
    return torch.nonzero(grad).flatten().tolist()


def test_a_sort_and_torch_topk_pick_different_tied_snippets():
    """The premise: on this tie the two selections differ (else the tests below would prove nothing)."""
    scores, _ = _tied_scores()
    valid = scores[0, :20]
    assert set(valid.sort(descending=True).indices[:2].tolist()) != set(torch.topk(valid, k=2).indices.tolist())


def test_topk_mean_selects_as_torch_topk_and_routes_its_gradient():
    scores, lengths = _tied_scores()
    values = scores[..., None].clone().requires_grad_(True)
    k = topk_k(lengths)
    out = topk_mean(values, lengths, k)
    out.sum().backward()
    assert values.grad is not None
    for b in range(2):
        n, kb = int(lengths[b]), int(k[b])
        expected = torch.topk(scores[b, :n], k=kb, largest=True)
        assert _picked(values.grad[b, :, 0]) == sorted(expected.indices.tolist())
        assert torch.equal(values.grad[b, expected.indices, 0], torch.full((kb,), 1.0 / kb))
        torch.testing.assert_close(out[b, 0], expected.values.mean())


def _same_loss_gradients(x: torch.Tensor, ours_fn, ref_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Our loss and the authors' on copies of `x`: asserted equal; returns both gradients with respect to `x`."""
    ours_in, ref_in = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours, ref = ours_fn(ours_in), ref_fn(ref_in)
    ours.backward()
    ref.backward()
    assert ours_in.grad is not None and ref_in.grad is not None
    torch.testing.assert_close(ours, ref)
    return ours_in.grad, ref_in.grad


def test_bce_loss_and_gradient_equal_the_authors_clas2_on_a_tie():
    scores, lengths = _tied_scores()
    logits = torch.logit(scores.clamp(0.05, 0.95))  # the tie survives the sigmoid; padding stays largest
    labels = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    ours_grad, ref_grad = _same_loss_gradients(logits[..., None], lambda x: mil_bce_loss(x, lengths, labels,
                                                                                        topk_k(lengths)),
                                               lambda x: clas2(x, labels, lengths))
    assert _picked(ours_grad) == _picked(ref_grad)  # the same snippets, tie included
    torch.testing.assert_close(ours_grad, ref_grad)


def test_align_loss_and_gradient_equal_the_authors_clasm_on_ties_in_some_classes():
    scores, lengths = _tied_scores()
    classes = torch.stack([scores, -scores, scores.flip(1)], dim=-1)  # (2, L, 3): class 0 holds video 0's tie
    classes[0, :20, 1] = 0.5  # class 1: every valid score of video 0 equal
    labels = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    ours_grad, ref_grad = _same_loss_gradients(classes, lambda x: mil_align_loss(x, lengths, labels, topk_k(lengths)),
                                               lambda x: clasm(x, labels, lengths))
    for c in range(3):
        assert _picked(ours_grad[..., c]) == _picked(ref_grad[..., c]), c
    torch.testing.assert_close(ours_grad, ref_grad)


def test_without_ties_the_value_is_unchanged_bit_for_bit():
    """The vectorised sort path still computes every value: no tie, nothing leaves it."""
    values = torch.randn(4, L, 3, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([L, 17, 5, 1])
    k = topk_k(lengths)
    padded = values.masked_fill((torch.arange(L)[None, :] >= lengths[:, None])[..., None], float("-inf"))
    top = padded.sort(dim=1, descending=True).values
    take = (torch.arange(L)[None, :] < k[:, None])[..., None]
    expected = torch.where(take, top, torch.zeros_like(top)).sum(1) / k[:, None].to(values.dtype)
    assert torch.equal(topk_mean(values, lengths, k), expected)
