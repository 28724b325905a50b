"""Fuzzing the kernel with hypothesis: 1,200 cases per run (600 + 350 + 250 below).

Shapes from 0-d, empty and 1-D to 3-D; float16, bfloat16, float32 and float64 inputs;
values that are arbitrary, constant, or pinned to the extremes of their dtype (largest
magnitude, smallest normal, signed zeros); targets equal to the base or offset from it;
donors equal to the base; weights, steepness, midpoint, eps, gate and every
``normalize`` option. Checked against the documented contract of
:func:`mergekit_sigmoid_diff.kernel.sigmoid_diff` and ``applied_fraction_``:

- finite inputs give a finite output of the target's shape, in the compute dtype
  (float32, float64 if any input is float64); inputs are not modified; reruns are
  bit-identical;
- out − T = fraction ⊙ Σ w_j (I_j − B) with fraction ∈ [0, 1]: elementwise, out − T lies
  between 0 and the full weighted diff (float64 reference, compute-dtype rounding);
- the full diff goes in when the gate is off or the target did not drift (T = B);
  a donor equal to the base leaves the target unchanged, exactly;
- the applied fraction is in [0, 1], never grows with the drift, and is 1 everywhere
  when max − min of the drift is below eps;
- any NaN or Inf in an input makes ``check_finite=True`` raise ``NonFiniteError``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_sigmoid_diff import kernel

# largest magnitude drawn per dtype: finite in that dtype, and far enough from the
# float32 maximum that T + Σ w (I − B) cannot overflow (|w| ≤ 4, ≤ 3 donors)
LIMITS = {torch.float16: 6.0e4, torch.bfloat16: 1e30, torch.float32: 1e30, torch.float64: 1e150}
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

shapes = st.one_of(
    st.just(()),
    st.tuples(st.integers(0, 40)),
    st.tuples(st.integers(0, 6), st.integers(0, 6)),
    st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(0, 4)),
)


@st.composite
def tensor_values(draw, n: int, dtype: torch.dtype) -> list[float]:
    limit = LIMITS[dtype]
    finite = st.floats(-limit, limit, allow_nan=False, allow_infinity=False)
    kind = draw(st.sampled_from(["any", "constant", "extreme", "unit"]))
    if kind == "constant":
        return [draw(finite)] * n
    if kind == "extreme":
        tiny = torch.finfo(dtype).tiny
        elements = st.sampled_from([0.0, -0.0, limit, -limit, tiny, -tiny, 1.0])
    elif kind == "unit":
        elements = st.floats(-1, 1)
    else:
        elements = finite
    return draw(st.lists(elements, min_size=n, max_size=n))


def as_tensor(values: list[float], shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(shape).to(dtype)


@st.composite
def cases(draw) -> dict:
    dtype = draw(st.sampled_from(list(LIMITS)))
    shape = draw(shapes)
    n = math.prod(shape)
    base = as_tensor(draw(tensor_values(n, dtype)), shape, dtype)
    target_kind = draw(st.sampled_from(["own", "own", "base", "offset"]))
    if target_kind == "base":
        target = base.clone()
    elif target_kind == "offset":  # constant drift, up to rounding
        target = (base.double() + draw(st.floats(-1, 1))).to(dtype)
    else:
        target = as_tensor(draw(tensor_values(n, dtype)), shape, dtype)
    donor_count = draw(st.integers(1, 3))
    donors = [
        base.clone() if draw(st.booleans()) and draw(st.booleans()) else as_tensor(draw(tensor_values(n, dtype)), shape, dtype)
        for _ in range(donor_count)
    ]
    return dict(
        base=base,
        target=target,
        donors=donors,
        weights=draw(st.lists(st.floats(-4, 4), min_size=donor_count, max_size=donor_count)),
        knobs=dict(
            steepness=draw(st.floats(1e-3, 100)),
            midpoint=draw(st.floats(0, 1)),
            eps=draw(st.sampled_from([0.0, 1e-30, 1e-6, 1e-3])),
            gate=draw(st.booleans()),
            normalize=draw(st.sampled_from(kernel.NORMALIZATIONS)),
            quantile=draw(st.floats(0.01, 1)),
        ),
    )


def rounding(compute: torch.dtype, scale: torch.Tensor, terms: int) -> torch.Tensor:
    """Bound on compute-dtype rounding for ``terms`` operations on operands of ``scale``."""
    info = torch.finfo(compute)
    return 4 * terms * (info.eps * scale + info.tiny * info.eps)


@settings(FUZZ, max_examples=600)
@given(cases())
def test_finite_inputs_give_a_bounded_finite_output(case):
    base, target, donors, weights, knobs = (case[k] for k in ("base", "target", "donors", "weights", "knobs"))
    originals = [t.clone() for t in (base, target, *donors)]
    out = kernel.sigmoid_diff(base, target, donors, weights, kernel.GateSettings(**knobs))
    again = kernel.sigmoid_diff(base, target, donors, weights, kernel.GateSettings(**knobs))

    compute = kernel.compute_dtype(base, target, *donors)
    assert out.shape == target.shape and out.dtype == compute
    assert torch.isfinite(out).all()
    assert out.reshape(-1).view(torch.uint8).equal(again.reshape(-1).view(torch.uint8))  # bit-identical
    assert all(torch.equal(a, b) for a, b in zip(originals, (base, target, *donors)))

    b64, t64 = base.double(), target.double()
    diffs = [w * (d.double() - b64) for d, w in zip(donors, weights)]
    full = sum(diffs, torch.zeros_like(t64))
    scale = t64.abs() + sum((d.abs() for d in diffs), torch.zeros_like(t64)) + out.double().abs()
    # weights are rounded to the compute dtype too: a subnormal one loses relative precision
    weight_rounding = torch.finfo(compute).tiny * torch.finfo(compute).eps
    spread = sum(((d.double() - b64).abs() for d in donors), torch.zeros_like(t64))
    tolerance = rounding(compute, scale, len(donors) + 3) + 2 * weight_rounding * spread
    delta = out.double() - t64
    assert (delta >= torch.minimum(full, torch.zeros_like(full)) - tolerance).all()
    assert (delta <= torch.maximum(full, torch.zeros_like(full)) + tolerance).all()

    if not knobs["gate"] or torch.equal(target, base):
        assert ((delta - full).abs() <= tolerance).all()
    if all(torch.equal(d, base) for d in donors):
        assert torch.equal(out, target.to(compute))


@st.composite
def drifts(draw) -> tuple[torch.Tensor, dict]:
    """|T − B| in the compute dtype, and the gate's knobs."""
    dtype = draw(st.sampled_from(list(LIMITS)))
    n = draw(st.integers(0, 64))
    base, target = (as_tensor(draw(tensor_values(n, dtype)), (n,), dtype) for _ in range(2))
    compute = kernel.compute_dtype(base, target)
    knobs = dict(
        steepness=draw(st.floats(1e-3, 100)),
        midpoint=draw(st.floats(0, 1)),
        eps=draw(st.sampled_from([1e-30, 1e-6, 1e-3])),
        normalize=draw(st.sampled_from(kernel.NORMALIZATIONS)),
        quantile=draw(st.floats(0.01, 1)),
    )
    return (target.to(compute) - base.to(compute)).abs(), knobs


@settings(FUZZ, max_examples=350)
@given(drifts())
def test_applied_fraction_is_bounded_and_never_grows_with_drift(case):
    drift, knobs = case
    compute = drift.dtype
    fraction = kernel.applied_fraction_(drift.clone(), kernel.GateSettings(**knobs))

    assert fraction.shape == drift.shape and torch.isfinite(fraction).all()
    assert ((fraction >= 0) & (fraction <= 1)).all()
    order = torch.argsort(drift, stable=True)
    by_drift = fraction[order]
    # ties may differ in the last bit (vectorised and scalar sigmoid paths round apart)
    assert (by_drift[1:] <= by_drift[:-1] + 4 * torch.finfo(compute).eps).all()
    if drift.numel() and (drift.max() - drift.min()).item() < knobs["eps"]:
        assert (fraction == 1).all()


@settings(FUZZ, max_examples=250)
@given(cases(), st.data())
def test_any_nan_or_inf_input_is_reported(case, data):
    tensors = [case["base"], case["target"], *case["donors"]]
    if tensors[0].numel() == 0:
        tensors = [t.new_zeros(3) for t in tensors]
    culprit = tensors[data.draw(st.integers(0, len(tensors) - 1))].view(-1)
    culprit[data.draw(st.integers(0, culprit.numel() - 1))] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    try:
        kernel.sigmoid_diff(tensors[0], tensors[1], tensors[2:], case["weights"], kernel.GateSettings(**case["knobs"]), check_finite=True)
    except kernel.NonFiniteError:
        return
    raise AssertionError("a non-finite input gave a finite output")


@pytest.mark.parametrize("normalize", kernel.NORMALIZATIONS)
def test_zero_eps_with_constant_drift_takes_the_whole_diff(normalize):
    base = torch.zeros(8)
    out = kernel.sigmoid_diff(base, base.clone(), [torch.ones(8)], [1.0], kernel.GateSettings(eps=0.0, normalize=normalize))
    assert torch.equal(out, torch.ones(8))
