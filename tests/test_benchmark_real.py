"""The real-weight suite's report (scripts/benchlib/realreport.py) on rows made up here, with
every expected figure worked out by hand from the frontier rule's definition."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchlib import realreport
from mergekit_sigmoid_diff import frontier


def _rows(seed: int, shift: float) -> list[dict]:
    """One lora-chat seed: T, three task_arithmetic points and two weights of one setting."""
    def row(model, family, lam, feature, knowledge, both=5.0):
        return {"key": f"{model}-{seed}", "case": "lora-chat", "seed": seed, "model": model, "family": family,
                "lambda_eff": lam, "feature_nll": feature, "shakespeare_nll": knowledge, "both_nll": both,
                "general_nll": 4.0, "chat_nll": 1.0, "feature_prob": 0.5}

    return [
        row("B (base)", "input", None, 12.0, 4.3),
        row("T (target)", "input", None, 10.0, 3.9, both=4.9),
        row("I (donor)", "input", None, 0.01, 4.7),
        row("task_arithmetic λ=0.5", "task_arithmetic", 0.5, 4.0, 4.1, both=5.1),
        row("task_arithmetic λ=1", "task_arithmetic", 1.0, 1.0, 4.3, both=5.3),
        row("task_arithmetic λ=1.5", "task_arithmetic", 1.5, 0.5, 4.5, both=5.5),
        # at feature 2.5 task_arithmetic has 4.2 (halfway between λ = 0.5 and 1): T is 3.9, so it lost 0.3
        row("protect input e=0.5 w=1", "protect input e=0.5", 0.8, 2.5, 4.1 + shift, both=5.2),
        row("protect input e=0.5 w=1.25", "protect input e=0.5", 1.1, 2.5, 4.05 + shift, both=5.2),
    ]


ROWS = _rows(0, 0.0) + _rows(1, 0.03) + _rows(2, -0.03)


def test_annotate_reads_task_arithmetic_at_the_merges_own_feature():
    rows = {(r["seed"], r["model"]): r for r in realreport.annotate(ROWS)}
    merged = rows[0, "protect input e=0.5 w=1"]
    assert merged["ta_knowledge"] == pytest.approx(4.2)
    assert merged["gap_closed"] == pytest.approx((4.2 - 4.1) / (4.2 - 3.9))
    assert merged["ta_feature"] == pytest.approx(4.0)  # task_arithmetic reaches knowledge 4.1 at λ = 0.5
    # both at once: task_arithmetic's both-score at feature 2.5 is 5.2, T's 4.9 → 0 closed
    assert merged["both_gap"] == pytest.approx(0.0, abs=1e-12)
    assert "gap_closed" not in rows[0, "task_arithmetic λ=1"] and "key" not in merged


def test_families_take_the_best_weight_and_judge_it_over_seeds():
    summary = realreport.families(realreport.annotate(ROWS), [0, 1, 2])
    (family,) = summary
    assert family["best"] == "protect input e=0.5 w=1.25" and family["weights_tried"] == 2
    want = [(4.2 - k) / 0.3 for k in (4.05, 4.08, 4.02)]
    assert family["gap_closed"] == pytest.approx(want)
    assert family["mean"] == pytest.approx(sum(want) / 3)
    assert family["verdict"] == "beats"


def test_a_family_inside_the_curve_loses(tmp_path):
    worse = [dict(r, shakespeare_nll=r["shakespeare_nll"] + 0.2) if r["family"].startswith("protect") else r for r in ROWS]
    (family,) = realreport.families(realreport.annotate(worse), [0, 1, 2])
    assert family["verdict"] == "loses" and family["mean"] < 0


def test_report_writes_one_json_row_per_case_seed_and_merge(tmp_path):
    meta = {"command": "test", "seeds": [0, 1, 2], "cases": {"lora-chat": "made-up"},
            "axes": {"lora-chat": ("feature_nll", "shakespeare_nll", "both_nll")}, "seconds_this_run": 0.0}
    plan = [(1, "task_arithmetic", f"task_arithmetic λ={lam:g}", None) for lam in (0.5, 1.0, 1.5)]
    written = realreport.report(ROWS, plan, tmp_path, meta)
    data = json.loads((tmp_path / "benchmark_real.json").read_text())
    assert len(data["rows"]) == len(ROWS) and {"feature", "knowledge"} <= set(data["rows"][0])
    assert data["summary"][0]["verdict"] == "beats"
    text = (tmp_path / "benchmark_real.md").read_text()
    assert "| protect input e=0.5 | protect input e=0.5 w=1.25 |" in text and "**beats**" in text
    assert all(p.is_file() for p in written)


def test_rows_without_per_item_scores_get_no_interval():
    rows = {(r["seed"], r["model"]): r for r in realreport.annotate(ROWS)}
    merged = rows[0, "protect input e=0.5 w=1"]
    assert (merged["gap_se"], merged["gap_ci_lo"], merged["gap_ci_hi"]) == (None, None, None)
    assert merged["gap_note"] == "no interval" and merged["gap_exact"] is True


def test_extra_points_join_the_curve_at_any_lambda():
    # a task_arithmetic point at λ = 0.75 with (feature 2.5, knowledge 4.15): the merge at
    # feature 2.5 is now read against 4.15, not the chord's 4.2 → (4.15 − 4.1) / 0.25
    extra = {("lora-chat", 0): [{"lambda_eff": 0.75, "feature_nll": 2.5, "shakespeare_nll": 4.15, "both_nll": 5.2}]}
    rows = {(r["seed"], r["model"]): r for r in realreport.annotate(ROWS, extra)}
    assert rows[0, "protect input e=0.5 w=1"]["gap_closed"] == pytest.approx(0.05 / 0.25)
    assert rows[1, "protect input e=0.5 w=1"]["gap_closed"] == pytest.approx((4.2 - 4.13) / 0.3)  # other seeds as before
    assert not any(r.get("lambda_eff") == 0.75 for r in rows.values())  # not listed as a row


def test_the_floor_makes_a_row_na_with_its_reason():
    # task_arithmetic loses 0.005 nats up to λ = 0.5: a merge at feature 5 has nothing to close
    rows = [dict(r) for r in _rows(0, 0.0)]
    for r in rows:
        if r["model"] == "task_arithmetic λ=0.5":
            r["shakespeare_nll"] = 3.905
        if r["model"] == "protect input e=0.5 w=1":
            r["feature_nll"] = 5.0
    merged = next(r for r in realreport.annotate(rows) if r["model"] == "protect input e=0.5 w=1")
    assert merged["gap_closed"] is None and merged["gap_note"] == "n/a: nothing to close"


# ---------------------------------------------------------------- row selection

TODAY = realreport.Today("score-1", {"sigmoid_diff": "merge-1"}, "mergekit 0.1.5",
                         {("lora-chat", 0): {"B": "b", "T": "t0", "I": "i0"}})


def _row(model, recipe=None, **changes):
    row = {"case": "lora-chat", "seed": 0, "model": model, "recipe": recipe, "scoring_key": "score-1",
           "stamps": {"B": "b", "T": "t0", "I": "i0"},
           "merge_code": TODAY.merge_code(recipe)}
    return {**row, **changes}


def test_a_row_counts_only_with_todays_scoring_merge_code_and_models():
    ours, theirs = {"merge_method": "sigmoid_diff"}, {"merge_method": "task_arithmetic"}
    assert TODAY.merge_code(ours) == "merge-1" and TODAY.merge_code(theirs) == "mergekit 0.1.5"
    assert TODAY.merge_code(None) is None
    assert TODAY.stale(_row("T (target)")) is None
    assert TODAY.stale(_row("m", ours)) is None
    assert TODAY.stale(_row("m", ours, merge_code="merge-0")) == "other merge code"
    assert TODAY.stale(_row("m", theirs, merge_code="merge-1")) == "other merge code"
    assert TODAY.stale(_row("m", ours, scoring_key="score-0")) == "other scoring code"
    # B's row carrying another case's stamps (the old bug): refused
    assert TODAY.stale(_row("B (base)", stamps={"B": "b", "T": "t-lora0", "I": "i-lora0"})) == "other models"
    assert TODAY.stale(_row("m", ours, seed=1)) == "its models are not present"


def test_select_keeps_the_newest_current_row_and_counts_each_stale_slot_once():
    ours = {"merge_method": "sigmoid_diff"}
    rows = [
        _row("m", ours, merge_code="merge-0", value=1),  # stale, then superseded: not counted
        _row("m", ours, value=2),
        _row("m", ours, value=3),  # the newest current row wins
        _row("n", ours, merge_code="merge-0"),  # only stale rows: counted once
        _row("n", ours, merge_code="merge-00"),
        _row("T (target)", stamps={"B": "b", "T": "old", "I": "i0"}),
        _row("x", ours),  # not in the plan: ignored
    ]
    kept, stale = realreport.select(rows, TODAY, ["lora-chat"], [0], ["m", "n"])
    assert [(r["model"], r.get("value")) for r in kept] == [("m", 3)]
    assert stale == {"other merge code": 1, "other models": 1}


# ---------------------------------------------------------------- benchmark_real.py, its cache and --only

import benchmark_real  # noqa: E402
from benchlib import quality, real  # noqa: E402
from mergekit_sigmoid_diff import mainjob  # noqa: E402


def _items(value: float, weights: tuple[float, ...]) -> list[list[float]]:
    """Items whose weighted mean is ``value``: per-item means value ± a spread that cancels."""
    spread = (0.02, -0.01, 0.0, 0.0)[: len(weights)]
    return [[(value + s * (1 if w != 1 else 5)) * w, w] for s, w in zip(spread, weights)]


class FakeSuite:
    """Stands in for the expensive parts: models are folders with a small weights file, a merge
    writes its recipe, and a score is a formula of the recipe (task_arithmetic: feature 4 − 2λ,
    knowledge 1 + λ²/2; a sigmoid_diff setting lies a little beyond that curve)."""

    FEATURE_W = (1, 1, 1, 1)
    KNOWLEDGE_W = (10, 20, 30, 40)

    def __init__(self, root: Path, monkeypatch):
        self.root, self.merged, self.scored, self.fail_after = root, [], [], None
        self.merge_key = "merge-1"
        monkeypatch.setattr(benchmark_real, "load_base", lambda: (self.model("base"), None))
        monkeypatch.setattr(benchmark_real, "make_probe", lambda tokenizer, quick: "probe")
        monkeypatch.setattr(benchmark_real, "trained", lambda case, seed, workdir: True)
        monkeypatch.setattr(benchmark_real, "models_for", lambda case, seed, *a: (self.model(f"T{seed}"), self.model(f"I{seed}")))
        monkeypatch.setattr(benchmark_real, "today_keys", lambda: ("score-1", {"sigmoid_diff": self.merge_key}, "mergekit 0.1.5"))
        monkeypatch.setattr(benchmark_real, "effective_lambda", lambda *a: 0.9)
        monkeypatch.setattr(quality, "run_merge", self.run_merge)
        monkeypatch.setattr(mainjob, "load_model", lambda folder: Path(folder))
        monkeypatch.setattr(mainjob, "plot_available", lambda: False)
        monkeypatch.setattr(real, "score", self.score)

    def model(self, name: str) -> Path:
        folder = self.root / "models" / name
        if not folder.is_dir():
            folder.mkdir(parents=True)
            (folder / "model.safetensors").write_text(f"weights of {name}")
            (folder / "train_info.json").write_text(json.dumps({"seconds": 100.0}))
        return folder

    def retrain(self, name: str) -> None:
        (self.root / "models" / name / "model.safetensors").write_text(f"new weights of {name}")

    def run_merge(self, recipe, folder, seed):
        if self.fail_after is not None and len(self.merged) == self.fail_after:
            raise KeyboardInterrupt
        self.merged.append((seed, recipe))
        folder.mkdir(parents=True)
        (folder / "recipe.json").write_text(json.dumps(recipe))

    def score(self, folder, probe, which):
        self.scored.append(folder.name)
        if (folder / "recipe.json").is_file():
            recipe = json.loads((folder / "recipe.json").read_text())
            weight = recipe["models"][1]["parameters"]["weight"]
            if recipe["merge_method"] == "task_arithmetic":
                feature, knowledge = 4 - 2 * weight, 1 + weight * weight / 2
            else:
                feature, knowledge = 2.0 - weight, 1.2 + len(json.dumps(recipe.get("parameters"))) / 1000
        else:
            feature, knowledge = {"b": (6.0, 1.2), "T": (4.0, 1.0), "I": (0.5, 1.5)}[folder.name[0]]
        values = {"feature_nll": feature, "shakespeare_nll": knowledge, "both_nll": knowledge + 1, "feature_prob": 0.5,
                  "general_nll": 4.0, "chat_nll": 1.0, "domain_nll": 2.0}
        values["items"] = {"feature_nll": _items(feature, self.FEATURE_W),
                           "shakespeare_nll": _items(knowledge, self.KNOWLEDGE_W)}
        return values

    def run(self, *args: str) -> dict:
        out = self.root / "out"
        benchmark_real.main(["--cases", "full-chat", "--workdir", str(self.root / "work"), "--out", str(out),
                             "--scratch", str(self.root), *args])
        return json.loads((out / "benchmark_real.json").read_text())


TIER1_SIGMOID = {"published default w=1", "element-wise w=1", "protect input e=0.5 w=1", "protect input e=0.5 w=1.25"}
TIER1_TA = {f"task_arithmetic λ={lam:g}" for lam in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75)}


def test_only_merges_the_families_named(tmp_path, monkeypatch):
    suite = FakeSuite(tmp_path, monkeypatch)
    data = suite.run("--seeds", "0", "--tiers", "1", "--only", "protect input", "published")
    names = {r["model"] for r in data["rows"]}
    assert names == set(realreport.INPUTS) | {"protect input e=0.5 w=1", "protect input e=0.5 w=1.25", "published default w=1"}
    assert len(suite.merged) == 3 and len(suite.scored) == 6  # the three merges and B, T, I


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    suite = FakeSuite(tmp_path, monkeypatch)
    suite.fail_after = 5
    with pytest.raises(KeyboardInterrupt):
        suite.run("--seeds", "0", "1", "--tiers", "1")
    assert len(suite.merged) == 5
    suite.fail_after = None
    data = suite.run("--seeds", "0", "1", "--tiers", "1")
    total = 2 * (len(TIER1_TA) + len(TIER1_SIGMOID))
    assert len(suite.merged) == total  # the first five were not merged again
    assert {r["model"] for r in data["rows"]} == set(realreport.INPUTS) | TIER1_TA | TIER1_SIGMOID
    assert len(data["rows"]) == 2 * (3 + len(TIER1_TA) + len(TIER1_SIGMOID)) and data["stale"] == {}
    before = len(suite.scored)
    suite.run("--seeds", "0", "1", "--tiers", "1")  # everything current: nothing merged or scored
    assert len(suite.merged) == total and len(suite.scored) == before


def test_stale_rows_are_refused_counted_and_rerun(tmp_path, monkeypatch):
    suite = FakeSuite(tmp_path, monkeypatch)
    suite.run("--seeds", "0", "1", "--tiers", "1")
    merged = len(suite.merged)
    suite.merge_key = "merge-2"  # the kernel changed: every sigmoid_diff row is stale, task_arithmetic's are not
    data = suite.run("--seeds", "0", "1", "--tiers", "1", "--report-only")
    assert {r["model"] for r in data["rows"]} == set(realreport.INPUTS) | TIER1_TA
    assert data["stale"] == {"other merge code": 2 * len(TIER1_SIGMOID)}
    text = (tmp_path / "out" / "benchmark_real.md").read_text()
    assert f"**{2 * len(TIER1_SIGMOID)} rows stale, not shown, rerun** ({2 * len(TIER1_SIGMOID)} other merge code)" in text
    assert len(suite.merged) == merged  # --report-only merges nothing
    data = suite.run("--seeds", "0", "1", "--tiers", "1")  # the rerun merges exactly the stale ones
    assert len(suite.merged) == merged + 2 * len(TIER1_SIGMOID) and data["stale"] == {}
    assert {r["merge_code"] for r in data["rows"] if r["model"] in TIER1_SIGMOID} == {"merge-2"}
    # seed 1's target retrained: all of seed 1's rows are stale (its B row too), seed 0's stay
    suite.retrain("T1")
    data = suite.run("--seeds", "0", "1", "--tiers", "1", "--report-only")
    assert {r["seed"] for r in data["rows"]} == {0}
    assert data["stale"] == {"other models": 3 + len(TIER1_TA) + len(TIER1_SIGMOID)}


def test_each_row_carries_its_own_models_stamps_and_the_header_its_provenance(tmp_path, monkeypatch):
    suite = FakeSuite(tmp_path, monkeypatch)
    data = suite.run("--seeds", "0", "1", "--tiers", "1")
    stamp = real.weights_stamp
    for seed in (0, 1):
        want = {"B": stamp(suite.model("base")), "T": stamp(suite.model(f"T{seed}")), "I": stamp(suite.model(f"I{seed}"))}
        assert {json.dumps(r["stamps"]) for r in data["rows"] if r["seed"] == seed} == {json.dumps(want)}
    base_rows = [r for r in data["rows"] if r["model"] == "B (base)"]
    assert [r.get("reused", False) for r in base_rows] == [False, True]  # B scored once, reused for seed 1
    assert base_rows[1]["seconds"] == 0.0 and suite.scored.count("base") == 1
    command = f"python scripts/benchmark_real.py --cases full-chat --workdir {tmp_path / 'work'} --out {tmp_path / 'out'} " \
              f"--scratch {tmp_path} --seeds 0 1 --tiers 1"
    assert data["commands"] == {command: len(data["rows"])}
    assert data["cold_seconds"] == pytest.approx(sum(r["seconds"] for r in data["rows"]), abs=0.2)
    assert data["training_seconds"] == 400.0 and data["trained_models"] == 4  # T and I of both seeds
    assert data["merge_key"] == "merge-1" and data["scoring_key"] == "score-1"
    text = (tmp_path / "out" / "benchmark_real.md").read_text()
    assert "merge code `merge-1`" in text and f"Produced by `{command}` ({len(data['rows'])} rows)" in text
    assert "Cold cost:" in text and "+ 400 s of training (4 models" in text
    assert "items" not in data["rows"][0]  # per-item scores stay in the cache


def test_rows_with_items_get_the_bootstrap_interval(tmp_path, monkeypatch):
    suite = FakeSuite(tmp_path, monkeypatch)
    data = suite.run("--seeds", "0", "--tiers", "1")
    merged = [r for r in data["rows"] if r["model"] in TIER1_SIGMOID]
    assert merged and all(r["gap_exact"] and r["gap_closed"] is not None for r in merged)
    for r in merged:
        assert r["gap_ci_lo"] <= r["gap_closed"] <= r["gap_ci_hi"] and r["gap_se"] > 0 and r["gap_note"] is None
    # the same figures as the frontier's bootstrap on the cached items (the report's plumbing)
    cache = quality.ScoreCache(tmp_path / "work" / "scores.jsonl")
    rows = {r["model"]: r for r in cache.rows.values() if r["seed"] == 0}
    items = {name: frontier.Items(r["items"]["feature_nll"], r["items"]["shakespeare_nll"]) for name, r in rows.items()}
    sweep = [(rows[name]["lambda_eff"], items[name]) for name in TIER1_TA]
    direct = frontier.bootstrap_gaps(items["T (target)"], sweep, {"protect input e=0.5 w=1": items["protect input e=0.5 w=1"]})
    row = next(r for r in merged if r["model"] == "protect input e=0.5 w=1")
    assert (row["gap_ci_lo"], row["gap_ci_hi"], row["gap_se"]) == (direct["protect input e=0.5 w=1"].lo,
                                                                  direct["protect input e=0.5 w=1"].hi,
                                                                  direct["protect input e=0.5 w=1"].se)
    family = next(s for s in data["summary"] if s["family"] == "protect input e=0.5")
    assert family["ci"] == [[next(r for r in merged if r["model"] == family["best"])[k] for k in ("gap_ci_lo", "gap_ci_hi")]]
