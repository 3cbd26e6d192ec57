"""The extractor's fixed geometry and the choices and defaults of its options (Python API and CLI alike)."""

from __future__ import annotations

RESIZE_WH = (340, 256)  # authors' crop.py resizes every frame to 340×256 (W×H) before cropping
CROP_SIZE = 224
CROP_CHOICES = (10, 5, 1)
SNIPPET_CHOICES = ("mean", "middle")
DEFAULT_CROPS = 10
DEFAULT_SNIPPET = "mean"
DEFAULT_BATCH_SIZE = 200  # images per encode_image call (20 frames × 10 crops)
DEFAULT_CLIP_MODEL = "ViT-B-16-quickgelu"  # OpenAI's ViT-B/16 (QuickGELU), the authors' CLIP
DEFAULT_LIST_NAME = "CLIP_rgb"
