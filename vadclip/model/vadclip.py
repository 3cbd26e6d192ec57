"""VadCLIP: LGT-Adapter, C-branch, A-branch with learnable / hand-crafted prompt and visual prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vadclip.config import ModelConfig
from vadclip.model.branches import AlignmentBranch, ClassificationBranch
from vadclip.model.lgt_adapter import TemporalAdapter
from vadclip.model.text import ClipTextEncoder, HandcraftedPrompt, LearnablePrompt


@dataclass
class VadOutput:
    t_out: torch.Tensor | None  # (C, d) class embeddings before the visual prompt (for L_cts)
    logits_c: torch.Tensor | None  # (B, L, 1) C-branch logits; A = sigmoid
    logits_a: torch.Tensor | None  # (B, L, C) alignment map M = cos / tau


class VadCLIP(nn.Module):
    """`straightforward=True` switches off the exact speed-ups (for the bench and the equality tests): full
    77-token text encoder, no cached class embeddings, the distance adjacency rebuilt every forward, local
    attention as a masked full-length attention. Same numbers to float32 round-off (docs/speed.md)."""

    def __init__(self, cfg: ModelConfig, class_names: list[str], clip: nn.Module, tokenizer,
                 straightforward: bool = False):
        super().__init__()
        self.cfg = cfg
        self.temporal = TemporalAdapter(cfg, straightforward)
        self.c_branch = ClassificationBranch(cfg.embed_dim, cfg.mlp_ratio) if "c" in cfg.branches else None
        self.prompt: LearnablePrompt | HandcraftedPrompt | None = None
        self.a_branch = None
        if "a" in cfg.branches:
            encoder = ClipTextEncoder(clip, truncate=not straightforward)
            if cfg.prompt == "learnable":
                self.prompt = LearnablePrompt(class_names, encoder, cfg.prompt_prefix, cfg.prompt_postfix,
                                              tokenizer)
            else:
                self.prompt = HandcraftedPrompt(class_names, encoder, cfg.handcrafted_template, tokenizer,
                                                use_cache=not straightforward)
            self.a_branch = AlignmentBranch(cfg.embed_dim, cfg.visual_prompt, cfg.visual_prompt_weights,
                                            cfg.text_ffn_residual, cfg.temperature, cfg.mlp_ratio)

    def encode_classes(self) -> torch.Tensor | None:
        """t_out (C, d); independent of the video, so evaluation computes it once per pass."""
        return None if self.prompt is None else self.prompt()

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, t_out: torch.Tensor | None = None) -> VadOutput:
        x = self.temporal(x.float(), lengths)
        logits_c = self.c_branch(x) if self.c_branch is not None else None
        logits_a = None
        if self.a_branch is not None:
            t_out = self.encode_classes() if t_out is None else t_out
            logits_a = self.a_branch(x, t_out, lengths, logits_c)
        return VadOutput(t_out, logits_c, logits_a)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen CLIP weights (the authors saved all of CLIP in every checkpoint)."""
        frozen = {n for n, p in self.named_parameters() if not p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k not in frozen}


def build_model(cfg: ModelConfig, class_names: list[str], clip: nn.Module, tokenizer,
                straightforward: bool = False) -> VadCLIP:
    return VadCLIP(cfg, class_names, clip, tokenizer, straightforward)
