"""``varm``: FuseChat's Variation Ratio Merge as a mergekit 0.1.5 merge method.

Wan et al., "Knowledge Fusion of Chat LLMs" (FuseChat), arXiv 2402.16107, §3.3: several
models fine-tuned from one base θ_0 are averaged with a weight per parameter matrix that
grows with how far that matrix moved during fine-tuning. Per output tensor, for the
fine-tuned models θ_1 … θ_K:

    Δ_j = θ_j − θ_0
    m_j = mean(Δ_j²)                          mean over the tensor's elements (units: weight²)
    w_j = m_j / Σ_i m_i                        the paper's variation ratio
        = softmax_j(m_j / τ)                   if a temperature τ > 0 is given
    out = Σ_j w_j · θ_j

The softmax acts on the raw m_j, as in FuseChat's reference code (``get_merge_weights``
in ``FuseChat/merge/VaRM/merge.py``); m_j of a typical fine-tune is ~1e-6 … 1e-3, so a
useful τ is of that order: τ ≫ m gives equal weights, τ ≪ m picks the model that moved most.
If every m_j is 0 (no model moved this tensor), the ratio is undefined and the weights are
equal, 1/K. The weights always sum to 1, so ``out = θ_0 + Σ_j w_j Δ_j`` as well.

Arithmetic is float32 (float64 if any input is float64), like :mod:`~mergekit_sigmoid_diff.kernel`;
the weights are float64 scalars.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, TensorGroup
from mergekit.merge_methods.easy_define import merge_method
from pydantic import Field, FiniteFloat
from typing_extensions import Annotated

from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.kernel import compute_dtype

NAME = "varm"
REFERENCE_URL = "https://arxiv.org/abs/2402.16107"

Temperature = Annotated[FiniteFloat, Field(gt=0)]


def mean_squared_changes(base: torch.Tensor, models: Sequence[torch.Tensor]) -> list[float]:
    """m_j = mean((θ_j − θ_0)²) for each model, as Python floats (NaN/Inf pass through)."""
    dtype = compute_dtype(base, *models)
    b = base.to(dtype)
    # mean in the compute dtype (torch sums pairwise): a float64 copy of a large embedding
    # matrix would double the peak memory for no useful digits
    return [torch.sub(m.to(dtype), b).square_().mean().item() for m in models]


def variation_ratio_weights(changes: Sequence[float], temperature: Optional[float] = None) -> list[float]:
    """w_j from the m_j: ``m_j / Σ m`` (equal if all are 0), or ``softmax(m_j / τ)``."""
    if not changes:
        raise ValueError("no models to weight")
    m = torch.tensor(changes, dtype=torch.float64)
    if temperature is not None:
        return torch.softmax(m / temperature, dim=0).tolist()
    total = m.sum().item()
    if total == 0.0:
        return [1.0 / len(changes)] * len(changes)
    return (m / total).tolist()


def varm(
    base: torch.Tensor, models: Sequence[torch.Tensor], temperature: Optional[float] = None
) -> tuple[torch.Tensor, list[float]]:
    """``Σ_j w_j θ_j`` for one tensor and the weights w_j used; see the module docstring.

    The result is in the compute dtype (float32, or float64 if any input is); the caller
    casts it. Memory beyond the inputs: the accumulator plus one transient diff.
    """
    weights = variation_ratio_weights(mean_squared_changes(base, models), temperature)
    dtype = compute_dtype(base, *models)
    out = models[0].to(dtype) * weights[0]
    for model, weight in zip(models[1:], weights[1:]):
        out.add_(model.to(dtype), alpha=weight)
    return out, weights


@merge_method(
    name=NAME,
    pretty_name="VaRM (FuseChat variation ratio merge)",
    reference_url=REFERENCE_URL,
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=2),
)
def varm_merge(group: TensorGroup, temperature: Optional[Temperature] = None) -> torch.Tensor:
    """Parameters (resolvable per tensor through mergekit's gradients and filters):

    - ``temperature``: τ > 0 turns the variation ratio ``m_j / Σ m`` into ``softmax(m_j / τ)``;
      unset (the default) uses the paper's ratio.

    The base model is θ_0 and is not itself averaged in; every other model is a θ_j.
    """
    name = group.metadata.name or "<tensor>"
    for entry in (group.base, *group.non_base):
        if not torch.isfinite(entry.tensor).all():
            raise SigmoidDiffError(f"{NAME}: tensor {name} of model {entry.id} contains NaN or Inf")
    out, _ = varm(group.base.tensor, [e.tensor for e in group.non_base], temperature)
    if not torch.isfinite(out).all():
        raise SigmoidDiffError(
            f"{NAME}: tensor {name} overflowed to Inf (inputs are finite, their squared change is not)"
        )
    return out
