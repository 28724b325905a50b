"""B, T and I of a one-donor ``sigmoid_diff`` recipe read once, through mergekit's own plan, and
prepared per tensor for ``sweep`` (:mod:`.sweep`); points applied into one working model.

Every planned merge step of the recipe (mergekit's ``ExecuteMergeMethodTask``: each parameter
resolved per tensor, gradients and filters included) becomes an :class:`Entry` through a mergekit
task that receives the very tensors the merge method would receive (the recipe's dtype, or the
inputs' promoted one), as :mod:`.inspection` does; mergekit's executor streams the inputs, so
only the prepared state is kept (T, D = I − B and the gate's fraction or the projection basis:
:mod:`.prepared`). An entry's output at weight w is cast as mergekit casts before writing
(the task's ``out_dtype``, then the recipe's ``out_dtype``), so it is what ``mergekit-yaml``
writes for the recipe at w, bit for bit.

The working model is built once from the output's config (the target's, as the merge writes
it) in float32 on the scoring device; a point is copied into its parameters tensor by tensor.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from mergekit_sigmoid_diff.errors import SigmoidDiffError


@dataclass(eq=False)
class Entry:
    """One output tensor: its prepared transfer, the casts mergekit applies before writing, the
    donor weight per sweep weight, and ⟨D, D⟩ and ⟨T, D⟩ (for λ_eff, float32 sums)."""

    name: str
    prepared: Any  # prepared.PreparedTensor
    casts: tuple[torch.dtype, ...]
    weights: dict[float, float] = field(default_factory=dict)
    energy: float = 0.0
    target_dot: float = 0.0

    def final(self, tensor: torch.Tensor) -> torch.Tensor:
        for dtype in self.casts:
            tensor = tensor.to(dtype)
        return tensor

    def uncast(self) -> bool:
        """Whether mergekit writes the tensor in the inputs' dtype (every cast a no-op)."""
        return all(dtype == self.prepared.dtype for dtype in self.casts)


@dataclass(frozen=True)
class Models:
    """B, T and I: references as the recipe names them, local folders, stamps."""

    base: Any
    target: Any
    donor: Any
    folders: dict[str, Path]
    stamps: dict[str, str]


class Transfer:
    """B, T and I read once and prepared (:mod:`.prepared`); points applied into ``model``."""

    def __init__(self, entries: list[Entry], model, tokenizer, parameters: dict[str, torch.nn.Parameter]):
        self.entries = entries
        self.model = model
        self.tokenizer = tokenizer
        self._parameters = parameters

    def nbytes(self) -> int:
        return sum(e.prepared.nbytes() for e in self.entries)

    def tensors_at(self, weight: float) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor as mergekit-yaml writes it) for the recipe at ``weight``, one at a time."""
        for entry in self.entries:
            yield entry.name, entry.final(entry.prepared.at(entry.weights[weight]))

    def apply(self, kind: str, value: float) -> Optional[float]:
        """Load the point into the working model: ``recipe`` at weight ``value`` or
        ``task_arithmetic`` at λ = ``value``. Returns the recipe point's λ_eff = Σ⟨out − T, D⟩ / Σ⟨D, D⟩
        (as Σ⟨out, D⟩ − Σ⟨T, D⟩; float32 sums)."""
        from mergekit_sigmoid_diff.threads import single_threaded

        dot, energy = 0.0, 0.0
        with torch.no_grad():
            for entry in self.entries:
                p, parameter = entry.prepared, self._parameters[entry.name]
                direct = entry.uncast() and parameter.dtype == p.dtype and parameter.device == p.target.device
                compute = p.at if kind == "recipe" else p.arithmetic
                weight = entry.weights[value] if kind == "recipe" else value
                if direct:  # written in place: no copy of the tensor
                    out = compute(weight, out=parameter.data)
                else:
                    out = entry.final(compute(weight))
                    with single_threaded(parameter.device.type == "cpu"):
                        parameter.copy_(out)
                if kind == "recipe":
                    with single_threaded(p.diff.device.type == "cpu"):
                        written = out if out.dtype == p.diff.dtype else out.to(p.diff.dtype)
                        dot += float(torch.dot(written.reshape(-1), p.diff.reshape(-1))) - entry.target_dot
                    energy += entry.energy
        return dot / energy if kind == "recipe" and energy > 0 else None


def dtype_of(name: Optional[str]) -> Optional[torch.dtype]:
    if not name:
        return None
    from mergekit.common import dtype_from_name

    return dtype_from_name(name)


def _prepare(merge: Any, tensors: dict, save_dtype: Optional[str]) -> Entry:
    """One planned merge step (mergekit's ``ExecuteMergeMethodTask``) as an :class:`Entry`, from
    the tensors mergekit gathers for it (:func:`.plan.each_step`, as ``inspect`` reads a step)."""
    from mergekit_sigmoid_diff import kernel, prepared
    from mergekit_sigmoid_diff.plan import step_roles

    name = merge.output_weight.name
    base, target, donors = step_roles(merge)
    (donor, _), = donors
    if any(m not in tensors for m in (base, target, donor)):
        raise SigmoidDiffError(f"sweep: tensor {name} is missing from one of the models (mergekit would pass it through)")
    if not tensors[base].is_floating_point():
        raise SigmoidDiffError(f"sweep: tensor {name} is not floating point")
    dtype = dtype_of(merge.dtype)
    if dtype is None:  # mergekit promotes the group's dtypes (merge_methods.dtype)
        dtype = tensors[base].dtype
        for m in (target, donor):
            dtype = torch.promote_types(dtype, tensors[m].dtype)
    b, t, i = (tensors[m].to(dtype) for m in (base, target, donor))
    parameters = dict(merge.parameters.items())
    settings = kernel.GateSettings.from_parameters(parameters)
    vocabulary = merge.output_weight.vocabulary_axis is not None
    solve = _data_solve(name, tuple(t.shape), parameters) if settings.mode(t.dim(), vocabulary) == "data" else None
    entry = prepared.prepare(b, t, i, settings, vocabulary=vocabulary, solve=solve)
    flat = entry.diff.reshape(-1)
    target_flat = entry.target.reshape(-1).to(flat.dtype)
    energy, target_dot = float(torch.dot(flat, flat)), float(torch.dot(target_flat, flat))
    if not (math.isfinite(energy) and math.isfinite(target_dot)):  # NaN and Inf reach the sums
        which = f"target {target}" if not bool(torch.isfinite(entry.target).all()) else f"donor {donor} or base {base}"
        raise SigmoidDiffError(f"sweep: tensor {name} of {which} holds NaN or Inf (or overflows)")
    casts = tuple(d for d in (dtype_of(merge.out_dtype), dtype_of(save_dtype)) if d is not None)
    return Entry(name, entry, casts, energy=energy, target_dot=target_dot)


def _data_solve(name: str, shape: tuple, parameters: dict[str, Any]) -> Any:
    """``protect_subspace: data``: the tensor's solve from the recipe's statistics files, as the
    merge reads them (:mod:`.datamerge`); None where no statistics apply (the plain diff)."""
    from mergekit_sigmoid_diff import datamerge, datasolve

    files = [datamerge.open_statistics(parameters.get(p) or "", p) for p in (datamerge.TARGET_STATISTICS, datamerge.DONOR_STATISTICS)]
    return datamerge.prepared_for(name, shape, *files, datasolve.DataSettings.from_parameters(parameters))


def folder(reference: Any, options: Any) -> Path:
    """The local folder of a model reference (a ``model+lora`` one merged into the LoRA cache)."""
    merged = reference.merged(cache_dir=options.lora_merge_cache, trust_remote_code=options.trust_remote_code,
                              lora_merge_dtype=options.lora_merge_dtype)
    return Path(merged.local_path(cache_dir=options.transformers_cache))


def model_memory(numel: int, dtype: torch.dtype) -> int:
    """Bytes the sweep holds for a model of ``numel`` parameters in recipe dtype ``dtype``: B, T
    and I while they are read, or T, D and the fraction (compute dtype) once prepared, whichever
    is larger, plus one float32 working copy."""
    size = torch.empty((), dtype=dtype).element_size()
    compute = 8 if dtype == torch.float64 else 4
    return numel * (max(3 * size, size + 2 * compute) + 4)


def working_model(out_config: Any, device: Optional[torch.device] = None):
    """A float32 causal LM of the output's config (on the meta device when ``device`` is None:
    for counting parameters)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device or "meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(out_config), dtype=torch.float32)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def load(config: Any, options: Any, planned: Sequence[Any], weights: Mapping[float, Optional[Sequence[Any]]],
         out_config: Any, tokenizer: Any, device: torch.device, quiet: bool = True) -> Transfer:
    """Read and prepare every planned tensor of ``config`` (inside the merge's checks) and build
    the working model. ``weights``: per sweep weight, the planned steps of the recipe at that
    weight (its per-tensor donor weights), or None when the weight is that number everywhere."""
    from mergekit_sigmoid_diff import plugin
    from mergekit_sigmoid_diff.plan import each_step

    def work(step: Any, tensors: dict) -> Entry:
        return _prepare(step, tensors, step.output_weight.force_dtype or config.out_dtype)

    with plugin.checked(config, options) as ok:
        by_name = each_step(planned, work, quiet=quiet or ok.options.quiet, desc="Preparing tensors")
    from mergekit.io.tasks import LoaderCache

    LoaderCache().flush_all()  # close the input files: their mapped pages leave memory
    for weight, steps in weights.items():
        for entry in by_name.values():
            entry.weights[weight] = weight
        for step in steps or ():
            donor = next(m for m in step.model_order if m != step.base_model and step.input_parameters[m]["role"] != "target")
            by_name[step.output_weight.name].weights[weight] = float(step.input_parameters[donor]["weight"])
    model = working_model(out_config, device)
    parameters = dict(model.named_parameters())
    missing = sorted(set(parameters) - set(by_name))
    if missing:
        raise SigmoidDiffError(f"sweep: the output model's tensor {missing[0]} is not among the recipe's merged tensors")
    unknown = sorted(set(by_name) - set(parameters))
    if unknown:
        raise SigmoidDiffError(f"sweep: the recipe merges tensor {unknown[0]}, which the output model does not have")
    return Transfer([by_name[step.output_weight.name] for step in planned], model, tokenizer, parameters)


__all__ = ["Entry", "Transfer", "dtype_of", "folder", "load", "model_memory", "working_model"]
