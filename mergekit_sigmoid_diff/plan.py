"""The transfer plan of a ``sigmoid_diff`` recipe: who is the target, who donates, and what.

Computed once per merge from the recipe alone (no file is read) by the recipe checks, then
handed to the output config and the tokenizer step; ``inspect`` checks recipes the same way. Settings resolve as mergekit
resolves them: a model's own parameters, then its slice's, its module's, the top level.

Per input group (``models``, each slice, each module) exactly one model has
``role: target`` and at least one is a donor (the default role); the base takes no role.
The output config describes the target, so every group must name the same target.
``inherit_rope`` / ``inherit_chat`` are single true/false values set on at most one donor
each: that donor lends the output its RoPE settings / its chat template and end-of-turn token.

The per-tensor rule (one target, some donors) is :func:`mergekit_sigmoid_diff.method.split_roles`,
which the method also applies to every tensor; this module adds where in the recipe a
mistake is, and the recipe-wide rules.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.merge_methods import registry

from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.method import DONOR, ROLE, TARGET, RoleError, split_roles

INHERIT_ROPE = "inherit_rope"
INHERIT_CHAT = "inherit_chat"
DONOR_FLAGS = {INHERIT_ROPE: "RoPE settings", INHERIT_CHAT: "chat template and eos token"}

Settings = Optional[Mapping[str, Any]]


@dataclass(frozen=True)
class InputModel:
    """One model of an input group and its parameter blocks, most specific first."""

    model: ModelReference
    scopes: tuple[Settings, ...]

    def resolve(self, key: str, default: Any = None) -> Any:
        return next((s[key] for s in self.scopes if s and key in s), default)

    def sets(self, key: str) -> bool:
        """Whether the model's own parameters set ``key`` (not an inherited value)."""
        return bool(self.scopes[0]) and key in self.scopes[0]


@dataclass(frozen=True)
class InputGroup:
    """The models merged together in one place of the recipe."""

    where: str  # "models", "slices[0]", "module x slices[1]", ...
    base: Optional[ModelReference]
    models: tuple[InputModel, ...]


@dataclass(frozen=True)
class TransferPlan:
    """Which input model each part of the output comes from."""

    target: ModelReference
    donors: tuple[ModelReference, ...]
    rope_donor: Optional[ModelReference] = None
    chat_donor: Optional[ModelReference] = None


def input_groups(config: MergeConfiguration) -> Iterator[InputGroup]:
    """Every input group of the recipe, with each model's parameter blocks."""
    top = config.parameters

    def group(where, base, models, *outer):
        return InputGroup(where, base, tuple(InputModel(m.model, (m.parameters, *outer, top)) for m in models))

    if config.models:
        yield group("models", config.base_model, config.models)
    for i, s in enumerate(config.slices or ()):
        yield group(f"slices[{i}]", s.base_model or config.base_model, s.sources, s.parameters)
    for name, module in (config.modules or {}).items():
        if module.models:
            yield group(f"module {name}", config.base_model, module.models, module.parameters)
        for i, s in enumerate(module.slices or ()):
            yield group(
                f"module {name} slices[{i}]", s.base_model or config.base_model, s.sources, s.parameters, module.parameters
            )


def tokenizer_built_by_mergekit(config: MergeConfiguration) -> bool:
    """mergekit builds (and saves) the output tokenizer, aligning the vocabularies, when the
    recipe has ``tokenizer`` or ``tokenizer_source``."""
    return config.tokenizer is not None or config.tokenizer_source is not None


def has_roles(method: str) -> bool:
    """Whether ``method`` takes target/donor roles (sigmoid_diff does, varm does not)."""
    return any(p.name == ROLE for p in registry.get(method).spec.parameters)


def transfer_plan(config: MergeConfiguration) -> Optional[TransferPlan]:
    """The plan of ``config``, or None for a method without roles.

    Raises :class:`SigmoidDiffError` (one line, naming the model and the place in the
    recipe) for a role on the base, a role that is not a single value, a weight on the
    target, a group without exactly one target or without donors, groups that name
    different targets, a donor flag that is not a single true/false or is set on the
    target, and a flag set on more than one donor.
    """
    if not has_roles(config.merge_method):
        return None
    targets: list[ModelReference] = []
    donors: list[ModelReference] = []
    flagged: dict[str, list[ModelReference]] = {key: [] for key in DONOR_FLAGS}
    for group in input_groups(config):
        ids, roles = [], []
        for entry in group.models:
            model = entry.model
            if model == group.base:
                if entry.sets(ROLE):
                    raise SigmoidDiffError(
                        f"base_model {model} is the common ancestor and takes no role (in {group.where})"
                    )
                continue
            if model in ids:
                raise SigmoidDiffError(
                    f"model {model} appears twice in {group.where}: each model is the target or a donor, once"
                )
            role = entry.resolve(ROLE, DONOR)
            if not isinstance(role, str):
                raise SigmoidDiffError(
                    f"role of model {model} in {group.where} must be a single value (target or donor), "
                    "not a gradient or filter"
                )
            if role == TARGET and entry.sets("weight"):
                raise SigmoidDiffError(
                    f"weight applies to donors; model {model} in {group.where} is the target "
                    "(its diff is kept whole)"
                )
            for key, chosen in flagged.items():
                value = entry.resolve(key, False)
                if not isinstance(value, bool):
                    raise SigmoidDiffError(
                        f"{key} of model {model} in {group.where} must be a single true or false, not {value!r}"
                    )
                if value and role == TARGET and entry.sets(key):
                    raise SigmoidDiffError(
                        f"{key} is a donor setting, but model {model} in {group.where} is the target "
                        "(the output already describes the target)"
                    )
                if value and role != TARGET and model not in chosen:
                    chosen.append(model)
            ids.append(model)
            roles.append(role)
        try:
            target, group_donors = split_roles(ids, roles)
        except RoleError as error:
            raise SigmoidDiffError(f"{group.where} {error}") from None
        if target not in targets:
            targets.append(target)
        donors.extend(d for d, _ in group_donors if d not in donors)
    if len(targets) != 1:
        raise SigmoidDiffError(
            "the output config describes the target, so all slices need the same model with "
            f"role: target (found {', '.join(str(m) for m in targets) or 'none'})"
        )
    for key, chosen in flagged.items():
        if len(chosen) > 1:
            raise SigmoidDiffError(
                f"{key}: true on {len(chosen)} donors ({', '.join(str(m) for m in chosen)}); "
                f"the output can take its {DONOR_FLAGS[key]} from one donor only"
            )
    return TransferPlan(
        target=targets[0],
        donors=tuple(donors),
        rope_donor=(flagged[INHERIT_ROPE] or [None])[0],
        chat_donor=(flagged[INHERIT_CHAT] or [None])[0],
    )


# The plan of the merge running in this context: set once by the wrapped run_merge, read by
# the output-config hook that mergekit calls from inside it (no second computation).
_CURRENT: contextvars.ContextVar[Optional[TransferPlan]] = contextvars.ContextVar("transfer_plan", default=None)


@contextmanager
def active(plan: Optional[TransferPlan]) -> Iterator[None]:
    token = _CURRENT.set(plan)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_or(config: MergeConfiguration) -> Optional[TransferPlan]:
    """The active plan if a merge is running, else the plan computed from ``config``."""
    plan = _CURRENT.get()
    return plan if plan is not None else transfer_plan(config)


def step_roles(merge: Any) -> tuple[Any, Any, list[tuple[Any, float]]]:
    """(base, target, [(donor, weight), ...]) of one planned merge step (mergekit's
    ``ExecuteMergeMethodTask``), from its resolved per-model parameters: what ``inspect`` and
    ``sweep`` read of a step, by the rule the method applies (:func:`.method.split_roles`)."""
    base = merge.base_model
    models = [m for m in merge.model_order if m != base]
    parameters = [merge.input_parameters[m] for m in models]
    target, donors = split_roles(models, [p[ROLE] for p in parameters], [p["weight"] for p in parameters])
    return base, target, donors


def each_step(steps: Sequence[Any], work: Callable[[Any, dict], Any], *, quiet: bool, desc: str) -> dict[str, Any]:
    """``work(step, tensors)`` on every planned merge step (mergekit's ``ExecuteMergeMethodTask``),
    given the tensors mergekit gathers for that step and streamed through mergekit's ``Executor`` as
    a merge streams them: {output tensor name: result}. ``inspect`` and ``sweep`` read steps here."""
    from mergekit.graph import Executor, Task
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    class StepTask(Task[Any]):
        merge: ExecuteMergeMethodTask
        work: Callable[[Any, dict], Any]

        def arguments(self) -> dict[str, Task]:
            return {"tensors": self.merge.gather_tensors}

        def group_label(self) -> Optional[str]:
            return self.merge.group_label()

        def uses_accelerator(self) -> bool:
            return False

        def execute(self, tensors: dict) -> Any:
            return self.work(self.merge, tensors)

    tasks = [StepTask(merge=step, work=work) for step in steps]
    return {task.merge.output_weight.name: result for task, result in Executor(targets=tasks).run(quiet=quiet, desc=desc)}
