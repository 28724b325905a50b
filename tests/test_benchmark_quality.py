"""The quality benchmark's quick mode, end to end: train, merge with mergekit, score, report.

One session fixture runs ``scripts/benchmark_quality.py --quick`` (1 seed, chat donor,
5 methods + 2 task_arithmetic twins) into a tmp dir; the tests inspect what it wrote.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from benchlib import quality, recipes, report, scoring, training
from benchlib import world as w

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_quality.py"


def _script():
    spec = importlib.util.spec_from_file_location("benchmark_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    threads = torch.get_num_threads()
    _script().main(["--quick", "--cache-dir", str(root / "cache"), "--out", str(root / "out"), "--no-progress"])
    torch.set_num_threads(threads)
    data = json.loads((root / "out" / "results.json").read_text())
    return root, data


def _row(data, label):
    (row,) = [r for r in data["rows"] if r["label"] == label]
    return row


def test_quick_run_scores_every_reference_and_merge(quick_run):
    _, data = quick_run
    variants, _ = recipes.available_variants(quick=True)
    labels = {r["label"] for r in data["rows"]}
    expected = set(quality.REFERENCES) | {v.label for v in variants}
    expected |= {report.MATCHED_PREFIX + v.label for v in variants if v.matched}
    assert labels == expected
    for row in data["rows"]:
        for metric, value in row["scores"].items():
            if metric in report.LOWER_IS_BETTER:
                assert value > 0, (row["label"], metric)
            else:
                assert 0.0 <= value <= 1.0, (row["label"], metric)


def test_training_taught_the_target_its_new_facts(quick_run):
    _, data = quick_run
    chance = 1 / len(next(iter(w.ATTRIBUTES.values()))[0])
    target = _row(data, "target")["scores"]["raw_acc_new"]
    base = _row(data, "base")["scores"]["raw_acc_new"]
    assert target > max(base, chance) + 0.1


def test_effective_lambda_of_task_arithmetic_is_its_lambda(quick_run):
    _, data = quick_run
    assert _row(data, "task_arithmetic λ=1")["lambda_eff"] == pytest.approx(1.0, abs=1e-4)
    for row in data["rows"]:
        if row["kind"] == "matched":
            gated = _row(data, row["label"].removeprefix(report.MATCHED_PREFIX))
            assert row["lambda_eff"] == pytest.approx(gated["lambda_eff"], abs=1e-3)


def test_gate_applies_less_than_the_whole_diff(quick_run):
    _, data = quick_run
    assert 0.0 < _row(data, "sigmoid_diff (defaults)")["lambda_eff"] < 1.0


def test_report_files_hold_every_method(quick_run):
    root, data = quick_run
    table = (root / "out" / "results.md").read_text()
    for label in {r["label"] for r in data["rows"]}:
        assert label in table
    assert (root / "out" / "quality.png").read_bytes()[:4] == b"\x89PNG"
    comparisons = data["summary"]["chat"]["comparisons"]
    projected = "sigmoid_diff protect input e=0.5 w=1.2"
    assert {c["method"] for c in comparisons} == {"sigmoid_diff (defaults)", projected}
    # each sigmoid-family merge is paired with: its λ_eff twin, the best λ, the best LiNeS, ties
    against = {c["against"] for c in comparisons if c["method"] == projected}
    assert against == {report.MATCHED_PREFIX + projected, "task_arithmetic λ=1", "LiNeS λ=0.5→1", "ties"}


def test_rerun_is_served_from_the_cache(quick_run):
    root, data = quick_run
    cache = root / "cache" / "quick"
    before = (cache / "scores.jsonl").read_text()
    variants, _ = recipes.available_variants(quick=True)
    rows = quality.run(cache, [0], ("chat",), training.QUICK, variants, progress=False, log=pytest.fail)
    assert (cache / "scores.jsonl").read_text() == before
    assert [report.rounded(r["scores"]) for r in rows] == [r["scores"] for r in data["rows"]]


def test_mergekit_yaml_subprocess_gives_the_same_merge(quick_run, tmp_path):
    root, _ = quick_run
    family = {n: training.model_dir(root / "cache" / "quick", 0, n) for n in ("base", "target", "chat")}
    recipe = recipes.recipe(recipes.sigmoid("defaults"), family["base"], family["target"], family["chat"])
    quality.run_merge(recipe, tmp_path / "sub", seed=0, backend="subprocess")
    quality.run_merge(recipe, tmp_path / "inproc", seed=0, backend="inprocess")
    sub = quality._tensors(tmp_path / "sub")
    inproc = quality._tensors(tmp_path / "inproc")
    assert sub.keys() == inproc.keys()
    for name in sub:
        torch.testing.assert_close(sub[name], inproc[name], rtol=0, atol=0)


def test_passkey_documents_hold_the_key_twice():
    codec = w.Codec(w.tokenizer())
    world = w.make_world(0)
    probes = scoring.make_probes(world, seq_len=64, n_passkeys=4)
    for ids, key in probes.passkeys:
        text = codec.decode(ids)
        assert len(ids) == 256
        assert text.count(f"the passkey is {key}.") == 2
        assert text.endswith(f"what is the passkey? the passkey is {key}.")
