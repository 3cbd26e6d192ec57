import pytest
import torch

from vadclip.model.local_transformer import TemporalTransformer, additive_mask, local_window


def test_non_overlapping_window_is_block_diagonal():
    allowed = local_window(6, 2)
    expected = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    mask = additive_mask(allowed)
    assert mask[0, 1] == 0 and mask[0, 2] == float("-inf")


def test_overlapping_window_is_a_centred_band_of_window_frames():
    allowed = local_window(8, 4, overlap=True)
    assert allowed[4].nonzero().flatten().tolist() == [2, 3, 4, 5]  # window of 4 centred on frame 4
    assert allowed[0].nonzero().flatten().tolist() == [0, 1]  # clipped at the start
    assert allowed.sum(1).max() == 4


@pytest.mark.parametrize("windows_as_batch", [False, True])
def test_window_mask_blocks_cross_window_attention(windows_as_batch):
    torch.manual_seed(0)
    tf = TemporalTransformer(16, layers=2, heads=1, mlp_ratio=4, length=12, window=4,
                             windows_as_batch=windows_as_batch).eval()
    x = torch.randn(1, 12, 16)
    y = x.clone()
    y[:, 4:8] += torch.randn(1, 4, 16)  # change only the second window
    with torch.no_grad():
        a, b = tf(x), tf(y)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6) and torch.allclose(a[:, 8:], b[:, 8:], atol=1e-6)
    assert not torch.allclose(a[:, 4:8], b[:, 4:8])
    glob = TemporalTransformer(16, layers=1, heads=1, mlp_ratio=4, length=12, window=None).eval()
    with torch.no_grad():
        assert not torch.allclose(glob(x)[:, :4], glob(y)[:, :4])  # the global TF mixes everything


def _masked_and_batched(*args, **kwargs) -> tuple[TemporalTransformer, TemporalTransformer]:
    """The same weights without and with the windows run as a batch."""
    masked = TemporalTransformer(*args, **kwargs, windows_as_batch=False)
    batched = TemporalTransformer(*args, **kwargs)
    batched.load_state_dict(masked.state_dict())
    return masked, batched


@pytest.mark.parametrize("length", [12, 10])  # 10: not a multiple of the window, the masked path runs
def test_windows_as_batch_equals_masked_attention(length):
    torch.manual_seed(0)
    tfs = _masked_and_batched(16, layers=2, heads=2, mlp_ratio=4, length=12, window=4)
    x = torch.randn(3, length, 16, requires_grad=True)
    outs, grads = [], []
    for tf in tfs:
        x.grad = None
        out = tf(x)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([x.grad.clone(), *(p.grad.clone() for p in tf.parameters())])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_blank_windows_are_shared_exactly():
    """Windows of pure padding run once per slot; outputs and the gradients of everything learnable
    (the position embedding, the blocks) equal the masked attention. (The input features get no
    gradient in training; a shared window passes its summed gradient to one of its copies.)"""
    torch.manual_seed(0)
    tfs = _masked_and_batched(16, layers=2, heads=1, mlp_ratio=4, length=16, window=4)
    pos = (torch.randn(16, 16) * 0.1).requires_grad_(True)
    raw = torch.randn(4, 16, 16)
    for i, n in enumerate([16, 9, 3, 0]):  # windows: none, 1, 3 and 4 of them pure padding
        raw[i, n:] = 0
    blank = (raw == 0).all(-1)
    assert blank.reshape(-1, 4).all(-1).sum() == 8
    outs, grads = [], []
    for tf in tfs:
        pos.grad = None
        out = tf(raw + pos, blank)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        outs.append(out.detach())
        grads.append([pos.grad.clone(), *(p.grad.clone() for p in tf.parameters())])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the blank slots really were shared: same output in every sample that has them
    torch.testing.assert_close(outs[1][2, 12:], outs[1][3, 12:])


def test_shared_blank_windows_give_the_same_gradients_every_run():
    """Many samples share each blank slot; their gradients must add up in a fixed order (an
    atomic scatter on 2+ CPU threads made training differ from run to run)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tf = TemporalTransformer(256, layers=1, heads=1, mlp_ratio=4, length=64, window=4)
        raw = torch.randn(96, 64, 256)
        raw[:, 4:] = 0  # 15 blank windows in each of 96 samples: 96 copies per blank slot
        blank = (raw == 0).all(-1)
        weight = torch.randn(96, 64, 256)
        grads = []
        for _ in range(6):
            tf.zero_grad()
            (tf(raw, blank) * weight).sum().backward()
            grads.append([p.grad.clone() for p in tf.parameters()])
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))
