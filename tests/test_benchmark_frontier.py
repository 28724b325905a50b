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
    assert "+0.90 [+0.80, +0.95] (w=1, edge)" in rows["ours"] and rows["ours"].endswith("| beats |")
    assert "≥ +0.30 [+0.10, +0.40]" in rows["base"] and rows["base"].endswith("| beats ≥ |")
    assert rows["neg"].endswith("| loses |")


def test_one_seed_gets_no_verdict_and_both_column_shows_the_reference():
    doc = {"runs": [run(0, [point("ours", "w=1", None, both_nll=1.5, both_best_ta=1.25)], both="b")]}
    text = bf.markdown(doc)
    line = next(line for line in text.splitlines() if line.startswith("| ours"))
    assert "n/a: nothing to close (w=1)" in line and "one seed" in line and "1.500 / 1.250" in line


def test_stale_runs_are_named_and_left_out_of_the_tables():
    old = run(1, [point("ours", "w=1", 0.99, lo=0.9, hi=1.0, se=0.01)])
    old["merge_key"] = "old"
    new = run(0, [point("ours", "w=1", 0.4, lo=0.3, hi=0.5, se=0.05)])
    new.update(command="python scripts/benchmark_frontier.py --seeds 0", seconds=600.0, sweep_code="s1")
    text = bf.markdown({"runs": [new, old]}, bf.Keys("abc"))
    assert "Stale runs left out** (another merge, sweep, baseline or score key; rerun them): c seed 1." in text
    assert "+0.99" not in text and "+0.40 [+0.30, +0.50] (w=1, edge)" in text and "seed 1" not in text.split("## c")[1]
    assert "`python scripts/benchmark_frontier.py --seeds 0`" in text and "Merge code `abc`, sweep code `s1`" in text
    assert "10 min over 1 case-seeds" in text
    ok, stale = bf.fresh([new, old], bf.Keys("abc", "s2"))  # another sweep code is stale too
    assert ok == [] and stale == [new, old]


def test_a_run_is_current_only_when_every_key_matches():
    good = run(0, [point("ours", "w=1", 0.4, lo=0.3, hi=0.5, se=0.05)])
    good.update(sweep_code="s", baseline_code="b", score_key="k")
    keys = bf.Keys("abc", "s", "b", {"c": "k"})
    assert bf.fresh([good], keys) == ([good], [])
    for field, other in (("merge_key", "old"), ("sweep_code", "s0"), ("baseline_code", "b0"), ("score_key", "k0")):
        stale = {**good, field: other}
        assert bf.fresh([good, stale], keys) == ([good], [stale]), field
        assert "c seed 0" in bf.markdown({"runs": [stale]}, keys).split("rerun them")[1][:12], field
    missing = {k: v for k, v in good.items() if k != "score_key"}  # a run from before the key was recorded
    assert bf.fresh([missing], keys) == ([], [missing])
    assert bf.fresh([missing], bf.Keys("abc")) == ([missing], [])  # keys left None are not checked


def test_glance_gives_each_seed_and_the_verdict_per_case():
    doc = {"runs": [run(0, [point("ours", "w=1", 0.9, lo=0.8, hi=0.95, se=0.03), point("base", "s=1", None)]),
                    run(1, [point("ours", "w=1", 0.8, exact=False, lo=0.7, hi=0.9, se=0.03)])]}
    text = bf.glance(doc, bf.Keys("abc"))
    assert "| ours | +0.90† / ≥+0.80† (beats ≥) |" in text and "| base | n/a (one seed) |" in text, text


def test_a_value_without_its_interval_is_no_evidence():
    """task_arithmetic's loss under the floor in many resamples: the value is shown, flagged, and
    the verdict is n/a, not beats."""
    doc = {"runs": [run(0, [point("ours", "w=1", 1.01)]), run(1, [point("ours", "w=1", 0.98)])]}
    text = bf.markdown(doc, bf.Keys("abc"))
    line = next(line for line in text.splitlines() if line.startswith("| ours"))
    assert "+1.01 [no interval: TA's loss near the floor] (w=1, edge)" in line and line.endswith("| n/a |")
    assert "| ours | +1.01† (no interval) / +0.98† (no interval) (n/a) |" in bf.glance(doc, bf.Keys("abc"))


def test_the_suites_recommended_family_is_the_shipped_setting():
    from mergekit_sigmoid_diff import recommended

    family, parameters, weights, statistics = bf.SETTINGS[0]
    shipped, weight = recommended.split(recommended.RECOMMENDED["chat-vector"])
    assert family.endswith("(recommended)") and parameters == shipped and weight in weights and statistics is None
    assert [s[0] for s in bf.SETTINGS].count(family) == 1 and not any("(recommended)" in s[0] for s in bf.SETTINGS[1:])


def test_needed_statistics_names_each_file_set_once():
    own = bf.OWN
    assert bf.needed_statistics(["protect both e=0.5 (recommended)", "WUDI"]) == []
    assert bf.needed_statistics(["data β=0.1 α=0.01", "data β=1 α=0.01", "RegMean", "AIM"]) == [own]
    grid = bf.needed_statistics(["data X_I from T", "data 32 sequences", "data 512 sequences", "AIM"])
    assert grid == [(128, "target"), (32, "donor"), (512, "donor"), own]


def test_widen_steps_past_the_edge_that_holds_the_best_gap():
    scales = (0.75, 1.0, 1.25)
    assert bf.widen(scales, {0.75: 0.1, 1.0: 0.3, 1.25: 0.5}) == (0.75, 1.0, 1.25, 1.5)
    assert bf.widen(scales, {0.75: 0.6, 1.0: 0.3, 1.25: None}) == (0.5, 0.75, 1.0, 1.25)
    assert bf.widen(scales, {0.75: 0.1, 1.0: 0.5, 1.25: 0.2}) is None  # the best lies inside
    assert bf.widen(scales, {0.75: None, 1.0: None, 1.25: None}) is None  # nothing to compare
    assert bf.widen((1.0, 1.5, 2.0), {1.0: 0.9, 1.5: 0.95, 2.0: 0.96}) == (1.0, 1.5, 2.0, 2.5)  # its own spacing
    assert bf.widen((2.0, 2.5, 3.0), {2.0: 0.1, 2.5: 0.2, 3.0: 0.3}) is None  # at the upper limit
    assert bf.widen((0.25, 0.5), {0.25: 0.4, 0.5: 0.1}) is None  # at the lower limit


def test_report_names_points_that_could_not_be_computed():
    failing = run(0, [point("ours", "w=1", 0.9, lo=0.8, hi=0.95, se=0.03)])
    failing["no_point"] = ["Iso-CTS s=1: linalg.svd: The algorithm failed to converge"]
    text = bf.markdown({"runs": [failing, run(1, [point("ours", "w=1", 0.8, lo=0.7, hi=0.9, se=0.03)])]})
    assert "Not computable (no point, so not in the table): seed 0: Iso-CTS s=1: linalg.svd" in text
    assert "Not computable" not in bf.markdown({"runs": [run(0, [point("ours", "w=1", 0.9)])]})


def test_a_best_point_at_the_end_of_what_was_tried_is_marked_edge():
    pts = [point("x", "s=0.75", 0.1), point("x", "s=1", 0.3), point("x", "s=1.25", 0.5)]
    assert bf.at_edge(pts, pts[2]) and bf.at_edge(pts, pts[0]) and not bf.at_edge(pts, pts[1])
    assert bf.at_edge(pts[:1], pts[0])  # one scale tried: nothing shows the best lies there
    assert not bf.at_edge([point("x", "s=1", None), point("x", "s=2", None)], point("x", "s=1", None))
    inside = run(0, [point("ours", "w=1", 0.2), point("ours", "w=2", 0.5), point("ours", "w=3", 0.1)])
    edge = run(1, [point("ours", "w=1", 0.2), point("ours", "w=2", 0.5)])
    text = bf.markdown({"runs": [inside, edge]})
    assert "(w=2) |" in text and "(w=2, edge) |" in text


def test_glance_marks_an_edge_point_with_a_dagger():
    doc = {"runs": [run(0, [point("ours", "w=1", 0.2, lo=0.1, hi=0.3), point("ours", "w=2", 0.5, lo=0.4, hi=0.6)])]}
    assert "+0.50†" in bf.glance(doc, bf.Keys("abc"))


class _Cache:
    """Records the keys asked for and answers each with a row (so nothing is merged or scored)."""

    def __init__(self):
        self.keys: list[str] = []

    def get(self, key):
        self.keys.append(key)
        return {"key": key}


def _engine(statistics):
    from types import SimpleNamespace

    from mergekit_sigmoid_diff import scoring

    probe = scoring.Probe({"k": scoring.ItemSet((([1, 2], [-100, 2]),)), "f": scoring.ItemSet((([1, 3], [-100, 3]),))}, 0)
    axes = SimpleNamespace(point_sets=lambda: ("k", "f"))
    sweep = SimpleNamespace(axes=axes, probe=probe, models=SimpleNamespace(stamps={"B": 1, "T": 2, "I": 3}), cache=_Cache())
    return bf.Baselines(sweep, statistics)


def test_data_aware_baselines_are_keyed_by_their_statistics_files(tmp_path):
    import os

    target, donor = tmp_path / "t.safetensors", tmp_path / "i.safetensors"
    target.write_bytes(b"x" * 10)
    donor.write_bytes(b"y" * 10)
    files = {"target": target, "donor": donor}
    before = {f: _engine(files).score(f, 1.0)["key"] for f in ("RegMean", "AIM", "WUDI")}
    os.utime(donor, ns=(1, 1))  # a file written again (the suite keeps an unchanged file's mtime)
    after = {f: _engine(files).score(f, 1.0)["key"] for f in ("RegMean", "AIM", "WUDI")}
    assert before["RegMean"] != after["RegMean"] and before["AIM"] != after["AIM"]
    assert before["WUDI"] == after["WUDI"] == _engine(None).score("WUDI", 1.0)["key"]  # data-free: no statistics in its key
    assert len({before["RegMean"], before["AIM"], before["WUDI"]}) == 3


def test_a_data_aware_baseline_without_statistics_is_refused():
    import pytest

    from mergekit_sigmoid_diff.errors import SigmoidDiffError

    with pytest.raises(SigmoidDiffError, match="^RegMean needs statistics files"):
        _engine(None).score("RegMean", 1.0)


def test_the_ledger_sums_every_invocation_a_stopped_one_up_to_its_last_family(tmp_path, monkeypatch):
    clock = iter([100.0, 130.0, 160.0, 1000.0, 1045.0])  # perf_counter readings, in call order
    monkeypatch.setattr(bf.time, "perf_counter", lambda: next(clock))
    first = bf.Ledger(tmp_path / "case-seed0")  # began at 100
    first.touch()  # a family done at 130
    first.touch()  # another at 160: then the invocation is killed
    second = bf.Ledger(tmp_path / "case-seed0")  # the rerun: began at 1000
    second.name += " (rerun)"  # two invocations in the same second of one process
    second.touch()  # done at 1045
    assert first.entries() == {first.name: 60.0, second.name: 45.0}
    assert second.total() == 105.0
    assert not (tmp_path / "case-seed0" / "ledger.partial").exists()


def test_the_header_gives_the_cold_cost_from_the_runs_ledgers():
    a = run(0, [point("ours", "w=1", 0.4, lo=0.3, hi=0.5, se=0.05)])
    b = run(1, [point("ours", "w=1", 0.5, lo=0.4, hi=0.6, se=0.05)])
    a.update(seconds=600.0, cold_seconds=5400.0)
    b.update(seconds=60.0, cold_seconds=1800.0)
    text = bf.markdown({"runs": [a, b]})
    assert "11 min over 2 case-seeds" in text and "2.0 h over 2 case-seeds" in text
    assert "Cold cost" not in bf.markdown({"runs": [run(0, [point("ours", "w=1", 0.4)])]})


class _FakeSweep:
    """task_arithmetic with feature 10·e^(−3λ) and knowledge λ² (T: λ = 0); rows are {"f", "k"}."""

    def __init__(self):
        self.scored: list[float] = []

    @staticmethod
    def row(lam: float) -> dict:
        import math

        return {"f": 10 * math.exp(-3 * lam), "k": lam * lam}

    def point(self, row, lam):
        from mergekit_sigmoid_diff import frontier

        return frontier.Point(lam, row["f"], row["k"])

    def score(self, kind, lam, name):
        assert kind == "task_arithmetic"
        self.scored.append(lam)
        return self.row(lam)


def test_a_best_point_that_only_the_refined_curve_puts_at_the_edge_is_widened():
    # Coarse grid λ = 1, 2: its chords lie far above the convex curve between them, so the
    # point mid-bracket (weight 1) looks best (0.48) against it; refined, the point on the grid's
    # own feature (weight 1.5, gap 0.30 either way) is best, and it is the family's largest weight.
    from mergekit_sigmoid_diff import frontier

    sweep = _FakeSweep()
    ta_rows = {1.0: sweep.row(1.0), 2.0: sweep.row(2.0)}
    inputs = {"T": sweep.row(0.0)}
    rows = {0.5: {"f": 0.9, "k": 0.6}, 1.0: {"f": 0.26, "k": 1.3}, 1.5: {"f": sweep.row(2.0)["f"], "k": 2.8}}
    coarse = frontier.Curve.of(sweep.point(inputs["T"], 0.0), [sweep.point(r, lam) for lam, r in ta_rows.items()])
    coarse_gaps = {v: frontier.gap(coarse, r["f"], r["k"]).value for v, r in rows.items()}
    assert max(coarse_gaps, key=coarse_gaps.get) == 1.0 and bf.widen((0.5, 1.0, 1.5), coarse_gaps) is None
    assert bf.wider(sweep, inputs, ta_rows, rows, (0.5, 1.0, 1.5), 0) == (0.5, 1.0, 1.5, 2.0)
    assert sweep.scored and set(sweep.scored) <= set(ta_rows)  # the refinement's λ joined the grid
    assert bf.wider(sweep, inputs, ta_rows, rows, (0.5, 1.0, 1.5), bf.WIDEN_STEPS) is None  # no steps left


def test_combine_adds_each_folders_runs_and_a_later_one_replaces_the_same_case_and_seed():
    first = {"runs": [run(0, [point("ours", "w=1", 0.4)]), run(1, [point("ours", "w=1", 0.5)])], "note": "old"}
    a = {"runs": [run(1, [point("ours", "w=1", 0.6)])]}
    b = {"runs": [run(1, [point("ours", "w=1", 0.7)]), run(2, [point("ours", "w=1", 0.8)])]}
    out = bf.combine(first, [a, b], note="in progress")
    assert [(r["seed"], r["points"][0]["gap_closed"]) for r in out["runs"]] == [(0, 0.4), (1, 0.7), (2, 0.8)]
    assert out["note"] == "in progress" and first["note"] == "old" and len(first["runs"]) == 2
    assert "note" not in bf.combine(first, [], note="") and bf.combine(first, [])["note"] == "old"
