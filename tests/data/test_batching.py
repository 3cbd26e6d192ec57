import numpy as np
import pytest

from tests.reference import uniform_extract
from vadclip.data import FeatureBank, collate, epoch_batches, pad_to_length, pool_to_length, split_chunks


def test_pool_by_hand():
    x = np.arange(10, dtype=np.float32).reshape(5, 2)  # rows [0,1], [2,3], ..., [8,9]
    out = pool_to_length(x, 2)  # bounds 0, 2, 5
    np.testing.assert_allclose(out, [[1, 2], [6, 7]])
    assert out.dtype == np.float32


@pytest.mark.parametrize("dim", [1, 4, 512])
@pytest.mark.parametrize("t", [257, 300, 511, 512, 513, 1000, 2000, 6750, 20000])
def test_pool_against_the_authors_uniform_extract(t, dim):
    """Theirs bit for bit while a row pools at most two snippets (T <= 512); beyond (up to 79 per row at
    T = 20,000) within the summation-order bound the docstring states, count * 2^-23 * mean |x| of the chunk."""
    x = (np.random.default_rng(t + dim).standard_normal((t, dim)) * 3 + 1).astype(np.float32)
    out, ref = pool_to_length(x, 256), uniform_extract(x, 256)
    assert out.dtype == np.float32 and out.shape == (256, dim)
    if t <= 512:
        np.testing.assert_array_equal(out, ref)
        return
    bounds = np.linspace(0, t, 257, dtype=np.int32)
    counts = np.diff(bounds)
    scale = np.stack([np.abs(x[a:b]).mean(0) for a, b in zip(bounds[:-1], bounds[1:])])
    assert (np.abs(out - ref) <= counts[:, None] * 2.0 ** -23 * scale).all()


def test_pool_keeps_short_inputs():
    x = np.ones((7, 3), np.float32)
    assert pool_to_length(x, 7) is x and pool_to_length(x, 256) is x


def test_pad():
    out = pad_to_length(np.ones((3, 2), np.float32), 5)
    assert out.shape == (5, 2) and out[:3].all() and not out[3:].any()
    with pytest.raises(ValueError):
        pad_to_length(np.ones((6, 2)), 5)


def test_split_shorter_than_length():
    x = np.ones((3, 2), np.float32)
    chunks, lengths = split_chunks(x, 4)
    assert chunks.shape == (1, 4, 2) and lengths.tolist() == [3] and lengths.dtype == np.int64
    assert not chunks[0, 3:].any()


def test_split_exact_length_has_no_padding_only_chunk():
    x = np.ones((4, 2), np.float32)
    chunks, lengths = split_chunks(x, 4)
    assert chunks.shape == (1, 4, 2) and lengths.tolist() == [4]
    chunks, lengths = split_chunks(np.ones((8, 2), np.float32), 4)
    assert lengths.tolist() == [4, 4]


def test_split_with_remainder():
    L = 4
    x = np.arange(2 * L + 3, dtype=np.float32)[:, None].repeat(2, 1)
    chunks, lengths = split_chunks(x, L)
    assert chunks.shape == (3, L, 2) and lengths.tolist() == [L, L, 3]
    np.testing.assert_array_equal(chunks.reshape(-1, 2)[: 2 * L + 3], x)  # concat + cut to T restores x
    assert not chunks[2, 3:].any()


def test_balanced_batches():
    is_normal = np.array([True] * 10 + [False] * 7)
    batches = epoch_batches(is_normal, 3, "balanced", np.random.default_rng(0))
    assert len(batches) == 7 // 3
    for b in batches:
        assert len(b) == 6 and is_normal[b[:3]].all() and not is_normal[b[3:]].any()
    flat = np.concatenate(batches)
    assert len(set(flat.tolist())) == len(flat)  # no sample twice in an epoch


def test_balanced_accepts_labels_and_needs_a_full_step():
    labels = np.zeros((5, 3), np.float32)
    labels[:2, 0] = 1
    labels[2:, 1] = 1
    assert [len(b) for b in epoch_batches(labels, 2, "balanced", np.random.default_rng(0))] == [4]
    with pytest.raises(ValueError, match="balanced"):
        epoch_batches(labels, 3, "balanced", np.random.default_rng(0))


def test_mixed_batches_keep_the_last_partial_batch():
    is_normal = np.arange(17) % 2 == 0
    batches = epoch_batches(is_normal, 5, "mixed", np.random.default_rng(1))
    assert [len(b) for b in batches] == [5, 5, 5, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(17))
    again = epoch_batches(is_normal, 5, "mixed", np.random.default_rng(1))
    assert all((a == b).all() for a, b in zip(batches, again))
    with pytest.raises(ValueError, match="sampler"):
        epoch_batches(is_normal, 5, "random", np.random.default_rng(1))


def test_collate_pads_and_pools():
    arrays = [np.full((3, 2), 1, np.float32), np.full((6, 2), 2, np.float32), np.full((9, 2), 3, np.float32)]
    bank = FeatureBank.from_arrays(arrays)
    feats, lengths = collate(bank, np.array([2, 0]), 4)
    assert feats.shape == (2, 4, 2) and feats.dtype == np.float32
    assert lengths.tolist() == [4, 3] and lengths.dtype == np.int64
    assert (feats[0] == 3).all() and (feats[1, :3] == 1).all() and not feats[1, 3:].any()


def test_feature_bank_views():
    arrays = [np.full((t, 2), t, np.float32) for t in (2, 5, 1)]
    bank = FeatureBank.from_arrays(arrays)
    assert len(bank) == 3 and bank.lengths.tolist() == [2, 5, 1] and bank.data.shape == (8, 2)
    assert (bank[1] == 5).all() and bank[1].base is not None and (bank[-1] == 1).all()
    with pytest.raises(IndexError):
        bank[3]
