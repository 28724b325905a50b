"""``sigmoid_diff`` as a mergekit 0.1.5 merge method: contract, parameters, roles.

The arithmetic lives in :mod:`mergekit_sigmoid_diff.kernel`; this module binds it to one
output tensor's :class:`~mergekit.merge_methods.base.TensorGroup`.
"""

from __future__ import annotations

from typing import Literal

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    InputContract,
    PerNonBase,
    TensorEntry,
    TensorGroup,
)
from mergekit.merge_methods.easy_define import merge_method
from pydantic import Field, FiniteFloat
from typing_extensions import Annotated

from mergekit_sigmoid_diff import kernel
from mergekit_sigmoid_diff.errors import SigmoidDiffError

NAME = "sigmoid_diff"
REFERENCE_URL = "https://github.com/StableFluffy/EasyLLMFeaturePorter"

Role = Literal["target", "donor"]
Steepness = Annotated[FiniteFloat, Field(gt=0)]
Midpoint = Annotated[float, Field(ge=0, le=1)]
Eps = Annotated[FiniteFloat, Field(ge=0)]


@merge_method(
    name=NAME,
    pretty_name="Sigmoid Diff (EasyLLMFeaturePorter)",
    reference_url=REFERENCE_URL,
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=2),
)
def sigmoid_diff_merge(
    group: TensorGroup,
    role: PerNonBase[Role] = "donor",
    weight: PerNonBase[FiniteFloat] = 1.0,
    steepness: Steepness = kernel.DEFAULT_STEEPNESS,
    midpoint: Midpoint = kernel.DEFAULT_MIDPOINT,
    eps: Eps = kernel.DEFAULT_EPS,
    gate: bool = True,
) -> torch.Tensor:
    """Parameters (all resolvable per tensor through mergekit's gradients and filters):

    - ``role`` (per model): ``target`` (exactly one) or ``donor`` (the default; one or more).
    - ``weight`` (per donor): w_j, the scale of that donor's diff ``I_j − B``.
    - ``steepness``: k > 0, the slope of the gate.
    - ``midpoint``: m ∈ [0, 1], the normalised drift at which half the diff goes in.
    - ``eps``: if max − min of |T − B| is below this, the whole diff goes in.
    - ``gate``: false takes the tensor out of the gate (plain ``T + Σ w_j (I_j − B)``).
    """
    name = group.metadata.name or "<tensor>"
    roles = role.values_for(group.non_base)
    targets = [e for e, r in zip(group.non_base, roles) if r == "target"]
    donors = [(e, w) for e, r, w in zip(group.non_base, roles, weight.values_for(group.non_base)) if r == "donor"]
    if len(targets) != 1:
        found = ", ".join(str(e.id) for e in targets) or "none"
        raise SigmoidDiffError(
            f"{NAME}: tensor {name} needs exactly one model with role: target; found {found}"
        )
    if not donors:
        raise SigmoidDiffError(f"{NAME}: tensor {name} has a target but no donor model")

    out = kernel.sigmoid_diff(
        group.base.tensor,
        targets[0].tensor,
        [e.tensor for e, _ in donors],
        [w for _, w in donors],
        steepness=steepness,
        midpoint=midpoint,
        eps=eps,
        gate=gate,
    )
    if not torch.isfinite(out).all():
        _raise_non_finite(name, [group.base, targets[0], *(e for e, _ in donors)])
    return out


def _raise_non_finite(name: str, entries: list[TensorEntry]) -> None:
    """Name the first input holding NaN or Inf; finite inputs that overflow say so."""
    for entry in entries:
        if not torch.isfinite(entry.tensor).all():
            raise SigmoidDiffError(f"{NAME}: tensor {name} of model {entry.id} contains NaN or Inf")
    raise SigmoidDiffError(f"{NAME}: tensor {name} overflowed to Inf (inputs are finite; lower the weights)")
