"""``sweep``: points applied in memory equal what ``mergekit-yaml`` writes, bit for bit; the rule of
choice; resume from cached scores; one-line errors; a ``model+lora`` recipe.

Oracles: the real ``mergekit-yaml`` in a subprocess on the written ``chosen.yml`` (torch.equal on
every tensor, in the output dtype), the kernel's own ``sigmoid_diff`` for the prepared transfer,
and hand-made score rows for the rule."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from mergekit_sigmoid_diff import kernel, prepared, scoring, sweep, sweepload
from mergekit_sigmoid_diff.cli import main as cli_main
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.kernel import GateSettings
from mergekit_sigmoid_diff.tiny import build_triple, tiny_config, tiny_tokenizer
from tests.support import EXEMPT_VOCAB_AND_NORMS, load_model_tensors, run_mergekit_yaml, save_lora_adapter

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
FAST = sweep.SweepSettings(weights=(0.5, 1.25), lambdas=(0.5, 1.5), refine_evaluations=2, bootstrap=100, device="cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """torch on one thread (the subprocess merges run on one too: the same bits, and quick)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-world")
    paths = build_triple(root / "models", seed=5, donors=2, config=tiny_config(hidden_size=64, intermediate_size=96))
    tokenizer = tiny_tokenizer(("<|user|>", "<|assistant|>", "<|end|>"), chat_template=TEMPLATE)
    for folder in (paths["base"], paths["target"], *paths["donors"]):
        tokenizer.save_pretrained(folder)
    (root / "knowledge.txt").write_text("the quick brown fox jumps over the lazy dog, then sleeps. " * 12)
    chats = [{"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer: {i}."}]}
             for i in range(5)]
    (root / "feature.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (root / "both.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats[:3]))
    return SimpleNamespace(root=root, paths=paths, knowledge=root / "knowledge.txt", feature=root / "feature.jsonl",
                           both=root / "both.jsonl")


def recipe(world, path: Path, donor: str | None = None, **top) -> Path:
    data = {"merge_method": "sigmoid_diff", "base_model": str(world.paths["base"]),
            "models": [{"model": str(world.paths["target"]), "parameters": {"role": "target"}},
                       {"model": donor or str(world.paths["donors"][0]), "parameters": {"weight": 1.0}}],
            "dtype": "float32", **top}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sweep_of(world, recipe_path: Path, out: Path, settings=FAST, **kwargs) -> sweep.Result:
    return sweep.run(recipe_path, world.knowledge, world.feature, out, settings=settings, windows=6, chats=3, quiet=True, **kwargs)


# ---------------------------------------------------------------- the prepared transfer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("settings", [
    GateSettings(), GateSettings(normalize="quantile"), GateSettings(normalize="rank", midpoint=0.3), GateSettings(gate=False),
    GateSettings(protect_subspace="input"), GateSettings(protect_subspace="output", protect_energy=0.8),
    GateSettings(protect_subspace="both"),
], ids=["minmax", "quantile", "rank", "plain", "input", "output", "both"])
def test_prepared_transfer_equals_the_kernel_bit_for_bit(dtype, settings, two_threads):
    generator = torch.Generator().manual_seed(3)
    shape = (700, 300)  # 210 000 elements: two chunks of the element-wise loop (CHUNK = 131 072)
    assert shape[0] * shape[1] > kernel.CHUNK
    b = torch.randn(shape, generator=generator)
    t = b + 0.02 * torch.randn(shape, generator=generator) ** 3
    i = b + 0.01 * torch.randn(shape, generator=generator)
    b, t, i = (x.to(dtype) for x in (b, t, i))
    ready = prepared.prepare(b, t, i, settings)
    for weight in (1.0, 1.25, 0.9):
        expected = kernel.sigmoid_diff(b, t, [i], [weight], settings, out_dtype=t.dtype)
        got = ready.at(weight)
        assert got.dtype == expected.dtype and torch.equal(got, expected), weight
    lam = 0.75
    want = (t.to(ready.diff.dtype) + lam * (i.to(ready.diff.dtype) - b.to(ready.diff.dtype))).to(dtype)
    assert torch.allclose(ready.arithmetic(lam).double(), want.double(), atol=2e-2 if dtype == torch.bfloat16 else 1e-6)


def test_prepared_data_mode_follows_the_merges_order():
    from mergekit_sigmoid_diff import datasolve

    generator = torch.Generator().manual_seed(4)
    b = torch.randn(40, 24, generator=generator)
    t, i = b + 0.1 * torch.randn(40, 24, generator=generator), b + 0.1 * torch.randn(40, 24, generator=generator)
    x_t, x_i = torch.randn(24, 60, generator=generator, dtype=torch.float64), torch.randn(24, 60, generator=generator, dtype=torch.float64)
    solve = datasolve.prepare(x_t @ x_t.T / 60, x_i @ x_i.T / 60)
    settings = GateSettings(protect_subspace="data")
    ready = prepared.prepare(b, t, i, settings, solve=solve)
    for weight in (1.0, 0.6):
        diff = kernel.donor_diff(b, [i], [weight], torch.float32)  # datamerge.transfer's steps
        assert torch.equal(ready.at(weight), solve.apply_delta(t, solve.delta(diff), t.dtype))
    plain = prepared.prepare(b, t, i, settings, solve=None)  # no statistics: the plain diff
    assert torch.equal(plain.at(0.6), kernel.sigmoid_diff(b, t, [i], [0.6], GateSettings(gate=False), out_dtype=t.dtype))


# ---------------------------------------------------------------- recipes and the rule


def test_recipe_at_replaces_a_single_weight_and_scales_a_varying_one():
    base = {"merge_method": "sigmoid_diff", "base_model": "b",
            "models": [{"model": "t", "parameters": {"role": "target"}}, {"model": "i"}],
            "parameters": {"weight": 2.0, "midpoint": 0.3}}
    at = sweep.recipe_at(base, 1.25)
    assert at["models"][1]["parameters"] == {"weight": 1.25} and at["parameters"] == {"midpoint": 0.3}
    assert base["parameters"]["weight"] == 2.0  # the input is not changed
    varying = {**base, "parameters": {"weight": [{"filter": "embed", "value": 1.0}, {"value": [0.3, 0.6]}]}}
    assert not sweep.scalar_weight(varying) and sweep.weight_label(varying, 0.5) == "w×0.5"
    assert sweep.recipe_at(varying, 0.5)["parameters"]["weight"] == [{"filter": "embed", "value": 0.5}, {"value": [0.15, 0.3]}]
    own = {**base, "models": [base["models"][0], {"model": "i", "parameters": {"weight": [0.2, 1.0]}}]}
    assert sweep.recipe_at(own, 2)["models"][1]["parameters"]["weight"] == [0.4, 2.0]


def _rows(feature: dict, knowledge: dict, both: dict | None = None) -> dict:
    rows = {("input", "T"): {"feature_nll": 10.0, "knowledge_nll": 1.0}, ("task_arithmetic", 1.0): {"feature_nll": 2.0, "knowledge_nll": 2.0}}
    for w in feature:
        rows["recipe", w] = {"feature_nll": feature[w], "knowledge_nll": knowledge[w], **({"both_nll": both[w]} if both else {})}
    return rows


def test_the_rule_least_knowledge_lost_among_the_weights_reaching_the_share():
    # T → task_arithmetic λ=1: feature 10 → 2, a gain of 8; 90 % of it is reached at feature ≤ 2.8
    fake = SimpleNamespace(axes=sweep.Axes(), settings=sweep.SweepSettings(weights=(0.5, 1.0, 1.5)))
    rows = _rows({0.5: 3.0, 1.0: 2.5, 1.5: 1.0}, {0.5: 1.1, 1.0: 1.2, 1.5: 1.3})
    weight, rule = sweep.choose(fake, rows)
    assert weight == 1.0 and "90 %" in rule and "λ = 1" in rule
    rows = _rows({0.5: 3.0, 1.0: 2.9, 1.5: 2.85}, {0.5: 1.1, 1.0: 1.2, 1.5: 1.3})  # none reaches it
    weight, rule = sweep.choose(fake, rows)
    assert weight == 1.5 and "no weight reaches" in rule
    with_both = SimpleNamespace(axes=sweep.Axes(both="both"), settings=fake.settings)
    weight, rule = sweep.choose(with_both, _rows({0.5: 3, 1.0: 2, 1.5: 1}, {0.5: 1, 1.0: 1, 1.5: 1}, {0.5: 0.7, 1.0: 0.6, 1.5: 0.65}))
    assert weight == 1.0 and "both" in rule


# ---------------------------------------------------------------- end to end (tiny models)


def _compare_with_mergekit_yaml(result: sweep.Result, out: Path, *extra: str) -> int:
    """Run mergekit-yaml on chosen.yml; every tensor must equal the sweep's in memory, and the
    working model at the chosen weight must hold the same values."""
    chosen = out / "chosen.yml"
    merged = out / "merged"
    done = run_mergekit_yaml(chosen, merged, *extra, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    written = load_model_tensors(merged)
    transfer = result.sweep.transfer
    ours = dict(transfer.tensors_at(result.chosen))
    assert set(ours) == set(written)
    for name, tensor in written.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    transfer.apply("recipe", result.chosen)
    state = transfer.model.state_dict()
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor.float()), name
    return len(written)


def world_statistics(world, out: Path) -> dict[str, str]:
    """T's statistics on the knowledge text, I's on the feature chats (full Grams)."""
    from mergekit_sigmoid_diff.calibrate import CalibrationSettings, calibrate

    settings = CalibrationSettings(seq_len=16, max_sequences=6, max_size_share=100.0)
    out.mkdir(parents=True, exist_ok=True)
    calibrate(str(world.paths["target"]), out / "t.safetensors", texts=world.knowledge, settings=settings, progress=False)
    calibrate(str(world.paths["donors"][0]), out / "i.safetensors", chats=world.feature, settings=settings, progress=False)
    return {"target_statistics": str(out / "t.safetensors"), "donor_statistics": str(out / "i.safetensors")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["elementwise", "projection-bf16", "both", "data", "varying-weight"])
def test_in_memory_tensors_equal_mergekit_yaml_bit_for_bit(world, tmp_path, kind):
    """Every setting the suite reads in memory (benchmark_frontier.SETTINGS) equals mergekit-yaml."""
    top = {
        "elementwise": {},
        "projection-bf16": {"dtype": "bfloat16", "parameters": {"gate": EXEMPT_VOCAB_AND_NORMS, "protect_subspace": "input",
                                                                 "protect_energy": 0.5}},
        "both": {"parameters": {"gate": EXEMPT_VOCAB_AND_NORMS, "protect_subspace": "both", "protect_energy": 0.5}},
        "data": {"parameters": {"protect_subspace": "data", "data_beta": 0.3, **world_statistics(world, tmp_path / "stats")}}
        if kind == "data" else {},
        "varying-weight": {"parameters": {"weight": [{"filter": "embed_tokens", "value": 1.0}, {"value": [0.3, 1.1]}]}},
    }[kind]
    path = recipe(world, tmp_path / "recipe.yml", **top)
    if kind == "varying-weight":  # the donor's own weight would win over the top-level one
        data = yaml.safe_load(path.read_text())
        del data["models"][1]["parameters"]
        path.write_text(yaml.safe_dump(data))
    result = sweep_of(world, path, tmp_path / "out")
    assert result.chosen in FAST.weights and (tmp_path / "out" / "sweep.json").is_file()
    chosen = yaml.safe_load((tmp_path / "out" / "chosen.yml").read_text())
    assert chosen == sweep.recipe_at(yaml.safe_load(path.read_text()), result.chosen)
    assert _compare_with_mergekit_yaml(result, tmp_path / "out") > 10


@pytest.mark.slow
def test_a_model_plus_lora_recipe_sweeps_through_the_default_lora_cache(world, tmp_path, monkeypatch):
    from mergekit_sigmoid_diff import cache

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))  # the package's default LoRA cache lives here
    adapter = save_lora_adapter(world.paths["base"], tmp_path / "adapter", targets=("q_proj", "v_proj"), seed=2)
    path = recipe(world, tmp_path / "lora.yml", donor=f"{world.paths['base']}+{adapter}")
    result = sweep_of(world, path, tmp_path / "out")
    assert any((tmp_path / "cache" / cache.LORA_CACHE_NAME).iterdir())
    assert _compare_with_mergekit_yaml(result, tmp_path / "out") > 10
    # the adapter changed only q and v: elsewhere the donor diff is 0 and every weight gives T
    stays = [e for e in result.sweep.transfer.entries if "q_proj" not in e.name and "v_proj" not in e.name]
    assert stays and all(float(e.prepared.diff.abs().max()) == 0 for e in stays)


def test_rerun_resumes_from_the_cached_scores(world, tmp_path, monkeypatch):
    path = recipe(world, tmp_path / "recipe.yml")
    first = sweep_of(world, path, tmp_path / "out", both=world.both)
    assert first.sweep._transfer is not None and first.chosen in FAST.weights
    assert "both" in first.rule and set(first.sweep.probe.sizes()) == {"knowledge", "feature", "both"}
    lines = (tmp_path / "out" / sweep.SCORES_FILE).read_text().splitlines()

    def refuse(*args, **kwargs):
        raise AssertionError("a cached point was scored again")

    monkeypatch.setattr(scoring, "score", refuse)
    monkeypatch.setattr(sweep.Sweep, "_load", refuse)
    again = sweep_of(world, path, tmp_path / "out", both=world.both)
    assert again.chosen == first.chosen and again.rule == first.rule
    assert [r["knowledge_nll"] for r in again.table_rows()] == [r["knowledge_nll"] for r in first.table_rows()]
    assert (tmp_path / "out" / sweep.SCORES_FILE).read_text().splitlines() == lines
    # a new weight scores that point only (and its refinement), reusing the rest
    monkeypatch.undo()
    grown = sweep_of(world, path, tmp_path / "out", settings=replace(FAST, weights=(0.5, 1.25, 0.8)), both=world.both)
    new_rows = (tmp_path / "out" / sweep.SCORES_FILE).read_text().splitlines()[len(lines):]
    assert grown.sweep._transfer is not None and 1 <= len(new_rows) <= 1 + FAST.refine_evaluations
    assert any(json.loads(r)["name"] == "recipe w=0.8" for r in new_rows)


def test_scores_carry_their_items(world, tmp_path):
    result = sweep_of(world, recipe(world, tmp_path / "recipe.yml"), tmp_path / "out")
    document = json.loads((tmp_path / "out" / "sweep.json").read_text())
    for name, items in document["item_scores"].items():
        row = next(r for r in document["rows"] if r["name"] == name)
        for key in ("knowledge_nll", "feature_nll"):
            assert row[key] == sum(i[0] for i in items[key]) / sum(i[1] for i in items[key])
    recipe_rows = [r for r in document["rows"] if r["kind"] == "recipe"]
    assert [r["value"] for r in recipe_rows] == list(FAST.weights)
    assert all("gap_closed" in r and "gap_ci_lo" in r for r in recipe_rows)
    assert len({p.lam for p in result.curve.points}) == len(result.curve.points)


# ---------------------------------------------------------------- errors, one line each


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_errors_are_one_line(world, tmp_path, no_tensor_reads):
    two = recipe(world, tmp_path / "two.yml")
    data = yaml.safe_load(two.read_text())
    data["models"].append({"model": str(world.paths["donors"][1]), "parameters": {"weight": 0.5}})
    two.write_text(yaml.safe_dump(data))
    with pytest.raises(SigmoidDiffError) as error:
        sweep_of(world, two, tmp_path / "o1")
    assert "one donor" in _one_line(error) and "has 2" in _one_line(error)

    other = tmp_path / "ta.yml"
    other.write_text(yaml.safe_dump({**data, "merge_method": "task_arithmetic"}))
    with pytest.raises(SigmoidDiffError) as error:
        sweep_of(world, other, tmp_path / "o2")
    assert "merge_method: task_arithmetic" in _one_line(error)

    good = recipe(world, tmp_path / "good.yml")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SigmoidDiffError) as error:
        sweep.run(good, empty, world.feature, tmp_path / "o3", settings=FAST, quiet=True)
    assert f"{empty} is empty" in _one_line(error)

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    with pytest.raises(SigmoidDiffError) as error:
        sweep.run(good, world.knowledge, broken, tmp_path / "o4", settings=FAST, quiet=True)
    assert f"{broken}:1: the chat does not render: no assistant turn" == _one_line(error)

    small = replace(FAST, max_memory_gb=1e-4)
    with pytest.raises(SigmoidDiffError) as error:
        sweep.run(good, world.knowledge, world.feature, tmp_path / "o5", settings=small, quiet=True)
    assert "--max-memory" in _one_line(error) and "M parameters" in _one_line(error)
    assert not (tmp_path / "o5").exists()


def test_the_command_prints_one_error_line(world, tmp_path):
    with pytest.raises(SystemExit) as exited:
        cli_main(["sweep", str(tmp_path / "missing.yml"), "--knowledge", str(world.knowledge), "--feature",
                  str(world.feature), "--out", str(tmp_path / "out")])
    assert str(exited.value.code) == f"Error: recipe {tmp_path / 'missing.yml'} not found"


def test_the_memory_estimate():
    # float32: B, T, I (12 bytes per parameter) + the float32 working copy (4)
    assert sweepload.model_memory(10, torch.float32) == 160
    # bfloat16: T (2) + D and the fraction in float32 (8) outweigh B, T, I (6); + 4
    assert sweepload.model_memory(10, torch.bfloat16) == 140
