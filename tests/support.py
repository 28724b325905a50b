"""Shared helpers for tests: recipes, the real ``mergekit-yaml`` in a subprocess, in-process
merges, tensors, and the tiny model families for the recipe twins."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from mergekit_sigmoid_diff.tiny import build_triple, perturbed, save_state, tiny_config, tiny_tokenizer
from mergekit_sigmoid_diff.commands import mergekit_command
from mergekit_sigmoid_diff import recommended

MERGEKIT_YAML = mergekit_command("mergekit-yaml")


def one_donor_recipe(paths: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A sigmoid_diff recipe over a ``build_triple`` triple: its target and first donor."""
    return {
        "merge_method": "sigmoid_diff",
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths["target"]), "parameters": {"role": "target"}},
            {"model": str(paths["donors"][0])},
        ],
        **top,
    }


# the recommended `gate` filters: embeddings, lm_head and norms take the plain diff
EXEMPT_VOCAB_AND_NORMS = recommended.VOCAB_AND_NORMS_UNGATED  # the one definition


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_mergekit_yaml(
    recipe: dict[str, Any] | Path,
    out: Path,
    *extra: str,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> subprocess.CompletedProcess:
    """Run ``mergekit-yaml RECIPE OUT`` (or ``command RECIPE OUT``) in a subprocess, as a user would."""
    out = Path(out)
    if isinstance(recipe, dict):
        recipe = write_recipe(out.parent / f"{out.name}.yml", recipe)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [*(command or [MERGEKIT_YAML]), str(recipe), str(out), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        **kwargs,
    )


def save_lora_adapter(model: Path, out: Path, *, targets: tuple[str, ...] = ("q_proj",), rank: int = 2, seed: int = 0) -> Path:
    """A seeded PEFT LoRA adapter for ``model`` whose ``lora_B`` is not zero, so that it
    changes exactly the ``targets`` projections; saved to ``out``."""
    import peft

    from mergekit_sigmoid_diff.plugin import lora_notices_silenced

    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(model)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
    with lora_notices_silenced():  # peft.get_peft_model reads a name transformers 5 deprecates
        adapter = peft.get_peft_model(base, config)
    adapter.save_pretrained(out)
    return Path(out)


def lora_delta(adapter: Path) -> dict[str, torch.Tensor]:
    """tensor name -> the change a saved LoRA adapter makes to it, (alpha / r) · B A in float64,
    read from ``adapter_config.json`` and ``adapter_model.safetensors`` (not through peft)."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(Path(adapter) / "adapter_model.safetensors")
    deltas = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        name = key.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
        deltas[name] = scale * (b.double() @ a.double())
    return deltas


def load_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder (one or more safetensors shards)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def merge_in_process(config: dict, out: Path, **options: Any) -> None:
    from mergekit import merge  # the wrapped run_merge, as mergekit-yaml calls it

    merge.run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True, **options))


def looks_finished(folder: Path) -> bool:
    """What a user would take for a finished model: config.json beside safetensors."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def assert_left_nothing(out: Path) -> None:
    """No OUT, and no leftover staging folder (or anything model-like) beside it."""
    assert not out.exists()
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(out.name) and p.is_dir()]
    assert leftovers == []


# the documented `normalize` options (README "Parameters", docs/method.md), written here rather
# than read from the method's own Literal, so that a test of the options can fail
NORMALIZE_OPTIONS = ("minmax", "quantile", "rank")


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


# --- models without tokenizer files (training checkpoints often have none) ---------------

TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def strip_tokenizer(folder: Path) -> Path:
    """Delete a model folder's tokenizer files; weights, config.json and generation_config stay."""
    for name in TOKENIZER_FILE_NAMES:
        (Path(folder) / name).unlink(missing_ok=True)
    return Path(folder)


def has_tokenizer(folder: Path) -> bool:
    return (Path(folder) / "tokenizer_config.json").is_file()


MERGEKIT_MULTI = mergekit_command("mergekit-multi")
