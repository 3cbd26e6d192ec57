"""Frozen CLIP from open_clip: model configs as data, one factory, local weights or a loud warning."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import open_clip
import torch
from torch import nn

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)  # registers `vadclip-tiny` beside open_clip's own configs

RANDOM_WEIGHTS_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!! No CLIP weights given (--clip-weights PATH): CLIP {model} has RANDOM weights.\n"
    "!! The text encoder then carries no language prior, so A-branch numbers are\n"
    "!! meaningless for real data. Pass a local OpenAI ViT-B/16 checkpoint\n"
    "!! (with clip.model ViT-B-16-quickgelu, the default of the real-data presets).\n"
    + "!" * 78
)


OPENAI_INTO_GELU_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!! CLIP checkpoint {weights} looks like OpenAI's weights,\n"
    "!! but CLIP {model} uses exact GELU. OpenAI's CLIP (the authors' ViT-B/16) was\n"
    "!! trained with QuickGELU: in a GELU tower its image and text features are wrong.\n"
    "!! Use clip.model=ViT-B-16-quickgelu (vadclip.extract: --clip-model ViT-B-16-quickgelu),\n"
    "!! or the `-quickgelu` variant of your model.\n"
    + "!" * 78
)


class ClipWeightsWarning(UserWarning):
    """CLIP runs with random weights."""


class ClipActivationWarning(UserWarning):
    """OpenAI CLIP weights were loaded into a model with exact GELU instead of QuickGELU."""


def is_openai_checkpoint(path: str | Path) -> bool:
    """OpenAI's released `ViT-B-16.pt` is a TorchScript archive; open_clip checkpoints are state dicts."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in zf.namelist())


def looks_like_openai_weights(path: str | Path) -> bool:
    """Whether a checkpoint holds OpenAI's weights, judged only by what the caller can see.

    OpenAI's own release (`ViT-B-16.pt`) is a TorchScript archive: certain. A state dict converted from
    it has exactly open_clip's keys and shapes, so nothing inside tells it apart; then the name decides
    (case-insensitive): the file name contains `openai` (e.g. `openai_ViT-B-16.pt`), or the file sits in
    a Hugging Face cache folder of an `openai` model (open_clip's own download of its `openai` pretrained
    tag: `.../models--timm--vit_base_patch16_clip_224.openai/snapshots/<hash>/open_clip_model.safetensors`).
    Other folder names do not count (`~/openai_runs/laion.pt` is not OpenAI's).
    """
    path = Path(path)
    hf_repo = any(part.startswith("models--") and "openai" in part.lower() for part in path.parts)
    return is_openai_checkpoint(path) or "openai" in path.name.lower() or hf_repo


def uses_quick_gelu(clip: nn.Module) -> bool:
    """Whether the built model's transformers use QuickGELU (OpenAI's activation) rather than GELU."""
    return any(isinstance(m, open_clip.transformer.QuickGELU) for m in clip.modules())


def resolve_model_name(model: str, weights: str | None) -> str:
    # OpenAI's ViT-B/16 uses QuickGELU; plain open_clip `ViT-B-16` (GELU) gives other outputs on it.
    if weights and model == "ViT-B-16" and is_openai_checkpoint(weights):
        log.info("OpenAI checkpoint detected: building ViT-B-16-quickgelu")
        return "ViT-B-16-quickgelu"
    return model


def _openai_state_dict(path: Path) -> dict[str, torch.Tensor]:
    scripted = torch.jit.load(str(path), map_location="cpu")
    state = scripted.state_dict()
    for key in ("input_resolution", "context_length", "vocab_size"):
        state.pop(key, None)
    return state


def warn_random_weights(model: str) -> None:
    """The loud banner, once per call site (a study driver shows it once for all its trials)."""
    warnings.warn(RANDOM_WEIGHTS_WARNING.format(model=model), ClipWeightsWarning, stacklevel=3)


def create_clip(model: str, weights: str | None = None, embed_dim: int | None = None,
                device: str | torch.device = "cpu") -> nn.Module:
    """Build an open_clip CLIP model, frozen, in eval mode.

    `weights`: a local checkpoint (open_clip state dict, safetensors, or OpenAI's TorchScript file);
    None gives random weights and a loud warning. OpenAI's weights (see `looks_like_openai_weights`)
    loaded into a GELU model (`ViT-B-16` instead of `ViT-B-16-quickgelu`) give a loud warning, except
    OpenAI's TorchScript file with `ViT-B-16`, which builds `ViT-B-16-quickgelu` instead. `embed_dim`
    may resize the output width of configs shipped here (`vadclip-tiny`) so that small test models
    match small feature widths.
    """
    if model not in open_clip.list_models():
        raise ValueError(f"clip.model: unknown CLIP model {model!r}; e.g. ViT-B-16, ViT-B-16-quickgelu, "
                         f"vadclip-tiny (any of open_clip.list_models())")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"clip.weights: no checkpoint file at {weights!r}")
    name = resolve_model_name(model, weights)
    local_cfg = CONFIG_DIR / f"{name}.json"
    if local_cfg.is_file():
        cfg = json.loads(local_cfg.read_text())
        if embed_dim is not None:
            cfg["embed_dim"] = embed_dim
        clip = open_clip.CLIP(**cfg)
    else:
        clip = open_clip.create_model(name, pretrained=None, pretrained_text=False)
    if weights is None:
        warn_random_weights(name)
    else:
        if is_openai_checkpoint(weights):
            clip.load_state_dict(_openai_state_dict(Path(weights)))
        else:
            open_clip.load_checkpoint(clip, weights)
        if looks_like_openai_weights(weights) and not uses_quick_gelu(clip):
            message = OPENAI_INTO_GELU_WARNING.format(weights=weights, model=name)
            log.warning(message)
            warnings.warn(message, ClipActivationWarning, stacklevel=2)
    if embed_dim is not None and clip.text_projection is not None and clip.text_projection.shape[-1] != embed_dim:
        raise ValueError(f"CLIP {name} outputs {clip.text_projection.shape[-1]}-d embeddings but "
                         f"model.embed_dim is {embed_dim}")
    clip.requires_grad_(False)
    return clip.eval().to(device)


def tokenizer() -> open_clip.tokenizer.SimpleTokenizer:
    """CLIP's BPE tokenizer (ships with open_clip, works offline)."""
    return open_clip.tokenizer.SimpleTokenizer()


_TEXT_TOWERS: OrderedDict[tuple, tuple[nn.Module, torch.Tensor]] = OrderedDict()
TEXT_TOWER_CACHE_SIZE = 2  # built towers a process keeps (ViT-B-16's text tower: ~0.25 GB)


def frozen_text_tower(model: str, weights: str | None = None, embed_dim: int | None = None) -> nn.Module:
    """`create_clip` without the image tower, built once per process and then copied (a Tune worker runs trial
    after trial: it builds CLIP once). Random weights are a function of torch's RNG state, so that state is part
    of the key, and a copy leaves the RNG where building would have: the same outputs as `create_clip`, always.
    """
    if weights is None:
        source: tuple = ("random", hashlib.sha1(torch.random.get_rng_state().numpy().tobytes()).hexdigest())
    else:
        stat = Path(weights).stat() if Path(weights).is_file() else None
        source = ("file", str(Path(weights).resolve()), stat and (stat.st_mtime_ns, stat.st_size))
    key = (model, embed_dim, source)
    if key in _TEXT_TOWERS:
        _TEXT_TOWERS.move_to_end(key)
        tower, rng_after = _TEXT_TOWERS[key]
        torch.random.set_rng_state(rng_after)
        if weights is None:
            warn_random_weights(resolve_model_name(model, weights))
        return copy.deepcopy(tower)
    tower = create_clip(model, weights, embed_dim=embed_dim)
    if hasattr(tower, "visual"):
        del tower.visual  # VadCLIP needs only the text tower
    _TEXT_TOWERS[key] = (tower, torch.random.get_rng_state())
    while len(_TEXT_TOWERS) > TEXT_TOWER_CACHE_SIZE:
        _TEXT_TOWERS.popitem(last=False)
    return copy.deepcopy(tower)
