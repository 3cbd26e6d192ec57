import torch
import torch.nn.functional as F

from vadclip.model.branches import AlignmentBranch, anomaly_focus_prompt, average_frame_prompt


def test_anomaly_focus_prompt_by_hand():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]]])
    logits = torch.tensor([[[2.0], [-1.0], [5.0]]])
    lengths = torch.tensor([2])
    code = anomaly_focus_prompt(x, logits, lengths, "logits")  # raw logits, padding included
    assert torch.allclose(code[0, 0], F.normalize(torch.tensor([2.0 + 15.0, -1.0 + 15.0]), dim=0))
    paper = anomaly_focus_prompt(x, logits, lengths, "sigmoid")  # sigmoid, valid frames only
    a = torch.sigmoid(torch.tensor([2.0, -1.0]))
    assert torch.allclose(paper[0, 0], F.normalize(a, dim=0))
    avg = average_frame_prompt(x, lengths)
    assert torch.allclose(avg[0, 0], F.normalize(torch.tensor([0.5, 0.5]), dim=0))


def test_alignment_map_and_both_residual_forms():
    torch.manual_seed(0)
    x, t_out = torch.randn(1, 3, 4), torch.randn(2, 4)
    logits, lengths = torch.randn(1, 3, 1), torch.tensor([3])
    code = AlignmentBranch(4, "anomaly_focus", "logits", "prompted", 0.07)
    v = anomaly_focus_prompt(x, logits, lengths)
    t = (t_out + v) + code.ffn(t_out + v)
    expected = F.normalize(x, dim=-1) @ F.normalize(t, dim=-1).transpose(1, 2) / 0.07
    assert torch.allclose(code(x, t_out, lengths, logits), expected, atol=1e-5)
    paper = AlignmentBranch(4, "anomaly_focus", "logits", "class", 0.07)
    paper.load_state_dict(code.state_dict())
    t = t_out + code.ffn(t_out + v)
    expected = F.normalize(x, dim=-1) @ F.normalize(t, dim=-1).transpose(1, 2) / 0.07
    assert torch.allclose(paper(x, t_out, lengths, logits), expected, atol=1e-5)
    plain = AlignmentBranch(4, "none", "logits", "prompted", 0.5)
    expected = F.normalize(x, dim=-1) @ F.normalize(t_out, dim=-1).T / 0.5
    assert torch.allclose(plain(x, t_out, lengths, None), expected, atol=1e-5)
