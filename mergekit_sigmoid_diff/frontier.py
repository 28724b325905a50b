"""The frontier rule: the project's one test of "better" (standard library only).

A transfer trades the donor's feature against the target's knowledge, and λ moves
``task_arithmetic`` (out = T + λ·(I − B)) along that trade. A merge is better only if it lies
*beyond* task_arithmetic's curve. Both axes are losses here (lower is better): the feature as
the donor behaviour's NLL, the knowledge as the target's held-out NLL (log-perplexity).

- ``curve``: task_arithmetic's points (λ, feature, knowledge), the target T itself as λ = 0.
- ``knowledge_at(curve, f)``: the knowledge task_arithmetic keeps at feature ``f``, linearly
  interpolated between the two λ-neighbouring points whose features bracket ``f``; where
  several segments bracket it (a curve that is not monotone), the best (lowest) knowledge, so
  the rule never flatters a merge. ``None`` outside the curve's feature range (no extrapolation).
- ``gap_closed = (k_TA(f) − k) / (k_TA(f) − k_T)``: the share of task_arithmetic's knowledge
  loss, at the merge's own feature strength, that the merge avoids. > 0: beyond the curve;
  1: no knowledge lost at all; < 0: inside it.
- ``feature_at(curve, k)``: the feature task_arithmetic reaches at the merge's knowledge
  (same interpolation, the other way round, best = lowest feature loss).
- ``gap_bound(curve, f, k)``: ``gap_closed`` where it is defined; where the merge's feature is
  *stronger* than any λ on the curve reaches (task_arithmetic's feature can saturate and turn
  back), a lower bound instead, read against the curve's strongest-feature point: task_arithmetic
  cannot reach that feature at all, and any knowledge loss it would need is at least that
  point's, so the true share avoided is at least this (for a merge that lost knowledge at all).

A setting *beats* task_arithmetic on a case when ``gap_closed`` > 0 on every seed and its
mean exceeds twice its standard error over seeds (``verdict``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["Point", "Curve", "knowledge_at", "feature_at", "gap_closed", "gap_bound", "verdict", "mean_sd"]


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
            raise ValueError("the task_arithmetic sweep needs λ > 0 points (T is λ = 0)")
        return cls((Point(0.0, target.feature, target.knowledge), *ordered))

    @property
    def target(self) -> Point:
        return self.points[0]

    @property
    def strongest(self) -> Point:
        """The point with the strongest feature (lowest feature loss; ties: least knowledge loss)."""
        return min(self.points, key=lambda p: (p.feature, p.knowledge))


def _along(curve: Curve, x: float, get_x, get_y) -> float | None:
    best = None
    for a, b in zip(curve.points, curve.points[1:]):
        xa, xb = get_x(a), get_x(b)
        lo, hi = min(xa, xb), max(xa, xb)
        if not lo <= x <= hi:
            continue
        y = get_y(a) if xa == xb else get_y(a) + (get_y(b) - get_y(a)) * (x - xa) / (xb - xa)
        best = y if best is None else min(best, y)
    return best


def knowledge_at(curve: Curve, feature: float) -> float | None:
    """task_arithmetic's knowledge loss at this feature loss (None outside its range)."""
    return _along(curve, feature, lambda p: p.feature, lambda p: p.knowledge)


def feature_at(curve: Curve, knowledge: float) -> float | None:
    """task_arithmetic's feature loss at this knowledge loss (None outside its range)."""
    return _along(curve, knowledge, lambda p: p.knowledge, lambda p: p.feature)


def gap_closed(curve: Curve, feature: float, knowledge: float) -> float | None:
    """The share of task_arithmetic's knowledge loss at ``feature`` that the merge avoids."""
    reference = knowledge_at(curve, feature)
    if reference is None:
        return None
    lost = reference - curve.target.knowledge
    if lost <= 0:
        return None  # task_arithmetic loses nothing there: no gap to close
    return (reference - knowledge) / lost


def gap_bound(curve: Curve, feature: float, knowledge: float) -> tuple[float | None, bool]:
    """(gap_closed, exact): exact where the curve covers ``feature``; a lower bound (exact =
    False) where the feature is stronger than the curve's strongest; (None, True) otherwise."""
    strongest = curve.strongest
    if feature >= strongest.feature:
        return gap_closed(curve, feature, knowledge), True
    lost = strongest.knowledge - curve.target.knowledge
    if lost <= 0:
        return None, True
    if knowledge <= curve.target.knowledge:
        return 1.0, False  # nothing lost at a feature task_arithmetic never reaches
    return (strongest.knowledge - knowledge) / lost, False


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(per_seed: Sequence[float | None]) -> str:
    """'beats', 'loses' (< 0 on every seed, by more than noise), 'undecided' or 'n/a'."""
    values = [v for v in per_seed if v is not None]
    if len(values) < len(per_seed) or len(values) < 2:
        return "n/a"
    mean, sd = mean_sd(values)
    noise = 2 * sd / math.sqrt(len(values))
    if all(v > 0 for v in values) and mean > noise:
        return "beats"
    if all(v < 0 for v in values) and -mean > noise:
        return "loses"
    return "undecided"
