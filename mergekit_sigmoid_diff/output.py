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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import transformers
from mergekit.common import ModelPath, ModelReference
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_sigmoid_diff.plan import INHERIT_CHAT, INHERIT_ROPE, TransferPlan, current_or, tokenizer_built_by_mergekit
from mergekit_sigmoid_diff.errors import SigmoidDiffError

LOG = logging.getLogger(__name__)

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


# --- config.json ---------------------------------------------------------------------------


def target_out_config(
    original: Callable[[MergeConfiguration], transformers.PretrainedConfig],
    config: MergeConfiguration,
    trust_remote_code: bool = False,
) -> transformers.PretrainedConfig:
    """mergekit's ``_model_out_config`` built from the target; RoPE from ``inherit_rope``.

    ``original(config)`` is mergekit's function with the call's other arguments: it is called
    with the target in place of ``base_model`` so its dtype and layer-count adjustments apply.
    """
    plan = current_or(config)
    if plan is None:
        return original(config)
    out = original(config.model_copy(update={"base_model": plan.target}))
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


@dataclass
class TokenizerStep:
    """What the tokenizer step of a merge does, worked out before any tensor is read.

    ``kind``:
    - ``none``: no output tokenizer (none is possible, or ``--no-copy-tokenizer``);
    - ``mergekit``: mergekit's own copy of the base's tokenizer stands (the target has none);
    - ``write``: ``tokenizer`` (the target's, already given the donor's chat template and
      tokens), ``generation`` and the ``config_ids`` for config.json are written after the merge;
    - ``built``: mergekit builds the tokenizer (``tokenizer`` / ``tokenizer_source``); it is
      finished the same way after the merge, with checks made now against its vocabulary.
    """

    kind: Literal["none", "mergekit", "write", "built"]
    tokenizer: Optional[Any] = None
    generation: Optional[transformers.GenerationConfig] = None
    config_ids: dict[str, Any] = field(default_factory=dict)
    # for "built": what finishing the built tokenizer needs
    sources: dict[str, Any] = field(default_factory=dict)

    def merge_options(self, options: MergeOptions) -> MergeOptions:
        """The options for mergekit's run: its own tokenizer copy only where it stands."""
        if self.kind in ("none", "write") and options.copy_tokenizer:
            return options.model_copy(update={"copy_tokenizer": False})
        return options


def prepare(config: MergeConfiguration, options: MergeOptions, plan: Optional[TransferPlan]) -> TokenizerStep:
    """Load and check everything the tokenizer step needs, before any tensor is read.

    Every tokenizer, generation config and token-id mapping the output needs is loaded and
    computed here, so that after the merge only files are written. When mergekit builds the
    tokenizer (``tokenizer`` / ``tokenizer_source``) it exists only after the merge: the same
    edits are then tried now on the vocabulary it will have (the source model's; for the
    union, which holds every token, only the recipe's chat template), and made after. Raises
    :class:`SigmoidDiffError` when ``inherit_chat`` cannot be honoured: the donor has no
    tokenizer or no chat template, no output tokenizer is possible, or a special token of
    the donor is missing from the output vocabulary. Without ``inherit_chat`` a model
    without tokenizer files is fine, as in mergekit: the output keeps the base's tokenizer
    (a warning names the target), or has none (one warning).
    """
    if plan is None:
        return TokenizerStep("mergekit")
    built = tokenizer_built_by_mergekit(config)
    chat = plan.chat_donor
    if not built and not options.copy_tokenizer:
        if chat is not None:
            raise SigmoidDiffError(f"{INHERIT_CHAT} on donor {chat} needs an output tokenizer: drop --no-copy-tokenizer")
        return TokenizerStep("none")
    donor_tokenizer = None
    if chat is not None:
        donor_tokenizer = _try_load_tokenizer(chat, options)
        if donor_tokenizer is None:
            raise SigmoidDiffError(
                f"{INHERIT_CHAT}: donor {chat} has no tokenizer files (tokenizer_config.json) to take "
                "the chat template from; set inherit_chat on a donor that has them, or remove it"
            )
        _require_chat_template(donor_tokenizer, chat)
    target_tokenizer = _try_load_tokenizer(plan.target, options)
    sources = dict(target=target_tokenizer, donor=donor_tokenizer, target_config=_config_ids(plan.target, options))

    if built:
        source = config.tokenizer.source if config.tokenizer is not None else config.tokenizer_source
        if source != "union":  # the union holds every token; other vocabularies are checked now
            vocabulary_model = config.base_model if source == "base" else source
            vocabulary = _try_load_tokenizer(vocabulary_model, options)
            if vocabulary is None:
                raise SigmoidDiffError(
                    f"the recipe's tokenizer source {vocabulary_model} has no tokenizer files to build "
                    "the output tokenizer from"
                )
            _finish(vocabulary, config, options, plan, sources)  # a dry run: raises what would fail
        else:  # what can fail on the union: the recipe's chat template
            any_tokenizer = target_tokenizer or donor_tokenizer or _try_load_tokenizer(config.base_model, options)
            if any_tokenizer is not None:
                _recipe_chat_template(copy.deepcopy(any_tokenizer), config, options)
        return TokenizerStep("built", sources=sources)

    if target_tokenizer is None:
        if _try_load_tokenizer(config.base_model, options) is not None:
            if chat is not None:
                raise SigmoidDiffError(
                    f"{INHERIT_CHAT} on donor {chat}: target {plan.target} has no tokenizer files, so the "
                    "output would carry the base's tokenizer; add tokenizer files to the target or "
                    "`tokenizer: {source: base}` to the recipe"
                )
            LOG.warning("target %s has no tokenizer files: the output keeps the base's tokenizer", plan.target)
            return TokenizerStep("mergekit")
        if chat is not None:
            raise SigmoidDiffError(
                f"{INHERIT_CHAT} on donor {chat} needs an output tokenizer, but neither target "
                f"{plan.target} nor base_model {config.base_model} has tokenizer files"
            )
        LOG.warning(
            "neither target %s nor base_model %s has tokenizer files: the output has no tokenizer",
            plan.target,
            config.base_model,
        )
        return TokenizerStep("none")
    tokenizer, generation, ids = _finish(target_tokenizer, config, options, plan, sources)
    return TokenizerStep("write", tokenizer=tokenizer, generation=generation, config_ids=ids)


def _config_ids(model: ModelReference, options: MergeOptions) -> dict[str, Any]:
    """The special token ids of a model's config (as the output config.json carries them)."""
    model_config = model.config(trust_remote_code=options.trust_remote_code)
    return {key: getattr(model_config, key, None) for key in SPECIAL_ID_KEYS}


def _finish(
    tokenizer: Any, config: MergeConfiguration, options: MergeOptions, plan: TransferPlan, sources: dict[str, Any]
) -> tuple[Any, Optional[transformers.GenerationConfig], dict[str, Any]]:
    """Give ``tokenizer`` (in place) the donor's chat settings and the recipe's chat template;
    return it, the output generation config and config.json's special ids on its vocabulary."""
    target_tokenizer, donor_tokenizer = sources["target"], sources["donor"]
    id_sources = {key: (target_tokenizer, value) for key, value in sources["target_config"].items()}
    generation = load_generation_config(plan.target)
    generation_tokenizer = target_tokenizer
    generation_from_donor = False
    if plan.chat_donor is not None:
        carry_chat(tokenizer, donor_tokenizer, plan.chat_donor)
        donor_config = plan.chat_donor.config(trust_remote_code=options.trust_remote_code)
        eos = getattr(donor_config, "eos_token_id", None)
        id_sources["eos_token_id"] = (donor_tokenizer, donor_tokenizer.eos_token_id if eos is None else eos)
        donor_generation = load_generation_config(plan.chat_donor)
        if donor_generation is not None:
            generation, generation_tokenizer = donor_generation, donor_tokenizer
            generation_from_donor = True
    _recipe_chat_template(tokenizer, config, options)
    ids = {
        key: remap_token_ids(value, source, tokenizer, f"{key} in config.json")
        for key, (source, value) in id_sources.items()
        if source is not None and value is not None
    }
    if generation is not None:
        for key in SPECIAL_ID_KEYS:
            value = getattr(generation, key, None)
            if generation_tokenizer is not None and value is not None:
                setattr(generation, key, remap_token_ids(value, generation_tokenizer, tokenizer, f"{key} in generation_config.json"))
        if plan.chat_donor is not None and (not generation_from_donor or generation.eos_token_id is None):
            # generation must stop at the donor's eos, whichever generation config this is
            generation.eos_token_id = ids.get("eos_token_id")
    return tokenizer, generation, ids


def _recipe_chat_template(tokenizer: Any, config: MergeConfiguration, options: MergeOptions) -> None:
    """Apply the recipe's ``chat_template`` (a built-in name or Jinja) as mergekit does; a bad one
    is a one-line error."""
    if not config.chat_template:
        return
    from mergekit.merge import _set_chat_template

    try:
        _set_chat_template(tokenizer, config, trust_remote_code=options.trust_remote_code)
    except (RuntimeError, ValueError, OSError) as error:
        raise SigmoidDiffError(f"chat_template {config.chat_template!r} of the recipe: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def apply_tokenizer(step: TokenizerStep, config: MergeConfiguration, out_path: str, options: MergeOptions, plan) -> None:
    """Write what :func:`prepare` worked out into the finished merge at ``out_path``.

    Call after mergekit's ``run_merge`` wrote ``out_path``. For ``write`` only files are
    written; for ``built`` the tokenizer mergekit just saved is loaded and finished with the
    settings already checked against its vocabulary.
    """
    if step.kind in ("none", "mergekit"):
        return
    out = Path(out_path)
    if step.kind == "built":
        built = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=options.trust_remote_code)
        tokenizer, generation, ids = _finish(built, config, options, plan, step.sources)
    else:
        tokenizer, generation, ids = step.tokenizer, step.generation, step.config_ids
    # Saved beside, then moved in: the tokenizer being saved may read its own files in OUT
    # (a sentencepiece tokenizer.model), and no stale file (a base chat template) may stay.
    with tempfile.TemporaryDirectory(dir=out, prefix=".tokenizer-") as fresh:
        tokenizer.save_pretrained(fresh)
        _drop_load_arguments(Path(fresh) / "tokenizer_config.json")
        if generation is not None:
            generation.save_pretrained(fresh)
        for name in TOKENIZER_FILES:
            (out / name).unlink(missing_ok=True)
        for file in Path(fresh).iterdir():
            os.replace(file, out / file.name)
    config_path = out / "config.json"
    out_config = json.loads(config_path.read_text(encoding="utf-8"))
    out_config.update(ids)
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


def load_generation_config(model: ModelReference) -> Optional[transformers.GenerationConfig]:
    for place in _places(model):
        if not _holds(place, "generation_config.json"):
            continue
        try:
            return transformers.GenerationConfig.from_pretrained(place.path, revision=place.revision)
        except (OSError, ValueError):
            continue
    return None
