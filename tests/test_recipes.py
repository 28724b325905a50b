"""Every recipe in ``recipes/`` validates, and runs as a tiny twin through the real
``mergekit-yaml`` (``mergekit-multi`` for the chained one).

A twin is the recipe file itself with its public model ids swapped for tiny local models
that recreate its situation (see ``tiny.build_transfer_family``) and ``dtype: float32``
(the expected tensors below are computed in float32 too). Each twin's output must load with
AutoModelForCausalLM / AutoTokenizer without missing weights and generate, and carry what
the recipe promises: the target's config, the donor's RoPE or chat settings, the target's
extended vocabulary, one tied embedding, the gated diff applied once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from mergekit import merge_methods
from mergekit.config import ConditionalParameter, MergeConfiguration, evaluate_setting
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from mergekit_sigmoid_diff import preflight, recommended, register
from mergekit_sigmoid_diff.plugin import method_names
from tests.reference import reference_transfer
from tests.support import CHATML_TEMPLATE, CHAT_TOKENS, EXTENDED_TOKENS, INST_TEMPLATE, MERGEKIT_MULTI, TARGET_TEMPLATE, build_transfer_family, load_model_tensors, run_mergekit_yaml

pytestmark = pytest.mark.slow

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
# The formula computed here and inside mergekit-yaml may differ in the last bit: vectorised
# sigmoid/exp round differently in the SIMD body and the scalar tail, and where the tail falls
# depends on the thread split. The diff itself is ~1e-2, so applying it twice would show.
SAME = {"rtol": 1e-5, "atol": 1e-7}
# protect_subspace: the drift's basis comes from a float32 SVD inside mergekit-yaml and a float64 one
# here, so the projected diff (~1e-2) agrees to ~1e-7 of its size, not to the last bit
PROJECTED = {"rtol": 1e-5, "atol": 2e-6}


def close(settings: dict[str, Any]) -> dict[str, float]:
    return PROJECTED if settings.get("protect_subspace", "none") != "none" else SAME

# recipe file -> {public model id: tiny family member recreating its situation}
TWINS: dict[str, dict[str, str]] = {
    "context-extension.yml": {
        "meta-llama/Meta-Llama-3-8B-Instruct": "base",
        "princeton-nlp/Llama-3-Instruct-8B-SimPO": "target",
        "gradientai/Llama-3-8B-Instruct-262k": "rope_donor",
    },
    "chat-vector.yml": {
        "meta-llama/Meta-Llama-3-8B": "base",
        "beomi/Llama-3-Open-Ko-8B": "target",
        "meta-llama/Meta-Llama-3-8B-Instruct": "chat_donor",
    },
    "domain-transfer.yml": {
        "Qwen/Qwen2.5-1.5B": "tied_base",
        "Qwen/Qwen2.5-1.5B-Instruct": "tied_target",
        "Qwen/Qwen2.5-Coder-1.5B": "tied_donor",
    },
    "layer-aware.yml": {
        "meta-llama/Llama-2-7b-hf": "base",
        "beomi/llama-2-ko-7b": "extended_target",
        "meta-llama/Llama-2-7b-chat-hf": "inst_donor",
    },
    "multi-donor.yml": {
        "meta-llama/Meta-Llama-3-8B": "base",
        "beomi/Llama-3-Open-Ko-8B": "target",
        "meta-llama/Meta-Llama-3-8B-Instruct": "chat_donor",
        "winglian/Llama-3-8b-64k-PoSE": "rope_donor",
    },
    "chained.yml": {
        "meta-llama/Meta-Llama-3-8B": "base",
        "beomi/Llama-3-Open-Ko-8B": "target",
        "meta-llama/Meta-Llama-3-8B-Instruct": "inst_donor",
    },
    # the data variants: their statistics files are calibrated on the twin's models (STATISTICS)
    "chat-vector-data.yml": {  # Llama-3's instruct model adds no tokens: a donor of the base's vocabulary
        "meta-llama/Meta-Llama-3-8B": "base",
        "beomi/Llama-3-Open-Ko-8B": "target",
        "meta-llama/Meta-Llama-3-8B-Instruct": "inst_donor",
        "stats/target-korean.safetensors": "stats/target-korean.safetensors",
        "stats/donor-chats.safetensors": "stats/donor-chats.safetensors",
    },
    "domain-transfer-data.yml": {
        "Qwen/Qwen2.5-1.5B": "tied_base",
        "Qwen/Qwen2.5-1.5B-Instruct": "tied_target",
        "Qwen/Qwen2.5-Coder-1.5B": "tied_donor",
        "stats/target-chats.safetensors": "stats/target-chats.safetensors",
        "stats/donor-code.safetensors": "stats/donor-code.safetensors",
    },
}
# a data recipe's statistics file -> (the family member it describes, its text: what the
# recipe's header says to calibrate on, the member whose tokenizer reads it)
STATISTICS: dict[str, tuple[str, str, str]] = {
    "stats/target-korean.safetensors": ("target", "texts", "target"),
    "stats/donor-chats.safetensors": ("inst_donor", "chats", "inst_donor"),
    "stats/chatml-donor-chats.safetensors": ("chat_donor", "chats", "chat_donor"),  # adds 2 tokens: refused
    "stats/target-chats.safetensors": ("tied_target", "chats", "target"),  # the tied triple has no tokenizer files
    "stats/donor-code.safetensors": ("tied_donor", "texts", "base"),
}
STAT_TEXT = ("def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n" * 3)
STAT_CHATS = [
    [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello, how can i help?"}],
    [{"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "four."}],
    [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "blue, like the sea."}],
]


def recipe_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --- every recipe validates ---------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yml")), ids=lambda p: p.name)
def test_recipe_validates_against_the_method(path: Path) -> None:
    register()
    methods = []
    for doc in recipe_documents(path):
        doc = {k: v for k, v in doc.items() if k != "name"}  # mergekit-multi's step name
        config = MergeConfiguration.model_validate(doc)
        if config.merge_method in method_names():
            preflight.check_recipe(config)
        methods.append(config.merge_method)
    assert "sigmoid_diff" in methods


def test_every_recipe_has_a_tiny_twin() -> None:
    assert sorted(TWINS) == sorted(p.name for p in RECIPES.glob("*.yml"))
    for name, ids in TWINS.items():
        text = (RECIPES / name).read_text()
        used = {v for doc in recipe_documents(RECIPES / name) for v in _strings(doc) if "/" in v}
        assert used <= set(ids), f"{name}: no twin for {sorted(used - set(ids))}"
        assert all(public in text for public in ids)


# --- the twins ------------------------------------------------------------------------------


def _strings(value: Any):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def _swap(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _swap(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_swap(v, ids) for v in value]
    return ids.get(value, value) if isinstance(value, str) else value


def twin_documents(name: str, family: dict[str, Path]) -> list[dict[str, Any]]:
    ids = {public: str(family[member]) for public, member in TWINS[name].items()}  # family: models and statistics
    docs = [_swap(doc, ids) for doc in recipe_documents(RECIPES / name)]
    for doc in docs:
        doc["dtype"] = "float32"
    return docs


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """The tiny models, and the data recipes' statistics files calibrated on them."""
    from mergekit_sigmoid_diff.calibrate import CalibrationSettings, calibrate

    paths = build_transfer_family(tmp_path_factory.mktemp("family"))
    folder = tmp_path_factory.mktemp("statistics")
    (folder / "text.txt").write_text(STAT_TEXT)
    (folder / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in STAT_CHATS))
    settings = CalibrationSettings(seq_len=16, max_sequences=8, max_size_share=100.0)  # full Grams (the oracle reads them)
    for name, (member, kind, tokenizer) in STATISTICS.items():
        out = folder / Path(name).name
        text = {"texts": folder / "text.txt", "chats": folder / "chats.jsonl"}[kind]
        calibrate(str(paths[member]), out, progress=False, settings=settings, tokenizer=str(paths[tokenizer]), **{kind: text})
        paths[name] = out
    return paths


@pytest.fixture(scope="session")
def twin(family, tmp_path_factory) -> Callable[[str], Path]:
    """Run a recipe's twin once per session; returns its output folder."""
    root = tmp_path_factory.mktemp("twins")
    outputs: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in outputs:
            docs = twin_documents(name, family)
            out = root / name.removesuffix(".yml")
            if len(docs) == 1:
                result = run_mergekit_yaml(docs[0], out)
            else:
                recipe = root / name
                recipe.write_text(yaml.safe_dump_all(docs, sort_keys=False))
                result = run_mergekit_multi(recipe, out, root / "steps")
            assert result.returncode == 0, result.stderr[-3000:]
            outputs[name] = out
        return outputs[name]

    return run


def run_mergekit_multi(recipe: Path, out: Path, steps: Path) -> subprocess.CompletedProcess:
    """``mergekit-multi RECIPE --intermediate-dir STEPS --out-path OUT`` in a subprocess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [MERGEKIT_MULTI, str(recipe), "--intermediate-dir", str(steps), "--out-path", str(out)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_model_tensors(path)


def loads_and_generates(out: Path) -> tuple[Any, Any]:
    """Load the output as a user would, with no weight missing, and generate 4 tokens."""
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    tokenizer = AutoTokenizer.from_pretrained(out)
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        prompt = tokenizer("hello", return_tensors="pt")["input_ids"]
    generated = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt.shape[1] + 4
    assert int(generated.max()) < model.config.vocab_size
    return model, tokenizer


GATE_KEYS = ("steepness", "midpoint", "eps", "gate", "normalize", "quantile", "protect_subspace", "protect_energy")


def shared_settings(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (doc.get("parameters") or {}).items() if k in GATE_KEYS}


# The recommended setting per job lives in mergekit_sigmoid_diff/recommended.py; every recipe
# must carry its job's (the chat donor's weight and the shared parameters), and the twins'
# expected values resolve them per tensor as mergekit does: gradients over the 2 layers, filters.
JOB_OF = {"chat-vector.yml": "chat-vector", "domain-transfer.yml": "domain-transfer", "layer-aware.yml": "layer-aware",
          "context-extension.yml": "context-extension", "multi-donor.yml": "chat-vector", "chained.yml": "chat-vector",
          "chat-vector-data.yml": "chat-vector-data", "domain-transfer-data.yml": "domain-transfer-data"}
RECOMMENDED, CHAT_WEIGHT = recommended.split(recommended.RECOMMENDED["chat-vector"])
CONTEXT, CONTEXT_WEIGHT = recommended.split(recommended.RECOMMENDED["context-extension"])
DOMAIN, DOMAIN_WEIGHT = recommended.split(recommended.RECOMMENDED["domain-transfer"])
LAYER_AWARE = recommended.split(recommended.RECOMMENDED["layer-aware"])[0]


def test_every_recipe_carries_its_jobs_recommended_setting() -> None:
    assert set(JOB_OF) == {p.name for p in RECIPES.glob("*.yml")}
    for name, job in JOB_OF.items():
        doc = recipe_documents(RECIPES / name)[0]
        assert doc["merge_method"] == "sigmoid_diff", name
        settings, weight = recommended.split(recommended.RECOMMENDED[job])
        assert shared_settings(doc) == settings, name
        # the first donor (the chat or feature donor) carries the job's weight
        donor = next(m for m in doc["models"] if (m.get("parameters") or {}).get("role") != "target")
        assert donor["parameters"]["weight"] == weight, name


def knobs(name: str, settings: dict[str, Any], layers: int = 2) -> dict[str, Any]:
    specs = {p.name: p for p in merge_methods.get("sigmoid_diff").spec.parameters}
    match = re.search(r"\.layers\.(\d+)\.", name)
    t = int(match.group(1)) / (layers - 1) if match else 0.0
    return {
        key: evaluate_setting(name, _setting(value), t, validate=specs[key].validate)
        for key, value in settings.items()
    }


def _setting(value: Any) -> Any:
    """YAML filter entries as mergekit's ConditionalParameter, other settings as they are."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [ConditionalParameter.model_validate(entry) for entry in value]
    return value


def expected(
    base: dict, target: dict, donors: list[dict], weights: list[float], name: str, settings: dict[str, Any] = RECOMMENDED
) -> torch.Tensor:
    """The independent float64 reference (tests/reference.py), cast like the output."""
    vocabulary = name in ("model.embed_tokens.weight", "lm_head.weight")
    want = reference_transfer(
        base[name], target[name], [d[name] for d in donors], weights, knobs(name, settings), vocabulary
    )
    return want.to(target[name].dtype)


def filled(tensor: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the rows it lacks taken from ``source``: what mergekit's
    PermutedVocabulary gives a model for tokens that only ``source`` has."""
    return torch.cat([tensor, source[tensor.shape[0] :]])


def config_json(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


# context extension: donor with other RoPE settings (old-style config.json) and max positions


def test_context_extension_takes_the_donors_rope_and_keeps_the_target(twin, family) -> None:
    out = twin("context-extension.yml")
    config, donor = config_json(out), AutoConfig.from_pretrained(family["rope_donor"])
    assert config["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}
    assert config["rope_parameters"] == donor.rope_parameters
    assert config["max_position_embeddings"] == 512 != config_json(family["target"])["max_position_embeddings"]
    # everything else is the target's config, not the base's (the base has no pad_token_id)
    target = config_json(family["target"])
    assert config_json(family["base"])["pad_token_id"] is None
    rope_keys = ("rope_parameters", "max_position_embeddings")
    assert {k: v for k, v in config.items() if k not in rope_keys} == {
        k: v for k, v in target.items() if k not in rope_keys
    }
    # the target's tokenizer and generation config, not the base's copy
    model, tokenizer = loads_and_generates(out)
    assert tokenizer.chat_template == TARGET_TEMPLATE
    assert GenerationConfig.from_pretrained(out).repetition_penalty == 1.1
    assert model.config.rope_parameters["rope_theta"] == 500000.0

    B, T, I, got = (tensors(p) for p in (family["base"], family["target"], family["rope_donor"], out))
    assert got.keys() == T.keys()
    for name in T:
        torch.testing.assert_close(got[name], expected(B, T, [I], [CONTEXT_WEIGHT], name, CONTEXT), **SAME)


# chat vector: donor with a chat template, an end-of-turn eos and two added special tokens


def test_chat_vector_carries_the_donors_chat_template_eos_and_tokens(twin, family) -> None:
    out = twin("chat-vector.yml")
    _, tokenizer = loads_and_generates(out)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert tokenizer.eos_token == "<|im_end|>"
    ids = [tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS]
    assert ids == [49, 50] and len(tokenizer) == 51
    assert all(tokenizer.added_tokens_decoder[i].special for i in ids)
    assert tokenizer.tokenize("<|im_start|>hi") == ["<|im_start|>", "h", "i"]
    config = config_json(out)
    assert config["eos_token_id"] == 50 and config["vocab_size"] == 51 and config["pad_token_id"] == 0
    assert GenerationConfig.from_pretrained(out).eos_token_id == [2, 50]

    B, T, I, got = (tensors(p) for p in (family["base"], family["target"], family["chat_donor"], out))
    for name in T:
        if name in (EMBED, LM_HEAD):
            # the union vocabulary: rows only the donor has are filled from the donor in B and T,
            # so I − B = 0 there and the output row is the donor's own row
            want = expected({name: filled(B[name], I[name])}, {name: filled(T[name], I[name])}, [I], [CHAT_WEIGHT], name)
            assert torch.equal(got[name][49:], I[name][49:])
        else:
            want = expected(B, T, [I], [CHAT_WEIGHT], name)
        torch.testing.assert_close(got[name], want, **close(RECOMMENDED))


# the data variants: the closed form on every linear weight, from the statistics the header names


DATA_BETA, DATA_ALPHA = 0.1, 0.01  # the documented defaults (datasolve.DataSettings), which the recipes keep


def data_expected(name: str, B: dict, T: dict, I: dict, weight: float, target_file: Path, donor_file: Path) -> torch.Tensor:
    """float64: T + Δ with Δ = wD (β G_I + α 1)(G_T + β G_I + α 1)⁻¹ (an LU solve of the
    objective's first form) on linear weights; token rows scaled by (β g_I + α)/(g_T + β g_I + α)
    on the embedding; the plain diff elsewhere (norms)."""
    from mergekit_sigmoid_diff.statistics import StatisticsFile

    diff = weight * (I[name].double() - B[name].double())
    t_file, i_file = StatisticsFile(target_file), StatisticsFile(donor_file)
    if name == EMBED:
        g_t = t_file.for_weight(name).counts.double() / t_file.count
        g_i = i_file.for_weight(name).counts.double() / i_file.count
        alpha = DATA_ALPHA * g_t.mean()
        return T[name].double() + diff * ((DATA_BETA * g_i + alpha) / (g_t + DATA_BETA * g_i + alpha))[:, None]
    if diff.dim() != 2:
        return T[name].double() + diff
    g_t, g_i = t_file.for_weight(name).gram.double(), i_file.for_weight(name).gram.double()
    eye = torch.eye(g_t.shape[0], dtype=torch.float64)
    keep = DATA_BETA * g_i + DATA_ALPHA * torch.trace(g_t) / g_t.shape[0] * eye
    return T[name].double() + torch.linalg.solve(g_t + keep, keep @ diff.T).T


def test_data_recipes_keep_the_documented_defaults() -> None:
    from mergekit_sigmoid_diff.datasolve import DataSettings

    assert (DataSettings().beta, DataSettings().alpha, DataSettings().hard) == (DATA_BETA, DATA_ALPHA, False)
    for name in ("chat-vector-data.yml", "domain-transfer-data.yml"):
        parameters = recipe_documents(RECIPES / name)[0]["parameters"]
        assert not {"data_beta", "data_alpha", "data_hard"} & set(parameters), name
        assert parameters["target_statistics"].startswith("stats/target-") and parameters["donor_statistics"].startswith("stats/donor-")


def test_chat_vector_data_solves_every_linear_weight_and_carries_the_chat(twin, family) -> None:
    out = twin("chat-vector-data.yml")
    _, tokenizer = loads_and_generates(out)
    assert tokenizer.chat_template == INST_TEMPLATE
    B, T, I, got = (tensors(p) for p in (family["base"], family["target"], family["inst_donor"], out))
    _, weight = recommended.split(recommended.RECOMMENDED["chat-vector-data"])
    files = family["stats/target-korean.safetensors"], family["stats/donor-chats.safetensors"]
    solved = 0
    for name in T:
        want = data_expected(name, B, T, I, weight, *files)
        torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=2e-6, msg=name)
        if T[name].dim() == 2:
            plain = T[name].double() + weight * (I[name].double() - B[name].double())
            solved += bool((want - plain).abs().max() > 1e-4)  # the statistics did change it
    assert solved >= 10


def test_data_recipe_with_a_donor_that_adds_tokens_is_refused_before_the_merge(family, tmp_path) -> None:
    """A ChatML donor with 2 added tokens under the union tokenizer: one line naming the file and
    the tensor, nothing written."""
    docs = twin_documents("chat-vector-data.yml", family)
    doc = _swap(docs[0], {str(family["inst_donor"]): str(family["chat_donor"]),
                          str(family["stats/donor-chats.safetensors"]): str(family["stats/chatml-donor-chats.safetensors"])})
    result = run_mergekit_yaml(doc, tmp_path / "out")
    assert result.returncode != 0
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "chatml-donor-chats.safetensors counts 51 tokens" in error[0], result.stderr[-2000:]
    assert "model.embed_tokens.weight" in error[0] and "share one vocabulary" in error[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_domain_transfer_data_solves_and_scales_the_tied_embedding_once(twin, family) -> None:
    out = twin("domain-transfer-data.yml")
    B, T, I, got = (tensors(p) for p in (family["tied_base"], family["tied_target"], family["tied_donor"], out))
    assert LM_HEAD not in got and config_json(out)["tie_word_embeddings"] is True
    _, weight = recommended.split(recommended.RECOMMENDED["domain-transfer-data"])
    files = family["stats/target-chats.safetensors"], family["stats/donor-code.safetensors"]
    for name in T:
        torch.testing.assert_close(got[name].double(), data_expected(name, B, T, I, weight, *files), rtol=1e-5, atol=2e-6,
                                   msg=name)
    plain = T[EMBED].double() + weight * (I[EMBED].double() - B[EMBED].double())
    assert (got[EMBED].double() - plain).abs().max() > 1e-4  # token counts scaled the rows
    model, _ = loads_and_generates(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# domain transfer: tied embeddings get the diff once


def test_domain_transfer_tied_embeddings_get_the_diff_once(twin, family) -> None:
    out = twin("domain-transfer.yml")
    B, T, I, got = (tensors(p) for p in (family["tied_base"], family["tied_target"], family["tied_donor"], out))
    assert LM_HEAD not in got and LM_HEAD not in T
    assert config_json(out)["tie_word_embeddings"] is True
    once = expected(B, T, [I], [DOMAIN_WEIGHT], EMBED, DOMAIN)
    torch.testing.assert_close(got[EMBED], once, **close(DOMAIN))
    assert not torch.equal(once, T[EMBED])  # the diff did go in
    for name in T:
        torch.testing.assert_close(got[name], expected(B, T, [I], [DOMAIN_WEIGHT], name, DOMAIN), **close(DOMAIN))
    model, _ = loads_and_generates(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# layer-aware: a weight gradient over layers, onto a target with an extended vocabulary


def test_layer_aware_gradient_and_extended_vocabulary(twin, family) -> None:
    out = twin("layer-aware.yml")
    _, tokenizer = loads_and_generates(out)
    target_tokenizer = AutoTokenizer.from_pretrained(family["extended_target"])
    assert tokenizer.get_vocab() == target_tokenizer.get_vocab()
    assert config_json(out)["vocab_size"] == len(target_tokenizer) == 49 + len(EXTENDED_TOKENS)
    assert tokenizer.chat_template == INST_TEMPLATE and tokenizer.eos_token == "</s>"
    generation = GenerationConfig.from_pretrained(out)
    assert (generation.temperature, generation.top_p, generation.eos_token_id) == (0.6, 0.9, 2)

    B, T, I, got = (tensors(p) for p in (family["base"], family["extended_target"], family["inst_donor"], out))
    for name in (EMBED, LM_HEAD):
        # the target-only token rows come out exactly as in the target
        assert torch.equal(got[name][49:], T[name][49:])
        want = expected({name: filled(B[name], T[name])}, T, [{name: filled(I[name], T[name])}], [1.0], name, LAYER_AWARE)
        torch.testing.assert_close(got[name], want, **close(LAYER_AWARE))
    # gradient [0.3, 0.6, 1.0] over 2 layers: layer 0 takes 0.3, layer 1 takes 1.0
    for name in T:
        if name.startswith("model.layers."):
            weight = {0: 0.3, 1: 1.0}[int(name.split(".")[2])]
            torch.testing.assert_close(got[name], expected(B, T, [I], [weight], name, LAYER_AWARE), **close(LAYER_AWARE))
    torch.testing.assert_close(got["model.norm.weight"], expected(B, T, [I], [1.0], "model.norm.weight", LAYER_AWARE), **close(LAYER_AWARE))


# multi-donor: chat from one donor, RoPE from the other


def test_multi_donor_takes_chat_and_rope_from_different_donors(twin, family) -> None:
    out = twin("multi-donor.yml")
    _, tokenizer = loads_and_generates(out)
    assert tokenizer.chat_template == CHATML_TEMPLATE and tokenizer.eos_token == "<|im_end|>"
    config = config_json(out)
    assert config["rope_parameters"]["rope_theta"] == 500000.0 and config["max_position_embeddings"] == 512
    assert config["eos_token_id"] == 50 and config["pad_token_id"] == 0

    B, T, chat, rope, got = (
        tensors(p) for p in (family["base"], family["target"], family["chat_donor"], family["rope_donor"], out)
    )
    for name in T:
        if name in (EMBED, LM_HEAD):
            fill = {m: {name: filled(s[name], chat[name])} for m, s in (("B", B), ("T", T), ("R", rope))}
            want = expected(fill["B"], fill["T"], [chat, fill["R"]], [CHAT_WEIGHT, 1.0], name)
        else:
            want = expected(B, T, [chat, rope], [CHAT_WEIGHT, 1.0], name)
        torch.testing.assert_close(got[name], want, **close(RECOMMENDED))


# chained: a sigmoid_diff output as the base of a SLERP step, through mergekit-multi


def test_chained_recipe_keeps_step_one_config_and_tokenizer(twin, family) -> None:
    out = twin("chained.yml")
    step = out.parent / "steps" / "ko-chat"
    assert (step / "config.json").exists() and (out / "config.json").exists()
    _, tokenizer = loads_and_generates(out)
    assert tokenizer.chat_template == INST_TEMPLATE
    assert config_json(out)["pad_token_id"] == 0  # the target's, through step 1
    B, T, I, first, final = (
        tensors(p) for p in (family["base"], family["target"], family["inst_donor"], step, out)
    )
    for name in T:
        torch.testing.assert_close(first[name], expected(B, T, [I], [CHAT_WEIGHT], name), **close(RECOMMENDED))
    # t = 0.0 at the last layer: SLERP returns step 1 there; t > 0 at layer 0 moves toward T
    last = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(final[last], first[last], **SAME)
    name = "model.layers.0.mlp.down_proj.weight"
    assert (final[name] - T[name]).norm() < (first[name] - T[name]).norm()


# a PEFT LoRA chat adapter as the donor, through mergekit's model+lora syntax


@pytest.fixture(scope="session")
def chat_adapter(family, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A seeded rank-4 LoRA on q/v projections of the base; returns it and the merged weights."""
    from peft import LoraConfig, get_peft_model

    from mergekit_sigmoid_diff.plugin import lora_notices_silenced

    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_pretrained(family["base"])
    with lora_notices_silenced():  # peft.get_peft_model reads a name transformers 5 deprecates
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts lora_B at zero: make the adapter do something
                parameter.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("adapter") / "chat-lora"
    peft_model.save_pretrained(path)
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return path, merged


def test_lora_adapter_donor(family, chat_adapter, tmp_path) -> None:
    """Run in process (mergekit's run_merge, wrapped as under mergekit-yaml) to spare one
    interpreter start; the twins above cover the command line."""
    import mergekit.merge
    from mergekit.options import MergeOptions

    from mergekit_sigmoid_diff.plugin import activate

    adapter, merged = chat_adapter
    recipe = twin_documents("chat-vector.yml", family)[0]
    recipe["models"][1] = {"model": f"{family['base']}+{adapter}", "parameters": {"weight": 1.0}}
    recipe.pop("tokenizer")
    activate()
    out = tmp_path / "lora-out"
    options = MergeOptions(lora_merge_cache=str(tmp_path / "lora-cache"), quiet=True)
    mergekit.merge.run_merge(MergeConfiguration.model_validate(recipe), str(out), options)
    loads_and_generates(out)
    B, T, got = tensors(family["base"]), tensors(family["target"]), tensors(out)
    changed = [n for n in T if not torch.equal(merged[n], B[n])]
    assert changed and all(".q_proj." in n or ".v_proj." in n for n in changed)
    for name in T:
        torch.testing.assert_close(got[name], expected(B, T, [merged], [1.0], name), rtol=0, atol=1e-6)
