"""The valid values of the gate's numeric parameters: one rule per parameter, in one place.

:class:`~mergekit_sigmoid_diff.kernel.GateSettings` checks its fields with :func:`problem`, and
the recipe checks use the same function through the pydantic types of
:mod:`mergekit_sigmoid_diff.method`, so a value the kernel refuses is refused in a recipe too,
with the same reason. Pure Python (the math layer: no mergekit, no pydantic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Range:
    """A finite number between ``low`` and ``high``; ``open_low``/``open_high`` exclude the end."""

    low: float
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def describe(self) -> str:
        if self.high == math.inf:
            return f"a finite number {'>' if self.open_low else '>='} {self.low:g}"
        left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"a number in {left}{self.low:g}, {self.high:g}{right}"

    def holds(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return math.isfinite(value) and above and below


# parameter -> its valid values (the meaning of each is documented on GateSettings, or as marked)
RANGES: dict[str, Range] = {
    "steepness": Range(0.0, open_low=True),
    "midpoint": Range(0.0, 1.0),
    "eps": Range(0.0),
    "quantile": Range(0.0, 1.0, open_low=True),
    "protect_energy": Range(0.0, 1.0),
    # protect_subspace: data (the meaning of each is documented on datasolve.DataSettings)
    "data_beta": Range(0.0),
    "data_alpha": Range(0.0),
}


def problem(name: str, value: Any) -> Optional[str]:
    """Why ``value`` is not valid for the gate parameter ``name`` ("expected ..."), or None
    (also None for a parameter without a numeric rule)."""
    rule = RANGES.get(name)
    if rule is None:
        return None
    if not isinstance(value, (int, float)) or not rule.holds(float(value)):
        return f"expected {rule.describe()}"
    return None


__all__ = ["RANGES", "Range", "problem"]
