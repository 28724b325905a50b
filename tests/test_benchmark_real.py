"""The real-weight suite's report (scripts/benchlib/realreport.py) on rows made up here, with
every expected figure worked out by hand from the frontier rule's definition."""

from __future__ import annotations

import json

import pytest

from benchlib import realreport


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
