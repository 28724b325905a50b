"""The ``normalize`` options (minmax, quantile, rank) and the chunked kernel, on hand-made tensors.

Convention in the hand-made cases: B = 0, one donor I = 1 with weight 1, so the output
minus T is exactly the applied fraction sigmoid(−k · (x − m)) and x can be read back.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit.merge_methods.api import merge_tensors

from mergekit_sigmoid_diff import kernel
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.kernel import GateSettings, NonFiniteError, applied_fraction_, sigmoid_diff
from mergekit_sigmoid_diff.normalization import NORMALIZATIONS, SAMPLE_SIZE, sample_quantile
from mergekit_sigmoid_diff.plugin import register
from tests.reference import applied_fraction as reference_fraction

K, M = 12.0, 0.5


def fraction(x: list[float]) -> torch.Tensor:
    """The applied fraction for normalised drifts ``x``, computed in float64."""
    return torch.sigmoid(-K * (torch.tensor(x, dtype=torch.float64) - M))


def gate_of(drift: list[float], **options) -> torch.Tensor:
    """out − T for B = 0, T = drift, I = 1: the applied fraction the kernel chose."""
    target = torch.tensor(drift, dtype=torch.float64)
    out = sigmoid_diff(torch.zeros_like(target), target, [torch.ones_like(target)], [1.0], GateSettings(**options))
    return out - target


def test_the_option_names():
    assert NORMALIZATIONS == ("minmax", "quantile", "rank")


def test_minmax_by_name_is_the_default_bit_for_bit():
    generator = torch.Generator().manual_seed(1)
    base, target, donor = (torch.randn(300, 7, generator=generator) for _ in range(3))
    assert torch.equal(
        sigmoid_diff(base, target, [donor], [0.8], GateSettings(normalize="minmax")), sigmoid_diff(base, target, [donor], [0.8])
    )


def test_quantile_scales_by_the_quantile_and_saturates_above_it():
    # sorted d = 0, 1, 2, 3, 100; p = 0.75 → h = 3 → Q = 3; x = min(1, d / 3)
    got = gate_of([2.0, 0.0, 100.0, 1.0, 3.0], normalize="quantile", quantile=0.75)
    torch.testing.assert_close(got, fraction([2 / 3, 0.0, 1.0, 1 / 3, 1.0]), rtol=0, atol=1e-12)


def test_quantile_interpolates_between_order_statistics_and_subtracts_the_minimum():
    # d = 1, 2, 3, 4, 101 (lo = 1); p = 0.625 → h = 2.5 → Q = 3.5; x = min(1, (d − 1) / 2.5)
    got = gate_of([1.0, 2.0, 3.0, 4.0, 101.0], normalize="quantile", quantile=0.625)
    torch.testing.assert_close(got, fraction([0.0, 0.4, 0.8, 1.0, 1.0]), rtol=0, atol=1e-12)


def test_quantile_level_one_is_minmax_bit_for_bit():
    generator = torch.Generator().manual_seed(2)
    base, target, donor = (torch.randn(40, 40, generator=generator) for _ in range(3))
    assert torch.equal(
        sigmoid_diff(base, target, [donor], [1.0], GateSettings(normalize="quantile", quantile=1.0)),
        sigmoid_diff(base, target, [donor], [1.0]),
    )


def test_quantile_falls_back_to_minmax_when_the_quantile_sits_on_the_minimum():
    # 9 of 10 elements did not drift: Q_0.5 = lo = 0 < eps, so the scale is hi − lo = 5
    drift = [0.0] * 9 + [5.0]
    got = gate_of(drift, normalize="quantile", quantile=0.5)
    torch.testing.assert_close(got, fraction([0.0] * 9 + [1.0]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("normalize, quantile", [("minmax", 0.99), ("quantile", 0.375), ("quantile", 0.5)])
def test_a_scale_so_small_that_k_over_it_overflows_float32_still_gives_the_formula(normalize, quantile):
    # found by test_kernel_fuzz: with eps = 0 the scale can be subnormal (here the 0.375-quantile
    # interpolates between 0 and the smallest normal, 2.9e-39), and 1 / scale overflows float32;
    # multiplying d = 0 by that infinity gave NaN where the target had not drifted
    tiny = torch.finfo(torch.float32).tiny
    drift = torch.tensor([0.0] * 6 + [tiny] + [1e30] * 8) if normalize == "quantile" else torch.tensor([0.0, tiny / 16, tiny / 8])
    base = torch.zeros_like(drift)
    out = sigmoid_diff(base, drift, [torch.ones_like(drift)], [1.0],
                       GateSettings(normalize=normalize, quantile=quantile, steepness=1.0, midpoint=0.0, eps=0.0))
    settings = GateSettings(normalize=normalize, quantile=quantile, steepness=1.0, midpoint=0.0, eps=0.0)
    want = reference_fraction(drift, normalize, quantile, steepness=1.0, midpoint=0.0, eps=0.0)
    assert torch.isfinite(out).all()
    small = drift < 1  # where T + fraction keeps the fraction's digits
    torch.testing.assert_close(out.double()[small] - drift.double()[small], want[small], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(applied_fraction_(drift.clone(), settings).double(), want, rtol=1e-6, atol=1e-7)


def test_rank_spreads_distinct_drifts_evenly_and_ties_equal_drifts():
    # bins of 0, 0, 1, 2, 4, 8, 1000 are 0, 0, then distinct: x = #{lower bins} / (N − 1)
    got = gate_of([4.0, 0.0, 1000.0, 1.0, 0.0, 8.0, 2.0], normalize="rank")
    torch.testing.assert_close(got, fraction([4 / 6, 0.0, 1.0, 2 / 6, 0.0, 5 / 6, 3 / 6]), rtol=0, atol=1e-12)


def test_rank_ties_drifts_within_the_bin_width():
    # 1.0 and 1.001 differ by less than 2**-8 relative: the same bin, the same x
    got = gate_of([1.001, 1.0, 2.0], normalize="rank")
    torch.testing.assert_close(got, fraction([0.0, 0.0, 1.0]), rtol=0, atol=1e-12)


def test_rank_of_evenly_spaced_drifts_matches_minmax():
    drift = [float(v) for v in range(1, 65)]  # 1..64: distinct bins, evenly spaced
    torch.testing.assert_close(gate_of(drift, normalize="rank"), gate_of(drift), rtol=0, atol=1e-12)


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_constant_drift_takes_the_whole_diff_for_every_option(normalize):
    assert torch.equal(gate_of([0.3] * 5, normalize=normalize), torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_zero_eps_still_takes_the_whole_diff_when_nothing_drifted(normalize):
    # eps = 0 is allowed; a constant drift must not divide by its zero span
    assert torch.equal(gate_of([0.3] * 5, normalize=normalize, eps=0.0), torch.ones(5, dtype=torch.float64))
    sparse = gate_of([0.0] * 9 + [5.0], normalize=normalize, eps=0.0, quantile=0.5)
    assert torch.isfinite(sparse).all() and sparse[0] > 0.99 and sparse[-1] < 0.01


def test_a_large_tensor_uses_a_deterministic_sample_close_to_the_exact_statistics():
    n = 4 * SAMPLE_SIZE + 17
    generator = torch.Generator().manual_seed(4)
    drift = torch.randn(n, generator=generator, dtype=torch.float64).abs() ** 3  # heavy tail
    base, donor = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    lo = drift.min().item()

    quantile_out = sigmoid_diff(base, drift, [donor], [1.0], GateSettings(normalize="quantile", quantile=0.9)) - drift
    x = (-torch.logit(quantile_out) / K + M).clamp(0, 1)  # invert the gate
    scale = ((drift - lo) / x)[(x > 0.05) & (x < 0.95)].median().item()
    exact = torch.quantile(drift, torch.tensor([0.89, 0.9, 0.91], dtype=torch.float64)).tolist()
    assert exact[0] - lo < scale < exact[2] - lo  # within ±0.01 of the level

    rank_out = sigmoid_diff(base, drift, [donor], [1.0], GateSettings(normalize="rank")) - drift
    x_rank = (-torch.logit(rank_out) / K + M).clamp(0, 1)
    exact_rank = torch.argsort(torch.argsort(drift)).double() / (n - 1)
    assert (x_rank - exact_rank).abs().max() < 0.02

    again = sigmoid_diff(base, drift, [donor], [1.0], GateSettings(normalize="quantile", quantile=0.9)) - drift
    assert torch.equal(again, quantile_out)  # same tensor, same sample, same bytes


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_chunking_does_not_change_a_single_bit(normalize, monkeypatch):
    generator = torch.Generator().manual_seed(5)
    shape = (3 * SAMPLE_SIZE // 64 + 3, 64)  # sampled, and not a multiple of any chunk size
    base = torch.randn(shape, generator=generator).bfloat16()
    target = (base.float() + 0.01 * torch.randn(shape, generator=generator) ** 3).bfloat16()
    donors = [(base.float() + 0.01 * torch.randn(shape, generator=generator)).bfloat16() for _ in range(2)]

    def run() -> torch.Tensor:
        return sigmoid_diff(base, target, donors, [0.7, 1.2], GateSettings(normalize=normalize), out_dtype=torch.bfloat16)

    whole = run()
    monkeypatch.setattr(kernel, "CHUNK", 1024)  # a multiple of every SIMD width
    assert torch.equal(run(), whole)


def test_out_dtype_is_one_rounding_of_the_compute_dtype_result():
    generator = torch.Generator().manual_seed(6)
    base, target, donor = (torch.randn(50, 30, generator=generator).bfloat16() for _ in range(3))
    for normalize in NORMALIZATIONS:
        exact = sigmoid_diff(base, target, [donor], [1.0], GateSettings(normalize=normalize))
        rounded = sigmoid_diff(base, target, [donor], [1.0], GateSettings(normalize=normalize), out_dtype=torch.bfloat16)
        assert exact.dtype == torch.float32 and rounded.dtype == torch.bfloat16
        assert torch.equal(rounded, exact.bfloat16())


def test_applied_fraction_takes_the_options_too():
    drift = torch.tensor([[2.0, 0.0], [100.0, 1.0]])
    torch.testing.assert_close(
        applied_fraction_(drift.clone(), GateSettings(normalize="quantile", quantile=2 / 3)),
        fraction([1.0, 0.0, 1.0, 0.5]).float().reshape(2, 2),
    )
    torch.testing.assert_close(
        applied_fraction_(drift.clone(), GateSettings(normalize="rank")), fraction([2 / 3, 0.0, 1.0, 1 / 3]).float().reshape(2, 2)
    )


def test_sample_quantile_agrees_with_torch_quantile():
    values = torch.randn(1001, generator=torch.Generator().manual_seed(7)).abs()
    for p in (0.0, 0.3, 0.5, 0.99, 0.9995, 1.0):
        torch.testing.assert_close(sample_quantile(values, p), torch.quantile(values, p), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"normalize": "zscore"}, "normalize='zscore': expected one of minmax, quantile, rank"),
        ({"normalize": "quantile", "quantile": 0.0}, r"quantile=0.0: expected a number in \(0, 1\]"),
        ({"normalize": "quantile", "quantile": 1.5}, r"quantile=1.5: expected a number in \(0, 1\]"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        gate_of([0.0, 1.0], **options)


@pytest.mark.parametrize("normalize", ["quantile", "rank"])
def test_non_finite_target_gives_nan_or_raises_when_asked(normalize):
    target = torch.tensor([0.0, 1.0, math.inf, 2.0])
    zero, one = torch.zeros(4), torch.ones(4)
    assert sigmoid_diff(zero, target, [one], [1.0], GateSettings(normalize=normalize)).isnan().all()
    with pytest.raises(NonFiniteError):
        sigmoid_diff(zero, target, [one], [1.0], GateSettings(normalize=normalize), check_finite=True)


def test_check_finite_catches_a_bad_donor_and_an_overflowing_cast():
    zero, ramp = torch.zeros(5), torch.arange(5.0)
    donor = torch.tensor([0.0, 1.0, math.nan, 1.0, 1.0])
    with pytest.raises(NonFiniteError):
        sigmoid_diff(zero, ramp, [donor], [1.0], check_finite=True)
    big = torch.full((5,), 60000.0)
    with pytest.raises(NonFiniteError):  # finite in float32, Inf once written as float16
        sigmoid_diff(zero, ramp, [big], [2.0], GateSettings(gate=False), out_dtype=torch.float16, check_finite=True)
    sigmoid_diff(zero, ramp, [big], [2.0], GateSettings(gate=False), check_finite=True)  # float32 holds it


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_the_merge_method_passes_the_options_and_keeps_the_input_dtype(normalize):
    register()
    generator = torch.Generator().manual_seed(8)
    base, target, donor = (torch.randn(16, 16, generator=generator).bfloat16() for _ in range(3))
    out = merge_tensors(
        [base, target, donor],
        "sigmoid_diff",
        base_index=0,
        parameters={"role": ["target", "donor"], "normalize": normalize, "quantile": 0.9},
    )
    assert out.dtype == torch.bfloat16
    # the definitions in float64 (tests/reference.py), not the kernel; one bf16 rounding apart
    b, t, i = base.double(), target.double(), donor.double()
    expected = t + reference_fraction((t - b).abs(), normalize, quantile=0.9) * (i - b)
    torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=1e-6)
    # and the option matters: each option's reference is off the others'
    others = [t + reference_fraction((t - b).abs(), o, quantile=0.9) * (i - b) for o in NORMALIZATIONS if o != normalize]
    assert all((out.double() - other).abs().max() > 1e-2 for other in others)


def test_the_merge_method_names_the_model_with_nan_under_rank():
    register()
    tensors = [torch.randn(4, 4) for _ in range(3)]
    tensors[2][0, 0] = math.nan
    with pytest.raises(SigmoidDiffError, match="tensor w of model donor contains NaN or Inf"):
        merge_tensors(
            tensors,
            "sigmoid_diff",
            ids=["base", "target", "donor"],
            base_index=0,
            name="w",
            parameters={"role": {"target": "target", "donor": "donor"}, "normalize": "rank"},
        )


shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3)
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def tensor_pairs(draw):
    shape = draw(shapes)
    size = math.prod(shape)
    return [
        torch.tensor(draw(st.lists(finite, min_size=size, max_size=size)), dtype=torch.float32).reshape(shape)
        for _ in range(2)
    ]


@settings(max_examples=40, deadline=None)
@given(tensor_pairs(), st.sampled_from(["quantile", "rank"]), st.floats(0.05, 1.0), st.floats(-2, 2, allow_nan=False))
def test_robust_options_keep_the_defining_properties(tensors, normalize, level, weight):
    base, other = tensors
    # I = B: nothing to add, the target comes back exactly.
    out = sigmoid_diff(base, other, [base.clone()], [weight], GateSettings(normalize=normalize, quantile=level))
    assert torch.equal(out, other)
    # T = B: no drift, the whole weighted diff goes in.
    out = sigmoid_diff(base, base.clone(), [other], [weight], GateSettings(normalize=normalize, quantile=level))
    torch.testing.assert_close(out, base + weight * (other - base))
    # The fraction lies in [0, 1] and never grows with the drift.
    drift = (other - base).abs().flatten()
    gate = applied_fraction_(drift.clone(), GateSettings(normalize=normalize, quantile=level))
    assert ((gate >= 0) & (gate <= 1)).all()
    assert (gate[torch.argsort(drift)].diff() <= 1e-7).all()
