"""Frames to CLIP input: the authors' crops of a 340×256 frame, then open_clip's eval normalisation."""

from __future__ import annotations

import logging

import numpy as np
import open_clip
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import Compose, Normalize

from vadclip.extract.errors import ExtractError
from vadclip.extract.options import CROP_CHOICES, CROP_SIZE, DEFAULT_CROPS, RESIZE_WH

log = logging.getLogger("vadclip.extract")  # one logger for the package: its name is in every log line


# --------------------------------------------------------------------------------------------- crops


def crop_boxes(n_crops: int, width: int = RESIZE_WH[0], height: int = RESIZE_WH[1],
               size: int = CROP_SIZE) -> list[tuple[int, int, bool]]:
    """(top, left, flipped) of each crop: 0 centre, 1 top-left, 2 top-right, 3 bottom-left, 4 bottom-right,
    5-9 the horizontal flips of 0-4."""
    if n_crops not in CROP_CHOICES:
        raise ExtractError(f"crops: {n_crops!r} is not one of {list(CROP_CHOICES)}")
    dy, dx = height - size, width - size
    five = [(dy // 2, dx // 2), (0, 0), (0, dx), (dy, 0), (dy, dx)]
    boxes = [(top, left, False) for top, left in five] + [(top, left, True) for top, left in five]
    return boxes[:n_crops]


def _resize_rgb(frame: np.ndarray, wh: tuple[int, int] = RESIZE_WH) -> np.ndarray:
    if frame.shape[1::-1] == wh:
        return frame
    return np.asarray(Image.fromarray(frame).resize(wh, Image.Resampling.BILINEAR))


def crop_stack(frame: np.ndarray, n_crops: int) -> np.ndarray:
    """`(n_crops, 224, 224, 3)` uint8 crops of one RGB frame (resized to 340×256 first if needed)."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"crop_frames wants an (H, W, 3) uint8 RGB frame, got {frame.dtype} {frame.shape}")
    frame = _resize_rgb(frame)
    out = np.empty((n_crops, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    for i, (top, left, flipped) in enumerate(crop_boxes(n_crops)):
        crop = frame[top:top + CROP_SIZE, left:left + CROP_SIZE]
        out[i] = crop[:, ::-1] if flipped else crop
    return out


def crop_frames(frame: np.ndarray, n_crops: int = DEFAULT_CROPS) -> list[np.ndarray]:
    """The authors' crops of one `(H, W, 3)` uint8 RGB frame, in their order (see `crop_boxes`)."""
    return list(crop_stack(frame, n_crops))


# ------------------------------------------------------------------------------------ preprocessing


def clip_eval_transform(model: nn.Module) -> Compose:
    """open_clip's eval transform for this model (resize bicubic, centre crop, model/OpenAI mean and std):
    a torchvision Compose, PIL image -> (3, H, W) float tensor."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    return open_clip.image_transform(cfg.get("size", CROP_SIZE), is_train=False, mean=cfg.get("mean"),
                                     std=cfg.get("std"), resize_mode=cfg.get("resize_mode"),
                                     interpolation=cfg.get("interpolation"))


class Preprocess:
    """Turns uint8 crops into CLIP input exactly as open_clip's eval transform does.

    For 224×224 crops and a 224 model the transform's resize and centre crop are identities, so the
    batch is normalised as one tensor on the device (checked bit-exact against the transform at start);
    any other model size falls back to the PIL transform per crop.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.transform = clip_eval_transform(model)
        self.device = device
        norm = next(t for t in self.transform.transforms if isinstance(t, Normalize))
        self.mean = torch.as_tensor(norm.mean, dtype=torch.float32)
        self.std = torch.as_tensor(norm.std, dtype=torch.float32)
        probe = np.random.default_rng(0).integers(0, 256, (1, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
        self.fast = torch.equal(self._tensor_path(probe, torch.device("cpu")), self._pil_path(probe))
        if not self.fast:
            log.info("crops differ from the model's input size: using open_clip's PIL transform per crop")

    def _tensor_path(self, crops: np.ndarray, device: torch.device) -> torch.Tensor:
        # Same ops as ToTensor + Normalize (float, /255, -mean, /std), done in the contiguous HWC layout
        # (5x faster than on the permuted view); uint8 travels to the device, 4x less to copy.
        x = torch.from_numpy(crops).to(device, non_blocking=True).float().div_(255)
        x = x.sub_(self.mean.to(device)).div_(self.std.to(device))
        return x.permute(0, 3, 1, 2)  # NCHW view of channels-last memory; conv2d takes either

    def _pil_path(self, crops: np.ndarray) -> torch.Tensor:
        return torch.stack([self.transform(Image.fromarray(c)) for c in crops])

    def __call__(self, crops: np.ndarray) -> torch.Tensor:
        if self.fast:
            return self._tensor_path(crops, self.device)
        return self._pil_path(crops).to(self.device)
