"""VadCLIP model: one module per concept (see docs/equations.md for the equation map)."""

from vadclip.model.clip import create_clip, tokenizer
from vadclip.model.vadclip import VadCLIP, VadOutput, build_model

__all__ = ["VadCLIP", "VadOutput", "build_model", "create_clip", "tokenizer"]
