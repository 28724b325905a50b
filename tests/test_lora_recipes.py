"""A new user's recipe: target and donor given as ``model+lora``, run through the real command
lines with no extra flag, and ``inspect`` judging a recipe exactly as the merge does.

Oracles: the merged output is compared with the float64 published formula (tests/reference.py)
on a donor built by hand from the adapter's saved A and B matrices (tests/support.lora_delta),
not through peft or mergekit; the D = 0 tensors are the ones the adapter does not touch, read
from the adapter file; error lines of ``inspect`` are compared with the merge's own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergekit_sigmoid_diff import inspection
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from tests.reference import published_formula, reference_stats
from tests.support import (
    load_model_tensors,
    lora_delta,
    merge_in_process,
    one_donor_recipe,
    run_mergekit_yaml,
    save_lora_adapter,
    strip_tokenizer,
    write_recipe,
)

pytestmark = pytest.mark.slow

NOTICE = re.compile(r"^LoRA adapters are merged into (\S+) \(the default; choose with --lora-merge-cache\)$", re.M)
# "path:line: SomeWarning: message", as the warnings module prints it
WARNING_LINE = re.compile(r"^(?P<path>\S+?):\d+: (?P<category>\w*Warning): ", re.M)
MERGE = [sys.executable, "-m", "mergekit_sigmoid_diff", "merge"]
INSPECT = [sys.executable, "-m", "mergekit_sigmoid_diff", "inspect"]


@pytest.fixture(scope="module")
def lora(triple, tmp_path_factory):
    """A recipe whose donor is ``base+adapter`` (the adapter changes only q_proj)."""
    root = tmp_path_factory.mktemp("lora")
    adapter = save_lora_adapter(triple["base"], root / "adapter", seed=5)
    recipe = one_donor_recipe(triple, dtype="float32")
    recipe["models"][1] = {"model": f"{triple['base']}+{adapter}"}
    return {"root": root, "adapter": adapter, "recipe": write_recipe(root / "recipe.yml", recipe)}


def cache_env(cache: Path, **more: str) -> dict[str, str]:
    return {"MERGEKIT_SIGMOID_DIFF_CACHE": str(cache), **more}


def notices(stderr: str) -> list[Path]:
    return [Path(m) for m in NOTICE.findall(stderr)]


def run(command: list[str], *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``command ARGS...`` in a subprocess, offline, with ``env`` added."""
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}
    )


def expected_output(triple, adapter: Path) -> dict[str, torch.Tensor]:
    base, target = load_model_tensors(triple["base"]), load_model_tensors(triple["target"])
    delta = lora_delta(adapter)
    return {
        name: published_formula(base[name], target[name], [base[name].double() + delta.get(name, 0.0)], [1.0])
        for name in target
    }


def test_a_lora_recipe_merges_without_a_cache_flag_and_reuses_the_default_cache(lora, triple, tmp_path):
    cache = tmp_path / "cache"
    # PYTHONWARNINGS=default shows every DeprecationWarning, also those Python hides by default
    first = run_mergekit_yaml(lora["recipe"], tmp_path / "out1", env=cache_env(cache, PYTHONWARNINGS="default"))
    assert first.returncode == 0, first.stderr[-3000:]
    (folder,) = notices(first.stderr)  # said once, in one line
    assert folder.parent == cache / "lora-merge-cache"
    (merged,) = [p for p in folder.iterdir() if p.is_dir()]  # mergekit's merged base+adapter
    stamp = {p.name: p.stat().st_mtime_ns for p in merged.iterdir()}

    got, want = load_model_tensors(tmp_path / "out1"), expected_output(triple, lora["adapter"])
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=0, atol=2e-6, msg=name)

    # no deprecation notice of ours, nor one our calls make a library print
    assert "torch_dtype" not in first.stderr and "is_gradient_checkpointing" not in first.stderr
    for warning in WARNING_LINE.finditer(first.stderr):
        if warning["category"] in ("DeprecationWarning", "FutureWarning", "PendingDeprecationWarning"):
            # only mergekit's own import-time notices (numpy.core in mergekit/io) may remain
            assert "/site-packages/mergekit/" in warning["path"], warning.group(0)

    # the same recipe again, through the package's own merge command: the cache is reused
    second = run(MERGE, str(lora["recipe"]), str(tmp_path / "out2"), env=cache_env(cache))
    assert second.returncode == 0, second.stderr[-3000:]
    assert notices(second.stderr) == [folder]
    assert [p for p in folder.iterdir() if p.is_dir()] == [merged]
    assert {p.name: p.stat().st_mtime_ns for p in merged.iterdir()} == stamp  # not merged again
    assert "Warning" not in second.stderr and "deprecated" not in second.stderr  # a user's default filters
    for name, tensor in load_model_tensors(tmp_path / "out2").items():
        assert torch.equal(tensor, got[name]), name


def test_a_changed_adapter_is_merged_afresh(lora, triple, tmp_path):
    """mergekit names its merged LoRA after the paths only; the default cache's key sees the files."""
    adapter = shutil.copytree(lora["adapter"], tmp_path / "adapter")
    recipe = one_donor_recipe(triple, dtype="float32")
    recipe["models"][1] = {"model": f"{triple['base']}+{adapter}"}
    recipe_path = write_recipe(tmp_path / "recipe.yml", recipe)
    cache = tmp_path / "cache"
    first = run_mergekit_yaml(recipe_path, tmp_path / "out1", env=cache_env(cache))
    assert first.returncode == 0, first.stderr[-3000:]
    save_lora_adapter(triple["base"], adapter, seed=6)  # retrained in place
    second = run_mergekit_yaml(recipe_path, tmp_path / "out2", env=cache_env(cache))
    assert second.returncode == 0, second.stderr[-3000:]
    assert notices(first.stderr) != notices(second.stderr)
    got, want = load_model_tensors(tmp_path / "out2"), expected_output(triple, adapter)
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=0, atol=2e-6, msg=name)


def test_an_explicit_lora_merge_cache_wins(lora, tmp_path):
    cache, chosen = tmp_path / "cache", tmp_path / "chosen"
    result = run_mergekit_yaml(lora["recipe"], tmp_path / "out", "--lora-merge-cache", str(chosen), env=cache_env(cache))
    assert result.returncode == 0, result.stderr[-3000:]
    assert notices(result.stderr) == []
    assert any(chosen.iterdir()) and not cache.exists()


def test_a_bad_adapter_path_is_one_error_line(triple, tmp_path):
    recipe = one_donor_recipe(triple)
    recipe["models"][1] = {"model": f"{triple['base']}+{tmp_path}/no-adapter"}
    for command in (None, INSPECT):
        path = write_recipe(tmp_path / "bad.yml", recipe)
        if command is None:
            result = run_mergekit_yaml(path, tmp_path / "out", env=cache_env(tmp_path / "cache"))
        else:
            result = run(command, str(path), "--out", str(tmp_path / "report"), env=cache_env(tmp_path / "cache"))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert errors == [f"Error: model {triple['base']}+{tmp_path}/no-adapter: LoRA adapter folder {tmp_path}/no-adapter not found"]


def test_inspect_reads_the_lora_recipe_and_marks_the_tensors_the_donor_left_alone(lora, triple, tmp_path):
    out = tmp_path / "report"
    result = run(INSPECT, str(lora["recipe"]), "--out", str(out), "--quiet", env=cache_env(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(notices(result.stderr)) == 1  # the same default cache as the merge
    doc = json.loads((out / "inspect.json").read_text())
    changed = set(lora_delta(lora["adapter"]))  # what the adapter touches: the q projections
    assert changed and all(".q_proj." in name for name in changed)
    base, target = load_model_tensors(triple["base"]), load_model_tensors(triple["target"])
    delta = lora_delta(lora["adapter"])
    for r in doc["tensors"]:
        assert r["donor_unchanged"] == (r["name"] not in changed), r["name"]
        if r["name"] in changed:
            want = reference_stats(base[r["name"]], target[r["name"]], [base[r["name"]].double() + delta[r["name"]]], [1.0], 12.0, 0.5, 1e-6, True)
            assert r["applied_fraction"] == pytest.approx(want["applied_fraction"], rel=1e-5)
    # the averages hold only the q tensors; every other cell is marked, not "1.000"
    q = [r for r in doc["tensors"] if r["name"] in changed]
    mean = sum(r["numel"] * r["applied_fraction"] for r in q) / sum(r["numel"] for r in q)
    assert doc["applied_fraction_overall"] == pytest.approx(mean)
    assert doc["donor_unchanged_tensors"] == len(doc["tensors"]) - len(q)
    cells = {("model" if r["layer"] is None else str(r["layer"]), r["kind"]) for r in doc["tensors"]}
    for row, marks, values in zip(doc["rows"], doc["donor_unchanged_grid"], doc["applied_fraction_grid"]):
        for kind, unchanged, value in zip(doc["kinds"], marks, values):
            exists = (row, kind) in cells
            assert unchanged == (exists and kind != "q"), (row, kind)  # "no tensor" is not "D = 0"
            assert (value is None) == (not exists or kind != "q"), (row, kind)
    assert doc["by_kind"]["k"]["applied_fraction"] is None and doc["by_kind"]["k"]["donor_unchanged"] == 2
    assert "D=0" in result.stdout and "1.000" not in result.stdout.split("per tensor kind")[0]


def test_inspect_refuses_inherit_chat_on_a_donor_without_tokenizer_as_the_merge_does(triple, tmp_path):
    donor = strip_tokenizer(shutil.copytree(triple["donors"][0], tmp_path / "donor"))
    recipe = one_donor_recipe({**triple, "donors": [donor]})
    recipe["models"][1]["parameters"] = {"inherit_chat": True}
    path = write_recipe(tmp_path / "chat.yml", recipe)
    merged = run_mergekit_yaml(path, tmp_path / "out", env=cache_env(tmp_path / "cache"))
    inspected = run(INSPECT, str(path), "--out", str(tmp_path / "report"), env=cache_env(tmp_path / "cache"))
    lines = []
    for result in (merged, inspected):
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        lines.append(line)
    assert lines[0] == lines[1]
    assert lines[0].startswith(f"Error: inherit_chat: donor {donor} has no tokenizer files")
    assert not (tmp_path / "out").exists() and not (tmp_path / "report").exists()


# --- in process: the merge options and the non-finite checks act on inspect as on the merge ----


def test_inspect_takes_the_merge_options_that_change_validity(triple, tmp_path):
    from mergekit.options import MergeOptions

    from tests.support import extended
    from mergekit_sigmoid_diff.tiny import save_state, tiny_config

    config = tiny_config()
    config.vocab_size += 8
    wide = save_state(extended(load_model_tensors(triple["donors"][0]), 8, seed=1), config, tmp_path / "wide")
    recipe = write_recipe(tmp_path / "wide.yml", one_donor_recipe({**triple, "donors": [wide]}))
    with pytest.raises(SigmoidDiffError, match=r"^vocabulary mismatch in tensor "):
        inspection.inspect_recipe(recipe, quiet=True)
    reports, _ = inspection.inspect_recipe(recipe, MergeOptions(quiet=True, unsafe_truncate_embeddings=True))
    assert {r.name for r in reports} == set(load_model_tensors(triple["base"]))
    # and through the command line, with mergekit-yaml's own flag
    result = run(INSPECT, str(recipe), "--out", str(tmp_path / "r"), "--unsafe-truncate-embeddings", "--quiet", env={})
    assert result.returncode == 0, result.stderr[-2000:]


def test_an_overflow_from_finite_inputs_fails_inspect_as_it_fails_the_merge(triple, tmp_path):
    from mergekit_sigmoid_diff.tiny import save_state, tiny_config

    name = "model.layers.1.mlp.up_proj.weight"
    state = load_model_tensors(triple["base"])
    state[name] = state[name] + 40000.0  # finite in float16; twice that is not
    big = save_state(state, tiny_config(), tmp_path / "big")
    recipe = one_donor_recipe({**triple, "donors": [big]}, dtype="float16")
    recipe["models"][1]["parameters"] = {"weight": 2.0}
    recipe["parameters"] = {"gate": False}
    with pytest.raises(SigmoidDiffError) as in_merge:
        merge_in_process(recipe, tmp_path / "out")
    with pytest.raises(SigmoidDiffError) as in_inspect:
        inspection.inspect_recipe(write_recipe(tmp_path / "big.yml", recipe), quiet=True)
    errors = [str(in_merge.value), str(in_inspect.value)]
    assert errors[0] == errors[1]
    assert errors[0] == f"sigmoid_diff: tensor {name} overflowed to Inf (inputs are finite; lower the weights)"


def test_mergekit_multi_merges_a_lora_step_without_a_cache_flag(lora, triple, tmp_path):
    import yaml

    from tests.support import MERGEKIT_MULTI

    step = {"name": "transfer", **yaml.safe_load(lora["recipe"].read_text())}
    final = {"merge_method": "linear", "models": [{"model": "transfer", "parameters": {"weight": 1.0}}], "dtype": "float32"}
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump_all([step, final], sort_keys=False))
    result = run([MERGEKIT_MULTI], str(path), "--intermediate-dir", str(tmp_path / "steps"), "--out-path", str(tmp_path / "out"),
                 env=cache_env(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(notices(result.stderr)) == 1
    got, want = load_model_tensors(tmp_path / "out"), expected_output(triple, lora["adapter"])
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=0, atol=2e-6, msg=name)
