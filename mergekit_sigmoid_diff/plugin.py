"""How this package plugs into mergekit 0.1.5.

- :func:`register` adds the merge methods to mergekit's registry (idempotent).
- :func:`on_merge` wraps ``mergekit.merge.run_merge`` so that a recipe using one of our
  methods is checked before any tensor is loaded (:mod:`~mergekit_sigmoid_diff.preflight`),
  and ``mergekit.merge._model_out_config`` so that the output config.json, tokenizer and
  generation config describe the target (:mod:`~mergekit_sigmoid_diff.output`).
- :func:`on_cli` makes ``mergekit-yaml`` and ``mergekit-multi`` print our errors as one line.

The lazy import hook calls the ``on_*`` functions when mergekit imports those modules;
:func:`activate` does all of it at once for the command-line wrapper and for tests.
Recipes for other merge methods pass through untouched.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Optional

_WRAPPED = "__mergekit_sigmoid_diff_wrapped__"


def merge_methods() -> tuple:
    """The merge methods this package provides."""
    from mergekit_sigmoid_diff.method import sigmoid_diff_merge
    from mergekit_sigmoid_diff.varm import varm_merge

    return (sigmoid_diff_merge, varm_merge)


def method_names() -> frozenset[str]:
    return frozenset(m.spec.name for m in merge_methods())


def register(registry: ModuleType | None = None) -> None:
    """Add our methods to mergekit's registry unless they are there already."""
    if registry is None:
        from mergekit.merge_methods import registry
    known = {m.spec.name for m in registry.registered_methods()}
    for method in merge_methods():
        if method.spec.name not in known:
            registry.register(method)


def on_registry(module: ModuleType) -> None:
    try:
        register(module)
    except ImportError:
        # Our method module is itself being imported (it imports mergekit, which got here):
        # it cannot be registered yet. The wrapped run_merge registers before it plans.
        if not _importing("mergekit_sigmoid_diff.method", "mergekit_sigmoid_diff.varm"):
            raise


def _importing(*names: str) -> bool:
    """Whether one of these modules is part-way through its first import."""
    return any(getattr(getattr(sys.modules.get(n), "__spec__", None), "_initializing", False) for n in names)


def _wrap_once(module: ModuleType, attribute: str, make: Callable[[Any], Any]) -> None:
    original = getattr(module, attribute)
    if getattr(original, _WRAPPED, False):
        return
    wrapped = make(original)
    setattr(wrapped, _WRAPPED, True)
    setattr(module, attribute, wrapped)


# The parameters of mergekit's functions that the wrappers read, by name. Everything else
# passes through untouched (*args, **kwargs), so a new keyword in a mergekit release
# does not break merges; a renamed one fails tests/test_registration.py, naming it.
WRAPPED_PARAMETERS = {
    "mergekit.merge.run_merge": ("merge_config", "out_path", "options"),
    "mergekit.merge._model_out_config": ("config", "arch_info", "trust_remote_code"),
}


def _bound(function: Callable[..., Any], args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """The call bound to ``function``'s signature, defaults applied: read and replace
    arguments by name in ``.arguments``, call with ``.args`` / ``.kwargs``."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound


@dataclass
class Checked:
    """What :func:`checked` hands the merge (or ``inspect``) once every check passed."""

    options: Any  # MergeOptions, with the default LoRA merge cache filled in
    transfer: Any  # plan.TransferPlan, or None (varm)
    tokenizer_step: Any  # output.TokenizerStep
    stage: Optional[Path]  # the staging folder the merge writes to (None for inspect)


def with_lora_cache(merge_config: Any, options: Any) -> Any:
    """``options`` with a default ``lora_merge_cache`` when the recipe has a ``model+lora``
    reference and none was given (mergekit would stop with ``Need to specify cache dir``);
    says which folder in one line on stderr. An explicit ``--lora-merge-cache`` wins."""
    adapters = [(m.model.path, m.lora.path) for m in merge_config.referenced_models() if m.lora is not None]
    if not adapters or options.lora_merge_cache:
        return options
    from mergekit_sigmoid_diff.cache import default_lora_merge_cache

    from tqdm import tqdm

    folder = default_lora_merge_cache(adapters)
    # tqdm.write: a line of its own also under a running progress bar (mergekit-multi's)
    tqdm.write(f"LoRA adapters are merged into {folder} (the default; choose with --lora-merge-cache)", file=sys.stderr)
    return options.model_copy(update={"lora_merge_cache": str(folder)})


# What mergekit.common.ModelReference.merged (mergekit 0.1.5), which merges a ``model+lora``
# reference into the LoRA cache, makes transformers and peft print: it calls
# ``from_pretrained(torch_dtype=...)`` (a transformers log line), and the
# ``peft.PeftModel.from_pretrained`` it calls reads ``model.is_gradient_checkpointing`` (a
# FutureWarning; ``peft.get_peft_model`` reads it too). Neither is our call; both are
# silenced, exactly, while our merges run (and where our scripts call peft).
MERGEKIT_LORA_LOG = (
    ("transformers.configuration_utils", "transformers.modeling_utils"),  # the loggers that say it
    "`torch_dtype` is deprecated! Use `dtype` instead!",
)
MERGEKIT_LORA_WARNING = (FutureWarning, r"`is_gradient_checkpointing` is deprecated")


class _DropMessage(logging.Filter):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message


@contextmanager
def lora_notices_silenced() -> Iterator[None]:
    """Drop exactly :data:`MERGEKIT_LORA_LOG` and :data:`MERGEKIT_LORA_WARNING` (see there)."""
    logger_names, message = MERGEKIT_LORA_LOG
    loggers, drop = [logging.getLogger(name) for name in logger_names], _DropMessage(message)
    category, pattern = MERGEKIT_LORA_WARNING
    for logger in loggers:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=pattern, category=category)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


@contextmanager
def checked(
    merge_config: Any, options: Any, out_path: Any = None, config_source: Optional[str] = None
) -> Iterator[Checked]:
    """Every check a merge of one of our methods makes before it reads a tensor, in order:
    the recipe, the output folder (when ``out_path`` is given: the merge stages its output
    there, see :mod:`.staging`), the models' configs and safetensors headers, the statistics
    files of ``protect_subspace: data``, the model card, and the tokenizer step
    (``inherit_chat``, ``chat_template``, tokenizer source).

    The merge (:func:`on_merge`) and ``inspect`` both run exactly this, so they cannot disagree
    about what is valid. Raises :class:`~.errors.SigmoidDiffError`; the transfer plan is active
    (:func:`.plan.active`) inside the block."""
    from mergekit_sigmoid_diff import output, plan, preflight, staging

    register()  # in case the import hook could not yet (see on_registry)
    options = with_lora_cache(merge_config, options)
    transfer = preflight.check_recipe(merge_config)
    with ExitStack() as stack:
        if any(m.lora is not None for m in merge_config.referenced_models()):
            stack.enter_context(lora_notices_silenced())
        stage = stack.enter_context(staging.staged_output(out_path)) if out_path is not None else None
        stack.enter_context(plan.active(transfer))
        steps = preflight.check_models(merge_config, options)
        preflight.check_statistics(merge_config, options, steps)
        card_name = str(out_path) if out_path is not None else "inspect"
        preflight.check_model_card(merge_config, options, card_name, config_source)
        tokenizer_step = output.prepare(merge_config, options, transfer)
        yield Checked(options, transfer, tokenizer_step, stage)


def on_merge(module: ModuleType) -> None:
    def make(run_merge):
        @functools.wraps(run_merge)
        def checked_run_merge(*args, **kwargs):
            call = _bound(run_merge, args, kwargs)
            merge_config, out_path, options = (call.arguments[n] for n in WRAPPED_PARAMETERS["mergekit.merge.run_merge"])
            if merge_config.merge_method not in method_names():
                return run_merge(*args, **kwargs)
            from mergekit_sigmoid_diff import datamerge, output

            # the merge goes to a staging folder that becomes out_path only once complete
            with checked(merge_config, options, out_path, call.arguments.get("config_source")) as ok:
                call.arguments["out_path"] = str(ok.stage)
                call.arguments["options"] = ok.tokenizer_step.merge_options(ok.options)
                with datamerge.collecting() as survival:  # protect_subspace: data's guard
                    result = run_merge(*call.args, **call.kwargs)
                output.apply_tokenizer(ok.tokenizer_step, merge_config, str(ok.stage), ok.options, ok.transfer)
            _say(survival.report())
            return result

        return checked_run_merge

    _wrap_once(module, "run_merge", make)

    def make_out_config(model_out_config):
        # run_merge looks _model_out_config up as a module global when it runs
        @functools.wraps(model_out_config)
        def target_out_config(*args, **kwargs):
            call = _bound(model_out_config, args, kwargs)
            config, _, trust_remote_code = (
                call.arguments[n] for n in WRAPPED_PARAMETERS["mergekit.merge._model_out_config"]
            )
            if config.merge_method not in method_names():
                return model_out_config(*args, **kwargs)
            from mergekit_sigmoid_diff import output

            def original(replaced):  # mergekit's function, every other argument as given
                call.arguments["config"] = replaced
                return model_out_config(*call.args, **call.kwargs)

            return output.target_out_config(original, config, trust_remote_code)

        return target_out_config

    _wrap_once(module, "_model_out_config", make_out_config)


def _say(lines: list[str]) -> None:
    """Lines on stderr, each on its own line also under a running progress bar."""
    if lines:
        from tqdm import tqdm

        for line in lines:
            tqdm.write(line, file=sys.stderr)


def on_cli(module: ModuleType) -> None:
    """``mergekit-yaml`` / ``mergekit-multi``: report :class:`SigmoidDiffError` as
    ``Error: <message>`` with exit status 1, and call the checked ``run_merge``."""

    def make(callback):
        @functools.wraps(callback)
        def main(*args, **kwargs):
            import click

            from mergekit_sigmoid_diff.errors import SigmoidDiffError, wants_traceback

            try:
                return callback(*args, **kwargs)
            except SigmoidDiffError as error:
                if wants_traceback():
                    raise
                raise click.ClickException(str(error)) from None

        return main

    _wrap_once(module.main, "callback", make)
    # the command bound run_merge at its import; make sure it calls the checked one
    merge = sys.modules.get("mergekit.merge")
    if merge is not None:
        on_merge(merge)
        module.run_merge = merge.run_merge


# mergekit module -> what to do once it is imported (the import hook reads this too)
CALLBACKS = {
    "mergekit.merge_methods.registry": on_registry,
    "mergekit.merge": on_merge,
    "mergekit.scripts.run_yaml": on_cli,
    "mergekit.scripts.multimerge": on_cli,
}


def activate() -> None:
    """Register and wrap now, importing mergekit (for ``python -S`` and the wrapper)."""
    import importlib

    for name, callback in CALLBACKS.items():
        callback(sys.modules.get(name) or importlib.import_module(name))
