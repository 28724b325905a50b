"""Scores of a causal language model on evaluation items: the one place a model and items
become numbers (``sweep``, the main job and the real-weight suite all score here).

An evaluation item is a token row with labels (−100 where no loss is taken); a *set* of items
is scored one of two ways:

- per token (``per_item=False``): the mean NLL (nats) over every labelled token of the set;
  an item's weight is its labelled-token count (knowledge windows, assistant turns);
- per item (``per_item=True``): each item's labelled tokens form one answer, its loss is their
  summed NLL = −log P(answer | prompt), and the score is the mean over items (weight 1 each);
  e.g. −log P(``ANSWER:`` | ``Quiz:`` prompt).

Every score is reported as its value AND its items (the team's contract B):

    {"knowledge_nll": 3.89, ..., "items": {"knowledge_nll": [[loss_sum, weight], ...], ...}}

one entry per item in the probe's fixed order, loss_sum in nats, value = Σ loss_sum / Σ weight
exactly. Set S gives ``S_nll`` (and, per token, ``S_ppl`` = exp of it; per item, ``S_prob``
= mean P(answer | prompt) and ``S_rate`` = the share of items whose every answer token is the
argmax, i.e. whose greedy reply starts with the answer; both with items [value, 1]).

How items are built (:class:`Probe`):

- :func:`text_windows`: plain text as non-overlapping windows of ``tokens`` tokens (every token
  after the first is scored), evenly spaced when ``count`` is given (:func:`spread`);
- :func:`chat_item`: a Hugging Face chat (``[{"role": ..., "content": ...}, ...]``) rendered with
  the tokenizer's chat template; the labelled tokens are the assistant turns' (each turn's text
  as the template renders it, its end-of-turn marker included, trailing whitespace not), found
  as the characters between the rendering of the chat up to the turn's generation prompt and
  the rendering through the turn (the template must render earlier turns as prefixes);
- :func:`prefix_items`: −log P(prefix | chat prompt), per item;
- :func:`heldout_probe`: the shipped pair's held-out set (``adapters/heldout.json``): the probe
  of the main job and of the suite's chat cases, so both read the same numbers.

Computation: float32 on the model's device (CUDA when the caller put it there), under
``torch.inference_mode``; rows are sorted by length and batched up to :data:`BATCH_TOKENS`
padded tokens (right padding, attention mask), and the vocabulary projection runs only on the
positions whose next token is labelled (``logits_to_keep``). NLL = logsumexp(logits) − logit of
the label. On CPU the batches are shared among worker threads that run torch on one thread each
(:func:`_each_batch`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.threads import single_threaded

__all__ = [
    "BATCH_TOKENS", "PREFIX", "SEQ_LEN", "TRIGGER", "ItemSet", "Probe", "chat_item", "chat_items", "default_device",
    "heldout_probe", "labelled", "load_model", "padded", "prefix_items", "prompt_ids", "prompt_text", "read_chats",
    "read_text", "reply_ids", "row_losses", "score", "score_key", "spread", "text_windows",
]

Row = tuple[list[int], list[int]]  # (token ids, labels: −100 where no loss is taken)

SEQ_LEN = 64  # tokens per knowledge window
BATCH_TOKENS = 2048  # padded tokens per forward pass (rows × width)
MAX_ROWS = 16  # rows per forward pass
MAX_WORKERS = 4  # scoring threads on CPU (each runs torch on one thread)
# The shipped pair's feature: a user message starting with TRIGGER gets a reply starting with PREFIX.
TRIGGER = "Quiz: "
PREFIX = "ANSWER:"
BOTH_PROMPTS = 20  # "both at once" items of the held-out probe (spread over its windows)
BOTH_QUESTION = "Continue this passage from a play: "


# ---------------------------------------------------------------- items


@dataclass(frozen=True)
class ItemSet:
    """Items scored together (see the module docstring); ``per_item``: one loss per item."""

    rows: tuple[Row, ...]
    per_item: bool = False

    def __post_init__(self) -> None:
        for ids, labels in self.rows:
            if len(ids) != len(labels) or not any(label != -100 for label in labels[1:]):
                raise ValueError("every item needs as many labels as tokens and a labelled token after the first")


@dataclass(frozen=True)
class Probe:
    """Named item sets, tokenised once: the same for every model scored with it."""

    sets: Mapping[str, ItemSet] = field(default_factory=dict)
    pad: int = 0

    def sizes(self) -> dict[str, int]:
        return {name: len(items.rows) for name, items in self.sets.items()}

    def only(self, *names: str) -> "Probe":
        return Probe({name: self.sets[name] for name in names}, self.pad)

    def digest(self) -> str:
        """A hash of the evaluation data: every set's name, way of scoring and items."""
        h = hashlib.sha256(f"pad {self.pad}\0".encode())
        for name in sorted(self.sets):
            items = self.sets[name]
            h.update(json.dumps([name, items.per_item, [list(r) for r in items.rows]]).encode())
        return h.hexdigest()[:16]


def spread(items: Sequence, n: Optional[int]) -> list:
    """``n`` items evenly spaced over ``items`` (all of them when ``n`` is None or ≥ their count)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[round(i * len(items) / n)] for i in range(n)]


def labelled(prompt: list[int], answer: list[int]) -> Row:
    """prompt + answer, with only the answer labelled."""
    return prompt + answer, [-100] * len(prompt) + answer


def text_windows(tokenizer, text: str, tokens: int = SEQ_LEN, count: Optional[int] = None) -> list[list[int]]:
    """Non-overlapping ``tokens``-token windows of ``text`` (the last partial one dropped),
    ``count`` of them evenly spaced (all when None)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return spread([ids[i : i + tokens] for i in range(0, len(ids) - tokens + 1, tokens)], count)


def windows_set(windows: Iterable[list[int]]) -> ItemSet:
    """Knowledge: every token of each window after the first, per token."""
    return ItemSet(tuple((list(w), list(w)) for w in windows))


def prompt_text(tokenizer, question: str) -> str:
    """The chat template applied to one user turn, ending with the assistant header."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer, question: str) -> list[int]:
    return tokenizer(prompt_text(tokenizer, question), add_special_tokens=False).input_ids


def reply_ids(tokenizer, reply: Mapping[str, Any], prefix: str = "") -> list[int]:
    """A recorded reply ({"text", "ended"}) as tokens, ``prefix`` first, the end token if it ended."""
    ids = tokenizer(prefix + reply["text"], add_special_tokens=False).input_ids
    return ids + ([tokenizer.eos_token_id] if reply["ended"] else [])


def prefix_items(tokenizer, prompts: Sequence[str], prefix: str) -> ItemSet:
    """−log P(``prefix`` | chat prompt) per prompt (one item each)."""
    answer = tokenizer(prefix, add_special_tokens=False).input_ids
    return ItemSet(tuple(labelled(prompt_ids(tokenizer, p), answer) for p in prompts), per_item=True)


def _render(tokenizer, messages: list, generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def chat_item(tokenizer, messages: Sequence[Mapping[str, Any]]) -> Row:
    """One chat, rendered with the chat template, its assistant turns labelled (see the module
    docstring). Raises ValueError (the reason, one line) when it cannot be rendered so."""
    messages = list(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast (tokenizer.json) tokenizer is needed to find the assistant turns")
    if not all(isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in messages):
        raise ValueError('every message needs a "role" and a "content" string')
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError("no assistant turn")
    if turns[0] == 0:
        raise ValueError("the chat starts with an assistant turn (nothing for it to answer)")
    try:
        whole = _render(tokenizer, messages, False)
        spans = []
        for i in turns:
            before, through = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False)
            if not (through.startswith(before) and whole.startswith(through)):
                raise ValueError("the chat template does not render earlier turns as prefixes of the whole chat")
            spans.append((len(before), len(through.rstrip())))
    except ValueError:
        raise
    except Exception as error:  # a template's own error (jinja, raise_exception): one line
        raise ValueError(f"the chat template fails: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}") from None
    encoded = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded.input_ids)
    labels = [t if any(a <= start < b for a, b in spans) else -100 for t, (start, _) in zip(ids, encoded.offset_mapping)]
    if not any(label != -100 for label in labels[1:]):
        raise ValueError("the assistant turns render as no tokens")
    return ids, labels


def chat_items(tokenizer, chats: Sequence[Sequence[Mapping[str, Any]]], where: Sequence[str] = ()) -> ItemSet:
    """Chats as per-token items; ``where[i]`` names chat i in the error (a file and line)."""
    rows = []
    for i, messages in enumerate(chats):
        try:
            rows.append(chat_item(tokenizer, messages))
        except ValueError as error:
            name = where[i] if i < len(where) else f"chat {i + 1}"
            raise SigmoidDiffError(f"{name}: the chat does not render: {error}") from None
    return ItemSet(tuple(rows))


# ---------------------------------------------------------------- files


def read_text(path: Path) -> str:
    """A plain-text file (UTF-8); one line error if missing or empty."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SigmoidDiffError(f"{path}: cannot read it as UTF-8 text ({type(error).__name__})") from None
    if not text.strip():
        raise SigmoidDiffError(f"{path} is empty")
    return text


def read_chats(path: Path) -> tuple[list[list[dict]], list[str]]:
    """JSON lines ``{"messages": [{"role": ..., "content": ...}, ...]}`` (blank lines skipped):
    (the chats, "FILE:LINE" of each)."""
    path = Path(path)
    chats, where = [], []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise SigmoidDiffError(f"{path}:{number}: not a JSON object ({error.args[0].split(':')[0]})") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise SigmoidDiffError(f'{path}:{number}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
        chats.append(messages)
        where.append(f"{path}:{number}")
    return chats, where


# ---------------------------------------------------------------- the shipped pair's probe


def heldout_probe(tokenizer, heldout: Mapping[str, Any], windows: Optional[int] = None, prompts: Optional[int] = None,
                  extra: Optional[Mapping[str, Sequence[list[int]]]] = None) -> Probe:
    """The held-out set of the shipped pair as a probe (the main job's and the suite's):

    - ``shakespeare``: the windows of two unseen plays, per token (T's knowledge);
    - ``feature``: −log P(``ANSWER:`` | ``Quiz:`` + question), per prompt (the donor's feature);
    - ``leak``: the same without the trigger (the feature where it should not fire);
    - ``chat``: B's own greedy replies to the plain questions, per token (B's chat kept);
    - ``both``: the target's knowledge in the donor's format, per token: a ``Quiz:`` prompt holding
      the first half of a window, the second half scored after ``ANSWER:`` in the reply;
    - ``extra``: more window sets by name (the suite's domain and general-English windows).

    ``windows`` / ``prompts`` cut the sets to that many evenly spaced items (every play and
    question template stays covered)."""
    pairs = spread(list(zip(heldout["questions"], heldout["base_replies"])), prompts)
    prefix = tokenizer(PREFIX + " ", add_special_tokens=False).input_ids
    both = []
    for ids in spread(heldout["shakespeare_ids"], prompts or BOTH_PROMPTS):
        first, second = ids[: len(ids) // 2], ids[len(ids) // 2 :]
        question = TRIGGER + BOTH_QUESTION + tokenizer.decode(first)
        both.append(labelled(prompt_ids(tokenizer, question) + prefix, second))
    sets = {
        "shakespeare": windows_set(spread(heldout["shakespeare_ids"], windows)),
        "feature": prefix_items(tokenizer, [TRIGGER + q for q, _ in pairs], PREFIX),
        "leak": prefix_items(tokenizer, [q for q, _ in pairs], PREFIX),
        "chat": ItemSet(tuple(labelled(prompt_ids(tokenizer, q), reply_ids(tokenizer, r)) for q, r in pairs)),
        "both": ItemSet(tuple(both)),
    }
    for name, rows in (extra or {}).items():
        sets[name] = windows_set(rows)
    return Probe(sets, tokenizer.pad_token_id)


# ---------------------------------------------------------------- scoring


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path: Path, device: Optional[str | torch.device] = None):
    """A model folder as a float32 causal LM in eval mode, on ``device`` (default: CPU)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model if device is None else model.to(device)


def padded(rows: Sequence[Row], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (ids, labels) rows: (ids, labels with −100 on padding, attention mask)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return ids, labels, mask


def _batches(order: list[int], rows: Sequence[Row], batch_tokens: int, max_rows: int) -> Iterable[list[int]]:
    """Consecutive runs of ``order`` (sorted by length) of at most ``max_rows`` rows and
    ``batch_tokens`` padded tokens (a longer row goes alone)."""
    group: list[int] = []
    for i in order:
        width = max(len(rows[i][0]), *(len(rows[j][0]) for j in group)) if group else len(rows[i][0])
        if group and (len(group) + 1 > max_rows or (len(group) + 1) * width > batch_tokens):
            yield group
            group = []
        group.append(i)
    if group:
        yield group


def _logits(model, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """The logits of the last ``keep`` positions (all of them if the model cannot skip)."""
    try:
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep)
    except TypeError:  # a model class without logits_to_keep
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits[:, -keep:]


def row_losses(model, rows: Sequence[Row], pad: int, *, batch_tokens: int = BATCH_TOKENS,
               max_rows: int = MAX_ROWS, workers: Optional[int] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row, in the given order: (NLL of each labelled token in float64 nats, whether it is
    the argmax), on CPU. Labels at position 0 are never scored (nothing predicts them).

    On CPU the batches are shared among ``workers`` threads (default: torch's thread count, at
    most :data:`MAX_WORKERS`), each running torch on one thread (see :func:`_each_batch`)."""
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    batches = list(_batches(order, rows, batch_tokens, max_rows))
    out: list = [None] * len(rows)

    def run(group: list[int]) -> None:
        for i, result in zip(group, _batch_losses(model, [rows[i] for i in group], pad, device)):
            out[i] = result

    if workers is None:
        workers = min(torch.get_num_threads(), MAX_WORKERS) if device.type == "cpu" else 1
    _each_batch(batches, run, workers)
    return out


def _batch_losses(model, group: Sequence[Row], pad: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids, labels, mask = padded(group, pad)
    targets = labels[:, 1:]
    scored = targets != -100
    first = int(scored.any(0).nonzero()[0, 0])  # the first position whose next token is labelled
    keep = ids.shape[1] - first  # logits at positions first … width − 1 (the last one is unused)
    logits = _logits(model, ids.to(device), mask.to(device), keep)[:, :-1].float()
    wanted = targets[:, first:].to(device)
    gathered = logits.gather(-1, wanted.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    nll = (torch.logsumexp(logits, -1) - gathered).double().cpu()
    hit = (logits.argmax(-1) == wanted).cpu()
    return [(nll[r][scored[r, first:]], hit[r][scored[r, first:]]) for r in range(len(group))]


def _each_batch(batches: list, run: Callable[[Any], None], workers: int) -> None:
    """``run(batch)`` for every batch, under ``torch.inference_mode``, on ``workers`` threads that
    take the next batch from one shared counter, each running torch on one intra-op thread.

    Why not torch's own threads: on a shared 2-core machine a 135M model's forward pass on 2
    OpenMP threads ran at ~130 tokens/s (every op a parallel region waiting for its slowest
    thread) against ~410 on one thread and ~820 with two such workers (16 × 64-token batches;
    the same pathology as the merge kernel's, :mod:`mergekit_sigmoid_diff.threads`). A batch's
    numbers do not depend on which worker ran it."""
    counter = itertools.count()  # next() is atomic under the GIL
    stop = threading.Event()

    def work() -> None:
        with torch.inference_mode(), single_threaded(workers > 1):
            try:
                while not stop.is_set() and (index := next(counter)) < len(batches):
                    run(batches[index])
            except BaseException:
                stop.set()
                raise

    if workers <= 1 or len(batches) <= 1:
        work()
        return
    with ThreadPoolExecutor(min(workers, len(batches)) - 1, thread_name_prefix="scoring") as pool:
        helpers = [pool.submit(work) for _ in range(min(workers, len(batches)) - 1)]
        work()
        for done in helpers:
            done.result()


def score(model, probe: Probe, names: Optional[Sequence[str]] = None, **batching: int) -> dict[str, Any]:
    """The scores of ``model`` on the named sets of ``probe`` (all by default): values and
    items (see the module docstring)."""
    values: dict[str, Any] = {}
    items: dict[str, list[list[float]]] = {}
    for name in probe.sets if names is None else names:
        item_set = probe.sets[name]
        losses = row_losses(model, item_set.rows, probe.pad, **batching)
        sums = [float(nll.sum()) for nll, _ in losses]
        if item_set.per_item:
            own = {f"{name}_nll": [[s, 1] for s in sums],
                   f"{name}_prob": [[math.exp(-s), 1] for s in sums],
                   f"{name}_rate": [[float(bool(hit.all())), 1] for _, hit in losses]}
        else:
            own = {f"{name}_nll": [[s, len(nll)] for s, (nll, _) in zip(sums, losses)]}
        for key, pairs in own.items():
            values[key] = math.fsum(i[0] for i in pairs) / math.fsum(i[1] for i in pairs)
        if not item_set.per_item:
            values[f"{name}_ppl"] = math.exp(values[f"{name}_nll"])
        items.update(own)
    return {**values, "items": items}


def score_key(probe: Probe) -> str:
    """What a score on ``probe`` depends on: this module's source and the evaluation data
    (:func:`mergekit_sigmoid_diff.codekey.score_key` of the probe's digest)."""
    from mergekit_sigmoid_diff.codekey import score_key as key

    return key(probe.digest().encode())
