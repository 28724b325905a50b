"""``demo --tiny``, the plumbing check on tiny random models, runs end to end and its evaluation holds
(the main job on SmolLM2 is tested in test_main_job.py)."""

from __future__ import annotations

import re

import pytest

from mergekit_sigmoid_diff.cli import main

pytestmark = pytest.mark.slow


def test_demo_merges_and_reports_per_layer_fractions(tmp_path, capsys):
    main(["demo", "--tiny", "--workdir", str(tmp_path / "demo")])
    printed = capsys.readouterr().out
    rows = re.findall(r"^\s*(\d+|model)\s+([\d.]+)\s+([\d.]+)$", printed, flags=re.M)
    assert [r[0] for r in rows] == ["0", "1", "2", "3", "model"]
    for _, fraction, measured in rows:
        assert 0 < float(fraction) <= 1 and 0 < float(measured) <= 1
    worst = float(re.search(r"float64 published formula\|: (\S+)", printed).group(1))
    assert worst < 2e-6
    assert (tmp_path / "demo" / "merged" / "config.json").exists()
