"""Shared helpers for tests: write a recipe, run the real ``mergekit-yaml``, read tensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

MERGEKIT_YAML = str(Path(sys.executable).with_name("mergekit-yaml"))


def one_donor_recipe(paths: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A sigmoid_diff recipe over a ``build_triple`` triple: its target and first donor."""
    return {
        "merge_method": "sigmoid_diff",
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths["target"]), "parameters": {"role": "target"}},
            {"model": str(paths["donors"][0])},
        ],
        **top,
    }


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_mergekit_yaml(
    recipe: dict[str, Any] | Path,
    out: Path,
    *extra: str,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> subprocess.CompletedProcess:
    """Run ``mergekit-yaml RECIPE OUT`` (or ``command RECIPE OUT``) in a subprocess, as a user would."""
    out = Path(out)
    if isinstance(recipe, dict):
        recipe = write_recipe(out.parent / f"{out.name}.yml", recipe)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [*(command or [MERGEKIT_YAML]), str(recipe), str(out), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        **kwargs,
    )


def load_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder (one or more safetensors shards)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors
