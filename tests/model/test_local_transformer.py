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


def test_window_mask_blocks_cross_window_attention():
    torch.manual_seed(0)
    tf = TemporalTransformer(16, layers=2, heads=1, mlp_ratio=4, length=12, window=4).eval()
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
