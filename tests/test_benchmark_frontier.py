"""scripts/benchmark_frontier.py's choice of a family's best point and its report (no models)."""

from __future__ import annotations

import benchmark_frontier as bf


def point(family: str, label: str, gap, exact=True, lo=None, hi=None, se=None, **extra):
    return {"family": family, "point": label, "gap_closed": gap, "gap_exact": exact, "gap_note": None if gap is not None else "n/a: nothing to close",
            "gap_se": se, "gap_ci_lo": lo, "gap_ci_hi": hi, **extra}


def run(seed: int, points: list[dict], both=None) -> dict:
    return {"case": "c", "seed": seed, "axes": {"knowledge": "k", "feature": "f", "both": both}, "items": {"k": 3},
            "merge_key": "abc", "points": points}


def test_best_takes_the_largest_gap_and_puts_n_a_last():
    pts = [point("x", "w=1", None), point("x", "w=2", 0.2), point("x", "w=3", 0.5), point("x", "w=4", -0.1)]
    assert bf.best(pts)["point"] == "w=3"
    assert bf.best([point("x", "w=1", None), point("x", "w=2", -0.3)])["point"] == "w=2"


def test_report_gives_intervals_bounds_and_verdicts():
    doc = {"command": "python scripts/benchmark_frontier.py", "runs": [
        run(0, [point("ours", "w=1", 0.9, lo=0.8, hi=0.95, se=0.03), point("ours", "w=2", 0.5),
                point("base", "s=1", 0.3, exact=False, lo=0.1, hi=0.4, se=0.05), point("neg", "s=1", -0.4, lo=-0.6, hi=-0.2, se=0.1)]),
        run(1, [point("ours", "w=1", 0.8, lo=0.7, hi=0.9, se=0.03),
                point("base", "s=1", 0.35, exact=False, lo=0.2, hi=0.45, se=0.05), point("neg", "s=1", -0.5, lo=-0.7, hi=-0.3, se=0.1)]),
    ]}
    text = bf.markdown(doc)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ") and "family" not in line}
    assert "+0.90 [+0.80, +0.95] (w=1)" in rows["ours"] and rows["ours"].endswith("| beats |")
    assert "≥ +0.30 [+0.10, +0.40]" in rows["base"] and rows["base"].endswith("| beats ≥ |")
    assert rows["neg"].endswith("| loses |")


def test_one_seed_gets_no_verdict_and_both_column_shows_the_reference():
    doc = {"runs": [run(0, [point("ours", "w=1", None, both_nll=1.5, both_best_ta=1.25)], both="b")]}
    text = bf.markdown(doc)
    line = next(line for line in text.splitlines() if line.startswith("| ours"))
    assert "n/a: nothing to close (w=1)" in line and "one seed" in line and "1.500 / 1.250" in line
