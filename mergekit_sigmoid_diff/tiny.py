"""Tiny Llama models built locally, for the demo, the tests and the benchmarks.

A triple shares one randomly initialised base B. The target T = B + heavy-tailed
drift (Student-t, so a few elements move far: the case the gate is for); each donor
I_j = B + Gaussian diff. Sizes are in elements; everything is written as a normal
Hugging Face folder (config.json + model.safetensors) under absolute paths, which
mergekit needs to tell a local folder from a hub id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHARACTERS = " abcdefghijklmnopqrstuvwxyz0123456789.,:?!'-\n"


def tiny_config(**overrides: Any) -> LlamaConfig:
    """A 2-layer Llama with hidden size 32: builds in milliseconds."""
    values = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_tokenizer(extra_tokens: tuple[str, ...] = (), chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: 4 special tokens, 45 characters, then ``extra_tokens``
    (added as special tokens, e.g. chat markers). Its length is 49 + len(extra_tokens)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if extra_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def save_state(
    state: dict[str, torch.Tensor],
    config: LlamaConfig,
    path: Path,
    dtype: torch.dtype = torch.float32,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Path:
    """Write ``state`` (and ``tokenizer``) as a model folder; returns the absolute path."""
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False)
    path = Path(path).absolute()
    model.to(dtype).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def perturbed(
    state: dict[str, torch.Tensor], scale: float, seed: int, heavy_tailed: bool = False
) -> dict[str, torch.Tensor]:
    """``state`` plus seeded noise of RMS about ``scale`` (Student-t with 2 d.o.f. if heavy)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
        if heavy_tailed:  # t(2) = N / sqrt(chi2(2) / 2); chi2(2) = -2 log U
            u = torch.rand(tensor.shape, generator=generator, dtype=torch.float64).clamp_min(1e-12)
            noise = noise / torch.sqrt(-torch.log(u))
            noise = noise / 3.0  # t(2) has infinite variance; keep typical values near N(0, 1)
        out[name] = (tensor.double() + scale * noise).to(tensor.dtype)
    return out


def build_triple(
    root: Path,
    *,
    seed: int = 0,
    donors: int = 1,
    config: LlamaConfig | None = None,
    dtype: torch.dtype = torch.float32,
    target_scale: float = 0.02,
    donor_scale: float = 0.01,
) -> dict[str, Any]:
    """Write base, target and donor folders under ``root``; return their absolute paths."""
    config = config or tiny_config()
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    base = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    root = Path(root).absolute()
    paths: dict[str, Any] = {
        "base": save_state(base, config, root / "base", dtype, tokenizer),
        "target": save_state(
            perturbed(base, target_scale, seed + 1, heavy_tailed=True), config, root / "target", dtype, tokenizer
        ),
        "donors": [
            save_state(perturbed(base, donor_scale, seed + 2 + j), config, root / f"donor{j}", dtype, tokenizer)
            for j in range(donors)
        ],
    }
    return paths
