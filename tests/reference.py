"""The authors' constructions, kept only as references for the exactness tests (not model code)."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial.distance import pdist, squareform


def distance_adjacency_scipy(length: int, sigma: float = math.e) -> torch.Tensor:
    """The authors' H_dis (Eq. 3, code kernel): exp(-cityblock distance / sigma) with scipy, (L, L) float32."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    return torch.from_numpy(np.exp(-squareform(pdist(pos, "cityblock")) / sigma)).float()


def uniform_extract(feat: np.ndarray, t_max: int) -> np.ndarray:
    """The authors' `utils/tools.py` `uniform_extract(feat, t_max, avg=True)`, as written there."""
    new_feat = np.zeros((t_max, feat.shape[1])).astype(np.float32)
    r = np.linspace(0, len(feat), t_max + 1, dtype=np.int32)
    for i in range(t_max):
        if r[i] != r[i + 1]:
            new_feat[i, :] = np.mean(feat[r[i]:r[i + 1], :], 0)
        else:
            new_feat[i, :] = feat[r[i], :]
    return new_feat


def clas2(logits: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The authors' L_bce (`CLAS2` in ucf_train.py / xd_train.py): logits (B, L, 1), labels (B, C)."""
    instance_logits = torch.zeros(0)
    labels = 1 - labels[:, 0].reshape(labels.shape[0])
    logits = torch.sigmoid(logits).reshape(logits.shape[0], logits.shape[1])
    for i in range(logits.shape[0]):
        tmp, _ = torch.topk(logits[i, 0:lengths[i]], k=int(lengths[i] / 16 + 1), largest=True)
        instance_logits = torch.cat([instance_logits, torch.mean(tmp).view(1)], dim=0)
    return torch.nn.functional.binary_cross_entropy(instance_logits, labels)


def clasm(logits: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The authors' L_nce (`CLASM`): logits (B, L, C) alignment map, labels (B, C) multi-hot."""
    instance_logits = torch.zeros(0)
    labels = labels / torch.sum(labels, dim=1, keepdim=True)
    for i in range(logits.shape[0]):
        tmp, _ = torch.topk(logits[i, 0:lengths[i]], k=int(lengths[i] / 16 + 1), largest=True, dim=0)
        instance_logits = torch.cat([instance_logits, torch.mean(tmp, 0, keepdim=True)], dim=0)
    return -torch.mean(torch.sum(labels * torch.nn.functional.log_softmax(instance_logits, dim=1), dim=1), dim=0)


def ucf_test_iterations(iterations: int, batch_size: int) -> list[int]:
    """0-based iterations of one epoch after which ucf_train.py tests: `step = 0; step += i * batch_size * 2;
    if step % 1280 == 0 and step != 0` (batch_size per side, reset every iteration)."""
    tested = []
    for i in range(iterations):
        step = 0
        step += i * batch_size * 2
        if step % 1280 == 0 and step != 0:
            tested.append(i)
    return tested
