"""Score a model on both sides of a transfer: the donor's feature and the target's knowledge.

All metrics are fractions in [0, 1] except ``chat_nll`` and ``base_nll`` (nats):

- ``raw_acc_new``  target knowledge: for each fact of a ``new`` entity, the prompt
  ``<s>NAME lives in`` and the 8 candidate values; correct if the true value's
  continuation has the highest log-probability (chance 1/8).
- ``raw_acc_domain``  the same over the domain donor's entities.
- ``format``  donor feature (chat): the greedy answer to ``<|user|>Q<|end|><|assistant|>`` about
  a ``new`` entity is the question's answer sentence (any 5-letter subject, any valid value)
  followed by ``<|end|>``.
- ``chat_acc``  both at once: the greedy answer is exactly the true sentence + ``<|end|>``.
- ``chat_nll``  nats of the true answer (sentence + ``<|end|>``) given the chat prompt,
  mean over the ``new`` entities' facts: low = the target's facts are reachable in chat.
- ``passkey``  (long) exact greedy recall of a 5-digit key placed in the
  first half of a document of 4× the base's training length.
- ``long_acc``  donor feature (long): top-1 next-token accuracy at positions ≥ the base's
  training length in raw documents 4× that long (the base never saw those positions).
- ``long_x_knowledge``, ``domain_x_knowledge``  feature × ``raw_acc_new``: both sides at once.
- ``base_nll``  nats per token on fresh raw text about the base entities.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM

from benchlib import world as w

# bump when a metric changes: cached scores carry it in their key
VERSION = 3

LOWER_IS_BETTER = frozenset({"chat_nll", "base_nll"})
FEATURE = {"chat": "format", "long": "long_acc", "domain": "raw_acc_domain"}
KNOWLEDGE = "raw_acc_new"
# the single number that needs both sides at once, per donor (chat_nll: lower is better)
COMBINED = {"chat": "chat_nll", "long": "long_x_knowledge", "domain": "domain_x_knowledge"}


@dataclass
class Probes:
    """Everything a model is scored on, built once per seed (deterministic)."""

    codec: w.Codec
    world: w.World
    passkeys: list[tuple[list[int], str]]
    base_docs: list[list[int]]
    long_docs: list[list[int]]
    seq_len: int


def make_probes(world: w.World, seq_len: int, n_passkeys: int = 12, n_docs: int = 8) -> Probes:
    codec = w.Codec(w.tokenizer())
    rng = random.Random(f"probes-{world.seed}")
    passkeys = [w.passkey_document(world.base, seq_len * 4, codec, rng) for _ in range(n_passkeys)]
    docs = [w.raw_document(world.base, seq_len, codec, rng) for _ in range(n_docs)]
    long_docs = [w.raw_document(world.base, seq_len * 4, codec, rng) for _ in range(n_docs // 2)]
    return Probes(codec, world, passkeys, docs, long_docs, seq_len)


def _continuation_logprobs(model: LlamaForCausalLM, pairs: list[tuple[list[int], list[int]]], pad: int) -> torch.Tensor:
    """Sum of log p(continuation | prompt) for each (prompt, continuation), right-padded in one batch."""
    seqs = [p + c for p, c in pairs]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        logp = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    out = torch.empty(len(pairs))
    for i, (p, c) in enumerate(pairs):
        positions = torch.arange(len(p) - 1, len(p) + len(c) - 1)
        out[i] = logp[i, positions, torch.tensor(c)].sum()
    return out


def _split(entity: w.Entity, attribute: str) -> tuple[str, str]:
    """The sentence before the value, and the value's continuation template."""
    template = w.ATTRIBUTES[attribute][1].format(name=entity.name, value="\0")
    prefix, suffix = template.split("\0")
    return prefix, suffix


def fact_accuracy(model: LlamaForCausalLM, probes: Probes, entities: list[w.Entity]) -> float:
    """Multiple-choice fact accuracy over ``entities`` × attributes, in raw text."""
    codec = probes.codec
    pairs, truth = [], []
    for entity in entities:
        for attribute, (values, _, _) in w.ATTRIBUTES.items():
            prefix, suffix = _split(entity, attribute)
            head = [codec.bos, *codec.text(prefix)]
            for value in values:
                pairs.append((head, codec.text(value + suffix)))
            truth.append(values.index(entity.values[attribute]))
    scores = _continuation_logprobs(model, pairs, codec.pad).view(len(truth), -1)
    return (scores.argmax(-1) == torch.tensor(truth)).float().mean().item()


def chat_nll(model: LlamaForCausalLM, probes: Probes, entities: list[w.Entity]) -> float:
    codec = probes.codec
    pairs = [
        (codec.chat_prompt(e.question(a)), codec.chat_answer(e.sentence(a))) for e in entities for a in w.ATTRIBUTES
    ]
    return -_continuation_logprobs(model, pairs, codec.pad).mean().item()


def _cache_of(out) -> dict:
    """The KV cache of a forward pass, as the keyword the next call takes: transformers 5
    renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40)."""
    return {"cache": out["cache"]} if "cache" in out else {"past_key_values": out["past_key_values"]}


def greedy(model: LlamaForCausalLM, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuation of equal-length prompts (no padding needed), with a KV cache."""
    ids = torch.tensor(prompts)
    generated = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        for step in range(new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(nxt)
            if step + 1 < new_tokens:
                out = model(input_ids=nxt, use_cache=True, **_cache_of(out))
    return torch.cat(generated, dim=1).tolist()


def _answer_patterns() -> dict[str, re.Pattern[str]]:
    """Per attribute: the answer sentence with any 5-letter lowercase subject and any valid value."""
    return {
        a: re.compile(
            re.escape(template)
            .replace(re.escape("{name}"), "[a-z]{5}")
            .replace(re.escape("{value}"), "(" + "|".join(values) + ")")
        )
        for a, (values, template, _) in w.ATTRIBUTES.items()
    }


def chat_format(model: LlamaForCausalLM, probes: Probes, entities: list[w.Entity]) -> tuple[float, float]:
    """(format adherence, in-format accuracy) of greedy chat answers about ``entities``."""
    codec = probes.codec
    end = codec.special[w.END]
    patterns = _answer_patterns()
    in_format = correct = total = 0
    for attribute, (values, template, _) in w.ATTRIBUTES.items():
        # names have one length, so each attribute's prompts share one length
        prompts = [codec.chat_prompt(e.question(attribute)) for e in entities]
        longest = max(len(template.format(name=e.name, value=v)) for e in entities for v in values) + 1
        for entity, out in zip(entities, greedy(model, prompts, longest)):
            total += 1
            if end not in out:
                continue
            text = codec.decode(out[: out.index(end)])
            match = patterns[attribute].fullmatch(text)
            if match:
                in_format += 1
                correct += text == entity.sentence(attribute)
    return in_format / total, correct / total


def passkey_accuracy(model: LlamaForCausalLM, probes: Probes) -> float:
    """Exact recall of the key: prompt = document up to ``the passkey is `` (the end)."""
    hits = 0
    cut = w.PASSKEY_DIGITS + 1  # the key's digits and the final period
    by_len: dict[int, list[tuple[list[int], str]]] = {}
    for ids, key in probes.passkeys:
        by_len.setdefault(len(ids) - cut, []).append((ids[:-cut], key))
    for group in by_len.values():
        outs = greedy(model, [p for p, _ in group], w.PASSKEY_DIGITS)
        hits += sum(probes.codec.decode(o) == key for o, (_, key) in zip(outs, group))
    return hits / len(probes.passkeys)


def base_nll(model: LlamaForCausalLM, probes: Probes) -> float:
    ids = torch.tensor(probes.base_docs)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    ).item()


def long_accuracy(model: LlamaForCausalLM, probes: Probes) -> float:
    """Top-1 next-token accuracy on the long documents, at positions ≥ ``probes.seq_len``."""
    ids = torch.tensor(probes.long_docs)
    with torch.no_grad():
        predicted = model(input_ids=ids).logits[:, :-1].argmax(-1)
    start = probes.seq_len - 1  # logits at position i predict token i + 1
    return (predicted[:, start:] == ids[:, start + 1 :]).float().mean().item()


def score(model: LlamaForCausalLM, probes: Probes, donor: str) -> dict[str, float]:
    """The metrics that matter for ``donor`` (see the module docstring)."""
    world = probes.world
    out = {
        "raw_acc_new": fact_accuracy(model, probes, world.new),
        "base_nll": base_nll(model, probes),
    }
    if donor == "chat":
        out["format"], out["chat_acc"] = chat_format(model, probes, world.new)
        out["chat_nll"] = chat_nll(model, probes, world.new)
    elif donor == "long":
        out["passkey"] = passkey_accuracy(model, probes)
        out["long_acc"] = long_accuracy(model, probes)
        out["long_x_knowledge"] = out["long_acc"] * out["raw_acc_new"]
    elif donor == "domain":
        out["raw_acc_domain"] = fact_accuracy(model, probes, world.domain)
        out["domain_x_knowledge"] = out["raw_acc_domain"] * out["raw_acc_new"]
    else:
        raise ValueError(f"unknown donor {donor!r}")
    return out
