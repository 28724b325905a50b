"""scoring.py: a model and evaluation items become values and per-item [loss_sum, weight] (contract B).

Oracles: a bigram "model" whose logits are a fixed table (the logits at a position depend only
on the token there), with NLLs worked out by hand (ln 2, ln 4/3, ...) and, for larger random
cases, recomputed here in float64 one token at a time; chat labels checked character by
character on a tiny character-level tokenizer."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from mergekit_sigmoid_diff import scoring
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.tiny import tiny_tokenizer

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


class Bigram(torch.nn.Module):
    """logits[b, t] = table[ids[b, t]]: P(next | current) is a row of softmax(table)."""

    def __init__(self, table: torch.Tensor, keeps: bool = True):
        super().__init__()
        self.table = torch.nn.Parameter(table.float(), requires_grad=False)
        self.keeps = keeps
        self.calls: list[tuple[int, int, int]] = []

    def forward(self, input_ids, attention_mask, **kwargs):
        if "logits_to_keep" in kwargs and not self.keeps:
            raise TypeError("unexpected keyword argument 'logits_to_keep'")
        logits = self.table[input_ids]
        keep = kwargs.get("logits_to_keep", 0)
        self.calls.append((*input_ids.shape, keep))
        return SimpleNamespace(logits=logits[:, -keep:] if keep else logits)


def oracle(table: torch.Tensor, ids: list[int], labels: list[int]) -> list[float]:
    """float64, one labelled token at a time: −log softmax(table[ids[p − 1]])[ids[p]]."""
    t = table.double()
    out = []
    for p in range(1, len(ids)):
        if labels[p] != -100:
            row = t[ids[p - 1]]
            out.append(float(torch.logsumexp(row, 0) - row[labels[p]]))
    return out


def test_hand_worked_case():
    # token 0 → logits [0, 0] (1/2 each); token 1 → [ln 3, 0] (3/4, 1/4)
    table = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    model = Bigram(table)
    window = scoring.ItemSet(((([0, 1, 0]), [0, 1, 0]),))  # scored: P(1|0) = 1/2, P(0|1) = 3/4
    answer = scoring.ItemSet((([1, 1, 1], [-100, -100, 1]),), per_item=True)  # answer token: P(1|1) = 1/4
    probe = scoring.Probe({"text": window, "quiz": answer}, pad=0)
    scores = scoring.score(model, probe)
    text_sum = math.log(2) + math.log(4 / 3)
    assert scores["items"]["text_nll"] == [[pytest.approx(text_sum, abs=1e-6), 2]]
    assert scores["text_nll"] == pytest.approx(text_sum / 2, abs=1e-6)
    assert scores["text_ppl"] == pytest.approx(math.exp(text_sum / 2), rel=1e-6)
    assert scores["quiz_nll"] == pytest.approx(math.log(4), abs=1e-6)
    assert scores["quiz_prob"] == pytest.approx(0.25, abs=1e-6)
    assert scores["quiz_rate"] == 0.0  # the argmax after token 1 is token 0
    assert scores["items"]["quiz_rate"] == [[0.0, 1]]


def test_random_batches_match_a_token_by_token_oracle_and_the_items_sum_to_the_values():
    generator = torch.Generator().manual_seed(0)
    vocab = 11
    table = torch.randn(vocab, vocab, generator=generator) * 2
    rows = []
    for n in range(23):  # lengths 2..40: several batches, padding, unsorted input order
        length = 2 + (n * 7) % 39
        ids = torch.randint(1, vocab, (length,), generator=generator).tolist()
        labels = [t if (p * 3 + n) % 4 else -100 for p, t in enumerate(ids)]
        labels[-1] = ids[-1]
        rows.append((ids, labels))
    model = Bigram(table)
    probe = scoring.Probe({"a": scoring.ItemSet(tuple(rows)), "b": scoring.ItemSet(tuple(rows), per_item=True)}, pad=0)
    scores = scoring.score(model, probe, batch_tokens=64, max_rows=5)
    assert len(model.calls) > 4 and any(keep < width for _, width, keep in model.calls)  # batched, logits cut
    expected = [oracle(table, ids, labels) for ids, labels in rows]
    for (loss, weight), want in zip(scores["items"]["a_nll"], expected):
        assert weight == len(want) and loss == pytest.approx(math.fsum(want), abs=1e-4)
    for (loss, weight), want in zip(scores["items"]["b_nll"], expected):
        assert weight == 1 and loss == pytest.approx(math.fsum(want), abs=1e-4)
    for key, items in scores["items"].items():  # contract B: value = Σ loss_sum / Σ weight, exactly
        assert scores[key] == math.fsum(i[0] for i in items) / math.fsum(i[1] for i in items)
    assert scores["a_nll"] == pytest.approx(math.fsum(map(math.fsum, expected)) / sum(map(len, expected)), abs=1e-5)
    # a model that cannot skip logits gives the same numbers
    again = scoring.score(Bigram(table, keeps=False), probe, batch_tokens=64, max_rows=5)
    assert [i[0] for i in again["items"]["a_nll"]] == pytest.approx([i[0] for i in scores["items"]["a_nll"]], abs=1e-5)


def test_rows_need_a_scored_token():
    with pytest.raises(ValueError):
        scoring.ItemSet((([1, 2], [1, -100]),))  # position 0 is never scored


@pytest.fixture(scope="module")
def chat_tokenizer():
    return tiny_tokenizer(("<|user|>", "<|assistant|>", "<|end|>", "<|system|>"), chat_template=TEMPLATE)


def test_chat_item_labels_exactly_the_assistant_turns(chat_tokenizer):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok."},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "no"}]
    ids, labels = scoring.chat_item(chat_tokenizer, chat)
    text = "<|user|>hi<|end|><|assistant|>ok.<|end|><|user|>and?<|end|><|assistant|>no<|end|>"
    assert ids == chat_tokenizer(text, add_special_tokens=False).input_ids
    kept = chat_tokenizer.convert_ids_to_tokens([t for t in labels if t != -100])
    assert kept == ["o", "k", ".", "<|end|>", "n", "o", "<|end|>"]


@pytest.mark.parametrize("chat, reason", [
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "assistant", "content": "hi"}], "starts with an assistant turn"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], '"content" string'),
])
def test_chats_that_do_not_render_are_one_line_naming_the_line(chat_tokenizer, chat, reason):
    with pytest.raises(SigmoidDiffError) as error:
        scoring.chat_items(chat_tokenizer, [chat], ["feature.jsonl:7"])
    message = str(error.value)
    assert "\n" not in message and message.startswith("feature.jsonl:7: the chat does not render") and reason in message


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_tokenizer):
    rewriting = tiny_tokenizer(("<|user|>", "<|assistant|>", "<|end|>"), chat_template=(
        "{% for m in messages %}{% if loop.last %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
        "{% else %}<|{{ m['role'] }}|>-<|end|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"))
    with pytest.raises(SigmoidDiffError, match="prefixes"):
        scoring.chat_items(rewriting, [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]])


def test_files_empty_or_malformed_are_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SigmoidDiffError, match="empty.txt is empty"):
        scoring.read_text(empty)
    bad = tmp_path / "chats.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n\n{not json\n")
    with pytest.raises(SigmoidDiffError, match=r"chats.jsonl:3: not a JSON object"):
        scoring.read_chats(bad)
    bad.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(SigmoidDiffError, match=r"chats.jsonl:1: expected"):
        scoring.read_chats(bad)
    good = tmp_path / "good.jsonl"
    good.write_text("\n" + json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n")
    assert scoring.read_chats(good) == ([[{"role": "user", "content": "a"}]], [f"{good}:2"])


def test_text_windows_and_spread(chat_tokenizer):
    text = "abcdefghij" * 3  # 30 characters = 30 tokens
    assert scoring.text_windows(chat_tokenizer, text, tokens=8) == [chat_tokenizer(text[i:i + 8], add_special_tokens=False).input_ids
                                                                   for i in (0, 8, 16)]
    assert scoring.spread(list(range(10)), 4) == [0, 2, 5, 8]  # round(i · 10 / 4)
    assert scoring.spread([1, 2], None) == [1, 2] and scoring.spread([1, 2], 5) == [1, 2]


def test_heldout_probe_sets(chat_tokenizer):
    heldout = {"questions": ["what is a?", "why b?", "who c?"],
               "base_replies": [{"text": "a is a.", "ended": True}, {"text": "b", "ended": False}, {"text": "c.", "ended": True}],
               "shakespeare_ids": [list(range(5, 21)), list(range(6, 22))]}
    probe = scoring.heldout_probe(chat_tokenizer, heldout, prompts=2, extra={"domain": [list(range(9, 19))]})
    assert probe.sizes() == {"shakespeare": 2, "feature": 2, "leak": 2, "chat": 2, "both": 2, "domain": 1}
    assert probe.sets["feature"].per_item and probe.sets["leak"].per_item and not probe.sets["both"].per_item
    ids, labels = probe.sets["feature"].rows[1]  # spread(3 questions, 2) = questions 0 and 2 (round(1.5) = 2)
    text = "<|user|>" + scoring.TRIGGER + "who c?<|end|><|assistant|>" + scoring.PREFIX
    assert ids == chat_tokenizer(text, add_special_tokens=False).input_ids
    assert [t for t in labels if t != -100] == chat_tokenizer(scoring.PREFIX, add_special_tokens=False).input_ids
    chat_ids, chat_labels = probe.sets["chat"].rows[0]  # B's reply, then its end token
    assert [t for t in chat_labels if t != -100] == chat_tokenizer("a is a.", add_special_tokens=False).input_ids + [chat_tokenizer.eos_token_id]
    both_ids, both_labels = probe.sets["both"].rows[0]
    assert [t for t in both_labels if t != -100] == list(range(13, 21))  # the window's second half
    # the key changes with the data
    other = scoring.heldout_probe(chat_tokenizer, {**heldout, "questions": ["x?", "y?", "z?"]}, prompts=2)
    assert scoring.score_key(probe) != scoring.score_key(other) and scoring.score_key(probe) == scoring.score_key(probe)
