"""An independent float64 implementation of the published formula, for comparisons.

Written from the EasyLLMFeaturePorter notebook's math, not from our kernel:
ratio = sigmoid(k·x − k·m) with x the min/max-normalised |T − B| (ratio = 0 when
max − min < eps), out = T + Σ w·(I − B)·(1 − ratio).
"""

from __future__ import annotations

from typing import Sequence

import torch


def published_formula(
    base: torch.Tensor,
    target: torch.Tensor,
    donors: Sequence[torch.Tensor],
    weights: Sequence[float],
    steepness: float = 12.0,
    midpoint: float = 0.5,
    eps: float = 1e-6,
) -> torch.Tensor:
    b, t = base.double(), target.double()
    drift = (t - b).abs()
    lo, hi = drift.min(), drift.max()
    if abs(hi.item() - lo.item()) < eps:
        ratio = torch.zeros_like(drift)
    else:
        ratio = torch.sigmoid((drift - lo) / (hi - lo) * steepness - steepness * midpoint)
    total = sum(w * (d.double() - b) for d, w in zip(donors, weights))
    return t + total * (1 - ratio)
