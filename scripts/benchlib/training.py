"""Train the benchmark's tiny Llamas on CPU and cache them by seed.

One seed's family, all descended from one base B:

=================  ============================================================
``base``           B: pretrained on raw text about the ``base`` entities
``target``         T: B + raw continued pretraining on the ``new`` entities
                   (a quarter of each batch replays ``base`` text)
``chat``           donor: B fine-tuned on chat turns about ``chat`` ⊂ ``base``
``long``           donor: B trained at 4× the sequence length with 4× rope_theta
                   on passkey documents and long raw text
``domain``         donor: B + raw text about the ``domain`` entities (+ replay)
``<donor>_ceiling`` T fine-tuned on that donor's data (what a merge hopes to reach)
=================  ============================================================

Loss: next-token cross-entropy over every position (nats per token). Optimiser: AdamW,
linear warm-up over 5 % of the steps then cosine decay to 10 %. Each model is a normal
Hugging Face folder under ``<cache>/seed<k>/<name>``; a folder holding ``model.safetensors``
is reused, so a second run trains nothing.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from benchlib import world as w
from mergekit_sigmoid_diff.tiny import save_state, tiny_config

Sampler = Callable[[random.Random], list[int]]

DONORS = ("chat", "long", "domain")
LONG_FACTOR = 4  # the long-context donor's sequence length and rope_theta, relative to the base


@dataclass(frozen=True)
class Schedule:
    """Model size and training budget. ``steps`` are optimiser steps of ``batch`` sequences
    of ``seq_len`` tokens (the long donor uses batch/4 sequences 4× as long)."""

    hidden: int = 64
    layers: int = 2
    seq_len: int = 128
    rope_theta: float = 1000.0
    batch: int = 16
    lr: float = 3e-3
    base_steps: int = 1000
    finetune_steps: int = 300
    long_steps: int = 400

    def config(self, long: bool = False) -> LlamaConfig:
        factor = LONG_FACTOR if long else 1
        return tiny_config(
            vocab_size=64,
            hidden_size=self.hidden,
            intermediate_size=self.hidden * 3,
            num_hidden_layers=self.layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=self.seq_len * factor,
            rope_theta=self.rope_theta * factor,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )


QUICK = Schedule(hidden=48, base_steps=250, finetune_steps=80, long_steps=60, batch=8)
FULL = Schedule()


def train(
    model: LlamaForCausalLM, sampler: Sampler, steps: int, batch: int, lr: float, seed: int
) -> list[float]:
    """Train in place on ``batch`` sequences per step from ``sampler``; returns the loss per step."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    model.train()
    losses = []
    for _ in range(steps):
        ids = torch.tensor([sampler(rng) for _ in range(batch)])
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def mixed(first: Sampler, second: Sampler, share_second: float) -> Sampler:
    """Draw from ``second`` with probability ``share_second``, else from ``first``."""
    return lambda rng: second(rng) if rng.random() < share_second else first(rng)


def samplers(world: w.World, codec: w.Codec, schedule: Schedule) -> dict[str, Sampler]:
    """The training data of each model, by name (a ``_ceiling`` uses its donor's)."""
    n = schedule.seq_len
    long_n = n * LONG_FACTOR

    def raw(entities):
        return lambda rng: w.raw_document(entities, n, codec, rng)

    replay = raw(world.base)
    return {
        "base": replay,
        "target": mixed(raw(world.new), replay, 0.25),
        "chat": lambda rng: w.chat_document(world.chat, n, codec, rng),
        "long": mixed(
            lambda rng: w.passkey_document(world.base, long_n, codec, rng)[0],
            lambda rng: w.raw_document(world.base, long_n, codec, rng),
            0.5,
        ),
        "domain": mixed(raw(world.domain), replay, 0.25),
    }


def load_model(path: Path, config: LlamaConfig) -> LlamaForCausalLM:
    """A model folder's weights in ``config`` (which may differ from the folder's own,
    e.g. the long donor's rope settings applied to a merge whose config came from B)."""
    model = LlamaForCausalLM(config)
    state = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"{path}: weights do not fit the config (missing {missing}, unexpected {unexpected})")
    return model.eval()


def model_dir(cache: Path, seed: int, name: str) -> Path:
    return (Path(cache) / f"seed{seed}" / name).absolute()


def build_family(
    cache: Path, seed: int, schedule: Schedule, donors: tuple[str, ...] = DONORS, log: Callable[[str], None] = print
) -> dict[str, Path]:
    """Train (or reuse) base, target, each donor and each ceiling for ``seed``; return their folders."""
    world = w.make_world(seed)
    tok = w.tokenizer()
    codec = w.Codec(tok)
    data = samplers(world, codec, schedule)
    paths: dict[str, Path] = {}

    def get(name: str, parent: str | None, data_name: str, long: bool, steps: int, batch: int) -> None:
        path = model_dir(cache, seed, name)
        paths[name] = path
        if (path / "model.safetensors").exists():
            return
        config = schedule.config(long)
        if parent is None:
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        else:
            model = load_model(paths[parent], config)
        salt = sum(map(ord, name)) * 1000
        losses = train(model, data[data_name], steps, batch, schedule.lr if parent is None else schedule.lr / 3, seed + salt)
        tail = sum(losses[-20:]) / len(losses[-20:])
        log(f"seed {seed}: trained {name} ({steps} steps, final loss {tail:.3f} nats/token)")
        save_state(model.state_dict(), config, path, tokenizer=tok)

    s = schedule
    get("base", None, "base", False, s.base_steps, s.batch)
    get("target", "base", "target", False, s.finetune_steps, s.batch)
    for donor in donors:
        long = donor == "long"
        steps = s.long_steps if long else s.finetune_steps
        batch = max(1, s.batch // LONG_FACTOR) if long else s.batch
        get(donor, "base", donor, long, steps, batch)
        get(f"{donor}_ceiling", "target", donor, long, steps, batch)
    return paths
