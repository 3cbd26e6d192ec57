"""A-branch text side: frozen CLIP text encoder fed with prompt embeddings (Eq. 5)."""

from __future__ import annotations

import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

CONTEXT_LENGTH = 77


class ClipTextEncoder(nn.Module):
    """CLIP's text transformer on token *embeddings*; returns the projected EOT output t_out.

    Under CLIP's causal mask the EOT output depends only on positions <= EOT, so by default only the
    first max(EOT)+1 positions are run (exact; `truncate=False` runs all 77 like the authors).
    """

    # CLIP's text tower, typed here: nn.Module's __getattr__ types submodules as `Tensor | Module`
    token_embedding: nn.Embedding
    positional_embedding: nn.Parameter
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: nn.Parameter | nn.Linear
    attn_mask: torch.Tensor  # buffer

    def __init__(self, clip: open_clip.CLIP, truncate: bool = True):
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask.clone(), persistent=False)
        self.requires_grad_(False)  # frozen; gradients still flow through it to the prompt
        self.truncate = truncate

    @property
    def width(self) -> int:
        return self.token_embedding.weight.shape[1]

    def forward(self, embeddings: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        n = int(eot.max()) + 1 if self.truncate else embeddings.shape[1]
        x = embeddings[:, :n] + self.positional_embedding[:n]
        x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = self.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj


class LearnablePrompt(nn.Module):
    """Eq. 5, as the code builds it: one shared 77-row table N(0, 0.01);
    [SOT, prefix rows 1..p, class tokens, next q rows, EOT, rest of the table]."""

    ids: torch.Tensor  # buffers
    is_token: torch.Tensor
    eot: torch.Tensor

    def __init__(self, class_names: list[str], encoder: ClipTextEncoder, prefix: int, postfix: int,
                 tokenizer: SimpleTokenizer):
        super().__init__()
        self.table = nn.Embedding(CONTEXT_LENGTH, encoder.width)
        nn.init.normal_(self.table.weight, std=0.01)
        ids = torch.zeros(len(class_names), CONTEXT_LENGTH, dtype=torch.long)
        is_token = torch.zeros(len(class_names), CONTEXT_LENGTH, dtype=torch.bool)
        eot = torch.zeros(len(class_names), dtype=torch.long)
        for c, name in enumerate(class_names):
            words = tokenizer.encode(name)
            e = 1 + prefix + len(words) + postfix
            if e >= CONTEXT_LENGTH:
                raise ValueError(f"class name {name!r} is too long for {prefix}+{postfix} prompt tokens")
            ids[c, 0], is_token[c, 0] = tokenizer.sot_token_id, True
            ids[c, 1 + prefix: 1 + prefix + len(words)] = torch.tensor(words)
            is_token[c, 1 + prefix: 1 + prefix + len(words)] = True
            ids[c, e], is_token[c, e], eot[c] = tokenizer.eot_token_id, True, e
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("is_token", is_token, persistent=False)
        self.register_buffer("eot", eot, persistent=False)
        self.encoder = encoder
        self.frozen = False

    def forward(self) -> torch.Tensor:
        """t_out (C, d)."""
        tokens = self.encoder.token_embedding(self.ids)
        emb = torch.where(self.is_token[..., None], tokens, self.table.weight[None])
        return self.encoder(emb, self.eot)


class HandcraftedPrompt(nn.Module):
    """Table 7's hand-crafted prompt: `template.format(class name)`; nothing learnable, so t_out is
    computed once and cached (`use_cache=False` re-encodes it every call, like the authors)."""

    ids: torch.Tensor  # buffers
    eot: torch.Tensor

    def __init__(self, class_names: list[str], encoder: ClipTextEncoder, template: str,
                 tokenizer: SimpleTokenizer, use_cache: bool = True):
        super().__init__()
        ids = torch.zeros(len(class_names), CONTEXT_LENGTH, dtype=torch.long)
        for c, name in enumerate(class_names):
            tokens = [tokenizer.sot_token_id, *tokenizer.encode(template.format(name)), tokenizer.eot_token_id]
            ids[c, : len(tokens)] = torch.tensor(tokens[:CONTEXT_LENGTH])
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("eot", ids.argmax(dim=-1), persistent=False)  # EOT has the largest id
        self.encoder = encoder
        self.frozen = True
        self._cache: torch.Tensor | None = None
        self.use_cache = use_cache

    def forward(self) -> torch.Tensor:
        if self._cache is not None and self.use_cache and self._cache.device == self.ids.device:
            return self._cache
        with torch.no_grad():
            out = self.encoder(self.encoder.token_embedding(self.ids), self.eot)
        self._cache = out
        return out
