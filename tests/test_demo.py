"""``demo --tiny``, the plumbing check on tiny random models, runs end to end and its evaluation holds
(the main job on SmolLM2 is tested in test_main_job.py).

Oracles: the merged output against the float64 published formula of tests/reference.py, and
each printed λ_eff against ⟨out − T, I − B⟩ / ⟨I − B, I − B⟩ computed here from the files."""

from __future__ import annotations

import re

import pytest
import torch

from mergekit_sigmoid_diff.cli import main
from tests.reference import published_formula
from tests.support import load_model_tensors

pytestmark = pytest.mark.slow


def test_demo_merges_and_reports_per_layer_fractions(tmp_path, capsys):
    workdir = tmp_path / "demo"
    main(["demo", "--tiny", "--workdir", str(workdir)])
    printed = capsys.readouterr().out
    rows = re.findall(r"^\s*(\d+|model)\s+([\d.]+)\s+([\d.]+)$", printed, flags=re.M)
    assert [r[0] for r in rows] == ["0", "1", "2", "3", "model"]
    for _, fraction, _ in rows:
        assert 0 < float(fraction) <= 1

    models = workdir / "models"
    base, target, donor, out = (load_model_tensors(p) for p in (models / "base", models / "target", models / "donor0", workdir / "merged"))
    worst = max((out[n].double() - published_formula(base[n], target[n], [donor[n]], [1.0])).abs().max().item() for n in out)
    assert worst < 2e-6
    printed_worst = float(re.search(r"float64 published formula\|: (\S+)", printed).group(1))
    assert printed_worst < 2e-6

    dots: dict[str, list[float]] = {}
    for name in out:
        layer = re.search(r"\.layers\.(\d+)\.", name)
        row = dots.setdefault(layer.group(1) if layer else "model", [0.0, 0.0])
        diff = (donor[name].double() - base[name].double()).flatten()
        row[0] += torch.dot(out[name].double().flatten() - target[name].double().flatten(), diff).item()
        row[1] += torch.dot(diff, diff).item()
    for row, _, measured in rows:
        assert float(measured) == pytest.approx(dots[row][0] / dots[row][1], abs=5e-4), row
    assert (workdir / "merged" / "config.json").exists()
