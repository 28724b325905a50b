"""The output folder of a ``sigmoid_diff`` merge describes the target, plus what donors lend.

mergekit 0.1.5 builds the output ``config.json`` from ``base_model`` and copies the base's
tokenizer and ``generation_config.json``. A transfer's output is the *target* with a donor's
feature added, so here:

- :func:`target_out_config` (wraps ``mergekit.merge._model_out_config``): the output config
  is the target's (architecture, vocab size, special token ids, ``tie_word_embeddings``), with
  mergekit's usual dtype and layer-count adjustments. A donor with ``inherit_rope: true``
  lends its RoPE settings (``rope_parameters`` in transformers 5; ``rope_theta`` /
  ``rope_scaling`` in older versions, whose config.json transformers 5 converts on load) and
  ``max_position_embeddings``.
- :func:`prepare` (before any tensor is merged) and :func:`apply_tokenizer` (after mergekit
  wrote the folder, still inside the wrapped ``run_merge``): the output tokenizer and
  generation config are the target's, or the one mergekit built when the recipe has
  ``tokenizer`` / ``tokenizer_source``. A donor with ``inherit_chat: true`` lends its chat
  template, its eos (end-of-turn) token, its special tokens and its generation config; the
  token ids in config.json and generation_config.json are re-mapped by token text onto the
  output vocabulary. A recipe's own ``chat_template`` is applied last and wins.

Methods of this package without a ``role`` parameter keep mergekit's behaviour.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import transformers
from mergekit.common import ModelPath, ModelReference
from mergekit.config import MergeConfiguration
from mergekit.merge_methods import registry
from mergekit.options import MergeOptions

from mergekit_sigmoid_diff import preflight
from mergekit_sigmoid_diff.errors import SigmoidDiffError

LOG = logging.getLogger(__name__)

INHERIT_ROPE = "inherit_rope"
INHERIT_CHAT = "inherit_chat"
SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
LOAD_ARGUMENTS = ("local_files_only", "is_local")
# Files a tokenizer (or mergekit's tokenizer copy) may leave in a model folder; cleared
# before the output tokenizer is written so no stale base file (e.g. a base chat template)
# survives next to it.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class OutputPlan:
    """Which input model each part of the output folder comes from."""

    target: ModelReference
    rope_donor: Optional[ModelReference] = None
    chat_donor: Optional[ModelReference] = None


# --- reading the recipe -------------------------------------------------------------------


def output_plan(config: MergeConfiguration) -> Optional[OutputPlan]:
    """The target and the donors flagged ``inherit_rope`` / ``inherit_chat``.

    None for a method without roles. Raises :class:`SigmoidDiffError` when the slices
    name different targets, when a flag is not a single true/false, when the target
    itself is flagged, or when more than one donor is flagged for the same thing.
    Settings resolve like mergekit's: the model's own, then slice, module, top level.
    """
    names = {p.name for p in registry.get(config.merge_method).spec.parameters}
    if "role" not in names:
        return None
    targets: list[ModelReference] = []
    flagged: dict[str, list[ModelReference]] = {INHERIT_ROPE: [], INHERIT_CHAT: []}
    for where, base, models in preflight._input_groups(config):
        for model, scopes in models:
            if model == base:
                continue
            role = _resolve(scopes, "role", "donor")
            for key, chosen in flagged.items():
                value = _resolve(scopes, key, False)
                if not isinstance(value, bool):
                    raise SigmoidDiffError(
                        f"{key} of model {model} in {where} must be a single true or false, "
                        f"not {value!r}"
                    )
                if value and role == "target" and key in (scopes[0] or {}):
                    raise SigmoidDiffError(
                        f"{key} is a donor setting, but model {model} in {where} is the target "
                        "(the output already describes the target)"
                    )
                if value and role != "target" and model not in chosen:
                    chosen.append(model)
            if role == "target" and model not in targets:
                targets.append(model)
    if len(targets) != 1:
        found = ", ".join(str(m) for m in targets) or "none"
        raise SigmoidDiffError(
            f"the output config describes the target, so all slices need the same model with "
            f"role: target (found {found})"
        )
    what = {INHERIT_ROPE: "RoPE settings", INHERIT_CHAT: "chat template and eos token"}
    for key, chosen in flagged.items():
        if len(chosen) > 1:
            raise SigmoidDiffError(
                f"{key}: true on {len(chosen)} donors ({', '.join(str(m) for m in chosen)}); "
                f"the output can take its {what[key]} from one donor only"
            )
    return OutputPlan(
        target=targets[0],
        rope_donor=(flagged[INHERIT_ROPE] or [None])[0],
        chat_donor=(flagged[INHERIT_CHAT] or [None])[0],
    )


def _resolve(scopes: Sequence[Optional[dict]], key: str, default: Any) -> Any:
    return next((s[key] for s in scopes if s and key in s), default)


def _tokenizer_built_by_mergekit(config: MergeConfiguration) -> bool:
    """mergekit builds (and saves) the output tokenizer when either setting is given."""
    return config.tokenizer is not None or config.tokenizer_source is not None


# --- config.json ---------------------------------------------------------------------------


def target_out_config(
    original: Callable[..., transformers.PretrainedConfig],
    config: MergeConfiguration,
    arch_info: Any,
    trust_remote_code: bool = False,
) -> transformers.PretrainedConfig:
    """mergekit's ``_model_out_config`` built from the target; RoPE from ``inherit_rope``.

    ``original`` is mergekit's function: it is called with the target in place of
    ``base_model`` so its dtype and layer-count adjustments still apply.
    """
    plan = output_plan(config)
    if plan is None:
        return original(config, arch_info, trust_remote_code=trust_remote_code)
    out = original(
        config.model_copy(update={"base_model": plan.target}), arch_info, trust_remote_code=trust_remote_code
    )
    if plan.rope_donor is not None:
        inherit_rope(out, plan.rope_donor.config(trust_remote_code=trust_remote_code), plan.rope_donor)
    return out


def rope_fields(config: transformers.PretrainedConfig) -> dict[str, Any]:
    """The RoPE settings of a loaded config, in the style the installed transformers uses.

    transformers 5 holds them in ``rope_parameters`` (``rope_theta``, ``rope_type``, scaling
    fields) and converts an old config.json's ``rope_theta``/``rope_scaling`` into it on load;
    older versions keep the two separate attributes.
    """
    parameters = getattr(config, "rope_parameters", None)
    if parameters:
        return {"rope_parameters": copy.deepcopy(dict(parameters))}
    fields = {}
    if getattr(config, "rope_theta", None) is not None:
        fields["rope_theta"] = config.rope_theta
    if fields and hasattr(config, "rope_scaling"):
        fields["rope_scaling"] = copy.deepcopy(config.rope_scaling)
    return fields


def inherit_rope(out: transformers.PretrainedConfig, donor: transformers.PretrainedConfig, name: Any) -> None:
    """Give ``out`` the donor's RoPE settings and ``max_position_embeddings``, in place."""
    fields = rope_fields(donor)
    if not fields:
        raise SigmoidDiffError(
            f"{INHERIT_ROPE}: the config of donor {name} has no RoPE settings "
            "(rope_parameters or rope_theta)"
        )
    max_positions = getattr(donor, "max_position_embeddings", None)
    if max_positions is None:
        raise SigmoidDiffError(f"{INHERIT_ROPE}: the config of donor {name} has no max_position_embeddings")
    # max positions first: transformers validates some RoPE types against it
    out.max_position_embeddings = max_positions
    for key, value in fields.items():
        setattr(out, key, value)


# --- tokenizer, generation config, special token ids ---------------------------------------


def prepare(config: MergeConfiguration, options: MergeOptions) -> Optional[OutputPlan]:
    """Checks for the tokenizer step that can run before any tensor is merged.

    With ``inherit_chat``: the donor's tokenizer loads and has a chat template, and every
    special token of it is in the output vocabulary (the target's, or the one named by
    ``tokenizer.source``; ``union`` always holds them).
    """
    plan = output_plan(config)
    if plan is None or plan.chat_donor is None:
        return plan
    built = _tokenizer_built_by_mergekit(config)
    if not built and not options.copy_tokenizer:
        raise SigmoidDiffError(
            f"{INHERIT_CHAT} on donor {plan.chat_donor} needs an output tokenizer: "
            "drop --no-copy-tokenizer"
        )
    donor_tokenizer = load_tokenizer(plan.chat_donor, options)
    _require_chat_template(donor_tokenizer, plan.chat_donor)
    source = config.tokenizer.source if config.tokenizer is not None else config.tokenizer_source
    if not built:
        vocabulary_model = plan.target
    elif source == "union":
        return plan
    elif source == "base":
        vocabulary_model = config.base_model
    else:
        vocabulary_model = source
    _missing_specials(donor_tokenizer, load_tokenizer(vocabulary_model, options), plan.chat_donor)
    return plan


def apply_tokenizer(
    config: MergeConfiguration, out_path: str, options: MergeOptions, plan: Optional[OutputPlan] = None
) -> None:
    """Write the output tokenizer, generation_config.json and special token ids (see module doc).

    Call after mergekit's ``run_merge`` wrote ``out_path``; pass the plan computed before it
    (``run_merge`` rewrites ``config.models`` into modules; the plan reads either form).
    """
    plan = plan or output_plan(config)
    built = _tokenizer_built_by_mergekit(config)
    if plan is None or (not built and not options.copy_tokenizer):
        return
    out = Path(out_path)
    target_tokenizer = _try_load_tokenizer(plan.target, options)
    if built:
        tokenizer = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=options.trust_remote_code)
    elif target_tokenizer is not None:
        tokenizer = target_tokenizer  # edited below; its vocabulary (all the id mapping reads) stays
    else:
        LOG.warning("target %s has no tokenizer: the output keeps the base's", plan.target)
        tokenizer = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=options.trust_remote_code)

    config_path = out / "config.json"
    out_config = json.loads(config_path.read_text(encoding="utf-8"))
    # (tokenizer the ids are written for, ids) per key; re-mapped by token text below
    id_sources = {key: (target_tokenizer, out_config.get(key)) for key in SPECIAL_ID_KEYS}
    generation = load_generation_config(plan.target)
    generation_tokenizer = target_tokenizer
    generation_from_donor = False

    if plan.chat_donor is not None:
        donor_tokenizer = load_tokenizer(plan.chat_donor, options)
        carry_chat(tokenizer, donor_tokenizer, plan.chat_donor)
        donor_config = plan.chat_donor.config(trust_remote_code=options.trust_remote_code)
        eos = getattr(donor_config, "eos_token_id", None)
        if eos is None:
            eos = donor_tokenizer.eos_token_id
        id_sources["eos_token_id"] = (donor_tokenizer, eos)
        donor_generation = load_generation_config(plan.chat_donor)
        if donor_generation is not None:
            generation, generation_tokenizer = donor_generation, donor_tokenizer
            generation_from_donor = True

    if config.chat_template:
        from mergekit.merge import _set_chat_template

        _set_chat_template(tokenizer, config, trust_remote_code=options.trust_remote_code)

    for key, (source, ids) in id_sources.items():
        if source is not None and (ids is not None or key in out_config):
            out_config[key] = remap_token_ids(ids, source, tokenizer, f"{key} in config.json")
    if generation is not None:
        for key in SPECIAL_ID_KEYS:
            ids = getattr(generation, key, None)
            if generation_tokenizer is not None and ids is not None:
                setattr(generation, key, remap_token_ids(ids, generation_tokenizer, tokenizer, f"{key} in generation_config.json"))
        if plan.chat_donor is not None and (not generation_from_donor or generation.eos_token_id is None):
            # generation must stop at the donor's eos, whichever generation config this is
            generation.eos_token_id = out_config.get("eos_token_id")

    for name in TOKENIZER_FILES:
        (out / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(out)
    _drop_load_arguments(out / "tokenizer_config.json")
    if generation is not None:
        generation.save_pretrained(out)
    config_path.write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _drop_load_arguments(path: Path) -> None:
    """transformers 5 saves how the tokenizer was loaded (``local_files_only``, ``is_local``)
    into tokenizer_config.json; they describe this machine, not the model."""
    if not path.exists():
        return
    values = json.loads(path.read_text(encoding="utf-8"))
    if any(key in values for key in LOAD_ARGUMENTS):
        for key in LOAD_ARGUMENTS:
            values.pop(key, None)
        path.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def carry_chat(tokenizer: Any, donor_tokenizer: Any, donor: Any) -> None:
    """Give ``tokenizer`` the donor's chat template, eos token and special tokens, in place.

    The vocabulary is not changed: a donor special token missing from it is an error, since
    the output has no embedding row for it.
    """
    _require_chat_template(donor_tokenizer, donor)
    specials = _missing_specials(donor_tokenizer, tokenizer, donor)
    special_here = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    listed = set(donor_tokenizer.all_special_tokens)  # named or listed as extra by the donor
    new = [
        token
        for token in specials
        if token not in tokenizer.all_special_tokens and (token in listed or token not in special_here)
    ]
    if new:
        parameters = inspect.signature(tokenizer.add_special_tokens).parameters
        keep = next((p for p in parameters if p.startswith("replace_")), None)  # name differs by version
        tokenizer.add_special_tokens({"additional_special_tokens": new}, **({keep: False} if keep else {}))
    tokenizer.eos_token = donor_tokenizer.eos_token
    tokenizer.chat_template = donor_tokenizer.chat_template


def _require_chat_template(donor_tokenizer: Any, donor: Any) -> None:
    if not donor_tokenizer.chat_template:
        raise SigmoidDiffError(f"{INHERIT_CHAT}: donor {donor} has no chat template in its tokenizer")


def _missing_specials(donor_tokenizer: Any, tokenizer: Any, donor: Any) -> list[str]:
    """The donor's special tokens (named ones and added ones marked special), in id order;
    raises if any is missing from ``tokenizer``'s vocabulary."""
    specials = [t.content for _, t in sorted(donor_tokenizer.added_tokens_decoder.items()) if t.special]
    specials += [t for t in donor_tokenizer.all_special_tokens if t not in specials]
    vocabulary = tokenizer.get_vocab()
    missing = [token for token in specials if token not in vocabulary]
    if missing:
        shown = ", ".join(repr(t) for t in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise SigmoidDiffError(
            f"{INHERIT_CHAT}: special token(s) {shown} of donor {donor} are not in the output "
            "vocabulary; add `tokenizer: {source: union}` to the recipe so the output keeps "
            "the donor's rows for them"
        )
    return specials


def remap_token_ids(ids: Any, source: Any, tokenizer: Any, what: str) -> Any:
    """Token id(s) of ``source``'s vocabulary → the same token text's id in ``tokenizer``.

    None stays None; an id ``source`` does not know (config files hold such ids) is kept
    as it is; a known token missing from ``tokenizer`` raises.
    """
    if ids is None:
        return None
    if isinstance(ids, (list, tuple)):
        return [remap_token_ids(i, source, tokenizer, what) for i in ids]
    token = source.convert_ids_to_tokens(int(ids))
    if token is None:
        LOG.warning("%s: id %s is not in the source tokenizer; kept as is", what, ids)
        return ids
    new_id = tokenizer.get_vocab().get(token)
    if new_id is None:
        raise SigmoidDiffError(f"{what}: token {token!r} (id {ids}) is not in the output vocabulary")
    return new_id


# --- loading from local folders, hub ids and model+lora references ------------------------


def _places(model: ModelReference) -> list[ModelPath]:
    """Where a model's tokenizer files may be: a LoRA adapter's own folder first."""
    return ([model.lora] if model.lora is not None else []) + [model.model]


def _holds(place: ModelPath, file_name: str) -> bool:
    """False only for a local folder that lacks the file (hub ids are asked)."""
    return not os.path.isdir(place.path) or os.path.exists(os.path.join(place.path, file_name))


def _try_load_tokenizer(model: ModelReference, options: MergeOptions) -> Optional[Any]:
    for place in _places(model):
        if not _holds(place, "tokenizer_config.json"):
            continue
        try:
            return transformers.AutoTokenizer.from_pretrained(
                place.path, revision=place.revision, trust_remote_code=options.trust_remote_code
            )
        except (OSError, ValueError) as error:
            LOG.info("no tokenizer at %s: %s", place, error)
    return None


def load_tokenizer(model: ModelReference, options: MergeOptions) -> Any:
    """The tokenizer of ``model`` (its adapter folder's own for ``model+lora``, if any)."""
    tokenizer = _try_load_tokenizer(model, options)
    if tokenizer is None:
        raise SigmoidDiffError(f"cannot load a tokenizer for model {model}")
    return tokenizer


def load_generation_config(model: ModelReference) -> Optional[transformers.GenerationConfig]:
    for place in _places(model):
        if not _holds(place, "generation_config.json"):
            continue
        try:
            return transformers.GenerationConfig.from_pretrained(place.path, revision=place.revision)
        except (OSError, ValueError):
            continue
    return None
