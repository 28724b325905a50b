"""Recipe errors not covered by test_method_errors.py: ``normalize`` values and names, and
the guarantee that a bad recipe stops the merge before any file or folder is written."""

from __future__ import annotations


import pytest
import torch
from mergekit.config import MergeConfiguration

from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.preflight import check_recipe
from tests.reference import applied_fraction as reference_fraction
from tests.support import NORMALIZE_OPTIONS, load_model_tensors, merge_in_process, one_donor_recipe


def recipe(triple=None, parameters=None, **top) -> dict:
    paths = triple or {"base": "/models/base", "target": "/models/target", "donors": ["/models/donor"]}
    return one_donor_recipe(paths, parameters=parameters or {}, **top)


@pytest.mark.parametrize("option", NORMALIZE_OPTIONS)
def test_every_documented_normalize_option_passes_the_checks_and_reaches_the_kernel(option, triple, tmp_path):
    """Not "no exception" alone: the option merges, to its documented definition (float64)."""
    config = MergeConfiguration.model_validate(recipe(triple, parameters={"normalize": option}))
    assert check_recipe(config) is not None  # a transfer plan: target and donor found
    merge_in_process(recipe(triple, parameters={"normalize": option}), tmp_path / option)
    merged = load_model_tensors(tmp_path / option)
    name = "model.layers.1.mlp.up_proj.weight"
    b, t, i = (load_model_tensors(p)[name].double() for p in (triple["base"], triple["target"], triple["donors"][0]))
    want = t + reference_fraction((t - b).abs(), option) * (i - b)  # the documented definition
    torch.testing.assert_close(merged[name].double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("value", ["min-max", "MINMAX", "", 1])
def test_unknown_normalize_value_is_one_line_listing_the_options(value):
    with pytest.raises(SigmoidDiffError) as caught:
        check_recipe(MergeConfiguration.model_validate(recipe(parameters={"normalize": value})))
    assert str(caught.value) == (
        f"parameter normalize={value!r} in the top-level parameters: Input should be 'minmax', 'quantile' or 'rank'"
    )


def test_misspelt_normalize_suggests_the_name():
    with pytest.raises(SigmoidDiffError, match=r"^unknown parameter 'normalise' in the top-level parameters \(did you mean 'normalize'\?\)"):
        check_recipe(MergeConfiguration.model_validate(recipe(parameters={"normalise": "rank"})))


BAD = {
    "missing base_model": (dict(base_model=None), r"^sigmoid_diff needs base_model"),
    "misspelt parameter": (dict(parameters={"midpiont": 0.5}), r"^unknown parameter 'midpiont' .*did you mean 'midpoint'"),
    "unknown normalize value": (dict(parameters={"normalize": "zscore"}), r"^parameter normalize='zscore'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_recipe_stops_the_merge_before_anything_is_written(case, triple, tmp_path, no_tensor_reads):
    changes, pattern = BAD[case]
    out = tmp_path / "deep" / "out"
    with pytest.raises(SigmoidDiffError, match=pattern):
        merge_in_process(recipe(triple, **changes), out)
    assert list(tmp_path.iterdir()) == []  # not even OUT's parent or a staging folder
