"""The output folder settings, in process and without tensors: which model the output
config.json describes, RoPE inheritance (both config styles), the recipe checks for
``inherit_rope`` / ``inherit_chat``, and the tokenizer helpers. End-to-end runs through
``mergekit-yaml`` are in ``test_recipes.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from mergekit.architecture import get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from transformers import AutoConfig, AutoTokenizer

from mergekit_sigmoid_diff import output, preflight
from mergekit_sigmoid_diff.plan import TransferPlan, transfer_plan
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.plugin import activate
from mergekit_sigmoid_diff.tiny import tiny_config, tiny_tokenizer
from tests.support import CHATML_TEMPLATE, CHAT_TOKENS, write_old_style_rope

B, T, I, J = "/m/base", "/m/target", "/m/donor", "/m/other-donor"


def recipe(models: list[dict], **extra) -> MergeConfiguration:
    activate()
    return MergeConfiguration.model_validate({"merge_method": "sigmoid_diff", "base_model": B, "models": models, **extra})


def target(path: str = T, **parameters) -> dict:
    return {"model": path, "parameters": {"role": "target", **parameters}}


def donor(path: str = I, **parameters) -> dict:
    return {"model": path, "parameters": {"weight": 1.0, **parameters}}


# --- recipe checks -------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["inherit_rope", "inherit_chat"])
def test_a_flag_on_two_donors_is_refused_naming_both(flag: str) -> None:
    config = recipe([target(), donor(I, **{flag: True}), donor(J, **{flag: True})])
    with pytest.raises(SigmoidDiffError, match=f"{flag}: true on 2 donors") as error:
        preflight.check_recipe(config)
    assert I in str(error.value) and J in str(error.value)


def test_the_target_cannot_inherit() -> None:
    with pytest.raises(SigmoidDiffError, match=f"inherit_chat is a donor setting.*{T}"):
        preflight.check_recipe(recipe([target(inherit_chat=True), donor()]))


def test_a_flag_must_be_one_boolean() -> None:
    with pytest.raises(SigmoidDiffError, match=f"inherit_rope of model {I} .* single true or false"):
        preflight.check_recipe(recipe([target(), donor(inherit_rope=[True, False])]))


def test_slices_must_share_one_target() -> None:
    slices = [
        {"sources": [{"model": m, "layer_range": [i, i + 1], "parameters": p} for m, p in sources]}
        for i, sources in enumerate(
            [[(T, {"role": "target"}), (I, {}), (B, {})], [(J, {"role": "target"}), (I, {}), (B, {})]]
        )
    ]
    activate()
    config = MergeConfiguration.model_validate({"merge_method": "sigmoid_diff", "base_model": B, "slices": slices})
    with pytest.raises(SigmoidDiffError, match="same model with role: target"):
        preflight.check_recipe(config)


def test_plan_resolves_flags_like_mergekit_and_ignores_the_base() -> None:
    # a top-level flag applies to every donor (here one); the target is not counted
    config = recipe([target(), donor(inherit_chat=True), {"model": B}], parameters={"inherit_rope": True})
    plan = preflight.check_recipe(config)
    assert (str(plan.target), str(plan.rope_donor), str(plan.chat_donor)) == (T, I, I)
    assert [str(d) for d in plan.donors] == [I]
    assert preflight.check_recipe(recipe([target(), donor()])) == TransferPlan(target=plan.target, donors=plan.donors)


# --- config.json ---------------------------------------------------------------------------


def test_rope_fields_from_an_old_style_config_json(tmp_path: Path) -> None:
    tiny_config().save_pretrained(tmp_path)
    write_old_style_rope(tmp_path, 500000.0, {"rope_type": "linear", "factor": 4.0}, 512)
    out = tiny_config()
    output.inherit_rope(out, AutoConfig.from_pretrained(tmp_path), "donor")
    assert out.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}
    assert out.max_position_embeddings == 512


def test_rope_fields_of_an_older_transformers_config() -> None:
    old = SimpleNamespace(rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=4096)
    out = SimpleNamespace(rope_theta=1e4, rope_scaling=None, max_position_embeddings=2048)
    output.inherit_rope(out, old, "donor")
    assert (out.rope_theta, out.rope_scaling, out.max_position_embeddings) == (1e6, {"type": "dynamic", "factor": 2.0}, 4096)
    assert out.rope_scaling is not old.rope_scaling


def test_a_donor_without_rope_settings_is_refused() -> None:
    with pytest.raises(SigmoidDiffError, match="donor d has no RoPE settings"):
        output.inherit_rope(SimpleNamespace(), SimpleNamespace(max_position_embeddings=8), "d")


@pytest.fixture(scope="module")
def config_folders(tmp_path_factory) -> dict[str, str]:
    """Folders holding only config.json: base, a target with pad_token_id 0, an old-style RoPE donor."""
    root = tmp_path_factory.mktemp("configs")
    paths = {name: str(root / name) for name in ("base", "target", "donor")}
    llama = {"architectures": ["LlamaForCausalLM"]}
    tiny_config(**llama).save_pretrained(paths["base"])
    tiny_config(**llama, pad_token_id=0, tie_word_embeddings=True).save_pretrained(paths["target"])
    tiny_config(**llama).save_pretrained(paths["donor"])
    write_old_style_rope(Path(paths["donor"]), 500000.0, None, 1024)
    return paths


def test_mergekit_builds_the_output_config_from_the_target(config_folders) -> None:
    import mergekit.merge

    p = config_folders
    activate()
    ours = MergeConfiguration.model_validate(
        {
            "merge_method": "sigmoid_diff",
            "base_model": p["base"],
            "dtype": "bfloat16",
            "models": [target(p["target"]), donor(p["donor"], inherit_rope=True)],
        }
    )
    built = mergekit.merge._model_out_config(ours, get_architecture_info(ours, MergeOptions()))
    assert (built.pad_token_id, built.tie_word_embeddings) == (0, True)  # the target's
    assert built.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    assert built.max_position_embeddings == 1024
    assert str(built.dtype).endswith("bfloat16")  # mergekit's own adjustment still applies
    # other methods keep mergekit's behaviour: the base's config
    other = MergeConfiguration.model_validate(
        {
            "merge_method": "linear",
            "base_model": p["base"],
            "models": [{"model": p[m], "parameters": {"weight": 0.5}} for m in ("base", "target")],
        }
    )
    plain = mergekit.merge._model_out_config(other, get_architecture_info(other, MergeOptions()))
    assert (plain.pad_token_id, plain.tie_word_embeddings) == (None, False)


# --- tokenizer -----------------------------------------------------------------------------


def test_remap_token_ids_goes_by_token_text() -> None:
    source, dest = tiny_tokenizer(extra_tokens=("<a>", "<b>")), tiny_tokenizer(extra_tokens=("<b>", "<a>"))
    assert output.remap_token_ids([49, 50, 2], source, dest, "eos") == [50, 49, 2]
    assert output.remap_token_ids(None, source, dest, "eos") is None
    assert output.remap_token_ids(10_000, source, dest, "pad") == 10_000  # unknown to the source: kept
    with pytest.raises(SigmoidDiffError, match="eos_token_id in config.json: token '<a>' .* not in the output"):
        output.remap_token_ids(49, source, tiny_tokenizer(), "eos_token_id in config.json")


def test_carry_chat_takes_template_eos_and_special_tokens() -> None:
    donor_tokenizer = tiny_tokenizer(extra_tokens=CHAT_TOKENS, chat_template=CHATML_TEMPLATE)
    donor_tokenizer.eos_token = CHAT_TOKENS[1]
    out = tiny_tokenizer()
    out.add_tokens(list(CHAT_TOKENS))  # in the vocabulary, but as ordinary tokens
    output.carry_chat(out, donor_tokenizer, "donor")
    assert out.chat_template == CHATML_TEMPLATE and out.eos_token == CHAT_TOKENS[1]
    assert set(CHAT_TOKENS) <= set(out.all_special_tokens)
    assert len(out) == len(donor_tokenizer)
    with pytest.raises(SigmoidDiffError, match=r"'<\|im_start\|>', '<\|im_end\|>' of donor d .*source: union"):
        output.carry_chat(tiny_tokenizer(), donor_tokenizer, "d")


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tokenizers")
    chat = tiny_tokenizer(extra_tokens=CHAT_TOKENS, chat_template=CHATML_TEMPLATE)
    chat.eos_token = CHAT_TOKENS[1]
    tokenizers = {"base": tiny_tokenizer(), "target": tiny_tokenizer(), "chat": chat, "plain": tiny_tokenizer()}
    for name, tokenizer in tokenizers.items():
        tokenizer.save_pretrained(root / name)
        tiny_config(architectures=["LlamaForCausalLM"], eos_token_id=tokenizer.eos_token_id).save_pretrained(root / name)
    return {name: str(root / name) for name in tokenizers}


def test_prepare_checks_the_chat_donor_before_merging(tokenizer_folders) -> None:
    p, options = tokenizer_folders, MergeOptions()
    models = [target(p["target"]), donor(p["chat"], inherit_chat=True)]

    def config(models, **extra):
        activate()
        return MergeConfiguration.model_validate({"merge_method": "sigmoid_diff", "base_model": p["base"], "models": models, **extra})

    def prepare(config, options):
        return output.prepare(config, options, transfer_plan(config))

    with pytest.raises(SigmoidDiffError, match=r"'<\|im_start\|>'.* not in the output vocabulary.*source: union"):
        prepare(config(models), options)
    assert prepare(config(models, tokenizer={"source": "union"}), options).kind == "built"
    with pytest.raises(SigmoidDiffError, match="has no chat template"):
        prepare(config([target(p["target"]), donor(p["plain"], inherit_chat=True)]), options)
    with pytest.raises(SigmoidDiffError, match="drop --no-copy-tokenizer"):
        prepare(config(models), MergeOptions(copy_tokenizer=False))


def test_apply_tokenizer_replaces_the_base_copy_and_lets_the_recipe_template_win(tokenizer_folders, tmp_path) -> None:
    """mergekit copied the base's tokenizer (here with a chat template of its own) next to the
    target's config.json; the output must carry the target's tokenizer and no stale base file,
    and a recipe's ``chat_template`` overrides the chat donor's."""
    p = tokenizer_folders
    out = tmp_path / "out"
    with_template = tiny_tokenizer(chat_template="BASE {{ messages }}")
    with_template.save_pretrained(out)
    tiny_config(architectures=["LlamaForCausalLM"], pad_token_id=0).save_pretrained(out)
    activate()

    def config(models, **extra):
        return MergeConfiguration.model_validate({"merge_method": "sigmoid_diff", "base_model": p["base"], "models": models, **extra})

    def apply(config):
        transfer = transfer_plan(config)
        output.apply_tokenizer(output.prepare(config, MergeOptions(), transfer), config, str(out), MergeOptions(), transfer)

    plain = config([target(p["target"]), donor(p["plain"])])
    apply(plain)
    assert not (out / "chat_template.jinja").exists()
    assert AutoTokenizer.from_pretrained(out).chat_template is None
    assert "local_files_only" not in (out / "tokenizer_config.json").read_text()

    chat = config([target(p["target"]), donor(p["chat"], inherit_chat=True)], tokenizer={"source": "union"}, chat_template="chatml")
    with_template.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
    with_template.save_pretrained(out)  # as mergekit saves the union tokenizer it built
    apply(chat)
    result = AutoTokenizer.from_pretrained(out)
    assert result.eos_token == CHAT_TOKENS[1] and result.chat_template != CHATML_TEMPLATE
    assert "<|im_start|>" in result.chat_template  # mergekit's built-in chatml template
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 50
