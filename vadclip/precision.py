"""Numeric precision of a trial (`optim.precision`, `optim.tf32`; docs/speed.md): autocast to bf16 or fp16 for the
training step and the evaluation passes, a loss scaler for fp16, and TF32 on CUDA. The defaults (float32, TF32 off)
are the path the exactness tests pin; bf16/fp16/TF32 are not exact, and their equivalence is a study's verdict
(`search_spaces/precision.yaml`)."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from vadclip.config import OptimConfig

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(optim: OptimConfig, device: torch.device) -> AbstractContextManager:
    """The context a forward runs in: autocast to `optim.precision` on `device`; disabled for float32 (so a
    float32 forward inside a caller's autocast stays float32)."""
    dtype = AUTOCAST_DTYPES.get(optim.precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def loss_scaler(optim: OptimConfig, device: torch.device) -> torch.amp.GradScaler:
    """fp16's dynamic loss scaling (its gradients underflow otherwise); a no-op scaler for the other precisions, whose
    `scale`, `step` and `update` are the plain loss, `optimizer.step()` and nothing."""
    return torch.amp.GradScaler(device.type, enabled=optim.precision == "fp16")


def apply_tf32(optim: OptimConfig, device: torch.device) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions on (`optim.tf32`) or off. Process-wide flags, so set at every
    fit: a reused worker process must not keep the previous trial's choice. (torch's own default allows TF32 in
    cuDNN convolutions; off here keeps a GPU run full float32.)"""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = optim.tf32
    torch.backends.cudnn.allow_tf32 = optim.tf32
