"""Where a training step's batch comes from (`data.on_device`). On a CPU, or with it off: `collate` on the host,
then a copy to the device, every step (the authors' way). On CUDA with it on: the training set once as one padded
tensor (the same zeros `collate` pads with) resident on the GPU when it fits, else in pinned host memory; a batch
is then one `index_select`. One copy per process and device, kept while the trials this worker runs share the data
configuration (Tune reuses workers), replaced when it changes."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable

import numpy as np
import torch

from vadclip.data.batching import Bank, collate

Batch = tuple[torch.Tensor, torch.Tensor]  # feats (B, length, d) float32, lengths (B,) int64
FIT_FRACTION = 0.5  # the resident copy may take at most this share of the GPU's free memory
_resident: dict[str, tuple[Hashable, torch.Tensor, torch.Tensor]] = {}  # device -> (key, feats, lengths)


def padded(bank: Bank, length: int) -> Batch:
    """The whole bank as `collate` pads it, on the host."""
    feats, lengths = collate(bank, np.arange(len(bank)), length)
    return torch.from_numpy(feats), torch.from_numpy(lengths)


def resident(bank: Bank, length: int, device: torch.device, key: Hashable) -> Batch:
    """The bank padded on `device` when it fits (FIT_FRACTION of the free memory), else in pinned host memory;
    cached per device under `key` (what identifies the bank: its data configuration)."""
    cached = _resident.get(str(device))
    if cached is not None and cached[0] == key and len(cached[2]) == len(bank):
        return cached[1], cached[2]
    _resident.pop(str(device), None)  # the previous study's copy goes before the next is made
    feats, lengths = padded(bank, length)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if feats.numel() * feats.element_size() <= FIT_FRACTION * free:
            feats, lengths = feats.to(device), lengths.to(device)
        else:
            try:
                feats, lengths = feats.pin_memory(), lengths.pin_memory()
            except RuntimeError as err:  # pinned memory is limited; pageable host memory works too
                warnings.warn(f"data.on_device: the training features could not be pinned ({err}); copying each "
                              "batch from pageable host memory", RuntimeWarning, stacklevel=2)
    _resident[str(device)] = (key, feats, lengths)
    return feats, lengths


def batch_source(bank: Bank, length: int, device: torch.device, on_device: bool,
                 key: Hashable) -> Callable[[np.ndarray], Batch]:
    """A function of a batch's sample indices giving its (feats, lengths) on `device`."""
    if device.type != "cuda" or not on_device:
        def host(idx: np.ndarray) -> Batch:
            feats, lengths = collate(bank, idx, length)
            return torch.from_numpy(feats).to(device), torch.from_numpy(lengths).to(device)
        return host
    feats, lengths = resident(bank, length, device, key)

    def gather(idx: np.ndarray) -> Batch:
        i = torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(feats.device)
        return (feats.index_select(0, i).to(device, non_blocking=True),
                lengths.index_select(0, i).to(device, non_blocking=True))
    return gather
