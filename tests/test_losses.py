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
