"""The frontier rule (mergekit_sigmoid_diff.frontier) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mergekit_sigmoid_diff import frontier
from mergekit_sigmoid_diff.frontier import Curve, Point

# T at λ = 0, then task_arithmetic at λ = 0.5, 1, 1.5 (feature loss falls, knowledge loss rises)
CURVE = Curve.of(Point(0, 10.0, 1.0), [Point(1.0, 1.0, 1.6), Point(0.5, 4.0, 1.2), Point(1.5, 0.5, 2.0)])


def test_knowledge_at_interpolates_between_the_bracketing_lambdas():
    # between λ = 0.5 (4, 1.2) and λ = 1 (1, 1.6): halfway in feature → 1.4
    assert frontier.knowledge_at(CURVE, 2.5) == pytest.approx(1.4)
    assert frontier.knowledge_at(CURVE, 7.0) == pytest.approx(1.1)  # between T and λ = 0.5
    assert frontier.knowledge_at(CURVE, 0.5) == pytest.approx(2.0)  # the last point itself


def test_no_extrapolation_outside_the_measured_range():
    assert frontier.knowledge_at(CURVE, 0.1) is None
    assert frontier.knowledge_at(CURVE, 11.0) is None
    assert frontier.gap_closed(CURVE, 0.1, 1.0) is None


def test_gap_closed_is_the_share_of_task_arithmetics_loss_avoided():
    # at f = 2.5 task_arithmetic keeps 1.4; T has 1.0, so it loses 0.4
    assert frontier.gap_closed(CURVE, 2.5, 1.3) == pytest.approx(0.25)
    assert frontier.gap_closed(CURVE, 2.5, 1.4) == pytest.approx(0.0)
    assert frontier.gap_closed(CURVE, 2.5, 1.0) == pytest.approx(1.0)
    assert frontier.gap_closed(CURVE, 2.5, 1.5) == pytest.approx(-0.25)


def test_feature_at_reads_the_curve_the_other_way():
    assert frontier.feature_at(CURVE, 1.4) == pytest.approx(2.5)
    assert frontier.feature_at(CURVE, 1.8) == pytest.approx(0.75)
    assert frontier.feature_at(CURVE, 2.5) is None


def test_a_curve_that_turns_back_is_read_at_its_best():
    # the feature gets worse again past λ = 1: two segments hold f = 2; the lower knowledge loss counts
    bent = Curve.of(Point(0, 4.0, 1.0), [Point(1, 1.0, 2.0), Point(2, 3.0, 4.0)])
    assert frontier.knowledge_at(bent, 2.0) == pytest.approx(1.0 + 1.0 * 2 / 3)
    assert frontier.gap_closed(bent, 2.0, 1.5) == pytest.approx((5 / 3 - 1.5) / (5 / 3 - 1.0))


def test_verdict_needs_every_seed_and_more_than_noise():
    assert frontier.verdict([0.2, 0.25, 0.3]) == "beats"
    assert frontier.verdict([-0.2, -0.3, -0.25]) == "loses"
    assert frontier.verdict([0.2, -0.1, 0.3]) == "undecided"
    # all positive, but mean 0.47 is below 2 × its standard error (2 × 0.445 / √3 = 0.51)
    assert frontier.verdict([0.01, 0.5, 0.9]) == "undecided"
    assert frontier.verdict([None, 0.2, 0.3]) == "n/a"
    assert frontier.verdict([0.3]) == "n/a"


def test_mean_sd_is_the_sample_standard_deviation():
    mean, sd = frontier.mean_sd([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert sd == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))


@given(st.floats(0.5, 9.5), st.floats(-1.0, 2.0))
def test_task_arithmetic_on_its_own_line_closes_no_gap(feature, offset):
    # a point on the curve closes exactly 0; moving it down (less knowledge loss) closes more
    on_curve = frontier.knowledge_at(CURVE, feature)
    assert frontier.gap_closed(CURVE, feature, on_curve) == pytest.approx(0.0, abs=1e-9)
    moved = frontier.gap_closed(CURVE, feature, on_curve - offset)
    assert moved == pytest.approx(offset / (on_curve - 1.0))


def test_a_feature_stronger_than_any_lambda_reaches_gets_a_lower_bound():
    # the curve's strongest feature is λ = 1.5 (0.5, 2.0): T lost 1.0 there
    assert frontier.gap_bound(CURVE, 0.3, 1.5) == (pytest.approx(0.5), False)
    assert frontier.gap_bound(CURVE, 0.3, 0.9) == (1.0, False)  # better than T itself
    assert frontier.gap_bound(CURVE, 2.5, 1.3) == (pytest.approx(0.25), True)  # covered: the exact value
    assert frontier.gap_bound(CURVE, 11.0, 1.0) == (None, True)  # weaker than T: nothing to say
    # a curve that saturates and turns back: the strongest point is λ = 1, not the last λ
    turned = Curve.of(Point(0, 10.0, 1.0), [Point(1, 0.5, 1.4), Point(2, 0.6, 1.8)])
    assert frontier.gap_bound(turned, 0.3, 1.1) == (pytest.approx(0.75), False)
