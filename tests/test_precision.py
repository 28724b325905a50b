"""bf16 and fp16 inputs are computed in float32: the stored half-precision output is the
float64 result of the published formula, rounded once to the output dtype."""

from __future__ import annotations

import pytest
import torch

from mergekit_sigmoid_diff import kernel
from mergekit_sigmoid_diff.tiny import build_triple
from tests.reference import published_formula
from tests.support import load_model_tensors, merge_in_process

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def rounding_bound(reference: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half an ulp of ``dtype`` at the float64 ``reference`` (round to nearest), plus
    float32 arithmetic error (a few units of 2^-24 of the operands' ``scale``), which
    can tip a value lying almost exactly between two ``dtype`` numbers."""
    info = torch.finfo(dtype)
    magnitude = reference.abs().clamp_min(info.tiny)  # below tiny the spacing is constant
    _, exponent = torch.frexp(magnitude)  # magnitude = m · 2^exponent, m ∈ [0.5, 1)
    ulp = info.eps * torch.pow(2.0, (exponent - 1).double())
    return 0.5 * ulp + 8 * 2.0**-24 * scale


@pytest.mark.parametrize("name", DTYPES)
def test_kernel_computes_half_inputs_in_float32(name):
    dtype = DTYPES[name]
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(64, 48, generator=generator).to(dtype)
    target = (base.double() + 0.05 * torch.randn(64, 48, generator=generator, dtype=torch.float64)).to(dtype)
    donor = (base.double() + 0.02 * torch.randn(64, 48, generator=generator, dtype=torch.float64)).to(dtype)

    out = kernel.sigmoid_diff(base, target, [donor], [0.7])
    reference = published_formula(base, target, [donor], [0.7])
    scale = target.double().abs() + 0.7 * (donor.double() - base.double()).abs()
    assert out.dtype == torch.float32
    # float32 arithmetic: far inside one ulp of the half-precision input dtype
    assert ((out.double() - reference).abs() <= 8 * 2.0**-24 * (scale + reference.abs())).all()
    stored = out.to(dtype).double()
    assert ((stored - reference).abs() <= rounding_bound(reference, scale, dtype)).all()


@pytest.mark.parametrize("name", DTYPES)
def test_merged_half_precision_model_is_within_rounding_of_float64(name, tmp_path):
    dtype = DTYPES[name]
    triple = build_triple(tmp_path / "models", seed=11, dtype=dtype)
    out = tmp_path / "out"
    merge_in_process(
        {
            "merge_method": "sigmoid_diff",
            "base_model": str(triple["base"]),
            "models": [
                {"model": str(triple["target"]), "parameters": {"role": "target"}},
                {"model": str(triple["donors"][0]), "parameters": {"weight": 0.9}},
            ],
            "dtype": name,
            "out_dtype": name,
        },
        out,
    )
    merged = load_model_tensors(out)
    base, target, donor = (load_model_tensors(p) for p in (triple["base"], triple["target"], triple["donors"][0]))
    assert merged.keys() == target.keys()
    for key, value in merged.items():
        assert value.dtype == dtype, key
        reference = published_formula(base[key], target[key], [donor[key]], [0.9])
        scale = target[key].double().abs() + 0.9 * (donor[key].double() - base[key].double()).abs()
        error = (value.double() - reference).abs()
        assert (error <= rounding_bound(reference, scale, dtype)).all(), (key, error.max().item())
