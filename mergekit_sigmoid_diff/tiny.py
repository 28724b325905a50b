"""Tiny Llama models built locally, for the demo, the tests and the benchmarks.

A triple shares one randomly initialised base B. The target T = B + heavy-tailed
drift (Student-t, so a few elements move far: the case the gate is for); each donor
I_j = B + Gaussian diff. Sizes are in elements; everything is written as a normal
Hugging Face folder (config.json + model.safetensors) under absolute paths, which
mergekit needs to tell a local folder from a hub id.
"""

from __future__ import annotations

import json
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


# --- variants for the recipe twins: RoPE donor, chat donors, extended vocabulary, tied ------

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INST_TEMPLATE = (  # Llama-2-chat style: markers made of ordinary characters, eos </s>
    "{% for m in messages %}{% if m['role'] == 'user' %}[inst] {{ m['content'] }} [/inst]"
    "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
)
TARGET_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
EXTENDED_TOKENS = ("가", "나", "다", "라", "마", "바")  # a target whose vocabulary grew


def extended(state: dict[str, torch.Tensor], rows: int, seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """``state`` with ``rows`` new seeded random rows appended to the vocabulary tensors."""
    generator = torch.Generator().manual_seed(seed)
    out = dict(state)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in out:
            old = out[name]
            new = scale * torch.randn((rows, old.shape[1]), generator=generator, dtype=torch.float64)
            out[name] = torch.cat([old, new.to(old.dtype)])
    return out


def write_old_style_rope(
    path: Path, rope_theta: float, rope_scaling: dict[str, Any] | None, max_positions: int
) -> None:
    """Rewrite ``path``/config.json with ``rope_theta``/``rope_scaling`` as transformers < 5
    wrote them (transformers 5 writes ``rope_parameters`` and converts this on load)."""
    config_file = Path(path) / "config.json"
    values = json.loads(config_file.read_text())
    values.pop("rope_parameters", None)
    values["rope_theta"] = rope_theta
    values["rope_scaling"] = rope_scaling
    values["max_position_embeddings"] = max_positions
    config_file.write_text(json.dumps(values, indent=2))


def build_transfer_family(root: Path, *, seed: int = 0) -> dict[str, Path]:
    """Tiny models for every transfer situation, all descended from one base; returns paths.

    - ``base``: vocabulary 49 (its tokenizer's size), no chat template.
    - ``target``: base + heavy-tailed drift; its own chat template, ``pad_token_id: 0`` and a
      generation config with ``repetition_penalty: 1.1`` (so a copy of the base's shows).
    - ``chat_donor``: base + diff, vocabulary 51: two added special tokens ``<|im_start|>``,
      ``<|im_end|>`` (rows of its own), a ChatML template, eos ``<|im_end|>`` (id 50) and a
      generation config ending on ids ``[2, 50]``.
    - ``inst_donor``: base + diff, base vocabulary, a ``[inst]`` template, eos ``</s>`` and
      a sampling generation config (temperature 0.6, top_p 0.9) as Llama-2-chat ships.
    - ``rope_donor``: base + diff, config.json in the old style: ``rope_theta: 500000``,
      linear ``rope_scaling`` factor 4, ``max_position_embeddings: 512`` (base: 10000, 128).
    - ``extended_target``: the target with 6 added tokens (vocabulary 55, new rows).
    - ``tied/base``, ``tied/target``, ``tied/donor0``: a triple with tied embeddings.
    """
    from transformers import GenerationConfig

    root = Path(root).absolute()
    vocab = len(tiny_tokenizer())
    config = tiny_config(vocab_size=vocab)
    torch.manual_seed(seed)
    base = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    target_state = perturbed(base, 0.02, seed + 1, heavy_tailed=True)
    paths: dict[str, Path] = {"base": save_state(base, config, root / "base", tokenizer=tiny_tokenizer())}

    paths["target"] = save_state(
        target_state, tiny_config(vocab_size=vocab, pad_token_id=0), root / "target",
        tokenizer=tiny_tokenizer(chat_template=TARGET_TEMPLATE),
    )
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, repetition_penalty=1.1).save_pretrained(
        paths["target"]
    )

    chat_tokenizer = tiny_tokenizer(extra_tokens=CHAT_TOKENS, chat_template=CHATML_TEMPLATE)
    chat_tokenizer.eos_token = CHAT_TOKENS[1]
    eot = chat_tokenizer.convert_tokens_to_ids(CHAT_TOKENS[1])
    paths["chat_donor"] = save_state(
        extended(perturbed(base, 0.01, seed + 2), len(CHAT_TOKENS), seed + 3),
        tiny_config(vocab_size=vocab + len(CHAT_TOKENS), eos_token_id=eot), root / "chat_donor",
        tokenizer=chat_tokenizer,
    )
    GenerationConfig(bos_token_id=1, eos_token_id=[2, eot]).save_pretrained(paths["chat_donor"])

    paths["inst_donor"] = save_state(
        perturbed(base, 0.01, seed + 4), config, root / "inst_donor", tokenizer=tiny_tokenizer(chat_template=INST_TEMPLATE)
    )
    GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=True, temperature=0.6, top_p=0.9).save_pretrained(
        paths["inst_donor"]
    )

    paths["rope_donor"] = save_state(perturbed(base, 0.01, seed + 5), config, root / "rope_donor", tokenizer=tiny_tokenizer())
    write_old_style_rope(paths["rope_donor"], 500000.0, {"rope_type": "linear", "factor": 4.0}, 512)

    extended_tokenizer = tiny_tokenizer()
    extended_tokenizer.add_tokens(list(EXTENDED_TOKENS))
    paths["extended_target"] = save_state(
        extended(target_state, len(EXTENDED_TOKENS), seed + 6),
        tiny_config(vocab_size=len(extended_tokenizer)), root / "extended_target", tokenizer=extended_tokenizer,
    )

    tied = build_triple(root / "tied", seed=seed + 7, config=tiny_config(vocab_size=vocab, tie_word_embeddings=True))
    paths["tied_base"], paths["tied_target"], paths["tied_donor"] = tied["base"], tied["target"], tied["donors"][0]
    return paths
