"""``varm`` (FuseChat's variation ratio merge) against an independent float64 numpy derivation.

The reference below is written from the paper's formula (arXiv 2402.16107, §3.3), not from
:mod:`mergekit_sigmoid_diff.varm`: per tensor m_j = mean((θ_j − θ_0)²),
w_j = m_j / Σ m (equal if Σ m = 0) or softmax(m_j / τ), out = Σ w_j θ_j.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge_methods.api import merge_tensors
from transformers import LlamaForCausalLM

from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.tiny import save_state, tiny_config
from mergekit_sigmoid_diff.varm import varm, varm_merge, variation_ratio_weights
from tests.support import load_model_tensors, run_mergekit_yaml


def reference_varm(base: np.ndarray, models: list[np.ndarray], temperature: float | None = None) -> np.ndarray:
    b = base.astype(np.float64)
    thetas = [m.astype(np.float64) for m in models]
    m = np.array([np.mean((t - b) ** 2) for t in thetas])
    if temperature is not None:
        z = np.exp((m - m.max()) / temperature)
        w = z / z.sum()
    elif m.sum() == 0:
        w = np.full(len(m), 1.0 / len(m))
    else:
        w = m / m.sum()
    return sum(wj * t for wj, t in zip(w, thetas))


def random_models(seed: int, scales: list[float], shape=(16, 24)) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + s * torch.randn(shape, generator=g) for s in scales]


@pytest.mark.parametrize("temperature", [None, 1e-4, 1e-3, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_float64_reference(seed, temperature):
    base, models = random_models(seed, [0.002, 0.01, 0.03])
    out, _ = varm(base.double(), [m.double() for m in models], temperature)
    expected = reference_varm(base.numpy(), [m.numpy() for m in models], temperature)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)


def test_float32_and_bfloat16_inputs_follow_the_reference():
    base, models = random_models(3, [0.01, 0.05])
    for dtype, atol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-6)):
        b, ms = base.to(dtype), [m.to(dtype) for m in models]
        out, _ = varm(b, ms)
        assert out.dtype == torch.float32
        expected = reference_varm(b.float().numpy(), [m.float().numpy() for m in ms])
        np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=atol)


def test_the_model_that_moved_more_weighs_more_and_weights_sum_to_one():
    base, models = random_models(4, [0.01, 0.03])
    _, weights = varm(base, models)
    assert weights[1] > weights[0]
    assert sum(weights) == pytest.approx(1.0, abs=1e-12)
    # m ∝ scale², so the ratio of weights is about (0.03 / 0.01)² = 9
    assert weights[1] / weights[0] == pytest.approx(9.0, rel=0.2)


def test_no_change_at_all_gives_equal_weights_and_the_base():
    base = torch.randn(5, 7)
    assert variation_ratio_weights([0.0, 0.0, 0.0]) == pytest.approx([1 / 3] * 3)
    out, weights = varm(base, [base.clone(), base.clone()])
    assert weights == pytest.approx([0.5, 0.5])
    torch.testing.assert_close(out, base, rtol=0, atol=0)


def test_temperature_limits():
    """τ → ∞: equal weights; τ → 0: the model that moved most takes everything."""
    changes = [1e-4, 4e-4, 2e-4]
    assert variation_ratio_weights(changes, 1e3) == pytest.approx([1 / 3] * 3, abs=1e-6)
    assert variation_ratio_weights(changes, 1e-7) == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)


def test_through_mergekit_api_with_the_base_anywhere():
    base, models = random_models(5, [0.02, 0.005, 0.01])
    tensors = [models[0], base, models[1], models[2]]
    out = merge_tensors(tensors, varm_merge, base_index=1, parameters={"temperature": 1e-4}, name="w")
    expected = reference_varm(base.numpy(), [m.numpy() for m in models], 1e-4)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)


def test_non_finite_input_names_the_tensor_and_model():
    base, models = random_models(6, [0.01, 0.01])
    models[1][2, 3] = float("nan")
    with pytest.raises(SigmoidDiffError, match=r"^varm: tensor layer\.w of model bad contains NaN or Inf$"):
        merge_tensors([base, *models], varm_merge, base_index=0, ids=["b", "ok", "bad"], name="layer.w")


@pytest.fixture(scope="module")
def recipe_check():
    from mergekit_sigmoid_diff import preflight
    from mergekit_sigmoid_diff.plugin import activate

    activate()
    return lambda recipe: preflight.check_recipe(MergeConfiguration.model_validate(recipe))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"models": [{"model": "/m/a", "parameters": {"weight": 1.0}}, {"model": "/m/b"}]},
         r"^unknown parameter 'weight' in the parameters of model /m/a; varm takes: temperature$"),
        ({"models": [{"model": "/m/a"}]},
         r"^varm: models needs at least 2 models besides base_model \(found /m/a\)$"),
        ({"parameters": {"temperature": -1.0}}, r"^parameter temperature=-1.0 in the top-level parameters: "),
        ({"base_model": None}, r"^varm needs base_model: the common ancestor of the models it merges$"),
    ],
)
def test_recipe_mistakes_are_one_line_errors(recipe_check, change, message):
    recipe = {"merge_method": "varm", "base_model": "/m/base", "models": [{"model": "/m/a"}, {"model": "/m/b"}]}
    recipe.update(change)
    with pytest.raises(SigmoidDiffError, match=message):
        recipe_check(recipe)


def test_registered_next_to_sigmoid_diff(recipe_check):
    from mergekit.merge_methods import registry

    from mergekit_sigmoid_diff.plugin import method_names

    assert {"sigmoid_diff", "varm"} <= method_names()
    assert registry.get("varm") is varm_merge


# --- end to end: plain mergekit-yaml in a subprocess ---------------------------------------


@pytest.fixture(scope="module")
def finetunes(tmp_path_factory):
    """A base and three 'fine-tunes' that moved different tensor kinds by different amounts,
    so the per-tensor weights differ from tensor to tensor."""
    root = tmp_path_factory.mktemp("varm")
    config = tiny_config()
    torch.manual_seed(7)
    base = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    moves = {  # model -> (scale on attention tensors, scale elsewhere)
        "attn": (0.03, 0.003),
        "mlp": (0.003, 0.03),
        "even": (0.01, 0.01),
    }
    paths = {"base": save_state(base, config, root / "base")}
    for j, (label, (attention, other)) in enumerate(moves.items()):
        g = torch.Generator().manual_seed(100 + j)
        state = {
            k: v + (attention if "self_attn" in k else other) * torch.randn(v.shape, generator=g)
            for k, v in base.items()
        }
        paths[label] = save_state(state, config, root / label)
    return paths


@pytest.mark.slow
def test_mergekit_yaml_varm_matches_the_reference_per_tensor(finetunes, tmp_path):
    labels = ["attn", "mlp", "even"]
    recipe = {
        "merge_method": "varm",
        "base_model": str(finetunes["base"]),
        "models": [{"model": str(finetunes[label])} for label in labels],
        # paper's ratio everywhere, except a softmax whose τ goes 1e-4 → 1e-3 over the MLP layers
        "parameters": {"temperature": [{"filter": "mlp", "value": [1e-4, 1e-3]}]},
        "dtype": "float32",
    }
    result = run_mergekit_yaml(recipe, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]

    out = load_model_tensors(tmp_path / "out")
    base = load_model_tensors(finetunes["base"])
    models = [load_model_tensors(finetunes[label]) for label in labels]
    assert set(out) == set(base)
    for name, merged in out.items():
        layer = re.search(r"\.layers\.(\d+)\.", name)
        t = int(layer.group(1)) / (2 - 1) if layer else 0.0  # mergekit: t = layer / (layers − 1)
        temperature = 1e-4 + t * (1e-3 - 1e-4) if "mlp" in name else None
        expected = reference_varm(base[name].numpy(), [m[name].numpy() for m in models], temperature)
        np.testing.assert_allclose(merged.numpy(), expected, rtol=0, atol=2e-6, err_msg=name)
    # the weights are per tensor: attention follows the model that moved attention most,
    # the MLP the one that moved the MLP most
    def distance(name: str, label: str) -> float:
        return (out[name] - models[labels.index(label)][name]).norm().item()

    q, down = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"
    assert distance(q, "attn") < distance(q, "mlp")
    assert distance(down, "mlp") < distance(down, "attn")
