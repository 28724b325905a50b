"""``sigmoid_diff`` as a mergekit 0.1.5 merge method: contract, parameters, roles.

The arithmetic lives in :mod:`mergekit_sigmoid_diff.kernel`; this module binds it to one
output tensor's :class:`~mergekit.merge_methods.base.TensorGroup`.
"""

from __future__ import annotations

from typing import Literal, NoReturn

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
from mergekit_sigmoid_diff.normalization import DEFAULT_NORMALIZE, DEFAULT_QUANTILE, Normalize

NAME = "sigmoid_diff"
REFERENCE_URL = "https://github.com/StableFluffy/EasyLLMFeaturePorter"

Role = Literal["target", "donor"]
Steepness = Annotated[FiniteFloat, Field(gt=0)]
Midpoint = Annotated[float, Field(ge=0, le=1)]
Eps = Annotated[FiniteFloat, Field(ge=0)]
QuantileLevel = Annotated[float, Field(gt=0, le=1)]


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
    normalize: Normalize = DEFAULT_NORMALIZE,
    quantile: QuantileLevel = DEFAULT_QUANTILE,
    inherit_rope: PerNonBase[bool] = False,
    inherit_chat: PerNonBase[bool] = False,
) -> torch.Tensor:
    """Parameters (all resolvable per tensor through mergekit's gradients and filters):

    - ``role`` (per model): ``target`` (exactly one) or ``donor`` (the default; one or more).
    - ``weight`` (per donor): w_j, the scale of that donor's diff ``I_j − B``.
    - ``steepness``: k > 0, the slope of the gate.
    - ``midpoint``: m ∈ [0, 1], the normalised drift at which half the diff goes in.
    - ``eps``: if max − min of |T − B| is below this, the whole diff goes in.
    - ``gate``: false takes the tensor out of the gate (plain ``T + Σ w_j (I_j − B)``).
    - ``normalize``: how |T − B| becomes the gate's input x: ``minmax`` (default, the published
      gate), ``quantile`` or ``rank`` (robust to outliers; see :mod:`.normalization`).
    - ``quantile``: p ∈ (0, 1], the level used by ``normalize: quantile`` (default 0.99).
    - ``inherit_rope`` / ``inherit_chat`` (per donor, at most one donor each): settings of the
      output folder, not of the tensor math (the kernel ignores them): the output config takes
      that donor's RoPE settings and max positions / the output tokenizer takes its chat
      template, eos and special tokens, and its generation_config (see :mod:`.output`).
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

    try:
        # Same dtype as the inputs (like mergekit's own methods); the finite check runs on
        # each chunk as it is written instead of a second pass over the whole output.
        return kernel.sigmoid_diff(
            group.base.tensor,
            targets[0].tensor,
            [e.tensor for e, _ in donors],
            [w for _, w in donors],
            steepness=steepness,
            midpoint=midpoint,
            eps=eps,
            gate=gate,
            normalize=normalize,
            quantile=quantile,
            out_dtype=targets[0].tensor.dtype,
            check_finite=True,
        )
    except kernel.NonFiniteError:
        _raise_non_finite(name, [group.base, targets[0], *(e for e, _ in donors)])


def _raise_non_finite(name: str, entries: list[TensorEntry]) -> NoReturn:
    """Name the first input holding NaN or Inf; finite inputs that overflow say so."""
    for entry in entries:
        if not torch.isfinite(entry.tensor).all():
            raise SigmoidDiffError(f"{NAME}: tensor {name} of model {entry.id} contains NaN or Inf")
    raise SigmoidDiffError(f"{NAME}: tensor {name} overflowed to Inf (inputs are finite; lower the weights)")
