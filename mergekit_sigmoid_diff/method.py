"""``sigmoid_diff`` as a mergekit 0.1.5 merge method: contract, parameters, roles.

The arithmetic lives in :mod:`mergekit_sigmoid_diff.kernel` (its knobs are one
:class:`~mergekit_sigmoid_diff.kernel.GateSettings`); this module binds it to one output
tensor's :class:`~mergekit.merge_methods.base.TensorGroup`.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Literal, NoReturn, Optional, Sequence, TypeVar

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    InputContract,
    PerNonBase,
    TensorEntry,
    TensorGroup,
)
from mergekit.merge_methods.easy_define import merge_method
from pydantic import AfterValidator, FiniteFloat
from typing_extensions import Annotated

from mergekit_sigmoid_diff import datamerge, datasolve, gate_rules, kernel
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.normalization import Normalize

NAME = "sigmoid_diff"
REFERENCE_URL = "https://github.com/StableFluffy/EasyLLMFeaturePorter"
ROLE, TARGET, DONOR = "role", "target", "donor"

Role = Literal["target", "donor"]


def _gate_rule(name: str) -> Any:
    """The recipe type of gate parameter ``name``: a float checked by the rule
    :class:`~.kernel.GateSettings` applies (:func:`.gate_rules.problem`)."""

    def check(value: float) -> float:
        reason = gate_rules.problem(name, value)
        if reason is not None:
            raise ValueError(reason)
        return value

    return Annotated[float, AfterValidator(check)]


Steepness = _gate_rule("steepness")
Midpoint = _gate_rule("midpoint")
Eps = _gate_rule("eps")
QuantileLevel = _gate_rule("quantile")
ProtectEnergy = _gate_rule("protect_energy")
DataBeta = _gate_rule("data_beta")
DataAlpha = _gate_rule("data_alpha")
_DATA_DEFAULTS = datasolve.DataSettings()

M = TypeVar("M", bound=Hashable)


class RoleError(ValueError):
    """Not exactly one target, or no donor, among a group's models."""


def split_roles(
    models: Sequence[M],
    roles: Sequence[str],
    weights: Sequence[float] | None = None,
    label: Callable[[M], str] = str,
) -> tuple[M, list[tuple[M, float]]]:
    """(target, [(donor, weight), ...]) from the models' roles: exactly one ``target``,
    at least one ``donor``. The one place this rule lives (the recipe checks use it too);
    ``label`` names a model in the :class:`RoleError` message."""
    weights = weights if weights is not None else [1.0] * len(models)
    targets = [m for m, r in zip(models, roles) if r == TARGET]
    donors = [(m, w) for m, r, w in zip(models, roles, weights) if r == DONOR]
    if len(targets) != 1:
        found = ", ".join(label(m) for m in targets) or "none"
        raise RoleError(f"needs exactly one model with role: target (found {found})")
    if not donors:
        raise RoleError(
            f"has a target ({label(targets[0])}) but no donor model: add the model whose feature you transfer"
        )
    return targets[0], donors


@merge_method(
    name=NAME,
    pretty_name="Sigmoid Diff (EasyLLMFeaturePorter)",
    reference_url=REFERENCE_URL,
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=2),
)
def sigmoid_diff_merge(
    group: TensorGroup,
    role: PerNonBase[Role] = DONOR,
    weight: PerNonBase[FiniteFloat] = 1.0,
    steepness: Steepness = kernel.DEFAULT_STEEPNESS,
    midpoint: Midpoint = kernel.DEFAULT_MIDPOINT,
    eps: Eps = kernel.DEFAULT_EPS,
    gate: bool = True,
    normalize: Normalize = kernel.DEFAULT_NORMALIZE,
    quantile: QuantileLevel = kernel.DEFAULT_QUANTILE,
    protect_subspace: kernel.Protect = "none",
    protect_energy: ProtectEnergy = kernel.DEFAULT_PROTECT_ENERGY,
    target_statistics: Optional[str] = None,
    donor_statistics: Optional[str] = None,
    data_beta: DataBeta = _DATA_DEFAULTS.beta,
    data_alpha: DataAlpha = _DATA_DEFAULTS.alpha,
    data_hard: bool = _DATA_DEFAULTS.hard,
    inherit_rope: PerNonBase[bool] = False,
    inherit_chat: PerNonBase[bool] = False,
) -> torch.Tensor:
    """Every parameter resolves per tensor through mergekit's gradients and filters.

    - ``role`` (per model): ``target`` (exactly one) or ``donor`` (the default; one or more).
    - ``weight`` (per donor): w_j, the scale of that donor's diff ``I_j − B``.
    - ``steepness``, ``midpoint``, ``eps``, ``gate``, ``normalize``, ``quantile``,
      ``protect_subspace``, ``protect_energy``: the fields of
      :class:`~mergekit_sigmoid_diff.kernel.GateSettings`, documented there.
    - ``target_statistics`` / ``donor_statistics`` (paths, for ``protect_subspace: data``): the
      statistics file (``python -m mergekit_sigmoid_diff calibrate``) of the target on its own
      domain text / of the donor (or the target) on the donor's chats. Relative paths are read
      from the working directory.
    - ``data_beta``, ``data_alpha``, ``data_hard``: the fields ``beta``, ``alpha``, ``hard`` of
      :class:`~mergekit_sigmoid_diff.datasolve.DataSettings`, documented there.
      ``protect_subspace: data`` takes one donor; tensors neither file covers (norms) take the
      plain diff (:mod:`mergekit_sigmoid_diff.datamerge`).
    - ``inherit_rope`` / ``inherit_chat`` (per donor, at most one donor each): settings of the
      output folder, not of the tensor math: see :mod:`.plan` and :mod:`.output`.
    """
    name = group.metadata.name or "<tensor>"
    try:
        target, donors = split_roles(
            group.non_base,
            role.values_for(group.non_base),
            weight.values_for(group.non_base),
            label=lambda entry: str(entry.id),
        )
    except RoleError as error:
        raise SigmoidDiffError(f"{NAME}: tensor {name} {error}") from None
    # the parameters named like GateSettings' fields (a knob added there needs only its parameter here)
    settings = kernel.GateSettings.from_parameters(locals())
    vocabulary = group.metadata.vocabulary_axis is not None
    try:
        if settings.mode(target.tensor.dim(), vocabulary) == datamerge.DATA:
            return _data_transfer(name, group.base, target, donors, settings, locals(), vocabulary)
        return kernel.sigmoid_diff(
            group.base.tensor,
            target.tensor,
            [e.tensor for e, _ in donors],
            [w for _, w in donors],
            settings,
            vocabulary=vocabulary,
            out_dtype=target.tensor.dtype,
            check_finite=True,
        )
    except kernel.NonFiniteError:
        _raise_non_finite(name, [group.base, target, *(e for e, _ in donors)])


def _data_transfer(
    name: str,
    base: TensorEntry,
    target: TensorEntry,
    donors: list[tuple[TensorEntry, float]],
    settings: kernel.GateSettings,
    parameters: dict[str, Any],
    vocabulary: bool,
) -> torch.Tensor:
    """``protect_subspace: data`` for one tensor (:func:`.datamerge.transfer`); the recipe
    checks refuse these mistakes first, the method repeats them for direct callers."""
    if len(donors) != 1:
        raise SigmoidDiffError(
            f"{NAME}: tensor {name}: protect_subspace: data takes one donor, found {len(donors)} "
            f"({', '.join(str(e.id) for e, _ in donors)})"
        )
    files = []
    for parameter in (datamerge.TARGET_STATISTICS, datamerge.DONOR_STATISTICS):
        if not parameters[parameter]:
            raise SigmoidDiffError(f"{NAME}: tensor {name}: protect_subspace: data needs the parameter {parameter}")
        files.append(datamerge.open_statistics(parameters[parameter], parameter))
    (donor, weight), = donors
    return datamerge.transfer(
        name,
        base.tensor,
        target.tensor,
        donor.tensor,
        weight,
        settings,
        datasolve.DataSettings.from_parameters(parameters),
        *files,
        vocabulary=vocabulary,
        out_dtype=target.tensor.dtype,
    )


def _raise_non_finite(name: str, entries: list[TensorEntry]) -> NoReturn:
    """Name the first input holding NaN or Inf; finite inputs that overflow say so."""
    for entry in entries:
        if not torch.isfinite(entry.tensor).all():
            raise SigmoidDiffError(f"{NAME}: tensor {name} of model {entry.id} contains NaN or Inf")
    raise SigmoidDiffError(f"{NAME}: tensor {name} overflowed to Inf (inputs are finite; lower the weights)")
