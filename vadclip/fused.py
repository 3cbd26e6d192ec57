"""Fused seeds: the k seeds of one configuration trained together as one vectorised model (horizontal fusion).

The k models' tensors are stacked along a leading seed dimension and one training step runs the model under
`torch.func.vmap` over it (`functional_call`): each seed sees only its own parameters and its own batch. The losses
follow per seed outside vmap, since the authors' top-k on tied scores is a per-video call (`vadclip.losses`). The
step's loss is the sum of the k seeds' losses, so the gradient of seed i's slice is seed i's own gradient. Frozen
tensors equal in every seed (CLIP's text tower with real weights, the masks) go in once, unbatched; those that differ
(a random text tower, drawn from each seed's RNG state) are stacked as well. AdamW is elementwise, so one AdamW over
the stacked tensors is k AdamWs (tests/test_fused.py checks it bit for bit).

Each seed keeps its own VadCLIP module (evaluation, checkpoints, reload-best) whose parameters are views of its
slice: the optimiser's in-place update is what that module holds, and loading weights into it writes the slice.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from vadclip.config import LossConfig
from vadclip.losses import total_loss
from vadclip.model import VadCLIP, VadOutput
from vadclip.model.local_transformer import TemporalTransformer
from vadclip.model.text import HandcraftedPrompt, LearnablePrompt

TOKEN_TABLE = "prompt.encoder.token_embedding.weight"
PROMPT_IDS = "prompt.ids"


def _rebind(model: nn.Module, name: str, value: nn.Parameter) -> None:
    """Replace the parameter at dotted `name` by `value`."""
    *path, leaf = name.split(".")
    owner = model
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, leaf, value)


def _vmappable(model: VadCLIP) -> None:
    """Switch off the exact speed-ups whose shapes depend on the data or that cache a tensor across calls."""
    for module in model.modules():
        if isinstance(module, TemporalTransformer):
            module.share_blank_windows = False
        if isinstance(module, HandcraftedPrompt):
            module.use_cache = False


def _seed_output(outs: dict[str, torch.Tensor], i: int) -> VadOutput:
    """Seed i's slice of the vmapped outputs (the names of `VadOutput` that are not None)."""
    return VadOutput(**{f.name: outs[f.name][i] if f.name in outs else None for f in fields(VadOutput)})


class SeedStack:
    """k VadCLIP models of one configuration (one per seed), their tensors stacked along a leading seed dimension."""

    def __init__(self, models: Sequence[VadCLIP], loss: LossConfig) -> None:
        if len(models) < 2:
            raise ValueError(f"SeedStack: fusing needs at least 2 models, got {len(models)}")
        self.k, self.loss = len(models), loss
        self.stacked: dict[str, torch.Tensor] = {}  # name -> (k, ...): trainable, or frozen but not equal
        self.shared: dict[str, torch.Tensor] = {}  # name -> tensor equal in every seed (frozen)
        params = [dict(m.named_parameters()) for m in models]
        for name, first in params[0].items():
            tensors = [p[name] for p in params]
            if not first.requires_grad and all(torch.equal(first, t) for t in tensors[1:]):
                self.shared[name] = first.detach()
                for model in models[1:]:  # one copy of a shared frozen tensor (e.g. real CLIP weights)
                    _rebind(model, name, nn.Parameter(self.shared[name], requires_grad=False))
                continue
            stacked = torch.stack([t.detach() for t in tensors]).requires_grad_(first.requires_grad)
            self.stacked[name] = stacked
            for i, model in enumerate(models):  # the member's parameter is a view of its slice
                _rebind(model, name, nn.Parameter(stacked.detach()[i], requires_grad=first.requires_grad))
        buffers: list[dict[str, torch.Tensor]] = [dict(m.named_buffers()) for m in models]
        for name, buffer in buffers[0].items():
            same = [b[name] for b in buffers]
            if all(torch.equal(buffer, t) for t in same[1:]):
                self.shared[name] = buffer
            else:
                self.stacked[name] = torch.stack(same)
        self.trainable = [t for t in self.stacked.values() if t.requires_grad]  # the models' parameter order
        self.base = copy.deepcopy(models[0]).to("meta")  # what functional_call runs: every tensor is passed in
        _vmappable(self.base)
        self._compact_token_table()

    def _compact_token_table(self) -> None:
        """The prompts read only a few rows of CLIP's 49,408-row token table: the base gets those rows and the
        prompt ids renumbered (the same numbers). A stacked table would otherwise be copied whole at every step."""
        prompt = self.base.prompt
        if not isinstance(prompt, (LearnablePrompt, HandcraftedPrompt)) or PROMPT_IDS not in self.shared:
            return
        where = self.stacked if TOKEN_TABLE in self.stacked else self.shared
        if TOKEN_TABLE not in where:
            return
        rows, renumbered = torch.unique(self.shared[PROMPT_IDS], return_inverse=True)
        where[TOKEN_TABLE] = where[TOKEN_TABLE][..., rows, :]  # (k, V, d) stacked or (V, d) shared
        prompt.encoder.token_embedding = nn.Embedding(len(rows), where[TOKEN_TABLE].shape[-1])
        self.shared[PROMPT_IDS] = renumbered

    def _seed_forward(self, stacked: dict[str, torch.Tensor], x: torch.Tensor,
                      lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        out = functional_call(self.base, {**stacked, **self.shared}, (x, lengths))
        return {f.name: getattr(out, f.name) for f in fields(out) if getattr(out, f.name) is not None}

    def losses(self, x: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every loss term of every seed, each (k,): x (k, B, L, d), lengths (k, B), labels (k, B, C)."""
        self.base.train()
        # the math attention: the CPU flash kernel has no vmap batching rule (a slow per-seed loop)
        with sdpa_kernel(SDPBackend.MATH):
            outs = vmap(self._seed_forward)(self.stacked, x, lengths)
        # the losses per seed, outside vmap: the authors' top-k on tied scores is a per-video call (losses.py)
        terms = [total_loss(_seed_output(outs, i), lengths[i], labels[i], self.loss) for i in range(self.k)]
        return {key: torch.stack([t[key] for t in terms]) for key in terms[0]}

    # ---------------------------------------------------------------- the optimiser's state, per seed

    def seed_optimizer_state(self, optimizer: torch.optim.Optimizer, i: int) -> dict[str, Any]:
        """Seed i's slice of the stacked optimiser's state, in the form a single model's optimiser saves."""
        saved = optimizer.state_dict()
        shapes = [p.shape for group in optimizer.param_groups for p in group["params"]]
        state = {index: {key: value[i].clone() if torch.is_tensor(value) and value.shape == shapes[index]
                         else value for key, value in entry.items()}
                 for index, entry in saved["state"].items()}
        return {"state": state, "param_groups": saved["param_groups"]}

    def load_optimizer_states(self, optimizer: torch.optim.Optimizer, states: Sequence[dict[str, Any]]) -> None:
        """The inverse of `seed_optimizer_state`: the k seeds' states stacked into `optimizer`."""
        shapes = [p.shape for group in optimizer.param_groups for p in group["params"]]
        merged = {}
        for index, entry in states[0]["state"].items():
            merged[index] = {key: torch.stack([s["state"][index][key] for s in states])
                             if torch.is_tensor(value) and (self.k, *value.shape) == tuple(shapes[index])
                             else value for key, value in entry.items()}
        optimizer.load_state_dict({"state": merged, "param_groups": states[0]["param_groups"]})
