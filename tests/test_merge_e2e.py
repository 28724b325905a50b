"""Real ``mergekit-yaml`` runs in a subprocess, compared with the float64 reference."""

from __future__ import annotations

import re

import pytest
import torch

from tests.reference import published_formula, reference_transfer
from tests.support import EXEMPT_VOCAB_AND_NORMS, load_model_tensors, one_donor_recipe, run_mergekit_yaml

pytestmark = pytest.mark.slow


def layer_t(name: str, layers: int = 2) -> float:
    """mergekit's gradient position: layer / (layers − 1); non-layer tensors take t = 0."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) / (layers - 1) if match else 0.0


def assert_matches(out_dir, paths, params_for, tolerance=2e-6):
    out = load_model_tensors(out_dir)
    base = load_model_tensors(paths["base"])
    target = load_model_tensors(paths["target"])
    donors = [load_model_tensors(d) for d in paths["donors"]]
    assert set(out) == set(base)
    worst = 0.0
    for name, merged in out.items():
        weights, knobs = params_for(name)
        expected = published_formula(base[name], target[name], [d[name] for d in donors], weights, **knobs)
        worst = max(worst, (merged.double() - expected).abs().max().item())
    assert worst <= tolerance, worst
    return out


@pytest.fixture(scope="module")
def one_donor_merge(triple, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "one"
    recipe = one_donor_recipe(triple, dtype="float32")
    result = run_mergekit_yaml(recipe, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_one_donor_defaults_match_the_published_formula(one_donor_merge, triple):
    assert_matches(one_donor_merge, triple, lambda name: ([1.0], {}))


def test_model_card_names_the_method_and_links_the_reference(one_donor_merge):
    card = (one_donor_merge / "README.md").read_text()
    assert "Sigmoid Diff" in card
    assert "https://github.com/StableFluffy/EasyLLMFeaturePorter" in card


def test_two_donors_weights_gradient_and_filter(triple2, tmp_path):
    recipe = {
        "merge_method": "sigmoid_diff",
        "base_model": str(triple2["base"]),
        "models": [
            {"model": str(triple2["target"]), "parameters": {"role": "target"}},
            {"model": str(triple2["donors"][0]), "parameters": {"weight": [0.4, 1.2]}},
            {"model": str(triple2["donors"][1]), "parameters": {"weight": 0.7}},
        ],
        "parameters": {
            "steepness": [6.0, 18.0],
            "midpoint": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}],
        },
        "dtype": "float32",
        "out_dtype": "float32",
    }
    result = run_mergekit_yaml(recipe, tmp_path / "two")
    assert result.returncode == 0, result.stderr[-3000:]

    def params(name):
        t = layer_t(name)
        knobs = {"steepness": 6.0 + 12.0 * t, "midpoint": 0.3 if "mlp" in name else 0.6}
        return [0.4 + 0.8 * t, 0.7], knobs

    assert_matches(tmp_path / "two", triple2, params)


def test_bf16_compute_dtype_and_out_dtype_are_honoured(triple, tmp_path):
    recipe = one_donor_recipe(triple, dtype="bfloat16", out_dtype="bfloat16")
    result = run_mergekit_yaml(recipe, tmp_path / "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    out = load_model_tensors(tmp_path / "bf16")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    base, target, donor = (load_model_tensors(p) for p in (triple["base"], triple["target"], triple["donors"][0]))
    for name, merged in out.items():
        # inputs rounded to bf16 (the recipe's dtype), math in float32, one rounding to bf16 at the end
        expected = published_formula(*(m[name].bfloat16() for m in (base, target)), [donor[name].bfloat16()], [1.0])
        assert torch.equal(merged, expected.bfloat16()) or (
            (merged.double() - expected).abs() <= expected.abs() * 2**-8 + 1e-30
        ).all(), name




@pytest.mark.parametrize("side", ["input", "output", "both"])
def test_protect_subspace_matches_a_float64_svd(triple2, tmp_path, side):
    """Two donors (weights by layer), a protect_energy gradient; vocabulary and norms exempt."""
    recipe = {
        "merge_method": "sigmoid_diff",
        "base_model": str(triple2["base"]),
        "models": [
            {"model": str(triple2["target"]), "parameters": {"role": "target"}},
            {"model": str(triple2["donors"][0]), "parameters": {"weight": [1.0, 1.4]}},
            {"model": str(triple2["donors"][1]), "parameters": {"weight": 0.5}},
        ],
        "parameters": {"protect_subspace": side, "protect_energy": [0.3, 0.7], "gate": EXEMPT_VOCAB_AND_NORMS},
        "dtype": "float32",
    }
    result = run_mergekit_yaml(recipe, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    out, base, target = (load_model_tensors(p) for p in (tmp_path / "out", triple2["base"], triple2["target"]))
    donors = [load_model_tensors(d) for d in triple2["donors"]]
    projected = 0
    for name, merged in out.items():
        t = layer_t(name)
        exempt = any(key in name for key in ("embed_tokens", "lm_head", "norm"))
        knobs = {"gate": not exempt, "protect_subspace": side, "protect_energy": 0.3 + 0.4 * t}
        weights = [1.0 + 0.4 * t, 0.5]
        want = reference_transfer(base[name], target[name], [d[name] for d in donors], weights, knobs)
        assert (merged.double() - want).abs().max().item() <= 2e-6, name
        if not exempt and merged.dim() == 2:
            plain = target[name].double() + sum(w * (d[name].double() - base[name].double()) for d, w in zip(donors, weights))
            projected += (merged.double() - plain).abs().max().item() > 1e-4  # the projection did act
    assert projected >= 10


def test_protect_subspace_in_bf16(triple, tmp_path):
    recipe = one_donor_recipe(
        triple, dtype="bfloat16", out_dtype="bfloat16",
        parameters={"protect_subspace": "input", "protect_energy": 0.5, "gate": EXEMPT_VOCAB_AND_NORMS},
    )
    result = run_mergekit_yaml(recipe, tmp_path / "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    out = load_model_tensors(tmp_path / "bf16")
    base, target, donor = (load_model_tensors(p) for p in (triple["base"], triple["target"], triple["donors"][0]))
    name = "model.layers.1.mlp.down_proj.weight"
    knobs = {"protect_subspace": "input", "protect_energy": 0.5}
    want = reference_transfer(*(m[name].bfloat16() for m in (base, target)), [donor[name].bfloat16()], [1.0], knobs)
    assert out[name].dtype == torch.bfloat16
    assert ((out[name].double() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()
