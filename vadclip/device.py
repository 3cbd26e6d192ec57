"""The `device` option of every CLI (train, extract): auto = CUDA when present."""

from __future__ import annotations

import torch

from vadclip.errors import VadClipError


class DeviceError(VadClipError, ValueError):
    """A name torch does not know, or CUDA asked for where there is none."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"device: {name!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device: {name!r} asked for but CUDA is not available")
    return device
