"""scripts/benchmark_speed.py: what it compares, how it alternates and loads the machine, and
one real run on a tiny triple. No timing is asserted (times belong to the script's report):
only that the comparison is set up the way docs/performance.md says."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from benchlib import speed
from mergekit_sigmoid_diff.recommended import setting, split

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("benchmark_speed", ROOT / "scripts" / "benchmark_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_recipes_setting_the_published_default_and_the_projection_are_measured_once():
    variants = _script().recipe_variants()
    assert variants["sigmoid_diff (published default)"] == {}
    recipe_parameters = []
    for path in sorted((ROOT / "recipes").glob("*.yml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("merge_method") == "sigmoid_diff":
                recipe_parameters.append(doc.get("parameters") or {})
    assert recipe_parameters
    for parameters in recipe_parameters:
        # the data recipes need statistics of the very models merged: benchmark_data_cost.py times them
        assert list(variants.values()).count(parameters) == (0 if parameters.get("protect_subspace") == "data" else 1)
    projection, _ = split(setting("chat-vector"))
    assert list(variants.values()).count(projection) == 1
    assert len({json.dumps(v, sort_keys=True) for v in variants.values()}) == len(variants)


def test_background_load_runs_beside_and_is_ended_by_its_pid():
    with speed.BackgroundLoad(warmup=1.0) as load:
        pid = load.process.pid
        assert load.process.poll() is None
        ticks = _cpu_ticks(pid)
        time.sleep(0.5)
        assert _cpu_ticks(pid) > ticks  # it is computing, not sleeping
    assert load.process is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # ended and reaped


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_pairs_alternate_and_the_load_is_on_exactly_in_the_load_rounds(monkeypatch, tmp_path):
    state = {"load": False}
    calls = []

    @contextmanager
    def fake_load():
        state["load"] = True
        yield
        state["load"] = False

    def fake_run(label, merge_recipe, workdir, threads, extra=()):
        calls.append((label, state["load"], merge_recipe["merge_method"]))
        return speed.Run(label, wall=2.0 if label == speed.TASK_ARITHMETIC else 3.0, cpu=1.0,
                         peak_rss=100 if label == speed.TASK_ARITHMETIC else 110)

    monkeypatch.setattr(speed, "BackgroundLoad", fake_load)
    monkeypatch.setattr(speed, "run_merge", fake_run)
    triple = {role: tmp_path / role for role in ("base", "target", "donor")}
    variants = {"a": {}, "b": {"gate": False}}
    result = speed.compare_merges(triple, variants, pairs=2, threads=0, workdir=tmp_path,
                                  log=lambda line: None, conditions=speed.CONDITIONS)
    labels = [speed.TASK_ARITHMETIC, "a", "b"]
    assert [c[0] for c in calls] == labels + labels + labels[::-1] + labels[::-1]
    assert [c[1] for c in calls] == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3
    assert {c[2] for c in calls if c[0] != speed.TASK_ARITHMETIC} == {"sigmoid_diff"}
    assert result["load"].median_ratio("a", "wall") == pytest.approx(1.5)
    assert result["quiet"].median_ratio("b", "peak_rss") == pytest.approx(1.1)
    table = _script().ratio_table(result)
    assert "1.500" in table and "1.100" in table and speed.TASK_ARITHMETIC not in table


@pytest.mark.slow
def test_a_real_run_on_a_tiny_triple_writes_both_conditions(tmp_path, capsys):
    out = tmp_path / "speed.json"
    _script().main(["--layers", "2", "--hidden", "384", "--intermediate", "512", "--vocab", "1000", "--pairs", "1",
                    "--load", "--skip-kernel", "--variants", "sigmoid_diff (published default)",
                    "--cache", str(tmp_path / "cache"), "--workdir", str(tmp_path), "--json", str(out)])
    report = json.loads(out.read_text())
    (runs,) = report["runs"].values()
    assert set(runs) == {"quiet", "load"}
    for condition in runs.values():
        summary = condition["summary"]
        assert summary["sigmoid_diff (published default)"]["wall_ratio"] > 0
        assert summary[speed.TASK_ARITHMETIC]["peak_rss"] > 0
    assert "wall quiet" in capsys.readouterr().out
