"""Checks that run before mergekit loads any tensor or writes any file.

- :func:`check_recipe`: mergekit resolves parameters per tensor while planning and
  silently ignores names a method does not declare; this turns every recipe mistake
  into one :class:`SigmoidDiffError` line naming the parameter, model or slice at fault.
- :func:`check_models`: reads only each model's ``config.json`` and safetensors
  headers (a few kB per shard) and reports a missing config, a corrupt file, mixed
  architectures, a tensor missing from a model, or shapes that disagree, naming the
  tensor and the models, before mergekit starts a merge that would fail midway.
- :func:`check_statistics`: ``protect_subspace: data`` only: the statistics files exist, are
  of the right models and fit every tensor they must cover (file headers and a stamp of each
  model, no statistics tensor read).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import safetensors
from mergekit import merge
from mergekit.architecture import WeightInfo, get_architecture_info
from mergekit.common import ModelReference
from mergekit.config import ConditionalParameter, MergeConfiguration
from mergekit.io.tasks import LoaderCache
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import ParameterScope, ParameterSpec
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner
from pydantic import ValidationError

from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.plan import (
    InputGroup,
    TransferPlan,
    has_roles,
    input_groups,
    tokenizer_built_by_mergekit,
    transfer_plan,
)

Settings = Optional[Mapping[str, Any]]


def check_recipe(config: MergeConfiguration) -> Optional[TransferPlan]:
    """Raise :class:`SigmoidDiffError` for the first problem found in ``config``; return
    its transfer plan (None for a method without roles, such as ``varm``)."""
    method = config.merge_method
    method_spec = registry.get(method).spec
    specs = {p.name: p for p in method_spec.parameters}
    roles = has_roles(method)  # sigmoid_diff: one target and donors; varm: a plain list
    if config.base_model is None:
        merged = "target and donors" if roles else "the models it merges"
        raise SigmoidDiffError(f"{method} needs base_model: the common ancestor of {merged}")

    for where, settings, per_model in _parameter_blocks(config):
        for key, setting in (settings or {}).items():
            spec = specs.get(key)
            if spec is None:
                close = difflib.get_close_matches(key, specs, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SigmoidDiffError(
                    f"unknown parameter {key!r} in {where}{hint}; {method} takes: {', '.join(specs)}"
                )
            if per_model and spec.scope == ParameterScope.SHARED:
                raise SigmoidDiffError(
                    f"parameter {key!r} in {where} is shared by all models: set it in the "
                    "top-level (or slice) parameters"
                )
            for value in _leaf_values(setting):
                _validate(spec, value, where)

    if roles:
        return transfer_plan(config)
    for group in input_groups(config):
        _check_model_count(method, group, method_spec.contract.min_non_base or 1)
    return None


def _validate(spec: ParameterSpec, value: Any, where: str) -> None:
    try:
        spec.validate(value)
    except ValidationError as error:
        first = error.errors()[0]
        # a rule of gate_rules raised ValueError(reason): its reason, without pydantic's prefix
        reason = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
        raise SigmoidDiffError(f"parameter {spec.name}={value!r} in {where}: {reason}") from None


def _leaf_values(setting: Any) -> Iterator[Any]:
    """Every scalar a setting can resolve to: plain, gradient endpoints, filter values."""
    if isinstance(setting, ConditionalParameter):
        yield from _leaf_values(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _leaf_values(item)
    else:
        yield setting


def _parameter_blocks(config: MergeConfiguration) -> Iterator[tuple[str, Settings, bool]]:
    """(location, parameters, per-model?) for every parameters block in the recipe."""
    yield "the top-level parameters", config.parameters, False
    for model_in in config.models or ():
        yield f"the parameters of model {model_in.model}", model_in.parameters, True
    for i, out_slice in enumerate(config.slices or ()):
        yield f"the parameters of slices[{i}]", out_slice.parameters, False
        for source in out_slice.sources:
            yield f"the parameters of {source.model} in slices[{i}]", source.parameters, True
    for name, module in (config.modules or {}).items():
        yield f"the parameters of module {name}", module.parameters, False
        for model_in in module.models or ():
            yield f"the parameters of model {model_in.model} in module {name}", model_in.parameters, True
        for i, out_slice in enumerate(module.slices or ()):
            yield f"the parameters of module {name} slices[{i}]", out_slice.parameters, False
            for source in out_slice.sources:
                yield (
                    f"the parameters of {source.model} in module {name} slices[{i}]",
                    source.parameters,
                    True,
                )


def _check_model_count(method: str, group: InputGroup, minimum: int) -> None:
    merged = [entry.model for entry in group.models if entry.model != group.base]
    if len(merged) < minimum:
        found = ", ".join(str(m) for m in merged) or "none"
        raise SigmoidDiffError(
            f"{method}: {group.where} needs at least {minimum} models besides base_model (found {found})"
        )


# --- model checks: config.json and safetensors headers, no tensor data ------------------

Shapes = dict[str, tuple[int, ...]]  # tensor name -> shape, read from safetensors headers


def check_models(config: MergeConfiguration, options: MergeOptions) -> list[Any]:
    """Raise :class:`SigmoidDiffError` for the first input model that cannot be merged;
    return the merge steps it checked (:func:`planned_merges`).

    Reads each model's ``config.json`` and the headers of its safetensors files, never
    tensor data, in this order: every model folder and its config, the architectures
    (all alike unless ``--allow-crimes``), every header (a corrupt file fails here), then
    every tensor the merge will read, laid out by mergekit's own planner: present in all
    models of its group (or, if optional, in none) with one shape, except along the
    vocabulary axis when tokenizer settings or ``--unsafe-truncate-embeddings`` align it.

    A ``model+lora`` reference is checked through its model (merging a LoRA keeps names
    and shapes); mergekit merges the adapter while planning, as it would anyway.
    Weights stored as ``pytorch_model.bin`` cannot be inspected without loading them
    and are left to mergekit.
    """
    models = config.referenced_models()
    folders = {model: _model_folder(model, options) for model in models}
    configs = {model: _read_config(model, folders[model]) for model in models}
    if not options.allow_crimes:
        _check_architectures(config, configs)
    headers = {model: _read_headers(model, folders[model]) for model in models}
    known: dict[ModelReference, bool] = {}

    def converted(model: ModelReference) -> bool:
        """transformers converts this model's checkpoint on load (and may build a tensor the
        files lack from others). Asked only for a missing tensor: building transformers'
        table of conversions took ~0.35 s, a few % of a 0.6B merge."""
        if model not in known:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping

            known[model] = bool(get_checkpoint_conversion_mapping(configs[model].get("model_type")))
        return known[model]

    return _check_tensors(config, options, headers, converted)


def _looks_local(path: str) -> bool:
    """A path a user meant as a folder (a hub id is ``name`` or ``owner/name``)."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _model_folder(model: ModelReference, options: MergeOptions) -> Path:
    """The local folder of ``model`` (a hub id is fetched, as mergekit would anyway)."""
    if model.lora is not None and _looks_local(model.lora.path) and not os.path.isdir(model.lora.path):
        raise SigmoidDiffError(f"model {model}: LoRA adapter folder {model.lora.path} not found")
    path = model.model.path
    if os.path.isdir(path):
        return Path(path)
    if os.path.exists(path):
        raise SigmoidDiffError(f"model {model}: {path} is a file, not a model folder")
    if _looks_local(path):
        raise SigmoidDiffError(f"model {model}: folder {path} not found")
    try:
        return Path(model.local_path(cache_dir=options.transformers_cache, ignore_lora=True))
    except Exception as error:  # hub client errors have many types; all mean "not available"
        raise SigmoidDiffError(
            f"model {model}: no such folder, and not available from the Hugging Face Hub "
            f"({_first_line(error)})"
        ) from None


def _read_config(model: ModelReference, folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise SigmoidDiffError(f"model {model}: no config.json in {folder}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SigmoidDiffError(f"model {model}: cannot read {file} ({_first_line(error)})") from None
    if not isinstance(data, dict):
        raise SigmoidDiffError(f"model {model}: {file} does not hold a JSON object")
    return data


def _label(model: ModelReference, config: MergeConfiguration) -> str:
    return f"base_model {model}" if model == config.base_model else f"model {model}"


def _architecture(model_config: dict) -> str:
    names = "/".join(model_config.get("architectures") or ()) or "no architectures"
    return f"{names} ({model_config.get('model_type', 'no model_type')})"


def _check_architectures(config: MergeConfiguration, configs: Mapping[ModelReference, dict]) -> None:
    reference = config.base_model if config.base_model in configs else next(iter(configs))
    expected = _architecture(configs[reference])
    for model, model_config in configs.items():
        found = _architecture(model_config)
        if found != expected:
            raise SigmoidDiffError(
                f"{_label(model, config)} is {found} but {_label(reference, config)} is {expected}: "
                f"{config.merge_method} merges models of one architecture "
                "(mergekit's --allow-crimes skips this check)"
            )


def _read_headers(model: ModelReference, folder: Path) -> Optional[Shapes]:
    """Shapes of all tensors of a safetensors model, from the file headers only.

    None for ``pytorch_model.bin`` weights. Also checks that an index's shards exist
    and hold the tensors the index assigns to them.
    """
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            assigned = {name: str(shard) for name, shard in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise SigmoidDiffError(
                f"model {model}: {index} is not a safetensors index ({_first_line(error)})"
            ) from None
    elif single.is_file():
        assigned = None
    elif (folder / "pytorch_model.bin").is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        return None
    else:
        raise SigmoidDiffError(
            f"model {model}: no weights in {folder} (model.safetensors, "
            "model.safetensors.index.json or pytorch_model.bin)"
        )

    shards = sorted(set(assigned.values())) if assigned is not None else [single.name]
    shapes: Shapes = {}
    for shard in shards:
        file = folder / shard
        if not file.is_file():
            raise SigmoidDiffError(f"model {model}: shard {shard} listed in {index.name} is missing")
        try:
            with safetensors.safe_open(str(file), framework="pt") as handle:
                held = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        except (safetensors.SafetensorError, OSError) as error:
            raise SigmoidDiffError(f"model {model}: corrupt safetensors file {file} ({_first_line(error)})") from None
        if assigned is not None:
            absent = next((n for n, s in assigned.items() if s == shard and n not in held), None)
            if absent is not None:
                raise SigmoidDiffError(
                    f"model {model}: {index.name} puts tensor {absent} in {shard}, which does not hold it"
                )
        shapes.update(held)
    return shapes


def planned_merges(config: MergeConfiguration, options: MergeOptions) -> list[Any]:
    """mergekit's own merge steps for ``config`` (``ExecuteMergeMethodTask``s, one per
    output tensor, every parameter resolved), planned as for a merge; nothing is read
    or written. The planner works on a copy: it rewrites the configuration it is given."""
    arch_info = get_architecture_info(config, options)
    # the output config fixes the output layer count for slice recipes, as in run_merge
    out_config = merge._model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    LoaderCache().setup(options=options)  # the planner looks up optional tensors through it
    planner = MergePlanner(config.model_copy(deep=True), arch_info, options=options, out_model_config=out_config)
    # plan_in_memory() fails in mergekit 0.1.5 (its ReturnTensor does not validate): take the
    # merge steps from the on-disk plan, whose writer tasks are never run
    steps = (getattr(task, "tensor_task", None) for task in planner.plan_to_disk(out_path=os.devnull))
    return [step for step in steps if step is not None]  # not the finalize / tokenizer tasks


def _check_tensors(
    config: MergeConfiguration,
    options: MergeOptions,
    headers: Mapping[ModelReference, Optional[Shapes]],
    converted: Callable[[ModelReference], bool],
) -> list[Any]:
    """Walk the merge plan (no tensor is read) and check each output tensor's inputs."""
    aligned_vocabulary = bool(
        tokenizer_built_by_mergekit(config) or options.unsafe_truncate_embeddings
    )
    steps = planned_merges(config, options)
    for merge_task in steps:
        _check_tensor(config, merge_task.output_weight, _weight_infos(merge_task), headers, converted, aligned_vocabulary)
    return steps


def _weight_infos(merge_task: Any) -> Mapping[ModelReference, WeightInfo]:
    """model -> the input tensor a merge step reads from it."""
    gather = merge_task.gather_tensors
    return getattr(gather, "gather_tensors", gather).weight_info  # vocabulary alignment wraps it


def _check_tensor(
    config: MergeConfiguration,
    weight: WeightInfo,
    inputs: Mapping[ModelReference, WeightInfo],
    headers: Mapping[ModelReference, Optional[Shapes]],
    converted: Callable[[ModelReference], bool],
    aligned_vocabulary: bool,
) -> None:
    shapes: dict[ModelReference, tuple[int, ...]] = {}
    missing = []
    for model, info in inputs.items():
        held = headers.get(model)
        if held is None:  # .bin weights: mergekit checks them while loading
            continue
        names = (info.name, *(info.aliases or ()), *(info.tied_names or ()))
        found = next((name for name in names if name in held), None)
        if found is not None:
            shapes[model] = held[found]
        elif not converted(model):  # else transformers may build it from other tensors
            missing.append(model)
    if missing and (shapes or not weight.optional):
        where = f" (present in {_label(next(iter(shapes)), config)})" if shapes else ""
        raise SigmoidDiffError(f"tensor {weight.name} is missing from {_label(missing[0], config)}{where}")
    if not shapes:
        return

    reference = config.base_model if config.base_model in shapes else next(iter(shapes))
    expected = shapes[reference]
    axis = weight.vocabulary_axis
    for model, shape in shapes.items():
        if shape == expected:
            continue
        vocabulary_only = (
            axis is not None
            and len(shape) == len(expected)
            and axis < len(shape)
            and all(a == b for i, (a, b) in enumerate(zip(shape, expected)) if i != axis)
        )
        if vocabulary_only and aligned_vocabulary:
            continue
        if vocabulary_only:
            raise SigmoidDiffError(
                f"vocabulary mismatch in tensor {weight.name}: {expected[axis]} tokens in "
                f"{_label(reference, config)} but {shape[axis]} in {_label(model, config)}; add "
                "`tokenizer: {source: base}` (or `source: union`) to the recipe so mergekit aligns the vocabularies"
            )
        raise SigmoidDiffError(
            f"tensor {weight.name} has shape {list(shape)} in {_label(model, config)} but "
            f"{list(expected)} in {_label(reference, config)}"
        )


def check_model_card(config: MergeConfiguration, options: MergeOptions, out_path: str, config_source: Optional[str]) -> None:
    """Render the model card mergekit writes after the merge (it names the input models and may
    look hub ids up), so that a failure there is reported before any tensor is read."""
    if not options.write_model_card:
        return
    from mergekit.card import generate_card

    try:
        generate_card(config=config, config_yaml=config_source or config.to_yaml(), name=os.path.basename(out_path))
    except Exception as error:  # the card writer calls the hub client, whose errors have many types
        raise SigmoidDiffError(
            f"the model card for {out_path} cannot be written ({_first_line(error)}); "
            "pass --no-write-model-card to merge without it"
        ) from None


# --- protect_subspace: data: the statistics files, from their headers ----------------------


def check_statistics(config: MergeConfiguration, options: MergeOptions, steps: list[Any]) -> None:
    """Raise :class:`SigmoidDiffError` for the first merge step under ``protect_subspace: data``
    (with ``gate`` on) that cannot be solved: a missing ``target_statistics`` or
    ``donor_statistics``, a file that is missing, unreadable or not a statistics file, a file of
    another model (its ``model_stamp`` against :func:`.statistics.model_stamp` of the target,
    for the donor's file of the donor or the target; a ``model+lora`` reference is stamped as
    merged), more than one donor, a tensor read from another position (a slice moving layers),
    a 2-D non-vocabulary weight the files do not cover, or statistics of the wrong size.

    ``steps`` are :func:`planned_merges` (as :func:`check_models` returns them). Reads the
    files' headers and one slice per model tensor for the stamps; no statistics tensor."""
    from mergekit_sigmoid_diff import datamerge, statistics
    from mergekit_sigmoid_diff.method import NAME, ROLE, split_roles

    stamps: dict[ModelReference, str] = {}
    shapes: dict[ModelReference, Optional[Shapes]] = {}
    checked_files: set[tuple[str, str, tuple]] = set()

    def folder(model: ModelReference) -> Path:
        if model.lora is None:
            return _model_folder(model, options)
        merged = model.merged(  # already merged by the planner: this returns its folder
            cache_dir=options.lora_merge_cache,
            trust_remote_code=options.trust_remote_code,
            lora_merge_dtype=options.lora_merge_dtype,
        )
        return Path(merged.model.path)

    def stamp(model: ModelReference) -> str:
        if model not in stamps:
            stamps[model] = statistics.model_stamp(folder(model))
        return stamps[model]

    for step in steps:
        if step.method_name != NAME:
            continue
        parameters = dict(step.parameters.items())
        if parameters.get("protect_subspace") != datamerge.DATA or not parameters.get("gate", True):
            continue
        name = step.output_weight.name
        models = [m for m in step.model_order if m != step.base_model]
        target, donors = split_roles(models, [step.input_parameters[m][ROLE] for m in models])
        if len(donors) != 1:
            raise SigmoidDiffError(
                f"protect_subspace: data takes one donor, but tensor {name} has {len(donors)} "
                f"({', '.join(str(d) for d, _ in donors)})"
            )
        donor = donors[0][0]
        files = []
        for parameter, owners in ((datamerge.TARGET_STATISTICS, (target,)), (datamerge.DONOR_STATISTICS, (donor, target))):
            path = parameters.get(parameter)
            if not path:
                raise SigmoidDiffError(
                    f"protect_subspace: data needs the parameter {parameter} (a statistics file from "
                    f"`python -m mergekit_sigmoid_diff calibrate`); tensor {name} has none"
                )
            file = datamerge.open_statistics(path, parameter)
            key = (str(file.path), parameter, owners)
            if key not in checked_files:
                if file.model_stamp not in {stamp(m) for m in owners}:
                    whose = " or the ".join(f"{'donor' if m == donor else 'target'} {m}" for m in owners)
                    raise SigmoidDiffError(
                        f"{parameter}: statistics file {file.path} was computed on another model "
                        f"({file.metadata.get('model') or 'unnamed'}, stamp {file.model_stamp or 'none'}), "
                        f"not on the {whose}: run calibrate on that model"
                    )
                checked_files.add(key)
            files.append(file)
        infos = _weight_infos(step)
        moved = next((m for m in (target, donor) if infos[m].name != name), None)
        if moved is not None:
            raise SigmoidDiffError(
                f"tensor {name} is read from {infos[moved].name} of model {moved}: protect_subspace: data "
                "needs every tensor at its own position (the statistics are keyed by the input model's names)"
            )
        if target not in shapes:
            shapes[target] = _read_headers(target, folder(target))
        held = shapes[target]
        if held is None:  # .bin weights: the merge checks the sizes per tensor
            continue
        info = infos[target]
        found = next((n for n in (info.name, *(info.aliases or ()), *(info.tied_names or ())) if n in held), None)
        if found is None:  # an optional tensor the target lacks
            continue
        shape = held[found]
        covers = [(file, datamerge.coverage(file, name)) for file in files]
        for file, cover in covers:
            if cover is not None and cover.kind == "tokens" and len(shape) == 2 and cover.size != shape[0]:
                raise SigmoidDiffError(
                    f"statistics file {file.path} counts {cover.size} tokens, but tensor {name} of the target "
                    f"has {shape[0]} rows: protect_subspace: data needs base, target and donor to share one "
                    "vocabulary (a donor that adds tokens is not supported yet: use protect_subspace: input there)"
                )
        if all(cover is None for _, cover in covers):
            if len(shape) == 2 and step.output_weight.vocabulary_axis is None:
                raise SigmoidDiffError(
                    f"tensor {name} is missing from statistics file {files[0].path} ({datamerge.TARGET_STATISTICS}) "
                    f"and {files[1].path} ({datamerge.DONOR_STATISTICS}): protect_subspace: data needs every 2-D weight; "
                    "recompute the files with calibrate, or exempt the tensor with a filter"
                )
            continue
        datamerge.check_fit(name, shape, covers)
