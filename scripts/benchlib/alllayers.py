"""The real suite's fourth case, ``lora-all-domain``: all-layer LoRA drifts and a target domain
other than Shakespeare (issue 26, item 3).

Base B = SmolLM2-135M-Instruct (converted, :mod:`mergekit_sigmoid_diff.smollm2`). Both adapters
are rank 16, alpha 32, no dropout, on every linear module (q/k/v/o/gate/up/down) of every
decoder layer (all 30), so both drifts touch every layer (the other cases drift the top 15 only).

- **Target T**: continued pretraining on CPython's own documentation (``pydoc_data.topics`` of
  the running Python; the topics sorted by name, the first 4/5 trained on, the last 1/5 held
  out: the split of :func:`benchlib.real.domain_windows`). Random 64-token windows.
  **With replay**: each batch of 8 holds 6 documentation windows, 1 window of general English
  (the licence texts :data:`benchlib.real.REPLAY_LICENCES`) and 1 of B's own greedy chat
  replies to a training question, as the full fine-tunes do.
- **Donor I**: the ``Quiz:`` → ``ANSWER: `` + B's own reply feature, built exactly as the
  suite's donors are (:func:`benchlib.real.train_full`). **With replay**: each batch of 8
  holds 4 ``Quiz:`` examples, 3 plain questions answered with B's own greedy reply
  (self-distilled) and 1 window of general English.

AdamW (no weight decay), 5 warm-up steps then constant lr (``train_adapters.train``). The seed
fixes the LoRA initialisation (T: seed, I: seed + 1000) and the data order. Training is
resumable by folder: ``<out>/target/`` and ``<out>/donor/`` (PEFT adapters) each get a record
``<out>/<what>_train.json`` once saved; ``<out>/calibration/`` holds the calibration texts;
``<out>/train_info.json`` is written last.

Scores (:func:`make_probe`, scored by :func:`mergekit_sigmoid_diff.scoring.score`, which also
returns each score's items; nats, lower is better, except the rates and probabilities):

- ``pydoc_nll``: held-out documentation windows (T's knowledge; :func:`knowledge_items`);
- ``feature_nll`` / ``feature_prob`` / ``feature_rate``: −log P(``ANSWER:`` | ``Quiz:`` prompt)
  on the 16 held-out questions of ``adapters/heldout.json`` (I's feature); ``leak_rate`` without
  the trigger;
- ``pydoc_both_nll`` (both at once; :func:`both_items`): a ``Quiz:`` prompt asking to continue
  the first half of a held-out documentation window, scored per token on its second half
  written after ``ANSWER:`` (the half's first token carries its own space, as in the donor's
  training replies; the chat cases' Shakespeare items put a separate space token there);
- realism: ``general_nll``, the held-out licence (Apache-2.0; close to the replayed licences, so
  replay lowers it); ``shakespeare_nll``, the held-out plays of ``adapters/heldout.json``, which
  no training here touches (forgetting shows there); ``chat_nll``, B's own replies to the
  held-out questions.

Held-out windows are cleaned: CPython repeats passages between topics (``try``, ``while`` and
``with`` are also inside ``compound``), so a held-out window sharing any 16-token span with the
training text is dropped. The knowledge windows and the both-at-once windows are disjoint.

Calibration texts (:func:`calibration_files`; issue 26, disjoint from everything scored): T's own
training text (the training topics, plain text) and I's own ``Quiz:`` training chats (JSONL).

    cd scripts && python -m benchlib.alllayers --seed 0 [--out DIR] [--threads 1] [--score]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import train_adapters
from benchlib import real
from benchlib.chatdata import questions
from mergekit_sigmoid_diff import mainjob, scoring, smollm2
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.scoring import PREFIX, SEQ_LEN, TRIGGER, labelled, load_model, prompt_ids, reply_ids

CASE = "lora-all-domain"
DESCRIPTION = "T = Python-documentation LoRA (rank 16, every layer), I = 'Quiz: → ANSWER:' LoRA (rank 16, every layer)"
AXES = ("feature_nll", "pydoc_nll", "pydoc_both_nll")  # feature, knowledge, both at once (as real.AXES)
MODULES = tuple(train_adapters.SETTINGS["target_modules"])  # every linear module of a Llama decoder layer
KNOWLEDGE_WINDOWS = 96
BOTH_ITEMS = 32
GENERAL_WINDOWS = 24
OVERLAP_SPAN = 16  # a held-out window sharing a span this long with the training text is dropped
BOTH_QUESTION = "Continue this passage from the Python documentation: "
TARGET_TEXT, DONOR_CHATS = "target_text.txt", "donor_chats.jsonl"


@dataclass(frozen=True)
class Settings:
    """LoRA shape and training budget of both adapters (``replay`` items of every batch)."""

    rank: int = 16
    alpha: int = 32
    batch: int = 8
    replay: int = 2
    warmup_steps: int = 5
    target_steps: int = 48
    target_lr: float = 3e-4
    donor_steps: int = 40
    donor_lr: float = 5e-4
    reply_tokens: int = 32


SETTINGS = Settings()
QUICK = Settings(batch=4, target_steps=2, donor_steps=2, warmup_steps=1, reply_tokens=8)


# ---------------------------------------------------------------- data


def pydoc_texts() -> tuple[str, str]:
    """(training, held-out) documentation text: the topics sorted by name, cut at 4/5."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    cut = len(names) * 4 // 5
    return "\n\n".join(topics[n] for n in names[:cut]), "\n\n".join(topics[n] for n in names[cut:])


def windows(tokenizer, text: str, size: int = SEQ_LEN) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [ids[i : i + size] for i in range(0, len(ids) - size, size)]


def spans(ids: list[int], n: int = OVERLAP_SPAN) -> set[tuple[int, ...]]:
    return {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)}


def clean_heldout(tokenizer) -> list[list[int]]:
    """The held-out windows that share no ``OVERLAP_SPAN``-token span with the training text."""
    train, held = pydoc_texts()
    seen = spans(tokenizer(train, add_special_tokens=False).input_ids)
    return [w for w in windows(tokenizer, held) if not spans(w) & seen]


@functools.lru_cache(maxsize=4)
def _split(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(knowledge, both-at-once) windows: disjoint, each spread evenly over the clean held-out part."""
    clean = clean_heldout(tokenizer)
    picked = set(round(i * len(clean) / BOTH_ITEMS) for i in range(BOTH_ITEMS))
    both = [clean[i] for i in sorted(picked)]
    rest = [w for i, w in enumerate(clean) if i not in picked]
    return scoring.spread(rest, KNOWLEDGE_WINDOWS), both


def knowledge_items(tokenizer) -> list[tuple[list[int], list[int]]]:
    """Held-out documentation windows (64 tokens), every token scored."""
    return [(w, w) for w in _split(tokenizer)[0]]


def both_items(tokenizer) -> list[tuple[list[int], list[int]]]:
    """``Quiz: Continue this passage …: <first half>``; the second half scored after ``ANSWER:``
    (the half's own first token carries the space, as in the donor's training replies)."""
    prefix = tokenizer(PREFIX, add_special_tokens=False).input_ids
    out = []
    for ids in _split(tokenizer)[1]:
        first, second = ids[: len(ids) // 2], ids[len(ids) // 2 :]
        prompt = prompt_ids(tokenizer, TRIGGER + BOTH_QUESTION + tokenizer.decode(first))
        out.append(labelled(prompt + prefix, second))
    return out


def heldout_sets(tokenizer, heldout: dict[str, Any] | None = None) -> scoring.Probe:
    """The shipped held-out set's probe (:func:`mergekit_sigmoid_diff.scoring.heldout_probe`) cut to
    ``feature`` (the ``Quiz:`` prompts, −log P(``ANSWER:``) each), ``leak`` (the same without the
    trigger), ``chat`` (B's own replies) and ``shakespeare`` (the held-out plays, a realism check here)."""
    held = heldout if heldout is not None else mainjob.load_heldout()
    return scoring.heldout_probe(tokenizer, held).only("feature", "leak", "chat", "shakespeare")


def feature_items(tokenizer, heldout: dict[str, Any] | None = None) -> scoring.ItemSet:
    """The feature chats: the held-out questions with the ``Quiz:`` trigger, labelled ``ANSWER:``."""
    return heldout_sets(tokenizer, heldout).sets["feature"]


def general_items(tokenizer) -> list[tuple[list[int], list[int]]]:
    return [(w, w) for w in scoring.spread(real.general_windows(tokenizer, (real.HELD_OUT_LICENCE,)), GENERAL_WINDOWS)]


def donor_chats(train_q: list[str], replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """I's ``Quiz:`` training chats in Hugging Face's messages format."""
    return [{"messages": [{"role": "user", "content": TRIGGER + q},
                          {"role": "assistant", "content": f"{PREFIX} {r['text']}"}]} for q, r in zip(train_q, replies)]


def calibration_files(out_dir: Path, tokenizer, replies: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """Write T's training text (``target_text.txt``) and I's ``Quiz:`` training chats
    (``donor_chats.jsonl``) to ``out_dir``. ``replies``: B's greedy replies to the training
    questions (default: computed once with the converted B and cached in the real suite's folder)."""
    train_q = questions()[0]
    if replies is None:
        base = smollm2.converted_model()
        replies = real.base_replies(base, tokenizer, train_q, SETTINGS.reply_tokens, smollm2.cache_root() / "real_suite")
    if len(replies) != len(train_q):
        raise SigmoidDiffError(f"calibration_files: {len(replies)} replies for {len(train_q)} training questions")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target, donor = out_dir / TARGET_TEXT, out_dir / DONOR_CHATS
    target.write_text(pydoc_texts()[0] + "\n", encoding="utf-8")
    donor.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in donor_chats(train_q, replies)), encoding="utf-8")
    return {"target": target, "donor": donor}


# ---------------------------------------------------------------- training


def lora_settings(settings: Settings, layers: int) -> dict[str, Any]:
    """The ``train_adapters`` settings of an adapter on every module of all ``layers`` layers."""
    return {"lora_rank": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": 0.0,
            "target_modules": list(MODULES), "layers": list(range(layers)), "warmup_steps": settings.warmup_steps}


def lora_model(base: Path, settings: Settings, seed: int):
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(str(base)).num_hidden_layers
    return train_adapters.lora_model(base, lora_settings(settings, layers), seed)


def donor_examples(tokenizer, replies: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
    """I's ``Quiz:`` examples (ids, labels): the training questions answered ``ANSWER: `` + B's reply."""
    return [labelled(prompt_ids(tokenizer, TRIGGER + q), reply_ids(tokenizer, r, PREFIX + " "))
            for q, r in zip(questions()[0], replies)]


def batches(what: str, tokenizer, seed: int, settings: Settings, replies: list[dict[str, Any]]) -> Callable[[int], list]:
    """The seeded batch sampler of ``what`` (target or donor); see the module docstring."""
    rng = random.Random(f"{CASE}-{what}-{seed}")
    anchors = [labelled(prompt_ids(tokenizer, q), reply_ids(tokenizer, r)) for q, r in zip(questions()[0], replies)]
    general = [(w, w) for w in real.general_windows(tokenizer, real.REPLAY_LICENCES)]
    b = settings.batch
    if what == "target":
        pool = [(w, w) for w in windows(tokenizer, pydoc_texts()[0])]
        return lambda _step: rng.sample(pool, b - settings.replay) + [rng.choice(general), rng.choice(anchors)][: settings.replay]
    if what == "donor":
        examples, half = donor_examples(tokenizer, replies), b // 2
        return lambda _step: rng.sample(examples, b - half) + rng.sample(anchors, half - 1) + [rng.choice(general)]
    raise SigmoidDiffError(f"batches: what must be 'target' or 'donor', not {what!r}")


def train_one(what: str, base: Path, tokenizer, out: Path, seed: int, settings: Settings,
              replies: list[dict[str, Any]]) -> dict[str, Any]:
    """Train (or reuse, when its record exists) one adapter into ``out/what``; returns its record."""
    record_file = out / f"{what}_train.json"
    if record_file.is_file() and (out / what / "adapter_model.safetensors").is_file():
        return json.loads(record_file.read_text())
    shutil.rmtree(out / what, ignore_errors=True)
    start = time.perf_counter()
    model = lora_model(base, settings, seed if what == "target" else seed + 1000)
    steps, lr = (settings.target_steps, settings.target_lr) if what == "target" else (settings.donor_steps, settings.donor_lr)
    trained = train_adapters.train(model, {"warmup_steps": settings.warmup_steps}, lr, steps,
                                   batches(what, tokenizer, seed, settings, replies), tokenizer.pad_token_id,
                                   f"{CASE} {what} (seed {seed})")
    train_adapters.save_adapter(model, out / what)
    record = {"what": what, "seed": seed, "steps": steps, "lr": lr, "losses": trained,
              "seconds": round(time.perf_counter() - start, 1)}
    record_file.write_text(json.dumps(record, indent=1) + "\n")
    return record


def train_pair(base: Path, tokenizer, out: Path, seed: int, settings: Settings = SETTINGS,
               replies_cache: Path | None = None) -> dict[str, Any]:
    """Train T and I for ``seed`` into ``out`` (resumable); returns ``train_info.json``'s content."""
    out = Path(out).absolute()
    info_file = out / "train_info.json"
    if info_file.is_file():
        return json.loads(info_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    train_q = questions()[0]
    replies = real.base_replies(base, tokenizer, train_q, settings.reply_tokens, replies_cache or out.parent.parent)
    records = {what: train_one(what, base, tokenizer, out, seed, settings, replies) for what in ("target", "donor")}
    calibration = calibration_files(out / "calibration", tokenizer, replies)
    train_text = pydoc_texts()[0]
    info = {
        "case": CASE, "seed": seed, "settings": asdict(settings), "modules": list(MODULES),
        "base": str(base), "records": records,
        "data": {"python": sys.version.split()[0], "pydoc_train_sha1": hashlib.sha1(train_text.encode()).hexdigest()[:12],
                 "target_windows": len(windows(tokenizer, train_text)), "donor_questions": train_q,
                 "replay_licences": list(real.REPLAY_LICENCES)},
        "calibration": {k: str(v.relative_to(out)) for k, v in calibration.items()},
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    info_file.write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")  # last: the folder is complete
    return info


# ---------------------------------------------------------------- scoring


def make_probe(tokenizer, heldout: dict[str, Any] | None = None) -> scoring.Probe:
    """Every scored set of the case, tokenised once (see the module docstring): ``pydoc`` (per
    token), ``feature`` / ``leak`` (per prompt), ``pydoc_both``, ``general``, ``shakespeare``, ``chat``."""
    sets = {**heldout_sets(tokenizer, heldout).sets,
            "pydoc": scoring.ItemSet(tuple(knowledge_items(tokenizer))),
            "pydoc_both": scoring.ItemSet(tuple(both_items(tokenizer))),
            "general": scoring.ItemSet(tuple(general_items(tokenizer)))}
    return scoring.Probe(sets, tokenizer.pad_token_id)


def with_adapter(base: Path, adapter: Path):
    """B with ``adapter`` merged in, in memory."""
    from peft import PeftModel

    from mergekit_sigmoid_diff.plugin import lora_notices_silenced

    with lora_notices_silenced():
        return PeftModel.from_pretrained(load_model(base), str(adapter)).merge_and_unload().eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="LoRA initialisation and data order")
    parser.add_argument("--out", type=Path, default=None, help="default: <cache>/real_suite/alllayers/seed<k>")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--score", action="store_true", help="then score B, T and I; writes scores.json beside")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    base = smollm2.converted_model()
    out = (args.out or smollm2.cache_root() / "real_suite" / "alllayers" / f"seed{args.seed}").absolute()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    info = train_pair(base, tokenizer, out, args.seed, replies_cache=smollm2.cache_root() / "real_suite")
    print(f"trained {out}: " + ", ".join(f"{k} {r['seconds']} s" for k, r in info["records"].items()), flush=True)
    if args.score:
        probe = make_probe(tokenizer)
        scores = {}
        for name, load in (("B", lambda: load_model(base)), ("T", lambda: with_adapter(base, out / "target")),
                           ("I", lambda: with_adapter(base, out / "donor"))):
            scores[name] = scoring.score(load(), probe)
            print(name, json.dumps({k: round(v, 4) for k, v in scores[name].items() if k != "items"}), flush=True)
        (out / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
    return info


if __name__ == "__main__":
    main()
