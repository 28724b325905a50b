"""Models that do not fit together: one line naming the culprit, before any tensor is read.

Most cases run in-process through ``mergekit.merge.run_merge`` (what ``mergekit-yaml``
calls), with tensor loading booby-trapped: the error must come from the checks on
``config.json`` and safetensors headers. A representative few run through the real
``mergekit-yaml`` for the exit status, the one-line message and the absent traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.plugin import activate
from mergekit_sigmoid_diff.preflight import check_models
from mergekit_sigmoid_diff.tiny import build_triple, save_state, tiny_config, tiny_tokenizer
from tests.support import assert_left_nothing, looks_finished, merge_in_process, run_mergekit_yaml, save_lora_adapter

activate()


# --- models ------------------------------------------------------------------------------


def _variant(zoo: Path, name: str, source: Path, change: Callable[[Path], Any]) -> Path:
    """A copy of ``source`` named ``name``, modified in place by ``change``."""
    path = zoo / name
    shutil.copytree(source, path)
    change(path)
    return path


def _edit_tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        file = path / "model.safetensors"
        tensors = load_file(file)
        edit(tensors)
        save_file(tensors, file, metadata={"format": "pt"})

    return change


def _fresh_model(path: Path, seed: int, **config: Any) -> Path:
    torch.manual_seed(seed)
    cfg = tiny_config(**config)
    return save_state(LlamaForCausalLM(cfg).state_dict(), cfg, path, tokenizer=tiny_tokenizer())


def _poison(name: str, value: float) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        tensors[name][1, 2] = value

    return edit


def _relabel_architecture(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (path / "config.json").write_text(json.dumps(config))


def _truncate(path: Path) -> None:
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A good base/target/donor triple and one broken or odd variant per case."""
    root = tmp_path_factory.mktemp("zoo")
    triple = build_triple(root, seed=7)
    donor = triple["donors"][0]
    down = "model.layers.1.mlp.down_proj.weight"
    return {
        "base": triple["base"],
        "target": triple["target"],
        "donor": donor,
        "wide": _fresh_model(root / "wide", 1, intermediate_size=40),
        "vocab": _fresh_model(root / "vocab", 2, vocab_size=72),
        "tied": _fresh_model(root / "tied", 3, tie_word_embeddings=True),
        "mistral": _variant(root, "mistral", donor, _relabel_architecture),
        "no_tensor": _variant(root, "no_tensor", donor, _edit_tensors(lambda t: t.pop(down))),
        "corrupt": _variant(root, "corrupt", donor, _truncate),
        "no_config": _variant(root, "no_config", donor, lambda p: (p / "config.json").unlink()),
        "nan_donor": _variant(root, "nan_donor", donor, _edit_tensors(_poison(down, float("nan")))),
        "inf_target": _variant(root, "inf_target", triple["target"], _edit_tensors(_poison(down, float("inf")))),
        "nan_base": _variant(root, "nan_base", triple["base"], _edit_tensors(_poison(down, float("nan")))),
    }


def recipe(zoo: dict[str, Path], base: str = "base", target: str = "target", donor: str = "donor", **extra: Any) -> dict:
    return {
        "merge_method": "sigmoid_diff",
        "base_model": str(zoo[base]) if base in zoo else base,
        "models": [
            {"model": str(zoo[target]), "parameters": {"role": "target"}},
            {"model": str(zoo[donor]) if donor in zoo else donor, "parameters": {"weight": 1.0}},
        ],
        **extra,
    }


# --- helpers -----------------------------------------------------------------------------


# --- errors found before any tensor is read -----------------------------------------------

EARLY = {
    "shape mismatch in a donor": (
        dict(donor="wide"),
        r"^tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape \[\d+, \d+\] in model \S+/wide "
        r"but \[\d+, \d+\] in base_model \S+/base$",
    ),
    "shape mismatch in the target": (
        dict(target="wide"),
        r"^tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape .* in model \S+/wide but .* in base_model",
    ),
    "vocabulary mismatch without tokenizer settings": (
        dict(donor="vocab"),
        r"^vocabulary mismatch in tensor model\.embed_tokens\.weight: 64 tokens in base_model \S+/base "
        r"but 72 in model \S+/vocab; add `tokenizer: \{source: base\}`",
    ),
    "different architectures": (
        dict(donor="mistral"),
        r"^model \S+/mistral is MistralForCausalLM \(mistral\) but base_model \S+/base is "
        r"LlamaForCausalLM \(llama\): .*--allow-crimes",
    ),
    "tensor missing from a donor": (
        dict(donor="no_tensor"),
        r"^tensor model\.layers\.1\.mlp\.down_proj\.weight is missing from model \S+/no_tensor \(present in",
    ),
    "corrupt safetensors file": (
        dict(donor="corrupt"),
        r"^model \S+/corrupt: corrupt safetensors file \S+/corrupt/model\.safetensors \(.*\)$",
    ),
    "missing config.json": (dict(donor="no_config"), r"^model \S+/no_config: no config\.json in \S+/no_config$"),
    "missing model folder": (dict(donor="/nonexistent/donor"), r"^model /nonexistent/donor: folder /nonexistent/donor not found$"),
    "missing base folder": (dict(base="/nonexistent/base"), r"^model /nonexistent/base: folder .* not found$"),
}


@pytest.mark.parametrize("case", EARLY)
def test_bad_models_fail_before_any_tensor_is_read(case, zoo, tmp_path, no_tensor_reads):
    models, pattern = EARLY[case]
    out = tmp_path / "out"
    with pytest.raises(SigmoidDiffError, match=pattern) as caught:
        merge_in_process(recipe(zoo, **models), out)
    assert "\n" not in str(caught.value)
    assert_left_nothing(out)


def test_mixed_architectures_pass_the_check_with_allow_crimes(zoo):
    """--allow-crimes is mergekit's switch for mixing architectures; it still applies."""
    config = MergeConfiguration.model_validate(recipe(zoo, donor="mistral"))
    check_models(config, MergeOptions(allow_crimes=True))


def test_vocabulary_mismatch_passes_the_check_with_tokenizer_settings(zoo):
    config = MergeConfiguration.model_validate(recipe(zoo, donor="vocab", tokenizer={"source": "base"}))
    check_models(config, MergeOptions())


def test_tied_embeddings_in_a_donor_are_not_a_missing_lm_head(zoo, tmp_path):
    """A tied model stores no lm_head; mergekit reads its embeddings instead."""
    assert "lm_head.weight" not in load_file(zoo["tied"] / "model.safetensors")
    out = tmp_path / "out"
    merge_in_process(recipe(zoo, donor="tied"), out)
    assert looks_finished(out)


def test_lora_donor_is_checked_through_its_model(zoo, tmp_path):
    adapter = save_lora_adapter(zoo["donor"], tmp_path / "adapter")
    options = MergeOptions(lora_merge_cache=str(tmp_path / "lora_cache"))

    good = MergeConfiguration.model_validate(recipe(zoo, donor=f"{zoo['donor']}+{adapter}"))
    check_models(good, options)

    wide = MergeConfiguration.model_validate(recipe(zoo, donor=f"{zoo['wide']}+{adapter}"))
    with pytest.raises(SigmoidDiffError, match=r"has shape .* in model \S+/wide\+\S+/adapter but"):
        check_models(wide, options)

    missing = MergeConfiguration.model_validate(recipe(zoo, donor=f"{zoo['donor']}+{tmp_path}/no_adapter"))
    with pytest.raises(SigmoidDiffError, match=r"LoRA adapter folder \S+/no_adapter not found"):
        check_models(missing, options)


def test_a_good_triple_passes_without_reading_tensors(zoo, no_tensor_reads):
    check_models(MergeConfiguration.model_validate(recipe(zoo)), MergeOptions())


# --- NaN / Inf: found while merging, and the half-written output is removed --------------


@pytest.mark.parametrize(
    "models, culprit",
    [(dict(donor="nan_donor"), "nan_donor"), (dict(target="inf_target"), "inf_target"), (dict(base="nan_base"), "nan_base")],
)
def test_non_finite_inputs_name_tensor_and_model_and_leave_no_output(zoo, tmp_path, models, culprit):
    out = tmp_path / "out"
    with pytest.raises(
        SigmoidDiffError,
        match=rf"tensor model\.layers\.1\.mlp\.down_proj\.weight of model \S+/{culprit} contains NaN or Inf",
    ):
        merge_in_process(recipe(zoo, **models), out)
    assert_left_nothing(out)


# --- the real command line ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "models, message",
    [
        (dict(donor="wide"), "Error: tensor model.layers.0.mlp."),
        (dict(donor="nan_donor"), "Error: sigmoid_diff: tensor model.layers.1.mlp.down_proj.weight of model"),
    ],
    ids=["shape mismatch (found before reading)", "NaN in a donor (found while merging)"],
)
def test_cli_reports_one_line_exits_non_zero_and_leaves_nothing(zoo, tmp_path, models, message):
    out = tmp_path / "out"
    result = run_mergekit_yaml(recipe(zoo, **models), out)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr[-2000:]
    assert_left_nothing(out)
