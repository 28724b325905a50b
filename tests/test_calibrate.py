"""``calibrate``: per-input Grams and token counts of a tiny Llama on hand-made texts and chats.

Oracles, written differently from the code under test:
- token ids by hand: the tiny tokenizer is character-level (id = 4 + position in CHARACTERS),
  and the chat template renders ``role: content\\n`` per message;
- each sequence run ALONE (batch 1, no padding) with forward hooks on the layers' OUTPUTS:
  q/k/v read the input_layernorm output, gate/up the post_attention_layernorm output, down_proj
  reads silu(gate x) ⊙ (up x) recomputed in float64 from the weights, o_proj's input is solved
  from the attention block's output (W_o is square and invertible here), lm_head reads the
  final norm's output; all summed in float64;
- the Frequent Directions sketch is judged by its published guarantees against the full Gram;
- a ``model+lora`` run against the oracle on the model merged by hand from the adapter's A, B.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from mergekit_sigmoid_diff import calibrate as cal
from mergekit_sigmoid_diff.calibrate import CalibrationSettings, FrequentDirections, calibrate, choose_ranks, text_windows
from mergekit_sigmoid_diff.statistics import StatisticsFile, model_stamp
from mergekit_sigmoid_diff.tiny import CHARACTERS, save_state, tiny_config, tiny_tokenizer
from tests.support import TARGET_TEMPLATE, lora_delta, save_lora_adapter

LAYERS = 2
CHATS = [
    [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello."}],
    [{"role": "user", "content": "what is two plus two? say it in words, please."},
     {"role": "assistant", "content": "four, i think."}],
    [{"role": "user", "content": "ok"}],
]
TEXT = ("to be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.\n")

# a size share no file reaches: full Grams, for the tests that compare them with an oracle
FULL = 100.0


def hand_ids(text: str) -> list[int]:
    return [4 + CHARACTERS.index(c) for c in text]


def rendered(chat: list[dict]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in chat)


def make_model(root: Path, seed: int, tied: bool = False, template: str | None = TARGET_TEMPLATE) -> dict:
    config = tiny_config(vocab_size=len(tiny_tokenizer()), tie_word_embeddings=tied)
    torch.manual_seed(seed)
    state = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    folder = save_state(state, config, root, tokenizer=tiny_tokenizer(chat_template=template))
    return {"folder": folder, "state": state, "config": config}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    return {"untied": make_model(root / "untied", 1), "tied": make_model(root / "tied", 2, tied=True),
            "root": root}


def oracle(folder: Path, sequences: list[list[int]]) -> tuple[dict[str, torch.Tensor], int, Counter]:
    """weight name -> Σ x xᵀ (float64) of what it reads; n; token counts (see the module docstring)."""
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    weights = {n: p.detach().double() for n, p in model.named_parameters()}
    seen: dict[str, torch.Tensor] = {}

    def keep(key):
        def hook(module, args, output):
            seen[key] = (output[0] if isinstance(output, tuple) else output)[0].double()
        return hook

    for i, layer in enumerate(model.model.layers):
        layer.input_layernorm.register_forward_hook(keep(f"ln1.{i}"))
        layer.self_attn.register_forward_hook(keep(f"attn.{i}"))
        layer.post_attention_layernorm.register_forward_hook(keep(f"ln2.{i}"))
    model.model.norm.register_forward_hook(keep("final"))
    sums: dict[str, torch.Tensor] = defaultdict(lambda: 0)
    counts: Counter = Counter()
    with torch.no_grad():
        for sequence in sequences:
            counts.update(sequence)
            model(torch.tensor([sequence]))
            for i in range(LAYERS):
                p = f"model.layers.{i}."
                ln1, ln2 = seen[f"ln1.{i}"], seen[f"ln2.{i}"]
                o_in = torch.linalg.solve(weights[p + "self_attn.o_proj.weight"], seen[f"attn.{i}"].T).T
                gate = ln2 @ weights[p + "mlp.gate_proj.weight"].T
                down_in = gate * torch.sigmoid(gate) * (ln2 @ weights[p + "mlp.up_proj.weight"].T)
                for name, x in (("self_attn.q_proj", ln1), ("self_attn.k_proj", ln1), ("self_attn.v_proj", ln1),
                                ("self_attn.o_proj", o_in), ("mlp.gate_proj", ln2), ("mlp.up_proj", ln2),
                                ("mlp.down_proj", down_in)):
                    sums[f"{p}{name}.weight"] = sums[f"{p}{name}.weight"] + x.T @ x
            if not model.config.tie_word_embeddings:
                sums["lm_head.weight"] = sums["lm_head.weight"] + seen["final"].T @ seen["final"]
    return dict(sums), sum(len(s) for s in sequences), counts


def assert_matches_oracle(stats: StatisticsFile, want: dict[str, torch.Tensor], n: int, counts: Counter):
    assert stats.count == n
    assert set(stats.weights) == set(want)
    for name, gram in want.items():
        got = stats.for_weight(name)
        assert got.count == n and not got.sketched
        torch.testing.assert_close(got.matrix() * n, gram, rtol=1e-4, atol=1e-5 * float(gram.abs().max()),
                                   msg=lambda m: f"{name}: {m}")
    tokens = stats.for_weight(stats.embedding)
    by_hand = torch.zeros(tokens.counts.numel(), dtype=torch.float32)
    for token, count in counts.items():
        by_hand[token] = count
    assert torch.equal(tokens.counts, by_hand) and tokens.count == n


def write_chats(path: Path, chats) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return path


# ---------------------------------------------------------------- the statistics


def test_chat_grams_with_padding_equal_the_unpadded_oracle(models, tmp_path):
    """Three chats of different lengths in one batch (padding), one cut at seq_len."""
    model = models["untied"]
    chats = write_chats(tmp_path / "chats.jsonl", CHATS)
    out = tmp_path / "chats.safetensors"
    summary = calibrate(str(model["folder"]), out, chats=chats, progress=False,
                        settings=CalibrationSettings(max_size_share=FULL, seq_len=40, batch=3))
    sequences = [hand_ids(rendered(c))[:40] for c in CHATS]
    assert len(sequences[1]) == 40 and len(sequences[0]) < 40  # one truncated, others padded
    want, n, counts = oracle(model["folder"], sequences)
    stats = StatisticsFile(out)
    assert_matches_oracle(stats, want, n, counts)
    meta = stats.metadata
    assert (meta["text_kind"], meta["sequences"], meta["seq_len"], meta["model"]) == ("chats", "3", "40", str(model["folder"]))
    assert meta["model_stamp"] == model_stamp(model["folder"])
    import hashlib

    assert meta["text_hash"] == hashlib.sha256(chats.read_bytes()).hexdigest()
    assert summary.tokens == n and summary.sequences == 3 and summary.file_bytes == out.stat().st_size


def test_text_windows_are_spread_evenly_and_disjoint():
    settings = CalibrationSettings(seq_len=3, max_sequences=2)
    assert text_windows(list(range(10)), settings) == [[0, 1, 2], [7, 8, 9]]
    assert text_windows(list(range(10)), CalibrationSettings(seq_len=3, max_sequences=9)) == \
        [[0, 1, 2], [4, 5, 6], [7, 8, 9]]  # starts 0, 3.5 → 4, 7
    assert text_windows([5, 6], settings) == [[5, 6]]  # a stream shorter than one window


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_text_grams_equal_the_oracle_on_the_windows(models, tmp_path, device):
    """On the CPU, and on CUDA where torch sees one (--device cuda): the same oracle."""
    model = models["tied"]
    text = tmp_path / "play.txt"
    text.write_text(TEXT)
    out = tmp_path / "text.safetensors"
    calibrate(str(model["folder"]), out, texts=text, progress=False,
              settings=CalibrationSettings(max_size_share=FULL, seq_len=32, max_sequences=4, batch=3, device=device))
    ids = hand_ids(TEXT)
    last = len(ids) - 32
    starts = [0, round(last / 3), round(2 * last / 3), last]
    want, n, counts = oracle(model["folder"], [ids[s:s + 32] for s in starts])
    stats = StatisticsFile(out)
    assert "lm_head.weight" not in stats.weights  # tied: the embedding's counts stand for it
    assert_matches_oracle(stats, want, n, counts)
    assert stats.embedding == "model.embed_tokens.weight" and n == 4 * 32


def test_layers_reading_one_tensor_share_one_input(models, tmp_path):
    text = tmp_path / "play.txt"
    text.write_text(TEXT)
    out = tmp_path / "s.safetensors"
    calibrate(str(models["untied"]["folder"]), out, texts=text, progress=False, settings=CalibrationSettings(max_size_share=FULL, seq_len=16))
    weights = StatisticsFile(out).weights
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        assert weights[p + "self_attn.q_proj.weight"] == weights[p + "self_attn.k_proj.weight"] \
            == weights[p + "self_attn.v_proj.weight"]
        assert weights[p + "mlp.gate_proj.weight"] == weights[p + "mlp.up_proj.weight"]
    # per layer: qkv, o, gate/up, down; plus lm_head
    assert len(set(weights.values())) == 4 * LAYERS + 1
    assert len(weights) == 7 * LAYERS + 1


# ---------------------------------------------------------------- sketches


def test_frequent_directions_keeps_its_guarantees():
    """BᵀB ≼ XᵀX and ‖XᵀX − BᵀB‖₂ ≤ ‖X − X_k‖²_F / (ℓ − k) for every k < ℓ (arXiv 1501.01711);
    exact when X has rank ≤ ℓ."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, -2, 20, dtype=torch.float64)
    x = torch.randn(300, 20, generator=generator, dtype=torch.float64) * scales
    sketch = FrequentDirections(20, 6, "cpu")
    for start in range(0, 300, 64):
        sketch.add(x[start:start + 64])
    gram = x.T @ x
    gap = gram - sketch.b.T @ sketch.b
    gap_eigs = torch.linalg.eigvalsh(gap)
    assert float(gap_eigs.min()) > -1e-9 * float(gram.trace())
    tails = torch.linalg.eigvalsh(gram).flip(0)
    bound = min(float(tails[k:].sum()) / (6 - k) for k in range(6))
    assert float(gap_eigs.max()) <= bound * (1 + 1e-9)
    assert sketch.trace == pytest.approx(float(gram.trace()), rel=1e-12)

    low = torch.randn(300, 4, generator=generator, dtype=torch.float64) @ torch.randn(4, 20, generator=generator, dtype=torch.float64)
    exact = FrequentDirections(20, 6, "cpu")
    for start in range(0, 300, 64):
        exact.add(low[start:start + 64])
    torch.testing.assert_close(exact.b.T @ exact.b, low.T @ low, rtol=1e-9, atol=1e-9 * float((low.T @ low).abs().max()))


def test_sketched_inputs_keep_the_trace_and_bound_the_top_eigenvalues(models, tmp_path):
    text = tmp_path / "play.txt"
    text.write_text(TEXT * 3)
    folder = str(models["untied"]["folder"])
    settings = CalibrationSettings(max_size_share=FULL, seq_len=24, max_sequences=16, batch=4)
    calibrate(folder, tmp_path / "full.safetensors", texts=text, progress=False, settings=settings)
    from dataclasses import replace

    calibrate(folder, tmp_path / "fd.safetensors", texts=text, progress=False,  # down_proj reads 48 > 40
              settings=replace(settings, sketch_above=40, sketch_rank=3))
    calibrate(folder, tmp_path / "eig.safetensors", texts=text, progress=False,  # 2·30 ≥ 48: exact eigenpairs
              settings=replace(settings, sketch_above=40, sketch_rank=30))
    full, fd, eig = (StatisticsFile(tmp_path / f"{k}.safetensors") for k in ("full", "fd", "eig"))
    for i in range(LAYERS):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        gram = full.for_weight(name).matrix()
        true_vals = torch.linalg.eigvalsh(gram).flip(0)
        sketched = fd.for_weight(name)
        assert sketched.sketched and sketched.eigvecs.shape == (48, 3)
        assert float(torch.trace(sketched.matrix())) == pytest.approx(float(torch.trace(gram)), rel=1e-5)
        v, lam = sketched.eigvecs.double(), sketched.eigvals.double()
        bound = min(float(true_vals[k:].sum()) / (6 - k) for k in range(6))
        assert torch.all(lam <= true_vals[:3] * (1 + 1e-5))
        assert torch.all(true_vals[:3] - lam <= bound * (1 + 1e-5))
        rayleigh = torch.einsum("di,de,ei->i", v, gram, v)  # vᵀ G v ≥ vᵀ BᵀB v = λ
        assert torch.all(rayleigh >= lam * (1 - 1e-5))
        exact = eig.for_weight(name)
        torch.testing.assert_close(exact.eigvals.double(), true_vals[:30], rtol=1e-4, atol=1e-6 * float(true_vals[0]))
        assert float(torch.trace(exact.matrix())) == pytest.approx(float(torch.trace(gram)), rel=1e-5)
        assert not fd.for_weight(f"model.layers.{i}.mlp.gate_proj.weight").sketched  # 32 wide: full


def test_the_default_rank_fits_the_size_share():
    dims = {"a": 32, "b": 48, "c": 64}
    settings = CalibrationSettings(sketch_above=40, max_size_share=0.5)
    # full a: 4·32²; counts: 4·10; sketches of b, c at rank r: 4·(48r + r + 1) + 4·(64r + r + 1)
    # 0.5 · 20000 = 10000 ≥ 4096 + 40 + 8 + 4·114·r  →  r = floor(5856 / 456) = 12
    assert choose_ranks(dims, 10, 20000, settings) == {"b": 12, "c": 12}
    # a model of 100 bytes: a's full Gram alone (4096 bytes) breaks the share, so every input is
    # sketched, never below MIN_SKETCH_RANK (and never above its width)
    assert choose_ranks(dims, 10, 100, settings) == {"a": 8, "b": 8, "c": 8}
    assert choose_ranks(dims, 10, 100, CalibrationSettings(sketch_above=40, sketch_rank=50)) == {"a": 32, "b": 48, "c": 50}
    # nothing wide, but the full file (4·(32² + 48² + 64²) + 40 = 29728 bytes) exceeds 10 % of
    # 200000 = 20000: every input sketched at r = floor((20000 − 40) / (4·(33 + 49 + 65))) = floor(19960 / 588) = 33
    assert choose_ranks(dims, 10, 200_000, CalibrationSettings()) == {"a": 32, "b": 33, "c": 33}
    # ... and a model large enough for full Grams keeps them: 10 % of 300000 = 30000 ≥ 29728
    assert choose_ranks(dims, 10, 300_000, CalibrationSettings()) == {}


# ---------------------------------------------------------------- model+lora


def test_a_model_plus_lora_runs_the_merged_weights(models, tmp_path):
    model = models["untied"]
    adapter = save_lora_adapter(model["folder"], tmp_path / "adapter", targets=("v_proj", "up_proj"), seed=7)
    state = {n: t.clone() for n, t in model["state"].items()}
    for name, delta in lora_delta(adapter).items():
        state[name] = (state[name].double() + delta).float()
    by_hand = save_state(state, model["config"], tmp_path / "by_hand")
    chats = write_chats(tmp_path / "chats.jsonl", CHATS)
    out = tmp_path / "lora.safetensors"
    cache = tmp_path / "cache"
    calibrate(f"{model['folder']}+{adapter}", out, chats=chats, progress=False, lora_cache=cache,
              settings=CalibrationSettings(max_size_share=FULL, seq_len=40))
    want, n, counts = oracle(by_hand, [hand_ids(rendered(c))[:40] for c in CHATS])
    stats = StatisticsFile(out)
    assert_matches_oracle(stats, want, n, counts)
    merged = next(p for p in cache.iterdir() if p.is_dir())
    assert stats.model_stamp == model_stamp(merged) != model_stamp(model["folder"])
    assert stats.metadata["model"] == f"{model['folder']}+{adapter}"


# ---------------------------------------------------------------- errors


def run_main(args: list[str]) -> str:
    """The ``Error:`` line ``calibrate`` exits with, in-process."""
    with pytest.raises(SystemExit) as caught:
        cal.main(args)
    message = str(caught.value.code)
    assert message.startswith("Error: ") and "\n" not in message, message
    return message


@pytest.fixture
def inputs(tmp_path):
    text = tmp_path / "play.txt"
    text.write_text(TEXT)
    return {"text": text, "chats": write_chats(tmp_path / "chats.jsonl", CHATS), "out": tmp_path / "out" / "s.safetensors"}


def assert_nothing_written(folder: Path):
    assert not folder.exists() or list(folder.iterdir()) == []


@pytest.mark.parametrize("case", ["empty", "missing", "not utf-8"])
def test_bad_text_is_one_line_naming_the_file(models, inputs, case):
    text = inputs["text"]
    if case == "empty":
        text.write_text("  \n\n")
    elif case == "missing":
        text = text.with_name("nowhere.txt")
    else:
        text.write_bytes(b"caf\xe9 latte")
    inputs["out"].parent.mkdir()
    message = run_main([str(models["untied"]["folder"]), "--texts", str(text), "--out", str(inputs["out"])])
    assert str(text) in message
    assert {"empty": "is empty", "missing": "cannot read", "not utf-8": "is not UTF-8"}[case] in message
    assert_nothing_written(inputs["out"].parent)


@pytest.mark.parametrize("case", ["not jsonl", "no messages", "template fails", "no template"])
def test_a_bad_chat_file_is_one_line_naming_it(models, inputs, tmp_path, case):
    chats, folder = inputs["chats"], models["untied"]["folder"]
    if case == "not jsonl":
        chats.write_text(json.dumps({"messages": CHATS[0]}) + "\n{'messages': []}\n")
        expected = "line 2 is not JSON"
    elif case == "no messages":
        chats.write_text(json.dumps({"text": "hello"}) + "\n")
        expected = "line 1 lacks a 'messages' list"
    elif case == "template fails":
        folder = make_model(tmp_path / "strict", 1, template="{{ raise_exception('roles must alternate') }}")["folder"]
        expected = f"the chat template of model {folder} cannot render chat 1 of {chats}: roles must alternate"
    else:
        folder = make_model(tmp_path / "plain", 1, template=None)["folder"]
        expected = f"model {folder} has no chat template"
    inputs["out"].parent.mkdir()
    message = run_main([str(folder), "--chats", str(chats), "--out", str(inputs["out"]), "--seq-len", "64"])
    assert expected in message and str(chats) in message
    assert_nothing_written(inputs["out"].parent)


def test_a_model_that_does_not_load_is_one_line(inputs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    inputs["out"].parent.mkdir()
    message = run_main([str(broken), "--texts", str(inputs["text"]), "--out", str(inputs["out"])])
    assert f"model {broken} does not load" in message
    assert_nothing_written(inputs["out"].parent)


def test_an_unreachable_hub_model_is_one_line_from_the_command(inputs):
    inputs["out"].parent.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "mergekit_sigmoid_diff", "calibrate", "no-such-org/no-such-model",
         "--texts", str(inputs["text"]), "--out", str(inputs["out"])],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "MERGEKIT_SIGMOID_DIFF_TRACEBACK": ""},
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: model no-such-org/no-such-model does not load"), result.stderr
    assert_nothing_written(inputs["out"].parent)


def test_a_sequence_longer_than_the_model_allows_is_one_line(models, inputs):
    inputs["out"].parent.mkdir()
    folder = models["untied"]["folder"]
    message = run_main([str(folder), "--texts", str(inputs["text"]), "--out", str(inputs["out"]), "--seq-len", "129"])
    assert message == f"Error: --seq-len 129 is above model {folder}'s max_position_embeddings 128"
    assert_nothing_written(inputs["out"].parent)


def test_an_output_folder_that_cannot_be_written_is_one_line(models, inputs):
    message = run_main([str(models["untied"]["folder"]), "--texts", str(inputs["text"]), "--out", str(inputs["out"])])
    assert str(inputs["out"]) in message and "not writable" in message
    assert not inputs["out"].parent.exists()


def test_cuda_asked_where_there_is_none_is_one_line(models, inputs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    inputs["out"].parent.mkdir()
    message = run_main([str(models["untied"]["folder"]), "--texts", str(inputs["text"]), "--out", str(inputs["out"]),
                        "--device", "cuda"])
    assert message == "Error: --device cuda: CUDA is not available on this machine"


def test_the_closing_lines_name_the_file_its_size_and_the_text_each_file_needs(models, inputs, capsys):
    inputs["out"].parent.mkdir()
    cal.main([str(models["untied"]["folder"]), "--texts", str(inputs["text"]), "--out", str(inputs["out"]),
              "--seq-len", "16", "--quiet"])
    lines = capsys.readouterr().out.strip().splitlines()
    size = inputs["out"].stat().st_size
    assert lines[0].startswith(f"wrote {inputs['out']}: {size / 1e3:.1f} kB = ")
    assert any("TARGET" in line and "DOMAIN" in line and "DONOR" in line and "FORMAT" in line for line in lines)
    assert "tokens in" in lines[0] and " s" in lines[0]


def test_default_settings_keep_the_file_within_the_size_share(models, tmp_path):
    """Tiny models' full Grams are large next to their weights: by default they are stored
    sketched, and the file's tensors stay within 10 % of the model's weight bytes."""
    from mergekit_sigmoid_diff.calibrate import weight_bytes

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 40)
    out = tmp_path / "s.safetensors"
    folder = models["untied"]["folder"]
    calibrate(str(folder), out, texts=text, progress=False, settings=CalibrationSettings(seq_len=16))
    stats = StatisticsFile(out)
    assert any(stats.for_weight(name).sketched for name in stats.weights if name != stats.embedding)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        tensor_bytes = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    from mergekit_sigmoid_diff.calibrate import MIN_SKETCH_RANK

    ranks = {stats.for_weight(n).eigvecs.shape[1] for n in stats.weights if n != stats.embedding}
    # within the share, unless the share is below what the rank floor needs (this 77 kB model)
    assert tensor_bytes <= 0.10 * weight_bytes(Path(folder)) or ranks == {MIN_SKETCH_RANK}


def test_an_interrupted_write_leaves_no_statistics_file(models, tmp_path, monkeypatch):
    """The file appears whole or not at all (callers such as the main job cache it by name)."""
    text = tmp_path / "play.txt"
    text.write_text(TEXT)
    out = tmp_path / "s.safetensors"

    def broken(path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(cal.statistics, "write_statistics", broken)
    with pytest.raises(KeyboardInterrupt):
        calibrate(str(models["tied"]["folder"]), out, texts=text, progress=False,
                  settings=CalibrationSettings(seq_len=16, max_sequences=2))
    assert not out.exists()
