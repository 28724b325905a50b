"""The frontier rule: the project's one test of "better" (standard library only).

A transfer trades the donor's feature against the target's knowledge, and λ moves
``task_arithmetic`` (out = T + λ·(I − B)) along that trade. A merge is better only if it lies
*beyond* task_arithmetic's curve. Both axes are losses here (lower is better): the feature as
the donor behaviour's NLL, the knowledge as the target's held-out NLL (log-perplexity).

- ``curve``: task_arithmetic's measured points (λ, feature, knowledge), the target T itself as
  λ = 0, at any λ (a grid plus whatever :func:`refine` adds).
- ``knowledge_at(curve, f)``: the knowledge task_arithmetic keeps at feature ``f``, linearly
  interpolated between the two λ-neighbouring points whose features bracket ``f``; where
  several segments bracket it (a curve that turns back), the best (lowest) knowledge. ``None``
  outside the curve's feature range (no extrapolation).
- ``gap_closed = (k_TA(f) − k) / (k_TA(f) − k_T)``: the share of task_arithmetic's knowledge
  loss, at the merge's own feature strength, that the merge avoids. > 0: beyond the curve;
  1: no knowledge lost at all; < 0: inside it.
- :data:`KNOWLEDGE_FLOOR` = 0.01 nats: where task_arithmetic loses less than that at the
  merge's feature, ``gap_closed`` is "n/a: nothing to close" (:func:`gap` gives the reason).
  A ratio over a denominator of a few millinats is a ratio of evaluation noise (issue 24: a
  "beats" built on task_arithmetic losing 2.4–9.5 millinats). The floor is a stated choice
  above that scale, not a measurement; :func:`bootstrap_gap`'s interval measures the noise that
  is left just above it (a denominator barely above the floor shows as a wide interval).
- ``feature_at(curve, k)``: the feature task_arithmetic reaches at the merge's knowledge
  (same interpolation, the other way round, best = lowest feature loss).
- ``gap_bound(curve, f, k)``: ``gap_closed`` where it is defined; where the merge's feature is
  *stronger* than any measured λ reaches, a lower bound instead, read against the curve's
  strongest-feature point. The bound *assumes* that reaching a stronger feature would cost
  task_arithmetic at least that point's knowledge loss (it is not measured); :func:`refine`
  measures around the strongest point (and past the grid's last λ when allowed) to shrink the
  region where only the bound speaks.

Why refinement: straight chords between sparse λ points lie *above* a convex curve, so on a
coarse grid task_arithmetic looks worse than it is and every merge looks better (issue 24: one
merge read 0.52 on a 0.25-step grid and 0.476 on a 0.125-step one). Nothing in the reading rule
prevents that; :func:`refine` bisects the λ interval around each merge's feature until halving
the step again moves that merge's ``gap_closed`` by less than ``tol`` (0.02): that is what makes
the figure honest.

Error bars (:func:`bootstrap_gap`): a paired bootstrap over the evaluation items (every model
scored on the same items, item scores as [loss_sum, weight]; Efron & Tibshirani 1993, ch. 13),
feature items and knowledge items resampled independently, the same indices for every model.

Verdict (:func:`verdict`, per setting and case, over seeds s = 1…n, n ≥ 2): with g_s the
seed's ``gap_closed``, se_s its bootstrap standard error and [lo_s, hi_s] its interval,

    SE_total = sqrt(sd(g)² / n + mean(se)²)

(the seeds' spread of the mean, plus the evaluation noise, which every seed shares because
all seeds score the same items, so it does not shrink with n). **beats** needs both

1. every seed beyond the curve beyond its own evaluation noise: lo_s > 0 (g_s > 0 where a seed
   has no interval), and
2. mean > 2·SE_total, in its monotone form: some g' ≤ g (lower values, never higher) has
   mean(g') > 2·SE_total(g'). The plain test is not monotone (a seed doing *better* can raise
   the spread more than the mean); its monotone form is exactly "clip the highest values to a
   common level c and test" (the KKT conditions of maximising mean − 2·SE over g' ≤ g), so a
   better seed can never turn "beats" into "undecided". What that costs, stated plainly: the
   plain test accepts equal values (spread 0), so any monotone form of it accepts every g whose
   smallest value exceeds 2·mean(se) (lower all seeds to the smallest); the seeds' spread can
   only count through "every seed" and the evaluation noise through the intervals and that margin.

**loses** is the mirror image (hi_s < 0 on every seed, and the mirrored test). Both are
monotone, so lower bounds may be used: a verdict that rests on a bound prints "beats ≥" (the
true values, all at least the bounds, pass too); a bound never yields "loses" (its true value
may be higher). Anything else is **undecided**; a seed without a value makes it **n/a**.
"""

from __future__ import annotations

import math
import operator
import random
import statistics
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

from mergekit_sigmoid_diff.errors import SigmoidDiffError

__all__ = [
    "KNOWLEDGE_FLOOR", "NOTHING_TO_CLOSE", "OUTSIDE", "Point", "Curve", "Gap", "Refinement", "Items", "Bootstrap",
    "SeedGap", "knowledge_at", "feature_at", "gap", "gap_closed", "gap_bound", "refine", "bootstrap_gap", "bootstrap_gaps",
    "verdict", "mean_sd",
]

# nats (per token for the knowledge NLL): task_arithmetic must lose at least this much at the
# merge's feature for gap_closed to be a ratio of signal rather than of evaluation noise
KNOWLEDGE_FLOOR = 0.01
NOTHING_TO_CLOSE = "n/a: nothing to close"
OUTSIDE = "n/a: outside the curve"


@dataclass(frozen=True)
class Point:
    lam: float
    feature: float  # loss: lower = more of the donor's feature
    knowledge: float  # loss: lower = more of the target's knowledge


@dataclass(frozen=True)
class Curve:
    """task_arithmetic's points in λ order; ``points[0]`` is T (λ = 0)."""

    points: tuple[Point, ...]

    @classmethod
    def of(cls, target: Point, sweep: Iterable[Point]) -> "Curve":
        ordered = sorted(sweep, key=lambda p: p.lam)
        if not ordered or any(p.lam <= 0 for p in ordered):
            raise SigmoidDiffError("the task_arithmetic sweep needs λ > 0 points (T is λ = 0)")
        return cls((Point(0.0, target.feature, target.knowledge), *ordered))

    def with_points(self, points: Iterable[Point]) -> "Curve":
        """This curve plus ``points`` (new λ > 0; a λ already on the curve keeps its point)."""
        have = {p.lam for p in self.points}
        new = {p.lam: p for p in points if p.lam not in have}
        return Curve.of(self.target, [*self.points[1:], *new.values()])

    @property
    def target(self) -> Point:
        return self.points[0]

    @property
    def strongest(self) -> Point:
        """The point with the strongest feature (lowest feature loss; ties: least knowledge loss)."""
        return min(self.points, key=lambda p: (p.feature, p.knowledge))


def _segments(curve: Curve, x: float, get_x, get_y) -> list[tuple[float, int]]:
    """(interpolated y, segment index) for every λ-neighbouring segment whose x brackets ``x``."""
    out = []
    for index, (a, b) in enumerate(zip(curve.points, curve.points[1:])):
        xa, xb = get_x(a), get_x(b)
        if not min(xa, xb) <= x <= max(xa, xb):
            continue
        out.append((get_y(a) if xa == xb else get_y(a) + (get_y(b) - get_y(a)) * (x - xa) / (xb - xa), index))
    return out


def _along(curve: Curve, x: float, get_x, get_y) -> float | None:
    found = _segments(curve, x, get_x, get_y)
    return min(found)[0] if found else None


def knowledge_at(curve: Curve, feature: float) -> float | None:
    """task_arithmetic's knowledge loss at this feature loss (None outside its range)."""
    return _along(curve, feature, lambda p: p.feature, lambda p: p.knowledge)


def feature_at(curve: Curve, knowledge: float) -> float | None:
    """task_arithmetic's feature loss at this knowledge loss (None outside its range)."""
    return _along(curve, knowledge, lambda p: p.knowledge, lambda p: p.feature)


@dataclass(frozen=True)
class Gap:
    """``gap_closed`` with how it was read: ``exact`` = False for a lower bound; ``reason``
    (:data:`NOTHING_TO_CLOSE`, :data:`OUTSIDE`) when ``value`` is None."""

    value: Optional[float]
    exact: bool = True
    reason: Optional[str] = None


def gap(curve: Curve, feature: float, knowledge: float, floor: float = KNOWLEDGE_FLOOR) -> Gap:
    """The merge (feature, knowledge) against ``curve`` (the module docstring's rule)."""
    strongest = curve.strongest
    if feature >= strongest.feature:
        reference = knowledge_at(curve, feature)
        if reference is None:
            return Gap(None, True, OUTSIDE)  # weaker than anything measured, T included
        lost = reference - curve.target.knowledge
        if lost < floor:
            return Gap(None, True, NOTHING_TO_CLOSE)
        return Gap((reference - knowledge) / lost, True)
    # stronger than any measured λ: a lower bound at the strongest point (see gap_bound)
    lost = strongest.knowledge - curve.target.knowledge
    if lost < floor:
        return Gap(None, False, NOTHING_TO_CLOSE)
    if knowledge <= curve.target.knowledge:
        # (r − k)/(r − k_T) falls towards 1 as task_arithmetic's loss r grows past the strongest's
        return Gap(1.0, False)
    return Gap((strongest.knowledge - knowledge) / lost, False)


def gap_closed(curve: Curve, feature: float, knowledge: float, floor: float = KNOWLEDGE_FLOOR) -> float | None:
    """The share of task_arithmetic's knowledge loss at ``feature`` that the merge avoids
    (None outside the curve, or where task_arithmetic loses less than ``floor`` there)."""
    found = gap(curve, feature, knowledge, floor)
    return found.value if found.exact else None


def gap_bound(curve: Curve, feature: float, knowledge: float, floor: float = KNOWLEDGE_FLOOR) -> tuple[float | None, bool]:
    """(gap_closed, exact): exact where the curve covers ``feature``; a lower bound (exact =
    False) where the feature is stronger than the curve's strongest; None where :func:`gap` is n/a."""
    found = gap(curve, feature, knowledge, floor)
    return found.value, found.exact


# ---------------------------------------------------------------- refinement


@dataclass(frozen=True)
class Refinement:
    """What :func:`refine` did: the refined curve, the points it measured (in order), the
    merge's gap on the refined curve, and why it stopped (``converged``: the last halving moved
    the gap by < tol; ``capped``: the evaluation budget ran out first; neither: nothing to refine)."""

    curve: Curve
    added: tuple[Point, ...]
    gap: Gap
    converged: bool
    capped: bool


def _next_lambdas(curve: Curve, feature: float, max_lambda: Optional[float]) -> list[float]:
    """The λ to measure next for a merge at ``feature``: the midpoint of the bracketing λ
    interval that :func:`knowledge_at` reads; beyond the strongest point, the midpoints on both
    sides of it (and, when it is the last λ, one grid step further, up to ``max_lambda``)."""
    points = curve.points
    strongest = curve.strongest
    if feature >= strongest.feature:
        found = _segments(curve, feature, lambda p: p.feature, lambda p: p.knowledge)
        if not found:
            return []
        index = min(found)[1]
        return [(points[index].lam + points[index + 1].lam) / 2]
    at = points.index(strongest)
    out = []
    if at > 0:
        out.append((points[at - 1].lam + strongest.lam) / 2)
    if at + 1 < len(points):
        out.append((strongest.lam + points[at + 1].lam) / 2)
    elif max_lambda is not None and strongest.lam < max_lambda and at > 0:
        out.append(min(strongest.lam + (strongest.lam - points[at - 1].lam), max_lambda))
    return out


def _moved(before: Gap, after: Gap) -> float:
    if before.exact != after.exact or (before.value is None) != (after.value is None):
        return math.inf
    return 0.0 if before.value is None else abs(after.value - before.value)


def refine(score: Callable[[float], Point], curve: Curve, feature: float, knowledge: float, *, tol: float = 0.02,
           max_evaluations: int = 12, floor: float = KNOWLEDGE_FLOOR, max_lambda: Optional[float] = None) -> Refinement:
    """Measure task_arithmetic at more λ around a merge's feature until halving the bracketing
    λ step again moves the merge's ``gap_closed`` by less than ``tol``.

    ``score(λ)`` measures task_arithmetic at λ (the returned point is placed at λ). Each round
    bisects the λ interval that brackets the merge's feature (or, for a feature stronger than
    any measured λ, the intervals on both sides of the strongest point, so the bound is read
    against the strongest point there is; ``max_lambda`` allows one grid step past the last λ).
    At most ``max_evaluations`` calls of ``score``; ``capped`` says when that stopped it.
    Deterministic for a deterministic ``score``.
    """
    if not tol > 0 or max_evaluations < 0:
        raise SigmoidDiffError(f"refine needs tol > 0 and max_evaluations >= 0 (got tol={tol}, max_evaluations={max_evaluations})")
    current = gap(curve, feature, knowledge, floor)
    added: list[Point] = []
    while True:
        lams = _next_lambdas(curve, feature, max_lambda)
        if not lams:
            return Refinement(curve, tuple(added), current, converged=False, capped=False)
        if len(added) + len(lams) > max_evaluations:
            return Refinement(curve, tuple(added), current, converged=False, capped=True)
        new = []
        for lam in lams:
            measured = score(lam)
            new.append(Point(lam, measured.feature, measured.knowledge))
        added += new
        curve = curve.with_points(new)
        after = gap(curve, feature, knowledge, floor)
        moved, current = _moved(current, after), after
        if moved < tol:
            return Refinement(curve, tuple(added), current, converged=True, capped=False)


# ---------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class Items:
    """One model's per-item scores on the two axes (contract B): [loss_sum, weight] per item,
    in the probe's order (the same for every model). The axis score is Σ loss_sum / Σ weight."""

    feature: Sequence[Sequence[float]]
    knowledge: Sequence[Sequence[float]]

    def point(self, lam: float) -> Point:
        return Point(lam, _mean(self.feature), _mean(self.knowledge))


def _mean(items: Sequence[Sequence[float]]) -> float:
    return math.fsum(i[0] for i in items) / math.fsum(i[1] for i in items)


@dataclass(frozen=True)
class Bootstrap:
    """The paired bootstrap of one merge's ``gap_closed``: its standard error and percentile
    interval [lo, hi] over the defined resamples; ``undefined`` = resamples where the gap was
    n/a. When more than (1 − level)/2 of the resamples are undefined, the interval is not
    determined on that side, and se, lo and hi are None."""

    estimate: Gap
    se: Optional[float]
    lo: Optional[float]
    hi: Optional[float]
    undefined: int
    resamples: int
    level: float


def _columns(name: str, items: Sequence[Sequence[float]], weights: Optional[list[float]]) -> tuple[list[float], list[float]]:
    losses = [float(i[0]) for i in items]
    own = [float(i[1]) for i in items]
    if weights is not None and own != weights:
        raise SigmoidDiffError(f"{name}: its items differ from the target's ({len(own)} items, or other weights): "
                               "every model must be scored on the same items")
    return losses, own


def _counts(rng: random.Random, n: int) -> list[int]:
    counts = [0] * n
    for i in rng.choices(range(n), k=n):
        counts[i] += 1
    return counts


def bootstrap_gap(target: Items, sweep: Sequence[tuple[float, Items]], merge: Items, *, resamples: int = 1000,
                  seed: int = 0, level: float = 0.95, floor: float = KNOWLEDGE_FLOOR) -> Bootstrap:
    """Paired bootstrap of ``gap_closed`` (:func:`gap`, bounds included) over evaluation items.

    Each resample draws n_f feature-item and n_k knowledge-item indices with replacement
    (``random.Random(seed)``; the two axes independently), takes the same indices for every
    model (T, each task_arithmetic λ of ``sweep``, the merge), rebuilds each score as
    Σ count·loss_sum / Σ count·weight, and recomputes the merge's gap against the rebuilt curve.
    Interval: the nearest-rank percentiles ((1 − level)/2 and (1 + level)/2) of the defined values.
    """
    return bootstrap_gaps(target, sweep, {"the merge": merge}, resamples=resamples, seed=seed, level=level,
                          floor=floor)["the merge"]


def bootstrap_gaps(target: Items, sweep: Sequence[tuple[float, Items]], merges: Mapping[str, Items], *,
                   resamples: int = 1000, seed: int = 0, level: float = 0.95,
                   floor: float = KNOWLEDGE_FLOOR) -> dict[str, Bootstrap]:
    """:func:`bootstrap_gap` for several merges of one case and seed at once: the same draws
    (so each merge's figures equal its own call's), the curve rebuilt once per resample."""
    if resamples < 2 or not 0 < level < 1:
        raise SigmoidDiffError(f"bootstrap_gap needs resamples >= 2 and 0 < level < 1 (got {resamples}, {level})")
    sweep = sorted(sweep, key=lambda pair: pair[0])
    lams = [lam for lam, _ in sweep]
    curve = Curve.of(target.point(0.0), [items.point(lam) for lam, items in sweep])
    estimates = {name: gap(curve, *_xy(items), floor) for name, items in merges.items()}
    models = [("the target", target), *((f"task_arithmetic λ={lam:g}", items) for lam, items in sweep), *merges.items()]
    _, feature_w = _columns("the target", target.feature, None)
    _, knowledge_w = _columns("the target", target.knowledge, None)
    if not feature_w or not knowledge_w:
        raise SigmoidDiffError("bootstrap_gap: the target has no feature or no knowledge items")
    feature_l = [_columns(name, m.feature, feature_w)[0] for name, m in models]
    knowledge_l = [_columns(name, m.knowledge, knowledge_w)[0] for name, m in models]
    on_curve = len(sweep) + 1
    rng = random.Random(seed)
    values: list[list[float]] = [[] for _ in merges]
    for _ in range(resamples):
        cf, ck = _counts(rng, len(feature_w)), _counts(rng, len(knowledge_w))
        wf, wk = sum(map(operator.mul, cf, feature_w)), sum(map(operator.mul, ck, knowledge_w))
        if wf <= 0 or wk <= 0:
            continue  # every drawn item has weight 0: no score (counted as undefined)
        f = [sum(map(operator.mul, cf, losses)) / wf for losses in feature_l]
        k = [sum(map(operator.mul, ck, losses)) / wk for losses in knowledge_l]
        curve = Curve((Point(0.0, f[0], k[0]), *map(Point, lams, f[1:on_curve], k[1:on_curve])))
        for out, fm, km in zip(values, f[on_curve:], k[on_curve:]):
            value = gap(curve, fm, km, floor).value
            if value is not None:
                out.append(value)
    return {name: _summary(estimates[name], found, resamples, level) for name, found in zip(merges, values)}


def _summary(estimate: Gap, values: list[float], resamples: int, level: float) -> Bootstrap:
    undefined = resamples - len(values)
    tail = (1 - level) / 2
    if not values or undefined > tail * resamples:
        return Bootstrap(estimate, None, None, None, undefined, resamples, level)
    values.sort()
    m = len(values)
    lo = values[max(0, math.ceil(tail * m) - 1)]
    hi = values[min(m - 1, math.ceil((1 - tail) * m) - 1)]
    return Bootstrap(estimate, statistics.stdev(values) if m > 1 else 0.0, lo, hi, undefined, resamples, level)


def _xy(items: Items) -> tuple[float, float]:
    p = items.point(0.0)
    return p.feature, p.knowledge


# ---------------------------------------------------------------- verdict


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class SeedGap:
    """One seed's ``gap_closed`` for :func:`verdict`: a lower bound when not ``exact``; ``se``,
    ``lo``, ``hi`` from :func:`bootstrap_gap` where the seed has item scores (None otherwise)."""

    value: Optional[float]
    exact: bool = True
    se: Optional[float] = None
    lo: Optional[float] = None
    hi: Optional[float] = None


Seed = Union[SeedGap, tuple, float, None]


def _seed(value: Seed) -> SeedGap:
    if isinstance(value, SeedGap):
        return value
    if isinstance(value, tuple):
        return SeedGap(value[0], bool(value[1]))
    return SeedGap(value)


def _best_margin(values: Sequence[float], item_se: float) -> float:
    """max over g' ≤ values of mean(g') − 2·SE_total(g'): the monotone form of mean > 2·SE.

    The maximiser clips the highest values to one level c (KKT: ∂/∂g'_s falls with g'_s, so
    every lowered value sits where the derivative is 0, the same c for all); within each
    interval between sorted values the clipped set is fixed and the margin is concave in c
    (linear minus the norm of an affine map), so a golden-section search per interval finds it.
    """
    n = len(values)
    ordered = sorted(values)

    def margin(c: float) -> float:
        clipped = [min(v, c) for v in ordered]
        mean, sd = mean_sd(clipped)
        return mean - 2 * math.sqrt(sd * sd / n + item_se * item_se)

    best = max(margin(c) for c in ordered)
    ratio = (math.sqrt(5) - 1) / 2
    for lo, hi in zip(ordered, ordered[1:]):
        a, b = lo, hi
        for _ in range(80):
            x1, x2 = b - ratio * (b - a), a + ratio * (b - a)
            if margin(x1) < margin(x2):
                a = x1
            else:
                b = x2
        best = max(best, margin((a + b) / 2))
    return best


def verdict(per_seed: Sequence[Seed]) -> str:
    """'beats', 'beats ≥' (resting on lower bounds), 'loses', 'undecided' or 'n/a' (see the
    module docstring for the exact test). Each seed: a :class:`SeedGap`, a (value, exact) pair
    or a plain value (exact, no interval)."""
    seeds = [_seed(s) for s in per_seed]
    if len(seeds) < 2 or any(s.value is None for s in seeds):
        return "n/a"
    values = [s.value for s in seeds]
    item_se = statistics.fmean(s.se if s.se is not None else 0.0 for s in seeds)
    if all((s.lo if s.lo is not None else s.value) > 0 for s in seeds) and _best_margin(values, item_se) > 0:
        return "beats" if all(s.exact for s in seeds) else "beats ≥"
    if (all(s.exact for s in seeds) and all((s.hi if s.hi is not None else s.value) < 0 for s in seeds)
            and _best_margin([-v for v in values], item_se) > 0):
        return "loses"
    return "undecided"
