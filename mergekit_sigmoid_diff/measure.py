"""Measurements on merged model folders (torch and safetensors only).

The effective λ of a transfer says how much of the donor's diff reached the output:

    λ_eff = ⟨out − T, I − B⟩ / ⟨I − B, I − B⟩

summed over every tensor the four folders share, in float64. ``task_arithmetic``
(out = T + λ·(I − B)) has λ_eff = λ exactly; a gate or a projection that removes part of
the diff has a smaller λ_eff than its weight. It is the fair partner for a comparison: a
method is better only if it beats ``task_arithmetic`` at the same λ_eff (and at its best λ).
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Hashable, Iterator

import torch
from safetensors import safe_open

__all__ = ["effective_lambda", "effective_lambda_by", "tensor_names"]

Folder = str | os.PathLike


def _shards(folder: Folder) -> list[Path]:
    shards = sorted(Path(folder).glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    return shards


def tensor_names(folder: Folder) -> dict[str, Path]:
    """tensor name → the shard that holds it (headers only)."""
    names: dict[str, Path] = {}
    for shard in _shards(folder):
        with safe_open(str(shard), framework="pt") as handle:
            names.update((name, shard) for name in handle.keys())
    return names


def _shared_tensors(*folders: Folder) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """(name, [the tensor in each folder]) for every name all folders hold, one at a time."""
    maps = [tensor_names(f) for f in folders]
    shared = sorted(set.intersection(*(set(m) for m in maps)))
    with ExitStack() as stack:
        handles: dict[Path, object] = {}
        for name in shared:
            tensors = []
            for names in maps:
                shard = names[name]
                if shard not in handles:
                    handles[shard] = stack.enter_context(safe_open(str(shard), framework="pt"))
                tensors.append(handles[shard].get_tensor(name))
            yield name, tensors


def effective_lambda_by(
    out: Folder, target: Folder, donor: Folder, base: Folder, key: Callable[[str], Hashable]
) -> dict[Hashable, float]:
    """λ_eff = ⟨out − T, I − B⟩ / ⟨I − B, I − B⟩ per group of tensors, ``key(name)`` naming
    each tensor's group (NaN for a group where I = B).

    Streams one tensor at a time; non-float tensors are left out; a tensor whose shape differs
    between the folders (a vocabulary that grew) is compared on the rows all four share.
    """
    dots: dict[Hashable, list[float]] = {}
    for name, tensors in _shared_tensors(out, target, donor, base):
        if not tensors[0].is_floating_point():
            continue
        rows = min(t.shape[0] for t in tensors) if tensors[0].dim() else None
        o, t, i, b = (x[:rows].double() if rows is not None else x.double() for x in tensors)
        diff = i - b
        group = dots.setdefault(key(name), [0.0, 0.0])
        group[0] += torch.dot((o - t).flatten(), diff.flatten()).item()
        group[1] += torch.dot(diff.flatten(), diff.flatten()).item()
    return {k: num / den if den else float("nan") for k, (num, den) in dots.items()}


def effective_lambda(out: Folder, target: Folder, donor: Folder, base: Folder) -> float:
    """λ_eff over all shared tensors (:func:`effective_lambda_by` with one group; NaN if I = B)."""
    return effective_lambda_by(out, target, donor, base, key=lambda name: None).get(None, float("nan"))
