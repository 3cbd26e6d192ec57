import math

import pytest
import torch
import torch.nn.functional as F

from vadclip.losses import contrastive_loss, mil_align_loss, mil_bce_loss, topk_k, topk_mean


def test_topk_rule_and_mean_by_hand():
    lengths = torch.tensor([5, 40, 16])
    assert topk_k(lengths).tolist() == [1, 3, 2]  # floor(len/16) + 1
    assert topk_k(lengths, fixed=4).tolist() == [4, 4, 4]
    values = torch.zeros(1, 6, 1)
    values[0, :, 0] = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 10.0])  # 10.0 is padding
    out = topk_mean(values, torch.tensor([5]), torch.tensor([2]))
    assert torch.isclose(out[0, 0], torch.tensor((0.9 + 0.7) / 2))


def test_mil_bce_by_hand():
    logits = torch.logit(torch.tensor([[[0.2], [0.8], [0.6], [0.99]]]))
    labels = torch.tensor([[0.0, 1.0]])  # abnormal
    loss = mil_bce_loss(logits, torch.tensor([3]), labels, torch.tensor([2]))
    assert torch.isclose(loss, torch.tensor(-math.log((0.8 + 0.6) / 2)), atol=1e-5)


def test_mil_align_soft_target_by_hand():
    m = torch.tensor([[[1.0, 2.0, 0.0], [3.0, 0.0, 1.0], [0.0, 1.0, 4.0]]])  # (B=1, L=3, C=3)
    labels = torch.tensor([[0.0, 1.0, 1.0]])  # multi-label XD video -> target 1/2, 1/2
    loss = mil_align_loss(m, torch.tensor([3]), labels, torch.tensor([2]))
    s = torch.tensor([(3.0 + 1.0) / 2, (2.0 + 1.0) / 2, (4.0 + 1.0) / 2])
    expected = -(0.5 * F.log_softmax(s, 0)[1] + 0.5 * F.log_softmax(s, 0)[2])
    assert torch.isclose(loss, expected)


@pytest.mark.parametrize("form", ["abs_mean", "hinge_sum"])
def test_contrastive_loss_both_forms_by_hand(form):
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [0.0, 2.0]])
    cos = torch.tensor([1 / math.sqrt(2), -1.0, 0.0])
    expected = cos.abs().mean() if form == "abs_mean" else cos.clamp_min(0).sum()
    assert torch.isclose(contrastive_loss(t, form), expected)


def test_mil_bce_saturated_logits_match_unclamped_authors_call():
    # The authors call F.binary_cross_entropy(mean top-k sigmoid, 1 - label[0]) with no clamp (PyTorch
    # clamps the log at -100). Confidently wrong videos must keep their loss value and their gradient.
    logits = torch.full((3, 12, 1), 50.0)  # padding: large, must be ignored
    logits[0, :10, 0] = torch.linspace(-22.0, -18.0, 10)  # abnormal video scored ~ -20: confidently wrong
    # normal video: sigmoid(20) rounds to 1.0, sigmoid(16.3) to 1 - 2**-23; mean top-2 = 1 - 2**-24 (> 1 - 1e-7)
    logits[1, :12, 0] = torch.cat([torch.tensor([16.3, 20.0]), torch.linspace(0.0, 10.0, 10)])
    logits[2, :5, 0] = 20.0  # normal video, sigmoid rounds to 1.0: log clamped at -100 by PyTorch
    lengths, k = torch.tensor([10, 12, 5]), torch.tensor([2, 2, 1])  # no ties inside a top-k
    labels = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])

    ours_in = logits.clone().requires_grad_(True)
    ours = mil_bce_loss(ours_in, lengths, labels, k)
    (ours_grad,) = torch.autograd.grad(ours, ours_in)

    ref_in = logits.clone().requires_grad_(True)
    probs = torch.sigmoid(ref_in)
    video = torch.stack([probs[b, : int(n), 0].topk(int(kk)).values.mean()
                         for b, (n, kk) in enumerate(zip(lengths, k))])
    ref = F.binary_cross_entropy(video, 1.0 - labels[:, 0])
    (ref_grad,) = torch.autograd.grad(ref, ref_in)

    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours_grad, ref_grad)
    assert ours.item() > 100 / 3  # the saturated normal video alone contributes 100 / B
    assert ours_grad[0, :10].sum() < -0.1 and ours_grad[1, :12].sum() > 0.1  # both confidently wrong videos learn
    assert ours_grad[:, :, 0][torch.arange(12)[None] >= lengths[:, None]].abs().sum() == 0  # padding: no gradient
