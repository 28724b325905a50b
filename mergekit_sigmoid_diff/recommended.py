"""The recommended ``sigmoid_diff`` setting per job: the one place it is defined.

``recipes/<job>.yml`` carry these settings (``tests/test_recipes.py`` fails when they differ),
the main job merges ``RECOMMENDED["chat-vector"]`` and the benchmarks read them from here.
Each setting is the recipe's top-level ``parameters`` plus ``weight``, which goes on the donor
(a weight on the target is an error). The evidence per job: docs/real/README.md (real weights,
the frontier rule) and docs/quality/README.md (the tiny benchmark, a weak proxy).
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["RECOMMENDED", "VOCAB_AND_NORMS_UNGATED", "setting", "split"]

# Vocabulary and norm tensors take the plain diff (no gate, no projection): their rows for rare
# tokens (chat markers) move in both T and I, so a gate would damp the donor exactly there.
VOCAB_AND_NORMS_UNGATED: list[dict[str, Any]] = [
    {"filter": "embed_tokens", "value": False},
    {"filter": "lm_head", "value": False},
    {"filter": "norm", "value": False},
    {"value": True},
]

# The donor's diff off the target drift's top singular directions (half of its energy) on both
# sides, (1 − U Uᵀ) D (1 − V Vᵀ): behind the input side alone on the LoRA chat pair (0.36–0.47
# against 0.42–0.48), ahead of it on all-layer drifts, and on full fine-tunes ahead or not ranked
# where the figures are lower bounds (docs/real/frontier.md)
_PROJECTION = {"gate": VOCAB_AND_NORMS_UNGATED, "protect_subspace": "both", "protect_energy": 0.5}

RECOMMENDED: dict[str, dict[str, Any]] = {
    # chat / instruction following onto a continued-pretraining or fine-tuned target
    "chat-vector": {**_PROJECTION, "weight": 1.25},
    # the same transfer with the donor weight rising over the layers
    # (vocabulary and final norm at full weight, decoder layers 0.3 → 1.0: the recipe's illustration)
    "layer-aware": {**_PROJECTION, "weight": [
        {"filter": "embed_tokens", "value": 1.0},
        {"filter": "lm_head", "value": 1.0},
        {"filter": "model.norm", "value": 1.0},
        {"value": [0.3, 0.6, 1.0]},
    ]},
    # domain knowledge onto an instruct model
    "domain-transfer": {**_PROJECTION, "weight": 1.25},
    # with a few hundred lines of your data (two `calibrate` files named in the recipe):
    # the data-aware solve, β 0.1 and α 0.01 by default (datasolve.DataSettings)
    "chat-vector-data": {"protect_subspace": "data", "weight": 1.5},
    "domain-transfer-data": {"protect_subspace": "data", "weight": 1.5},
    # no real-weight case: task_arithmetic at λ = 0.5 plus the donor's RoPE settings
    "context-extension": {"gate": False, "weight": 0.5},
}


def setting(job: str) -> dict[str, Any]:
    """A copy of the recommended setting for ``job`` (a key of :data:`RECOMMENDED`)."""
    if job not in RECOMMENDED:
        raise KeyError(f"no recommended setting for job {job!r}; jobs: {', '.join(RECOMMENDED)}")
    return copy.deepcopy(RECOMMENDED[job])


def split(chosen: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(top-level parameters, donor weight or None) of a setting."""
    parameters = copy.deepcopy(chosen)
    return parameters, parameters.pop("weight", None)
