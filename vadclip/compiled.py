"""`optim.compile`: the training forward through torch.compile (inductor, dynamic shapes: a batch's lengths change
which windows are blank, so a static graph would recompile for each). Exact to float32 rounding
(`tests/test_speed.py`). Where the backend cannot run (no C++ compiler on a CPU, no Triton on a GPU, or the
compilation itself fails), the forward stays eager with one warning per process."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

COMPILE_WARNING = "optim.compile=true: {why}; training runs eager (the same numbers, without the speed-up)"
_warned: set[str] = set()


class CompileWarning(UserWarning):
    """torch.compile could not run; the trial continues eager."""


def warn_once(why: str) -> None:
    if why not in _warned:
        _warned.add(why)
        warnings.warn(COMPILE_WARNING.format(why=why), CompileWarning, stacklevel=3)


def backend_problem(device: torch.device) -> str | None:
    """Why inductor cannot compile for `device` here, or None."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (inductor's GPU backend)"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "no C++ compiler on PATH (inductor's CPU backend)"
    return None


def compiled_forward(model: nn.Module, device: torch.device) -> Callable[..., Any]:
    """`model`'s forward compiled, falling back to the eager forward (with one warning) when the backend is
    missing or its compilation fails; the parameters are the model's own either way."""
    problem = backend_problem(device)
    if problem is not None:
        warn_once(problem)
        return model
    compiled = torch.compile(model, dynamic=True)
    eager = False

    def forward(*args: Any) -> Any:
        nonlocal eager
        if eager:
            return model(*args)
        try:
            return compiled(*args)
        except torch._dynamo.exc.BackendCompilerFailed as err:  # before any autograd state: safe to rerun eager
            warn_once(f"the backend failed ({type(err.inner_exception).__name__}: "
                      f"{str(err.inner_exception).splitlines()[0] if str(err.inner_exception) else ''})")
            eager = True
            return model(*args)

    return forward
