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


def projected_diff(
    base: torch.Tensor, target: torch.Tensor, diff: torch.Tensor, side: str, energy: float
) -> torch.Tensor:
    """D with the target drift's top singular directions removed, in float64 from a full SVD.

    r = the smallest rank whose top σ² sum to at least ``energy`` · Σσ²; ``input`` removes
    D V_r V_rᵀ, ``output`` removes U_r U_rᵀ D, ``both`` applies both projections.
    """
    drift = target.double() - base.double()
    d = diff.double()
    u, s, vh = torch.linalg.svd(drift, full_matrices=False)
    power = s.square()
    total = power.sum().item()
    if total == 0 or energy == 0:
        return d
    rank = int((torch.cumsum(power, 0) < energy * total * (1 - 1e-12)).sum().item()) + 1
    u, v = u[:, :rank], vh[:rank].T
    if side in ("output", "both"):
        d = d - u @ (u.T @ d)
    if side in ("input", "both"):
        d = d - (d @ v) @ v.T
    return d


def reference_transfer(
    base: torch.Tensor,
    target: torch.Tensor,
    donors: Sequence[torch.Tensor],
    weights: Sequence[float],
    knobs: dict,
    vocabulary: bool = False,
) -> torch.Tensor:
    """The whole per-tensor rule in float64: ``gate: false`` → plain diff; ``protect_subspace``
    on a 2-D non-vocabulary tensor → the projection; else the published element-wise gate
    (``normalize: minmax`` only)."""
    assert knobs.get("normalize", "minmax") == "minmax", "the reference implements the published minmax gate"
    total = sum(w * (d.double() - base.double()) for d, w in zip(donors, weights))
    if not knobs.get("gate", True):
        return target.double() + total
    side = knobs.get("protect_subspace", "none")
    if side != "none" and target.dim() == 2 and not vocabulary:
        return target.double() + projected_diff(base, target, total, side, knobs.get("protect_energy", 0.5))
    gate = {k: knobs[k] for k in ("steepness", "midpoint", "eps") if k in knobs}
    return published_formula(base, target, donors, weights, **gate)


def reference_stats(base, target, donors, weights, steepness, midpoint, eps, gate) -> dict[str, float]:
    """inspect's per-tensor definitions (inspection's module docstring), in float64, written
    independently of the kernel: f = 1 − sigmoid(k·(x − m)) with x the min/max-normalised drift."""
    b, t = base.double(), target.double()
    d = sum(w * (i.double() - b) for i, w in zip(donors, weights))
    drift = (t - b).abs()
    span = (drift.max() - drift.min()).item()
    if not gate or span < eps:
        f = torch.ones_like(drift)
    else:
        x = (drift - drift.min()) / span
        f = 1.0 - 1.0 / (1.0 + torch.exp(-steepness * (x - midpoint)))
    energy = (d * d).sum().item()
    return {
        "applied_fraction": f.mean().item(),
        "weighted_fraction": (f * d * d).sum().item() / energy if energy else None,
        "target_drift_mean": drift.mean().item(),
        "target_drift_max": drift.max().item(),
        "donor_diff_mean": d.abs().mean().item(),
        "donor_diff_max": d.abs().max().item(),
        "donor_energy": energy,
    }


def applied_fraction(
    drift: torch.Tensor,
    normalize: str = "minmax",
    quantile: float = 0.99,
    steepness: float = 12.0,
    midpoint: float = 0.5,
    eps: float = 1e-6,
) -> torch.Tensor:
    """1 − ratio per element of ``drift = |T − B|``, in float64, written from the definitions in
    normalization.py's docstring (exact statistics over the whole tensor, no sample):

    - minmax: x = (d − lo) / (hi − lo);
    - quantile: Q = the p-quantile (linear interpolation), Q = hi at p = 1; s = Q − lo, or
      hi − lo when Q − lo < eps or Q = lo; x = min(1, (d − lo) / s);
    - rank: x = min(1, #{j : bin(d_j) < bin(d)} / (N − 1)), bin = the float32 bit pattern
      without its sign bit, shifted right by 15 (exponent and first 8 significand bits);
    - hi − lo < eps or hi = lo: the whole diff (1 everywhere).
    """
    d = drift.double().flatten()
    lo, hi = d.min().item(), d.max().item()
    if hi - lo < eps or hi == lo:
        return torch.ones_like(drift, dtype=torch.float64)
    if normalize == "minmax":
        x = (d - lo) / (hi - lo)
    elif normalize == "quantile":
        q = hi if quantile == 1.0 else torch.quantile(d, quantile).item()
        scale = hi - lo if (q - lo < eps or q == lo) else q - lo
        x = ((d - lo) / scale).clamp(max=1.0)
    elif normalize == "rank":
        bins = (d.float().view(torch.int32) & 0x7FFFFFFF) >> 15
        below = torch.searchsorted(bins.sort().values, bins, side="left")  # how many bins are lower
        x = (below.double() / (d.numel() - 1)).clamp(max=1.0)
    else:
        raise ValueError(normalize)
    return torch.sigmoid(-steepness * (x - midpoint)).reshape(drift.shape)
