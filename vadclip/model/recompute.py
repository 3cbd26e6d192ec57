"""`optim.recompute_activations`: the heavy blocks keep only their inputs for the backward pass and run their
forward again there (torch.utils.checkpoint). The same kernels on the same inputs give the same numbers, so loss and
gradients equal the default path bit for bit on the CPU (a test); the price is one more forward of those blocks.

At the ucf preset (128 samples × 256 snippets × 512) a training step's activations drop from about 4.4 GiB to 0.7
(docs/speed.md): what lets several trials train side by side on a CPU node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def recomputed(enabled: bool, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """fn(*args), its activations recomputed in the backward pass when `enabled` and autograd is recording."""
    if enabled and torch.is_grad_enabled():
        out: torch.Tensor = checkpoint(fn, *args, use_reentrant=False)
        return out
    return fn(*args)


def set_recompute(model: nn.Module, enabled: bool) -> None:
    """Switch recomputation on or off in every block of `model` that offers it (a `recompute` attribute)."""
    for module in model.modules():
        if hasattr(module, "recompute"):
            setattr(module, "recompute", enabled)  # noqa: B010 (a plain attribute, not a submodule)
