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
