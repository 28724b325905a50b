"""The kernel on hand-made tensors, and its algebraic properties under hypothesis."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_sigmoid_diff.kernel import GateSettings, applied_fraction_, sigmoid_diff
from tests.reference import published_formula


def test_hand_computed_values():
    base = torch.zeros(3)
    target = torch.tensor([0.0, 0.5, 1.0])  # drift normalises to x = 0, 0.5, 1
    donor = torch.ones(3)
    out = sigmoid_diff(base, target, [donor], [1.0])
    s = 1 / (1 + math.exp(-6))  # sigmoid(6)
    expected = torch.tensor([0.0 + s, 0.5 + 0.5, 1.0 + (1 - s)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


def test_constant_drift_takes_the_whole_diff():
    base = torch.randn(4, 5)
    target = base + 0.3  # |T − B| constant: max − min = 0 < eps
    donor = base + torch.randn(4, 5)
    out = sigmoid_diff(base, target, [donor], [0.5])
    torch.testing.assert_close(out, target + 0.5 * (donor - base))


def test_eps_branch_is_strictly_below_eps():
    drift = torch.tensor([0.0, 0.5e-6])
    assert torch.equal(applied_fraction_(drift.clone(), GateSettings(eps=1e-6)), torch.ones(2))
    spread = torch.tensor([0.0, 2e-6])
    fraction = applied_fraction_(spread.clone(), GateSettings(eps=1e-6))
    assert fraction[0] > 0.99 and fraction[1] < 0.01


def test_one_dimensional_and_empty_tensors():
    base, target, donor = torch.randn(7), torch.randn(7), torch.randn(7)
    torch.testing.assert_close(
        sigmoid_diff(base, target, [donor], [1.0]),
        published_formula(base, target, [donor], [1.0]).float(),
    )
    empty = torch.empty(0, 4)
    assert sigmoid_diff(empty, empty, [empty], [1.0]).shape == (0, 4)


def test_bf16_inputs_are_computed_in_float32():
    generator = torch.Generator().manual_seed(0)
    base, target, donor = (torch.randn(64, 64, generator=generator).bfloat16() for _ in range(3))
    out = sigmoid_diff(base, target, [donor], [1.0])
    assert out.dtype == torch.float32
    expected = published_formula(base, target, [donor], [1.0])
    assert (out.double() - expected).abs().max() < 2e-6


def test_float64_inputs_stay_float64():
    base, target, donor = (torch.randn(8, 8, dtype=torch.float64) for _ in range(3))
    out = sigmoid_diff(base, target, [donor], [1.0])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, published_formula(base, target, [donor], [1.0]), rtol=0, atol=1e-12)


def test_gate_off_is_task_arithmetic():
    base, target, d1, d2 = (torch.randn(6, 3) for _ in range(4))
    out = sigmoid_diff(base, target, [d1, d2], [0.3, 0.9], GateSettings(gate=False))
    torch.testing.assert_close(out, target + 0.3 * (d1 - base) + 0.9 * (d2 - base))


def test_inputs_are_not_modified():
    base, target, donor = (torch.randn(5, 5) for _ in range(3))
    copies = [t.clone() for t in (base, target, donor)]
    sigmoid_diff(base, target, [donor], [2.0])
    assert all(torch.equal(a, b) for a, b in zip((base, target, donor), copies))


def test_matches_reference_with_custom_knobs():
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(32, 16, generator=generator)
    target = base + 0.05 * torch.randn(32, 16, generator=generator) ** 3  # heavy-tailed drift
    donors = [base + 0.01 * torch.randn(32, 16, generator=generator) for _ in range(2)]
    out = sigmoid_diff(base, target, donors, [0.7, 1.3], GateSettings(steepness=5.0, midpoint=0.2, eps=1e-8))
    expected = published_formula(base, target, donors, [0.7, 1.3], steepness=5.0, midpoint=0.2, eps=1e-8)
    assert (out.double() - expected).abs().max() < 2e-6


shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3)
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def tensor_sets(draw, count: int):
    shape = draw(shapes)
    size = math.prod(shape)
    return [
        torch.tensor(draw(st.lists(finite, min_size=size, max_size=size)), dtype=torch.float32).reshape(shape)
        for _ in range(count)
    ]


@settings(max_examples=200, deadline=None)
@given(tensor_sets(3), st.lists(st.floats(-2, 2, allow_nan=False), min_size=2, max_size=2))
def test_donor_equal_to_base_returns_the_target(tensors, weights):
    base, target, _ = tensors
    out = sigmoid_diff(base, target, [base.clone(), base.clone()], weights)
    assert torch.equal(out, target)


@settings(max_examples=200, deadline=None)
@given(tensor_sets(3), st.floats(-2, 2, allow_nan=False), st.floats(0.5, 50), st.floats(0, 1))
def test_target_equal_to_base_takes_the_whole_weighted_diff(tensors, weight, steepness, midpoint):
    base, donor, _ = tensors
    out = sigmoid_diff(base, base.clone(), [donor], [weight], GateSettings(steepness=steepness, midpoint=midpoint))
    torch.testing.assert_close(out, base + weight * (donor - base))


@settings(max_examples=100, deadline=None)
@given(tensor_sets(4), st.floats(0.5, 50), st.floats(0, 1))
def test_applied_fraction_is_monotone_and_bounded(tensors, steepness, midpoint):
    base, target, _, _ = tensors
    drift = (target - base).abs().flatten()
    fraction = applied_fraction_(drift.clone(), GateSettings(steepness=steepness, midpoint=midpoint))
    assert ((fraction >= 0) & (fraction <= 1)).all()
    order = torch.argsort(drift)
    assert (fraction[order].diff() <= 1e-7).all()  # more drift, never more of the diff
