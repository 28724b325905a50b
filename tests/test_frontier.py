"""The frontier rule (mergekit_sigmoid_diff.frontier) against values worked out by hand:
reading the curve, the knowledge floor, the λ refinement, the paired bootstrap and the verdict."""

from __future__ import annotations

import itertools
import math
import statistics
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mergekit_sigmoid_diff import frontier
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.frontier import Curve, Items, Point, SeedGap

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


# ---------------------------------------------------------------- the knowledge floor


def test_gap_closed_is_na_where_task_arithmetic_loses_less_than_the_floor():
    assert frontier.KNOWLEDGE_FLOOR == 0.01
    # T at 1.0; task_arithmetic's knowledge at λ = 1 is 1.009 (lost 9 millinats), at λ = 2 1.5
    curve = Curve.of(Point(0, 4.0, 1.0), [Point(1, 2.0, 1.009), Point(2, 1.0, 1.5)])
    # at f = 2 task_arithmetic lost 0.009 < 0.01: a ratio of noise, not reported
    assert frontier.gap(curve, 2.0, 1.0) == frontier.Gap(None, True, "n/a: nothing to close")
    assert frontier.gap_closed(curve, 2.0, 1.0) is None and frontier.gap_bound(curve, 2.0, 1.0) == (None, True)
    # at f = 1.5: 1.009 + 0.491 / 2 = 1.2545, lost 0.2545: a ratio
    assert frontier.gap_closed(curve, 1.5, 1.1) == pytest.approx((1.2545 - 1.1) / 0.2545)
    # the floor is a parameter: 0.005 lets the 9 millinats through
    assert frontier.gap_closed(curve, 2.0, 1.0, floor=0.005) == pytest.approx(1.0)
    assert frontier.gap(curve, 5.0, 1.0).reason == "n/a: outside the curve"
    # beyond the strongest point too: the bound's denominator is floored
    flat = Curve.of(Point(0, 4.0, 1.0), [Point(1, 2.0, 1.005)])
    assert frontier.gap(flat, 1.0, 1.0) == frontier.Gap(None, False, "n/a: nothing to close")


def test_a_curve_gets_extra_points_at_any_lambda():
    finer = CURVE.with_points([Point(0.75, 2.0, 1.3), Point(1.0, 9.0, 9.0)])  # λ = 1 is measured already: kept
    assert [p.lam for p in finer.points] == [0, 0.5, 0.75, 1.0, 1.5]
    assert finer.points[3] == Point(1.0, 1.0, 1.6)
    # at f = 2.5 the new point λ = 0.75 brackets it with λ = 0.5: 1.2 + 0.1 × 1.5 / 2 = 1.275
    assert frontier.knowledge_at(finer, 2.5) == pytest.approx(1.275)


# ---------------------------------------------------------------- refinement


def convex(lam: float) -> Point:
    """task_arithmetic whose feature falls linearly in λ and whose knowledge loss is convex:
    f = 4 − 2λ, k = 1 + λ², so at feature f it keeps k = 1 + ((4 − f)/2)² exactly."""
    return Point(lam, 4 - 2 * lam, 1 + lam * lam)


def test_refinement_bisects_until_halving_the_step_moves_the_gap_by_less_than_tol():
    coarse = Curve.of(convex(0), [convex(1.0), convex(2.0)])
    # the merge sits at f = 2.6 (λ* = 0.7), knowledge 1.3; the truth: TA keeps 1.49 there,
    # so the merge closes 0.19 / 0.49. On a chord between λ = a and b the read knowledge is
    # too high by (λ* − a)(b − λ*), which gives gap = (0.19 + e) / (0.49 + e):
    #   grid [0, 1]: e = 0.21 → 0.5714; +0.5: [0.5, 1], e = 0.06 → 0.4545 (moved 0.117);
    #   +0.75: [0.5, 0.75], e = 0.01 → 0.4 (moved 0.055); +0.625: [0.625, 0.75], e = 0.00375
    #   → 0.3924 (moved 0.0076 < 0.02): stop.
    def gap_for(e):
        return (0.19 + e) / (0.49 + e)

    assert frontier.gap_closed(coarse, 2.6, 1.3) == pytest.approx(gap_for(0.21))  # the coarse grid flatters
    calls = []
    result = frontier.refine(lambda lam: calls.append(lam) or convex(lam), coarse, 2.6, 1.3)
    assert calls == [0.5, 0.75, 0.625] and [p.lam for p in result.added] == calls
    assert result.converged and not result.capped
    assert result.gap == frontier.Gap(pytest.approx(gap_for(0.00375)), True)
    assert abs(result.gap.value - 0.19 / 0.49) < 0.02  # within tol of the true gap
    assert [p.lam for p in result.curve.points] == [0, 0.5, 0.625, 0.75, 1.0, 2.0]
    # deterministic; and a budget of 2 evaluations stops after λ = 0.5 and 0.75, saying so
    assert frontier.refine(convex, coarse, 2.6, 1.3) == result
    capped = frontier.refine(convex, coarse, 2.6, 1.3, max_evaluations=2)
    assert capped.capped and not capped.converged and capped.gap.value == pytest.approx(gap_for(0.01))
    # a looser tol stops one halving earlier (moved 0.055 < 0.06)
    assert [p.lam for p in frontier.refine(convex, coarse, 2.6, 1.3, tol=0.06).added] == [0.5, 0.75]


def saturating(lam: float) -> Point:
    """task_arithmetic whose feature is strongest at λ = 1.2 (f = 0.5) and turns back after."""
    return Point(lam, (lam - 1.2) ** 2 + 0.5, 1 + lam)


def test_refinement_beyond_the_strongest_point_measures_around_it():
    grid = Curve.of(saturating(0), [saturating(lam) for lam in (0.5, 1.0, 1.5, 2.0)])
    # the merge (f 0.52, k 1.5) is stronger than every grid λ (best: λ = 1, f 0.54, k 2): a bound
    assert frontier.gap_bound(grid, 0.52, 1.5) == (pytest.approx(0.5), False)
    result = frontier.refine(saturating, grid, 0.52, 1.5)
    # round 1: both sides of λ = 1 (0.75, 1.25); λ = 1.25 reaches f 0.5025, so the gap is exact
    # now (a change of kind: go on); then the bracketing interval [1, 1.25] is halved twice:
    #   [1, 1.25]: k = 2 + 0.25 · 0.02/0.0375 → gap 0.5588; +1.125: [1, 1.125] → 0.5339 (moved 0.025);
    #   +1.0625 (f 0.5189): [1, 1.0625] → 0.5280 (moved 0.006): stop
    assert [p.lam for p in result.added] == [0.75, 1.25, 1.125, 1.0625]
    assert result.converged and result.gap.exact
    f_1625 = (1.0625 - 1.2) ** 2 + 0.5
    k = 2 + 0.0625 * (0.52 - 0.54) / (f_1625 - 0.54)
    assert result.gap.value == pytest.approx((k - 1.5) / (k - 1))
    truth = 1.2 - math.sqrt(0.02)  # where task_arithmetic first reaches f = 0.52
    assert abs(result.gap.value - (truth - 0.5) / truth) < 0.02
    assert 0.5 <= (truth - 0.5) / truth  # the grid's bound was a true lower bound here


def test_refinement_past_the_last_lambda_only_when_allowed():
    grid = Curve.of(convex(0), [convex(0.5), convex(1.0)])  # strongest: λ = 1 (f 2), the last λ
    kept = frontier.refine(convex, grid, 1.5, 1.5)  # f 1.5 needs λ = 1.25
    assert [p.lam for p in kept.added] == [0.75] and not kept.gap.exact
    assert kept.converged  # the bound did not move: (2 − 1.5) / 1
    extended = frontier.refine(convex, grid, 1.5, 1.5, max_lambda=1.5)
    # λ 0.75 and one grid step past 1 (1.5, f 1): f 1.5 is now covered, between λ 1 and 1.5
    assert [p.lam for p in extended.added[:2]] == [0.75, 1.5] and extended.gap.exact
    assert frontier.refine(convex, grid, 5.0, 1.0).added == ()  # weaker than T: nothing to refine
    with pytest.raises(SigmoidDiffError, match="tol > 0"):
        frontier.refine(convex, grid, 1.5, 1.5, tol=0)


# ---------------------------------------------------------------- bootstrap

# Two feature items (weight 1: per prompt) and two knowledge items (weights 1 and 3: tokens),
# per model as [loss_sum, weight]; item means: feature T (4, 4), λ = 1 (2, 0), merge (3, 1);
# knowledge T (1, 1), λ = 1 (2, 1.5), merge (1.5, 1.2).
T_ITEMS = Items([[4, 1], [4, 1]], [[1, 1], [3, 3]])
TA_ITEMS = Items([[2, 1], [0, 1]], [[2, 1], [4.5, 3]])
MERGE_ITEMS = Items([[3, 1], [1, 1]], [[1.5, 1], [3.6, 3]])


def enumerated_gaps() -> list[float]:
    """The gap for each of the 16 equally likely index draws, by the straight-line formula."""
    out = []
    for fi, ki in itertools.product(itertools.product(range(2), repeat=2), repeat=2):
        def mean(items, drawn):
            return sum(items[i][0] for i in drawn) / sum(items[i][1] for i in drawn)

        f_t, f_1, f_m = (mean(m.feature, fi) for m in (T_ITEMS, TA_ITEMS, MERGE_ITEMS))
        k_t, k_1, k_m = (mean(m.knowledge, ki) for m in (T_ITEMS, TA_ITEMS, MERGE_ITEMS))
        k_ta = k_t + (k_1 - k_t) * (f_t - f_m) / (f_t - f_1)  # the chord from T to λ = 1 at f_m
        out.append((k_ta - k_m) / (k_ta - k_t))
    return out


def test_bootstrap_against_every_resample_enumerated():
    gaps = enumerated_gaps()
    # by hand for the whole sample: f = (4, 1, 2), k = (1, 1.625, 1.275); TA keeps 1 + 0.625 · 2/3 there
    whole = frontier.bootstrap_gap(T_ITEMS, [(1.0, TA_ITEMS)], MERGE_ITEMS, resamples=20000, seed=3)
    k_ta = 1 + 0.625 * 2 / 3
    assert whole.estimate == frontier.Gap(pytest.approx((k_ta - 1.275) / (k_ta - 1)), True)
    # the bootstrap distribution is the 16 values, each 1/16: se → their sd, and the 2.5 % and
    # 97.5 % points are the smallest and largest values (each has 6.25 % > 2.5 % of the mass)
    assert whole.se == pytest.approx(statistics.pstdev(gaps), rel=0.03)
    assert whole.lo == pytest.approx(min(gaps)) and whole.hi == pytest.approx(max(gaps))
    assert whole.undefined == 0 and whole.resamples == 20000 and whole.level == 0.95
    # seeded: the same seed gives the same figures, another seed other ones
    again = frontier.bootstrap_gap(T_ITEMS, [(1.0, TA_ITEMS)], MERGE_ITEMS, resamples=200, seed=1)
    assert again == frontier.bootstrap_gap(T_ITEMS, [(1.0, TA_ITEMS)], MERGE_ITEMS, resamples=200, seed=1)
    assert again.se != frontier.bootstrap_gap(T_ITEMS, [(1.0, TA_ITEMS)], MERGE_ITEMS, resamples=200, seed=2).se


def test_bootstrap_counts_resamples_where_the_gap_is_undefined():
    # λ = 1 loses only 0.005 nats on knowledge item 2 (1 → 1.005 per token) and 1 nat on item 1:
    # a resample that draws item 2 twice has less than the floor to close (1/4 of them)
    ta = Items([[2, 1], [0, 1]], [[2, 1], [3.015, 3]])
    merge = Items([[3, 1], [1, 1]], [[1.5, 1], [3.0, 3]])
    result = frontier.bootstrap_gap(T_ITEMS, [(1.0, ta)], merge, resamples=4000, seed=0)
    assert result.undefined == pytest.approx(1000, abs=120)  # binomial(4000, 1/4): sd 27
    assert (result.se, result.lo, result.hi) == (None, None, None)  # far more than 2.5 % undefined
    # with a floor of 0.001 every resample is defined
    assert frontier.bootstrap_gap(T_ITEMS, [(1.0, ta)], merge, resamples=400, floor=0.001).undefined == 0


def test_bootstrap_refuses_models_scored_on_other_items():
    other = Items([[2, 1], [0, 1], [1, 1]], TA_ITEMS.knowledge)
    with pytest.raises(SigmoidDiffError, match=r"^task_arithmetic λ=1: its items differ from the target's"):
        frontier.bootstrap_gap(T_ITEMS, [(1.0, other)], MERGE_ITEMS)


def test_bootstrap_of_a_suite_sized_case_is_fast():
    """1000 resamples × 20 λ × 100 items (pure Python): well under a second on one core;
    the bound here leaves room for a loaded machine."""
    feature = [[1.0 + (i % 7) / 10, 1] for i in range(100)]
    knowledge = [[(1 + (i % 5) / 50) * (40 + i % 9), 40 + i % 9] for i in range(100)]

    def scaled(f, k):
        return Items([[a * f, w] for a, w in feature], [[a * k, w] for a, w in knowledge])

    sweep = [(lam / 10, scaled(1 - lam / 25, 1 + (lam / 10) ** 2 / 4)) for lam in range(1, 21)]
    start = time.perf_counter()
    result = frontier.bootstrap_gap(scaled(1, 1), sweep, scaled(0.6, 1.1), resamples=1000)
    assert time.perf_counter() - start < 3.0
    assert result.estimate.exact and result.se is not None


# ---------------------------------------------------------------- verdict


def test_verdict_needs_every_seed_and_more_than_noise():
    assert frontier.verdict([0.2, 0.25, 0.3]) == "beats"
    assert frontier.verdict([-0.2, -0.3, -0.25]) == "loses"
    assert frontier.verdict([0.2, -0.1, 0.3]) == "undecided"
    assert frontier.verdict([None, 0.2, 0.3]) == "n/a"
    assert frontier.verdict([0.3]) == "n/a"


def test_verdict_counts_each_seeds_evaluation_noise():
    # three seeds at 0.1 whose intervals lie above 0 (a skewed bootstrap), se 0.06 each: the
    # seeds agree (sd 0), but the shared evaluation noise makes SE_total 0.06, and 0.1 < 0.12
    assert frontier.verdict([SeedGap(0.1, se=0.06, lo=0.01, hi=0.3)] * 3) == "undecided"
    assert frontier.verdict([SeedGap(0.1, se=0.04, lo=0.01, hi=0.3)] * 3) == "beats"  # 0.1 > 0.08
    # an interval reaching below 0 on one seed: not beyond that seed's noise
    seeds = [SeedGap(0.3, se=0.01, lo=0.28), SeedGap(0.3, se=0.01, lo=-0.01), SeedGap(0.3, se=0.01, lo=0.28)]
    assert frontier.verdict(seeds) == "undecided"
    assert frontier.verdict([SeedGap(-0.3, se=0.01, hi=-0.28)] * 2 + [SeedGap(-0.3, se=0.01, hi=0.01)]) == "undecided"


def test_verdict_is_monotone_where_the_plain_mean_test_is_not():
    # the plain test, mean > 2 sd/√n: (0.3, 0.35, 0.4) passes; raising the third seed to 2.0
    # gives mean 0.883 < 2 × 0.953/√3 = 1.10, so a *better* seed would fail it
    values = [0.3, 0.35, 2.0]
    mean, sd = frontier.mean_sd(values)
    assert mean < 2 * sd / math.sqrt(3)
    assert frontier.verdict([0.3, 0.35, 0.4]) == "beats" and frontier.verdict(values) == "beats"
    # with evaluation noise (se 0.04 each, intervals above 0): (0.05, 0.5, 0.9) fails the plain
    # test (mean 0.4833, 2·sqrt(0.1808/3 + 0.04²) = 0.4975) but lowering 0.9 to 0.5 passes it
    # (mean 0.35 > 2·sqrt(0.0675/3 + 0.0016) = 0.3105), so the monotone test says beats
    seeds = [SeedGap(v, se=0.04, lo=v / 2) for v in (0.05, 0.5, 0.9)]
    mean, sd = frontier.mean_sd([0.05, 0.5, 0.9])
    assert mean < 2 * math.sqrt(sd**2 / 3 + 0.04**2)
    mean, sd = frontier.mean_sd([0.05, 0.5, 0.5])
    assert mean > 2 * math.sqrt(sd**2 / 3 + 0.04**2)
    assert frontier.verdict(seeds) == "beats"


def test_a_verdict_on_bounds_says_so_and_never_loses():
    assert frontier.verdict([(0.3, False), (0.35, True), (0.4, True)]) == "beats ≥"
    assert frontier.verdict([(0.3, True), (0.35, True), (0.4, True)]) == "beats"
    # a negative bound proves nothing: the true value may be higher
    assert frontier.verdict([(-0.3, False), (-0.2, True), (-0.25, True)]) == "undecided"
    assert frontier.verdict([(-0.3, True), (-0.2, True), (-0.25, True)]) == "loses"
    assert frontier.verdict([(None, False), (0.2, True)]) == "n/a"


seed_values = st.lists(st.tuples(st.floats(-1, 1), st.floats(0, 0.2), st.floats(0, 0.3)), min_size=2, max_size=4)


@given(seed_values, st.lists(st.floats(0, 2), min_size=4, max_size=4))
def test_a_better_seed_never_turns_beats_into_undecided(seeds, raises):
    """Monotone: raising any seed's value (with its interval) keeps "beats"; so a verdict
    read on lower bounds holds for the true values, whatever they are."""
    low = [SeedGap(v, se=se, lo=v - w, hi=v + w) for v, se, w in seeds]
    high = [SeedGap(s.value + r, se=s.se, lo=s.lo + r, hi=s.hi + r) for s, r in zip(low, raises)]
    bounds = [SeedGap(s.value, False, s.se, s.lo, s.hi) for s in low]
    if frontier.verdict(low) == "beats":
        assert frontier.verdict(high) == "beats"
    assert frontier.verdict(bounds) == {"beats": "beats ≥"}.get(frontier.verdict(low), "undecided")
    if frontier.verdict(bounds) == "beats ≥":
        assert frontier.verdict(high) == "beats"


def test_several_merges_share_the_draws_and_each_gets_its_own_call_figures():
    other = Items([[3.5, 1], [2.5, 1]], [[1.2, 1], [3.3, 3]])
    both = frontier.bootstrap_gaps(T_ITEMS, [(1.0, TA_ITEMS)], {"a": MERGE_ITEMS, "b": other}, resamples=300, seed=4)
    assert both["a"] == frontier.bootstrap_gap(T_ITEMS, [(1.0, TA_ITEMS)], MERGE_ITEMS, resamples=300, seed=4)
    assert both["b"] == frontier.bootstrap_gap(T_ITEMS, [(1.0, TA_ITEMS)], other, resamples=300, seed=4)
