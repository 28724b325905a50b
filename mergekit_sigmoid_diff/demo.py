"""The main job on tiny models built here: ``python -m mergekit_sigmoid_diff demo``.

1. builds a tiny Llama base B, a target T = B + heavy-tailed drift and a donor
   I = B + Gaussian diff (4 layers, hidden 64) under ``--workdir``;
2. writes the recipe and runs the real ``mergekit-yaml`` on it, as a user would;
3. evaluates the merged model: per layer, the mean applied fraction ``1 − ratio`` the
   gate chose (``inspect``) and the effective λ measured on the output,
   λ_eff = ⟨out − T, I − B⟩ / ⟨I − B, I − B⟩, plus the largest deviation of any output
   element from a float64 evaluation of the published formula.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
import yaml
from safetensors.torch import load_file

from mergekit_sigmoid_diff import kernel
from mergekit_sigmoid_diff.inspection import inspect_recipe, layer_index
from mergekit_sigmoid_diff.tiny import build_triple, tiny_config


def write_recipe(workdir: Path, paths: dict) -> Path:
    recipe = {
        "merge_method": "sigmoid_diff",
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths["target"]), "parameters": {"role": "target"}},
            {"model": str(paths["donors"][0]), "parameters": {"weight": 1.0}},
        ],
        "parameters": {"steepness": 12, "midpoint": 0.5},
        "dtype": "float32",
    }
    path = workdir / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def mergekit_yaml() -> str:
    """The ``mergekit-yaml`` beside this interpreter (the one pip installed), else on PATH."""
    sibling = Path(sys.executable).with_name("mergekit-yaml")
    return str(sibling) if sibling.exists() else (shutil.which("mergekit-yaml") or "mergekit-yaml")


def evaluate(paths: dict, merged: Path) -> tuple[dict, float]:
    """Per-layer λ_eff measured on the output, and the worst deviation from float64."""
    base, target, donor, out = (
        load_file(Path(p) / "model.safetensors") for p in (paths["base"], paths["target"], paths["donors"][0], merged)
    )
    dots: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    worst = 0.0
    for name, result in out.items():
        b, t, i = base[name].double(), target[name].double(), donor[name].double()
        diff = i - b
        layer = layer_index(name)
        row = dots["model" if layer is None else str(layer)]
        row[0] += torch.dot((result.double() - t).flatten(), diff.flatten()).item()
        row[1] += torch.dot(diff.flatten(), diff.flatten()).item()
        expected = kernel.sigmoid_diff(b, t, [i], [1.0])  # float64 inputs: float64 arithmetic
        worst = max(worst, (result.double() - expected).abs().max().item())
    return {row: num / den for row, (num, den) in dots.items() if den > 0}, worst


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="python -m mergekit_sigmoid_diff demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo-out"), help="where models and output go")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv))
    workdir = args.workdir.absolute()
    if workdir.exists():
        shutil.rmtree(workdir)  # the demo owns this folder: rebuild from scratch
    workdir.mkdir(parents=True)

    print(f"building tiny base/target/donor under {workdir}")
    paths = build_triple(
        workdir / "models", seed=args.seed, config=tiny_config(num_hidden_layers=4, hidden_size=64, intermediate_size=128)
    )
    recipe = write_recipe(workdir, paths)
    merged = workdir / "merged"
    command = [mergekit_yaml(), str(recipe), str(merged)]
    print("running:", " ".join(command))
    subprocess.run(command, check=True)

    fractions: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for report in inspect_recipe(recipe, quiet=True)[0]:  # element-weighted mean per layer
        row = fractions["model" if report.layer is None else str(report.layer)]
        row[0] += report.applied_fraction * report.numel
        row[1] += report.numel
    lambdas, worst = evaluate(paths, merged)
    print("\nlayer   mean applied fraction (1 − ratio)   λ_eff measured on the output")
    for row in sorted(lambdas, key=lambda r: (r == "model", int(r) if r.isdigit() else 0)):
        print(f"{row:>5}   {fractions[row][0] / fractions[row][1]:>33.3f}   {lambdas[row]:>28.3f}")
    print(f"\nlargest |output − float64 published formula|: {worst:.2e}")
    print(f"merged model: {merged}")
