"""Checks that run before mergekit loads any tensor or writes any file.

- :func:`check_recipe`: mergekit resolves parameters per tensor while planning and
  silently ignores names a method does not declare; this turns every recipe mistake
  into one :class:`SigmoidDiffError` line naming the parameter, model or slice at fault.
- :func:`check_models`: reads only each model's ``config.json`` and safetensors
  headers (a few kB per shard) and reports a missing config, a corrupt file, mixed
  architectures, a tensor missing from a model, or shapes that disagree, naming the
  tensor and the models, before mergekit starts a merge that would fail midway.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import safetensors
from mergekit.common import ModelReference
from mergekit.config import ConditionalParameter, MergeConfiguration
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import ParameterScope, ParameterSpec
from mergekit.options import MergeOptions
from pydantic import ValidationError

from mergekit_sigmoid_diff.errors import SigmoidDiffError

Settings = Optional[Mapping[str, Any]]


def check_recipe(config: MergeConfiguration) -> None:
    """Raise :class:`SigmoidDiffError` for the first problem found in ``config``."""
    method = config.merge_method
    method_spec = registry.get(method).spec
    specs = {p.name: p for p in method_spec.parameters}
    has_roles = "role" in specs  # sigmoid_diff: one target and donors; varm: a plain list
    if config.base_model is None:
        merged = "target and donors" if has_roles else "the models it merges"
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

    for where, base, models in _input_groups(config):
        if has_roles:
            _check_roles(where, base, models)
        else:
            _check_model_count(method, where, base, models, method_spec.contract.min_non_base or 1)


def _validate(spec: ParameterSpec, value: Any, where: str) -> None:
    try:
        spec.validate(value)
    except ValidationError as error:
        reason = error.errors()[0]["msg"]
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


def _input_groups(config: MergeConfiguration):
    """(location, base, [(model, [settings from most to least specific])]) per merge."""
    top = config.parameters
    if config.models:
        yield "models", config.base_model, [(m.model, [m.parameters, top]) for m in config.models]
    for i, s in enumerate(config.slices or ()):
        base = s.base_model or config.base_model
        yield f"slices[{i}]", base, [(src.model, [src.parameters, s.parameters, top]) for src in s.sources]
    for name, module in (config.modules or {}).items():
        if module.models:
            yield (
                f"module {name}",
                config.base_model,
                [(m.model, [m.parameters, module.parameters, top]) for m in module.models],
            )
        for i, s in enumerate(module.slices or ()):
            base = s.base_model or config.base_model
            yield (
                f"module {name} slices[{i}]",
                base,
                [(src.model, [src.parameters, s.parameters, module.parameters, top]) for src in s.sources],
            )


def _check_roles(where: str, base: Any, models: Sequence[tuple[Any, list[Settings]]]) -> None:
    targets, donors = [], []
    for model, scopes in models:
        own = scopes[0] or {}
        if model == base:
            if "role" in own:
                raise SigmoidDiffError(
                    f"base_model {model} is the common ancestor and takes no role (in {where})"
                )
            continue
        role = next((s["role"] for s in scopes if s and "role" in s), "donor")
        if not isinstance(role, str):
            raise SigmoidDiffError(
                f"role of model {model} in {where} must be a single value (target or donor), "
                "not a gradient or filter"
            )
        (targets if role == "target" else donors).append(model)
    if len(targets) != 1:
        found = ", ".join(str(m) for m in targets) or "none"
        raise SigmoidDiffError(
            f"{where} needs exactly one model with role: target (found {found})"
        )
    if not donors:
        raise SigmoidDiffError(
            f"{where} has a target ({targets[0]}) but no donor model: add the model whose "
            "feature you transfer"
        )


def _check_model_count(method: str, where: str, base: Any, models: Sequence[tuple[Any, Any]], minimum: int) -> None:
    merged = [model for model, _ in models if model != base]
    if len(merged) < minimum:
        found = ", ".join(str(m) for m in merged) or "none"
        raise SigmoidDiffError(
            f"{method}: {where} needs at least {minimum} models besides base_model (found {found})"
        )
