"""The sigmoid_diff arithmetic on plain tensors, free of mergekit.

For one output tensor, with base B, target T and donors I_j with weights w_j:

    x      = (|T − B| − min) / (max − min)        min/max over the whole tensor, x ∈ [0, 1]
    ratio  = sigmoid(k · (x − m))                  k = steepness, m = midpoint
    out    = T + (1 − ratio) ⊙ Σ_j w_j · (I_j − B)
    if max − min < eps: ratio = 0                  (the whole diff goes in)

``1 − ratio`` is the *applied fraction*: 1 where the target stayed near the base, → 0
where it drifted furthest. It is computed as ``sigmoid(−k · (x − m))``, which equals
``1 − sigmoid(k · (x − m))`` but does not lose digits to cancellation as ratio → 1.

Reference: StableFluffy/EasyLLMFeaturePorter, ``1-Click.ipynb`` (2024):
``sigmoid(normalized_diff * 12 - 6)``, i.e. k = 12, m = 0.5, eps = 1e-6.

Arithmetic is float32 (float64 if any input is float64) whatever the input dtype;
the result is returned in that compute dtype and the caller casts it.
"""

from __future__ import annotations

from typing import Sequence

import torch

DEFAULT_STEEPNESS = 12.0
DEFAULT_MIDPOINT = 0.5
DEFAULT_EPS = 1e-6


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def applied_fraction_(
    drift: torch.Tensor,
    *,
    steepness: float = DEFAULT_STEEPNESS,
    midpoint: float = DEFAULT_MIDPOINT,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Turn ``drift = |T − B|`` (floating point) into ``1 − ratio``, in place.

    Returns ``drift`` itself, now holding values in [0, 1]. A non-finite drift
    (NaN or Inf in T or B) is left for the caller to report: min/max propagate it.
    """
    if drift.numel() == 0:
        return drift
    lo, hi = torch.aminmax(drift)
    span = (hi - lo).item()
    if span < eps:  # the notebook's "all values are the same" branch: ratio = 0
        return drift.fill_(1.0)
    # x = (drift − lo) / span;  1 − ratio = sigmoid(−k·(x − m))
    return drift.sub_(lo).div_(span).sub_(midpoint).mul_(-steepness).sigmoid_()


def sigmoid_diff(
    base: torch.Tensor,
    target: torch.Tensor,
    donors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    steepness: float = DEFAULT_STEEPNESS,
    midpoint: float = DEFAULT_MIDPOINT,
    eps: float = DEFAULT_EPS,
    gate: bool = True,
) -> torch.Tensor:
    """``T + (1 − ratio) ⊙ Σ w_j (I_j − B)`` for one tensor; see the module docstring.

    ``gate=False`` takes the tensor out of the gate: ``T + Σ w_j (I_j − B)``.
    Memory beyond the inputs (after their upcast): the gate and the accumulator, plus
    one transient diff per donor after the first.
    """
    if len(donors) != len(weights):
        raise ValueError(f"{len(donors)} donors but {len(weights)} weights")
    dtype = compute_dtype(base, target, *donors)
    b = base.to(dtype)
    t = target.to(dtype)

    acc = torch.sub(donors[0].to(dtype), b)
    if weights[0] != 1.0:
        acc.mul_(weights[0])
    for donor, weight in zip(donors[1:], weights[1:]):
        acc.add_(donor.to(dtype) - b, alpha=weight)

    if gate:
        fraction = applied_fraction_(
            torch.sub(t, b).abs_(), steepness=steepness, midpoint=midpoint, eps=eps
        )
        acc.mul_(fraction)
        del fraction
    return acc.add_(t)
