"""Models without tokenizer files, post-merge steps checked before the merge, mergekit-multi,
and wrappers that survive a change of mergekit's signatures.

Training checkpoints often hold weights and config.json but no tokenizer: mergekit merges
them and warns. So must sigmoid_diff, for every combination of base, target and donor
having or lacking tokenizer files; and where the recipe asks for something that needs a
tokenizer (``inherit_chat``), the error comes before any tensor is read.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from mergekit import merge
from transformers import AutoTokenizer

from mergekit_sigmoid_diff import _hook, plugin
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.tiny import build_triple, tiny_tokenizer
from tests.support import (
    CHATML_TEMPLATE,
    CHAT_TOKENS,
    MERGEKIT_MULTI,
    TARGET_TEMPLATE,
    assert_left_nothing,
    has_tokenizer,
    merge_in_process,
    run_mergekit_yaml,
    strip_tokenizer,
    write_recipe,
)

ROLES = ("base", "target", "donor")


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """For each role, a folder with the tiny tokenizer and one without it (same weights)."""
    root = tmp_path_factory.mktemp("tokenless")
    paths = build_triple(root / "with", seed=3)
    folders = {"base": paths["base"], "target": paths["target"], "donor": paths["donors"][0]}
    # the target's tokenizer is told apart from the base's (same vocabulary) by a template
    tiny_tokenizer(chat_template=TARGET_TEMPLATE).save_pretrained(folders["target"])
    out = {}
    for role, folder in folders.items():
        without = root / "without" / role
        shutil.copytree(folder, without)
        out[role] = {True: Path(folder), False: strip_tokenizer(without)}
    # a chat donor: the donor with a ChatML template and eos (same vocabulary: markers as text)
    chat = root / "chat_donor"
    shutil.copytree(folders["donor"], chat)
    tokenizer = tiny_tokenizer(chat_template=CHATML_TEMPLATE.replace("<|im_start|>", "<").replace("<|im_end|>", ">"))
    tokenizer.save_pretrained(chat)
    out["chat"] = chat
    return out


def recipe(base, target, donor, **donor_params):
    return {
        "merge_method": "sigmoid_diff",
        "base_model": str(base),
        "models": [
            {"model": str(target), "parameters": {"role": "target"}},
            {"model": str(donor), "parameters": donor_params},
        ],
        "dtype": "float32",
    }


@pytest.mark.parametrize("has", list(itertools.product((True, False), repeat=3)), ids=lambda h: "".join("BTI"[i] if x else "-" for i, x in enumerate(h)))
def test_every_tokenizer_combination_merges_as_mergekit_does(variants, has, tmp_path, caplog):
    base, target, donor = (variants[role][flag] for role, flag in zip(ROLES, has))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        merge_in_process(recipe(base, target, donor), out)
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "tokenizer" in r.getMessage()]
    base_has, target_has, _ = has
    if target_has:  # the output's tokenizer is the target's
        assert AutoTokenizer.from_pretrained(out).chat_template == TARGET_TEMPLATE
    elif base_has:  # mergekit's copy of the base's stands, and the user is told why
        assert has_tokenizer(out) and AutoTokenizer.from_pretrained(out).chat_template is None
        assert any(f"target {target} has no tokenizer files" in w for w in warnings), warnings
    else:
        assert not has_tokenizer(out)
        ours = [w for w in warnings if "the output has no tokenizer" in w]
        assert len(ours) == 1, warnings


@pytest.mark.slow
def test_no_tokenizer_anywhere_through_mergekit_yaml(variants, tmp_path):
    base, target, donor = (variants[role][False] for role in ROLES)
    result = run_mergekit_yaml(recipe(base, target, donor), tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not has_tokenizer(tmp_path / "out") and (tmp_path / "out" / "model.safetensors").is_file()
    assert result.stderr.count("the output has no tokenizer") == 1
    assert "Traceback" not in result.stderr  # mergekit's own failed tokenizer copy is not attempted


@pytest.mark.slow
def test_tokenizer_only_on_the_base_through_mergekit_yaml(variants, tmp_path):
    result = run_mergekit_yaml(recipe(variants["base"][True], variants["target"][False], variants["donor"][False]), tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    assert has_tokenizer(tmp_path / "out")
    assert f"target {variants['target'][False]} has no tokenizer files" in result.stderr


CHAT_ERRORS = {
    "donor without tokenizer": (
        dict(base=True, target=True, donor=False),
        r"^inherit_chat: donor \S+ has no tokenizer files \(tokenizer_config.json\)",
    ),
    "no output tokenizer possible": (
        dict(base=False, target=False, donor="chat"),
        r"^inherit_chat on donor \S+ needs an output tokenizer, but neither target \S+ nor base_model \S+ has tokenizer files$",
    ),
    "only the base's tokenizer for the output": (
        dict(base=True, target=False, donor="chat"),
        r"^inherit_chat on donor \S+: target \S+ has no tokenizer files, so the output would carry the base's",
    ),
}


@pytest.mark.parametrize("case", CHAT_ERRORS)
def test_inherit_chat_without_a_tokenizer_fails_before_any_tensor_is_read(variants, case, tmp_path, no_tensor_reads):
    flags, pattern = CHAT_ERRORS[case]
    pick = lambda role: variants["chat"] if flags[role] == "chat" else variants[role][flags[role]]
    out = tmp_path / "deep" / "out"
    with pytest.raises(SigmoidDiffError, match=pattern) as caught:
        merge_in_process(recipe(pick("base"), pick("target"), pick("donor"), inherit_chat=True), out)
    assert "\n" not in str(caught.value)
    assert_left_nothing(out)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["donor without tokenizer", "no output tokenizer possible"])
def test_inherit_chat_errors_through_mergekit_yaml(variants, case, tmp_path):
    flags, pattern = CHAT_ERRORS[case]
    pick = lambda role: variants["chat"] if flags[role] == "chat" else variants[role][flags[role]]
    out = tmp_path / "out"
    result = run_mergekit_yaml(recipe(pick("base"), pick("target"), pick("donor"), inherit_chat=True), out)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and re.match(pattern, errors[0].removeprefix("Error: ")), result.stderr[-2000:]
    assert_left_nothing(out)


def test_inherit_chat_with_tokenizers_everywhere_works(variants, tmp_path):
    out = tmp_path / "out"
    merge_in_process(recipe(variants["base"][True], variants["target"][True], variants["chat"], inherit_chat=True), out)
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(variants["chat"]).chat_template


def test_an_id_the_output_vocabulary_lacks_is_caught_before_the_merge(variants, tmp_path, no_tensor_reads):
    """config.json's eos of the target names a token the output tokenizer (the base's, as the
    recipe asks) does not have: the id remapping after the merge would fail, so it is tried first."""
    target = tmp_path / "target"
    shutil.copytree(variants["target"][True], target)
    tokenizer = tiny_tokenizer(extra_tokens=CHAT_TOKENS)
    tokenizer.save_pretrained(target)
    config = (target / "config.json").read_text().replace('"eos_token_id": 2', f'"eos_token_id": {tokenizer.convert_tokens_to_ids(CHAT_TOKENS[1])}')
    (target / "config.json").write_text(config)
    bad = recipe(variants["base"][True], target, variants["donor"][True])
    bad["tokenizer"] = {"source": "base"}
    with pytest.raises(SigmoidDiffError, match=r"^eos_token_id in config.json: token '<\|im_end\|>' \(id \d+\) is not in the output vocabulary$"):
        merge_in_process(bad, tmp_path / "out")
    assert_left_nothing(tmp_path / "out")


# --- mergekit-multi ------------------------------------------------------------------------


def multi(recipe_path: Path, steps: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MERGEKIT_MULTI, str(recipe_path), "--intermediate-dir", str(steps), "--out-path", str(out)],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )


def two_steps(variants, **step1_parameters) -> str:
    step1 = {"name": "transfer", **recipe(variants["base"][True], variants["target"][True], variants["donor"][True])}
    step1["parameters"] = step1_parameters
    final = {
        "merge_method": "linear",
        "models": [{"model": "transfer", "parameters": {"weight": 0.5}}, {"model": str(variants["target"][True]), "parameters": {"weight": 0.5}}],
        "dtype": "float32",
    }
    return yaml.safe_dump_all([step1, final], sort_keys=False)


@pytest.mark.slow
def test_mergekit_multi_prints_recipe_errors_as_one_line(variants, tmp_path):
    path = tmp_path / "multi.yml"
    path.write_text(two_steps(variants, midpoint=1.5))
    result = multi(path, tmp_path / "steps", tmp_path / "out")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: parameter midpoint=1.5 in the top-level parameters: expected a number in [0, 1]"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "steps" / "transfer").exists()


@pytest.mark.slow
def test_mergekit_multi_skips_a_completed_step(variants, tmp_path):
    path = tmp_path / "multi.yml"
    path.write_text(two_steps(variants))
    first = multi(path, tmp_path / "steps", tmp_path / "out")
    assert first.returncode == 0, first.stderr[-3000:]
    step = tmp_path / "steps" / "transfer" / "model.safetensors"
    written = step.stat().st_mtime_ns
    shutil.rmtree(tmp_path / "out")
    again = multi(path, tmp_path / "steps", tmp_path / "out")
    assert again.returncode == 0, again.stderr[-3000:]
    assert step.stat().st_mtime_ns == written  # mergekit-multi saw it complete and skipped it
    assert (tmp_path / "out" / "config.json").is_file()


# --- the wrappers --------------------------------------------------------------------------


@pytest.mark.parametrize("qualified", plugin.WRAPPED_PARAMETERS)
def test_the_mergekit_functions_we_wrap_still_take_the_parameters_we_read(qualified):
    function = getattr(merge, qualified.rsplit(".", 1)[1])
    function = inspect.unwrap(function)  # mergekit's own, beneath our wrapper
    present = set(inspect.signature(function).parameters)
    expected = plugin.WRAPPED_PARAMETERS[qualified]
    missing = [name for name in expected if name not in present]
    assert not missing, (
        f"{qualified} changed shape: the wrapper reads parameters {', '.join(expected)} by name, "
        f"but {', '.join(missing)} no longer exist (it has: {', '.join(present)})"
    )


def test_the_wrappers_pass_every_argument_through(monkeypatch, tmp_path):
    """A keyword a later mergekit adds reaches mergekit's function untouched."""
    seen = {}

    def run_merge(merge_config, out_path, options, config_source=None, new_keyword=None):
        seen.update(out_path=out_path, new_keyword=new_keyword, config_source=config_source)

    module = type(merge)("fake_merge")
    module.run_merge = run_merge
    module._model_out_config = lambda config, arch_info, trust_remote_code=False, **extra: extra
    plugin.on_merge(module)
    config = type("Config", (), {"merge_method": "linear"})()
    module.run_merge(config, str(tmp_path), None, "source", new_keyword=7)
    assert seen == {"out_path": str(tmp_path), "new_keyword": 7, "config_source": "source"}
    assert module._model_out_config(config, None, trust_remote_code=True, later=1) == {"later": 1}


def test_our_path_passes_every_argument_through(variants, monkeypatch, tmp_path):
    """A sigmoid_diff merge through wrappers of functions that grew a keyword: it reaches them."""
    real_run_merge = inspect.unwrap(merge.run_merge)
    real_out_config = inspect.unwrap(merge._model_out_config)
    seen = {}

    def run_merge(merge_config, out_path, options, config_source=None, new_keyword=None):
        seen["run_merge"] = new_keyword
        return real_run_merge(merge_config, out_path, options, config_source)

    def model_out_config(config, arch_info, trust_remote_code=False, later=None):
        seen.setdefault("out_config", []).append(later)
        return real_out_config(config, arch_info, trust_remote_code)

    module = type(merge)("fake_merge")
    module.run_merge, module._model_out_config = run_merge, model_out_config
    plugin.on_merge(module)
    monkeypatch.setattr(merge, "_model_out_config", module._model_out_config)  # what run_merge looks up
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(recipe(variants["base"][True], variants["target"][True], variants["donor"][True]))
    module.run_merge(config, str(tmp_path / "out"), MergeOptions(quiet=True), new_keyword="kept")
    assert seen["run_merge"] == "kept" and (tmp_path / "out" / "model.safetensors").is_file()
    from mergekit.architecture import get_architecture_info

    # run_merge rewrote the configuration into modules: a fresh one
    config = MergeConfiguration.model_validate(recipe(variants["base"][True], variants["target"][True], variants["donor"][True]))
    arch = get_architecture_info(config, MergeOptions())
    out = module._model_out_config(config, arch, later="also kept")
    assert seen["out_config"][-1] == "also kept"
    assert out.to_dict() == real_out_config(
        config.model_copy(update={"base_model": config.models[0].model}), arch
    ).to_dict()  # built from the target


def test_importing_the_method_first_still_registers_it(variants, tmp_path):
    """The hook runs inside mergekit's import, which our method module itself triggers."""
    code = (
        "import warnings, sys\n"
        "warnings.filterwarnings('error', message='mergekit-sigmoid-diff')\n"
        "import mergekit_sigmoid_diff.method\n"
        "from mergekit.config import MergeConfiguration\n"
        "from mergekit.options import MergeOptions\n"
        "from mergekit import merge\n"
        "import yaml\n"
        f"config = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))\n"
        "merge.run_merge(config, sys.argv[2], MergeOptions(quiet=True))\n"
    )
    path = write_recipe(tmp_path / "r.yml", recipe(variants["base"][True], variants["target"][True], variants["donor"][True]))
    done = subprocess.run([__import__("sys").executable, "-c", code, str(path), str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_hook_and_the_plugin_list_the_same_modules():
    assert {name: fn.__name__ for name, fn in plugin.CALLBACKS.items()} == _hook._CALLBACKS


def test_a_model_card_that_cannot_be_rendered_fails_before_any_tensor_is_read(variants, tmp_path, monkeypatch, no_tensor_reads):
    import mergekit.card

    def broken(**kwargs):
        raise RuntimeError("hub unreachable")

    monkeypatch.setattr(mergekit.card, "generate_card", broken)
    out = tmp_path / "out"
    with pytest.raises(SigmoidDiffError, match=r"^the model card for \S+ cannot be written \(hub unreachable\); pass --no-write-model-card"):
        merge_in_process(recipe(variants["base"][True], variants["target"][True], variants["donor"][True]), out)
    assert_left_nothing(out)


def test_a_bad_recipe_chat_template_is_one_line_before_any_tensor_is_read(variants, tmp_path, no_tensor_reads):
    bad = recipe(variants["base"][True], variants["target"][True], variants["donor"][True])
    bad["chat_template"] = "no-such-template"
    with pytest.raises(SigmoidDiffError, match=r"^chat_template 'no-such-template' of the recipe: ") as caught:
        merge_in_process(bad, tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert_left_nothing(tmp_path / "out")


def test_a_model_listed_twice_in_a_group_is_refused(variants, tmp_path, no_tensor_reads):
    twice = recipe(variants["base"][True], variants["target"][True], variants["donor"][True])
    twice["models"].append({"model": str(variants["target"][True])})
    with pytest.raises(SigmoidDiffError, match=r"^model \S+ appears twice in models"):
        merge_in_process(twice, tmp_path / "out")
