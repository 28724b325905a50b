"""The merges the quality benchmark compares, as mergekit recipes.

Every recipe merges one donor I onto the target T with base B (absolute paths), in
float32. ``task_arithmetic`` is written as out = T + λ·(I − B): T with weight 1, I with
weight λ, ``normalize: false``. The sparsifying built-ins keep all of T's diff (density 1)
and sparsify only the donor's, with ``normalize: false`` so T's diff is not averaged away.

Variants that exist only if another part of the package provides them (``normalize``
for ``sigmoid_diff``, the ``varm`` method) are looked up in mergekit's registry at run
time and left out, with a note, when absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_sigmoid_diff import recommended

# Exempt vocabulary tensors and norms from the gate: they take the plain diff (issue 9).
EXEMPT_VOCAB_AND_NORMS = recommended.VOCAB_AND_NORMS_UNGATED  # the one definition
TA_LAMBDAS = (0.25, 0.5, 0.75, 1.0, 1.1, 1.25, 1.5)
# LiNeS (Wang et al., ICLR 2025): the donor weight grows linearly with depth, first → last layer
LINES_GRADIENTS = ((0.5, 1.0), (0.75, 1.25), (0.9, 1.3), (1.0, 1.5))
# protect_subspace variants: (side, energy, weight); the embeddings, lm_head and norms take
# the plain diff (the `gate` exemption), every other 2-D weight is projected
SUBSPACE_GRID = (  # the prototype's form, and the forms closest to a win in the in-process sweep
    ("input", 0.5, 1.2),
    ("input", 0.5, 1.0),
    ("input", 0.25, 0.75),
    ("output", 0.75, 0.75),
    ("output", 0.25, 0.75),
    ("both", 0.5, 1.0),
)


@dataclass(frozen=True)
class Variant:
    """One merge: ``method`` with ``params`` (top level) and per-model parameters.

    ``matched`` marks a sigmoid-family merge whose effective λ gets a task_arithmetic twin.
    """

    label: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    target_params: dict[str, Any] = field(default_factory=dict)
    donor_params: dict[str, Any] = field(default_factory=dict)
    matched: bool = False


def recipe(variant: Variant, base: Path, target: Path, donor: Path) -> dict[str, Any]:
    return {
        "merge_method": variant.method,
        "base_model": str(base),
        "models": [
            {"model": str(target), "parameters": dict(variant.target_params)},
            {"model": str(donor), "parameters": dict(variant.donor_params)},
        ],
        "parameters": dict(variant.params),
        "dtype": "float32",
    }


def task_arithmetic(lam: float, label: str | None = None) -> Variant:
    return Variant(
        label or f"task_arithmetic λ={lam:g}",
        "task_arithmetic",
        {"normalize": False},
        {"weight": 1.0},
        {"weight": round(lam, 4)},
    )


def sigmoid(label: str, weight: float = 1.0, **params: Any) -> Variant:
    return Variant(label, "sigmoid_diff", params, {"role": "target"}, {"weight": weight}, matched=True)


def protected(side: str, energy: float, weight: float) -> Variant:
    return sigmoid(
        f"sigmoid_diff protect {side} e={energy:g} w={weight:g}",
        weight=weight,
        gate=EXEMPT_VOCAB_AND_NORMS,
        protect_subspace=side,
        protect_energy=energy,
    )


def lines(first: float, last: float) -> Variant:
    return Variant(
        f"LiNeS λ={first:g}→{last:g}", "task_arithmetic", {"normalize": False}, {"weight": 1.0}, {"weight": [first, last]}
    )


def _registered() -> dict[str, Any]:
    from mergekit_sigmoid_diff import register

    register()
    from mergekit.merge_methods import registry

    return {m.spec.name: m for m in registry.registered_methods()}


def available_variants(quick: bool = False) -> tuple[list[Variant], list[str]]:
    """The variants to run, and notes on the ones left out."""
    methods = _registered()
    notes: list[str] = []
    gate = EXEMPT_VOCAB_AND_NORMS
    if quick:
        return [
            sigmoid("sigmoid_diff (defaults)"),
            protected("input", 0.5, 1.2),
            task_arithmetic(1.0),
            lines(0.5, 1.0),
            Variant("ties", "ties", {"normalize": False}, {"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 0.5}),
        ], notes

    # The element-wise variants measured before (steepness, midpoint, normalize, weight 1.5)
    # are in git history and docs/quality; these are the published default, the element-wise
    # recommendation and the subspace grid.
    chat_parameters, chat_weight = recommended.split(recommended.RECOMMENDED["chat-vector"])
    variants = [
        sigmoid("sigmoid_diff (defaults)"),
        sigmoid("sigmoid_diff exempt, midpoint by layer 0.3→0.7", gate=gate, midpoint=[0.3, 0.7]),
        *(protected(*point) for point in SUBSPACE_GRID),
        # the chat-vector job's recommended setting, read from the one place it is defined
        sigmoid("sigmoid_diff recommended (chat-vector)", chat_weight, **chat_parameters),
    ]
    if "varm" in methods:
        varm_params = {p.name for p in methods["varm"].spec.parameters}
        target_params = {"role": "target"} if "role" in varm_params else {}
        variants.append(Variant("varm", "varm", {}, target_params, {"weight": 1.0} if "weight" in varm_params else {}, matched=True))
    else:
        notes.append("no `varm` merge method registered in this install: not run")

    variants += [task_arithmetic(lam) for lam in TA_LAMBDAS]
    variants += [lines(*gradient) for gradient in LINES_GRADIENTS]
    variants += [
        Variant("ties d=0.5", "ties", {"normalize": False}, {"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 0.5}),
        Variant("dare_linear d=0.5", "dare_linear", {}, {"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 0.5}),
        Variant(
            "della d=0.5 ε=0.1", "della", {"normalize": False}, {"weight": 1.0, "density": 1.0},
            {"weight": 1.0, "density": 0.5, "epsilon": 0.1},
        ),
        Variant(
            "breadcrumbs d=0.9 γ=0.01", "breadcrumbs", {}, {"weight": 1.0, "density": 1.0},
            {"weight": 1.0, "density": 0.9, "gamma": 0.01},
        ),
    ]
    return variants, notes
