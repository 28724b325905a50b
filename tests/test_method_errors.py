"""Every recipe error of the method gives one line naming the culprit, before any write."""

from __future__ import annotations

import math

import pytest
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge_methods import merge_tensors

from mergekit_sigmoid_diff import register
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.preflight import check_recipe
from tests.support import run_mergekit_yaml

register()


def recipe(target_params=None, donor_params=None, parameters=None, **top):
    config = {
        "merge_method": "sigmoid_diff",
        "base_model": "/models/base",
        "models": [
            {"model": "/models/target", "parameters": target_params if target_params is not None else {"role": "target"}},
            {"model": "/models/donor", "parameters": donor_params or {}},
        ],
        "parameters": parameters or {},
    }
    config.update(top)
    return config


CASES = {
    "no target": (recipe(target_params={}), r"exactly one model with role: target \(found none\)"),
    "two targets": (
        recipe(donor_params={"role": "target"}),
        r"exactly one model with role: target \(found /models/target, /models/donor\)",
    ),
    "unknown role": (recipe(donor_params={"role": "doner"}), r"parameter role='doner' in the parameters of model /models/donor"),
    "no donor": (
        {**recipe(), "models": [{"model": "/models/target", "parameters": {"role": "target"}}]},
        r"has a target \(/models/target\) but no donor model",
    ),
    "steepness zero": (recipe(parameters={"steepness": 0}), r"parameter steepness=0 in the top-level parameters: expected a finite number > 0$"),
    "steepness negative in gradient": (recipe(parameters={"steepness": [12, -1]}), r"parameter steepness=-1"),
    "midpoint above 1": (recipe(parameters={"midpoint": 1.5}), r"parameter midpoint=1.5 .*: expected a number in \[0, 1\]$"),
    "midpoint below 0 in filter": (
        recipe(parameters={"midpoint": [{"filter": "mlp", "value": -0.1}, {"value": 0.5}]}),
        r"parameter midpoint=-0.1",
    ),
    "nan weight": (recipe(donor_params={"weight": math.nan}), r"parameter weight=nan in the parameters of model /models/donor: .*finite"),
    "infinite eps": (recipe(parameters={"eps": math.inf}), r"parameter eps=inf .*finite"),
    "misspelt parameter": (recipe(parameters={"steepnes": 12}), r"unknown parameter 'steepnes' .*did you mean 'steepness'"),
    "shared parameter on a model": (recipe(donor_params={"midpoint": 0.4}), r"'midpoint' in the parameters of model /models/donor is shared"),
    "weight on the target": (
        recipe(target_params={"role": "target", "weight": 0.5}),
        r"weight applies to donors; model /models/target in models is the target",
    ),
    "missing base_model": (recipe(base_model=None), r"needs base_model"),
    "unknown protect_subspace": (
        recipe(parameters={"protect_subspace": "sideways"}),
        r"parameter protect_subspace='sideways' in the top-level parameters: .*'none', 'input', 'output', 'both' or 'data'",
    ),
    "protect_energy above 1": (recipe(parameters={"protect_energy": [0.5, 1.2]}), r"parameter protect_energy=1.2 .*: expected a number in \[0, 1\]$"),
    "role on the base": (
        {**recipe(), "models": recipe()["models"] + [{"model": "/models/base", "parameters": {"role": "donor"}}]},
        r"base_model /models/base is the common ancestor and takes no role",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_recipe_error_names_the_culprit(case):
    config, pattern = CASES[case]
    with pytest.raises(SigmoidDiffError, match=pattern) as caught:
        check_recipe(MergeConfiguration.model_validate(config))
    assert "\n" not in str(caught.value)


def test_a_good_recipe_passes():
    check_recipe(MergeConfiguration.model_validate(recipe(donor_params={"weight": [0.5, 1.0]}, parameters={"steepness": 8})))


@pytest.mark.slow
def test_cli_prints_one_line_and_writes_nothing(triple, tmp_path):
    config = recipe(parameters={"midpoint": 2})
    config["base_model"] = str(triple["base"])
    config["models"][0]["model"] = str(triple["target"])
    config["models"][1]["model"] = str(triple["donors"][0])
    out = tmp_path / "out"
    result = run_mergekit_yaml(config, out)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "Error: parameter midpoint=2 in the top-level parameters" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("culprit", [0, 1, 2])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_names_tensor_and_model(culprit, bad):
    tensors = [torch.randn(4, 4) for _ in range(3)]
    tensors[culprit][1, 2] = bad
    ids = ["base-model", "target-model", "donor-model"]
    with pytest.raises(SigmoidDiffError, match=rf"tensor model.layers.0.mlp.up_proj.weight of model {ids[culprit]} contains NaN or Inf"):
        merge_tensors(
            tensors,
            "sigmoid_diff",
            ids=ids,
            base_index=0,
            name="model.layers.0.mlp.up_proj.weight",
            parameters={"role": {"target-model": "target", "donor-model": "donor"}},
        )


# --- one rule for the gate parameters: GateSettings and the recipe checks agree ----------------

# (parameter, value, valid?) written from the documented ranges, not read from the code:
# steepness > 0 finite; midpoint, protect_energy in [0, 1]; eps >= 0 finite; quantile in (0, 1]
GATE_VALUES = [
    ("steepness", 12.0, True), ("steepness", 1e-9, True), ("steepness", 0.0, False), ("steepness", -1.0, False),
    ("steepness", math.inf, False), ("steepness", math.nan, False),
    ("midpoint", 0.0, True), ("midpoint", 1.0, True), ("midpoint", -0.01, False), ("midpoint", 1.01, False),
    ("midpoint", math.nan, False),
    ("eps", 0.0, True), ("eps", 1e-6, True), ("eps", -1e-9, False), ("eps", math.inf, False), ("eps", math.nan, False),
    ("quantile", 1.0, True), ("quantile", 0.5, True), ("quantile", 0.0, False), ("quantile", 1.5, False),
    ("quantile", math.nan, False),
    ("protect_energy", 0.0, True), ("protect_energy", 1.0, True), ("protect_energy", 1.2, False),
    ("protect_energy", -0.1, False), ("protect_energy", math.inf, False),
]


@pytest.mark.parametrize("name, value, valid", GATE_VALUES, ids=[f"{n}={v}" for n, v, _ in GATE_VALUES])
def test_gate_settings_and_recipe_checks_apply_one_rule(name, value, valid):
    from mergekit_sigmoid_diff.kernel import GateSettings

    config = MergeConfiguration.model_validate(recipe(parameters={name: value}))
    if valid:
        GateSettings(**{name: value})
        check_recipe(config)
        return
    with pytest.raises(ValueError) as in_kernel:
        GateSettings(**{name: value})
    with pytest.raises(SigmoidDiffError) as in_recipe:
        check_recipe(config)
    kernel_reason = str(in_kernel.value).split(": ", 1)[1]
    assert str(in_recipe.value).endswith(f": {kernel_reason}")  # the same reason, word for word
    assert kernel_reason.startswith("expected ")
