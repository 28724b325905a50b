"""Recipe errors not covered by test_method_errors.py: ``normalize`` values and names, and
the guarantee that a bad recipe stops the merge before any file or folder is written."""

from __future__ import annotations


import pytest
from mergekit.config import MergeConfiguration

from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.preflight import check_recipe
from tests.support import merge_in_process, normalize_options, one_donor_recipe


def recipe(triple=None, parameters=None, **top) -> dict:
    paths = triple or {"base": "/models/base", "target": "/models/target", "donors": ["/models/donor"]}
    return one_donor_recipe(paths, parameters=parameters or {}, **top)


def test_normalize_declares_its_options():
    assert "minmax" in normalize_options()  # the published gate stays available


@pytest.mark.parametrize("option", normalize_options())
def test_every_declared_normalize_option_is_accepted(option):
    check_recipe(MergeConfiguration.model_validate(recipe(parameters={"normalize": option})))


@pytest.mark.parametrize("value", ["min-max", "MINMAX", "", 1])
def test_unknown_normalize_value_lists_the_options(value):
    with pytest.raises(SigmoidDiffError, match=rf"^parameter normalize={value!r} in the top-level parameters: ") as caught:
        check_recipe(MergeConfiguration.model_validate(recipe(parameters={"normalize": value})))
    message = str(caught.value)
    assert "\n" not in message
    assert all(repr(option) in message for option in normalize_options()), message


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
