"""Fixed-length training samples, test chunks and the two epoch samplers (authors' `utils/tools.py`
and train loops)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from vadclip.config import ConfigError


class Bank(Protocol):
    """Ragged (T_i, d) float32 arrays by index: `FeatureBank` (in memory) or `DiskFeatureBank` (read at each
    access), both in `vadclip.data.banks`."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...

    @property
    def lengths(self) -> np.ndarray: ...  # (n,) int64: T_i

    @property
    def feature_dim(self) -> int: ...


def pool_to_length(x: np.ndarray, length: int) -> np.ndarray:
    """Authors' `uniform_extract(avg=True)`: T > length -> exactly `length` rows, row i = mean of rows
    [b_i, b_{i+1}) with b = linspace(0, T, length+1) cast to int32 (an empty chunk takes row b_i);
    T <= length -> `x` unchanged.

    Bit for bit theirs when every chunk has at most two rows (T <= 2 * length); with three or more, np.add.reduceat
    sums a chunk in another order than their np.mean over the slice, so a value may differ by float32 rounding
    (|diff| <= count * 2^-23 * mean |x| of the chunk; tests/data/test_batching.py). Their order (np.mean per row)
    would move the pooled inputs, hence every result trained on them, by that rounding."""
    t = len(x)
    if t <= length:
        return x
    bounds = np.linspace(0, t, length + 1).astype(np.int32)
    starts, counts = bounds[:-1], np.diff(bounds)
    # reduceat sums [b_i, b_{i+1}) and returns row b_i itself when the chunk is empty: the authors' rule
    sums = np.add.reduceat(x.astype(np.float32, copy=False), starts, axis=0)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32, copy=False)


def pad_to_length(x: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad (T, d) at the end to (length, d); T must be <= length."""
    t = len(x)
    if t > length:
        raise ValueError(f"cannot pad {t} snippets to {length}; pool or split first")
    out = np.zeros((length, *x.shape[1:]), dtype=np.float32)
    out[:t] = x
    return out


def split_chunks(x: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Authors' `process_split` for testing: (chunks (n, length, d) float32, lengths (n,) int64).

    T < length: one padded chunk; otherwise consecutive chunks of `length`, the last zero-padded,
    lengths length, ..., remainder. The authors make int(T/length)+1 chunks, so when T is a multiple
    of `length` their last chunk is pure padding (length 0); it is DROPPED here, which cannot change
    the scores of the first T rows (chunks never interact; the caller concatenates and cuts to T).
    """
    t = len(x)
    if t == 0:
        raise ValueError("cannot split a video with no snippets")
    n = -(-t // length)  # ceil
    chunks = np.zeros((n, length, *x.shape[1:]), dtype=np.float32)
    chunks.reshape(n * length, *x.shape[1:])[:t] = x
    lengths = np.full(n, length, dtype=np.int64)
    lengths[-1] = t - (n - 1) * length
    return chunks, lengths


def epoch_batches(labels_or_is_normal: np.ndarray, batch_size: int, sampler: str,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """Index arrays of one epoch.

    `labels_or_is_normal`: (N, C) labels (normal = column 0 set) or (N,) bool is-normal.
    `balanced` (UCF): two shuffled streams, `batch_size` normal then `batch_size` abnormal indices per
    step, drop_last, min(#normal, #abnormal) // batch_size steps. `mixed` (XD): one shuffled stream,
    `batch_size` per step, last batch kept (no drop_last).
    """
    arr = np.asarray(labels_or_is_normal)
    is_normal = arr[:, 0] > 0.5 if arr.ndim == 2 else arr.astype(bool)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if sampler == "mixed":
        order = rng.permutation(len(is_normal))
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if sampler == "balanced":
        normal = rng.permutation(np.flatnonzero(is_normal))
        abnormal = rng.permutation(np.flatnonzero(~is_normal))
        steps = min(len(normal), len(abnormal)) // batch_size
        if steps == 0:
            # a ConfigError: the trial fails at once instead of being retried (study.trainable)
            raise ConfigError(f"balanced sampler: {len(normal)} normal and {len(abnormal)} abnormal training "
                             f"samples give no full step of optim.batch_size={batch_size} per side")
        return [np.concatenate([normal[s * batch_size:(s + 1) * batch_size],
                                abnormal[s * batch_size:(s + 1) * batch_size]]) for s in range(steps)]
    raise ValueError(f"unknown sampler {sampler!r}; expected 'balanced' or 'mixed'")


def collate(bank: Bank, indices: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Training batch: (feats (B, length, d) float32, lengths (B,) int64). Each sample goes through the
    authors' `process_feat`: pooled to `length` if longer (already done at load time for our banks),
    else zero-padded with valid length T."""
    items = [pool_to_length(bank[int(i)], length) for i in indices]
    dim = items[0].shape[1] if items else 0
    feats = np.zeros((len(items), length, dim), dtype=np.float32)
    lengths = np.empty(len(items), dtype=np.int64)
    for b, x in enumerate(items):
        feats[b, :len(x)] = x
        lengths[b] = len(x)
    return feats, lengths
