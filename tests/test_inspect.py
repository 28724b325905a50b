"""``inspect``: per-tensor reports equal a direct float64 computation from the safetensors files.

The reference reads each tensor with ``safetensors.safe_open`` and derives the parameters
by hand from the recipe (gradients: t = layer / (layers − 1); filters by substring), so it
checks mergekit's parameter resolution as used by inspect, not only the arithmetic.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from mergekit_sigmoid_diff import cli, inspection, kernel
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.tiny import save_state, tiny_config
from tests.reference import applied_fraction as reference_fraction
from tests.reference import projected_diff, reference_stats
from tests.support import EXEMPT_VOCAB_AND_NORMS, load_model_tensors, one_donor_recipe, write_recipe


def read_tensor(folder: Path, name: str) -> torch.Tensor:
    (shard,) = Path(folder).glob("*.safetensors")
    with safe_open(str(shard), framework="pt") as f:
        return f.get_tensor(name)


@pytest.fixture(scope="module")
def inspected(triple2, tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    recipe = {
        "merge_method": "sigmoid_diff",
        "base_model": str(triple2["base"]),
        "models": [
            {"model": str(triple2["target"]), "parameters": {"role": "target"}},
            {"model": str(triple2["donors"][0]), "parameters": {"weight": [0.5, 1.0]}},
            {"model": str(triple2["donors"][1]), "parameters": {"weight": 0.25}},
        ],
        "parameters": {
            "steepness": [6.0, 18.0],
            "midpoint": [{"filter": "mlp", "value": [0.3, 0.7]}, {"value": 0.5}],
            "gate": [{"filter": "embed_tokens", "value": False}, {"value": True}],
        },
        "dtype": "float32",
    }
    path = root / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path, root / "report"


@pytest.fixture(scope="module")
def report(inspected):
    recipe, out = inspected
    cli.main(["inspect", str(recipe), "--out", str(out), "--quiet"])
    return json.loads((out / "inspect.json").read_text()), out


def hand_resolved(name: str) -> dict:
    """The recipe above, resolved by hand for one tensor of the 2-layer model."""
    layer = re.search(r"\.layers\.(\d+)\.", name)
    t = int(layer.group(1)) / (2 - 1) if layer else 0.0
    return {
        "steepness": 6.0 + 12.0 * t,
        "midpoint": 0.3 + 0.4 * t if "mlp" in name else 0.5,
        "eps": kernel.DEFAULT_EPS,
        "gate": "embed_tokens" not in name,
        "weights": [0.5 + 0.5 * t, 0.25],
    }


def test_every_tensor_matches_a_direct_computation_from_safetensors(report, triple2):
    doc, _ = report
    names = set(load_model_tensors(triple2["base"]))
    assert {r["name"] for r in doc["tensors"]} == names and not doc["skipped"]
    for r in doc["tensors"]:
        name, knobs = r["name"], hand_resolved(r["name"])
        assert r["mode"] == ("elementwise" if knobs["gate"] else "plain"), name
        assert r["parameters"]["steepness"] == pytest.approx(knobs["steepness"]), name
        assert r["parameters"]["midpoint"] == pytest.approx(knobs["midpoint"]), name
        assert list(r["weights"].values()) == pytest.approx(knobs["weights"]), name
        expected = reference_stats(
            read_tensor(triple2["base"], name),
            read_tensor(triple2["target"], name),
            [read_tensor(d, name) for d in triple2["donors"]],
            knobs["weights"],
            knobs["steepness"],
            knobs["midpoint"],
            knobs["eps"],
            knobs["gate"],
        )
        for key, value in expected.items():
            assert r[key] == pytest.approx(value, rel=2e-5, abs=1e-7), f"{name} {key}"


def test_grid_and_kind_table_aggregate_the_tensors(report):
    doc, _ = report
    assert doc["rows"] == ["0", "1", "model"]
    assert doc["kinds"] == list(inspection.KIND_ORDER)  # a Llama has all of them
    by_cell = {(str(r["layer"]) if r["layer"] is not None else "model", r["kind"]): r for r in doc["tensors"]}
    for row, values in zip(doc["rows"], doc["applied_fraction_grid"]):
        for kind, value in zip(doc["kinds"], values):
            tensor = by_cell.get((row, kind))
            assert value == (None if tensor is None else pytest.approx(tensor["applied_fraction"]))
    for kind, summary in doc["by_kind"].items():
        tensors = [r for r in doc["tensors"] if r["kind"] == kind]
        numel = sum(r["numel"] for r in tensors)
        mean = sum(r["numel"] * r["applied_fraction"] for r in tensors) / numel
        assert summary["applied_fraction"] == pytest.approx(mean)
        assert summary["target_drift_max"] == max(r["target_drift_max"] for r in tensors)
        energy = sum(r["donor_energy"] for r in tensors)
        kept = sum(r["donor_energy"] * r["weighted_fraction"] for r in tensors)
        assert summary["weighted_fraction"] == pytest.approx(kept / energy)
    # gate: false on embed_tokens lets the whole diff in; the gated vocabulary tensor does not
    assert doc["by_kind"]["embed"]["applied_fraction"] == 1.0
    assert doc["by_kind"]["lm_head"]["applied_fraction"] < 1.0


def test_heatmap_png_is_written_and_small(report):
    _, out = report
    png = out / "inspect-heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 200_000


def test_table_is_printed(inspected, tmp_path, capsys):
    recipe, _ = inspected
    summary = inspection.run(recipe, tmp_path, quiet=True)
    printed = capsys.readouterr().out
    for kind in summary["kinds"]:
        assert kind in printed
    overall = re.search(r"overall applied fraction: ([0-9.]+)", printed)
    assert float(overall.group(1)) == pytest.approx(summary["applied_fraction_overall"], abs=1e-4)


@pytest.mark.parametrize(
    "name, kind, layer",
    [
        ("model.layers.3.self_attn.q_proj.weight", "q", 3),
        ("model.layers.0.self_attn.k_proj.bias", "k.bias", 0),
        ("model.layers.12.mlp.down_proj.weight", "down", 12),
        ("model.layers.1.post_attention_layernorm.weight", "post_norm", 1),
        ("model.layers.1.self_attn.q_norm.weight", "q_norm", 1),
        ("model.embed_tokens.weight", "embed", None),
        ("model.norm.weight", "final_norm", None),
        ("lm_head.weight", "lm_head", None),
    ],
)
def test_tensor_kinds(name, kind, layer):
    assert inspection.tensor_kind(name) == kind
    assert inspection.layer_index(name) == layer


def test_ungated_and_flat_drift_apply_everything():
    base = torch.zeros(4, 4)
    donor = torch.full((4, 4), 0.1)
    spread = inspection.tensor_report("x", base, torch.randn(4, 4), [donor], [1.0], kernel.GateSettings(gate=False))
    flat = inspection.tensor_report("x", base, torch.full((4, 4), 0.3), [donor], [1.0], kernel.GateSettings())
    for r in (spread, flat):
        assert r.applied_fraction == 1.0 and r.weighted_fraction == pytest.approx(1.0)


def test_non_finite_model_is_named(triple2, tmp_path):
    state = load_model_tensors(triple2["target"])
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = math.inf
    bad = save_state(state, tiny_config(), tmp_path / "bad")
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "sigmoid_diff",
                "base_model": str(triple2["base"]),
                "models": [{"model": str(bad), "parameters": {"role": "target"}}, {"model": str(triple2["donors"][0])}],
            }
        )
    )
    with pytest.raises(SigmoidDiffError, match=rf"tensor model\.layers\.1\.mlp\.up_proj\.weight of model {bad} contains"):
        inspection.inspect_recipe(recipe, quiet=True)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"^recipe .*nope\.yml not found$"),
        ("merge_method: varm\nbase_model: /b\nmodels: [{model: /a}, {model: /c}]\n",
         r"^inspect reads sigmoid_diff recipes; .* has merge_method: varm$"),
        ("models: [{model: /a}]\n", r"^recipe .* is not a mergekit recipe: "),
        ("merge_method: sigmoid_diff\nbase_model: /b\nmodels: [{model: /a, parameters: {role: target}}]\n",
         r"^models has a target \(/a\) but no donor model"),
    ],
)
def test_bad_recipes_are_one_line_errors(tmp_path, content, message, capsys):
    recipe = tmp_path / "nope.yml"
    if content is not None:
        recipe.write_text(content)
    with pytest.raises(SigmoidDiffError, match=message):
        inspection.inspect_recipe(recipe, quiet=True)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["inspect", str(recipe), "--out", str(tmp_path)])
    assert str(exit_.value.code).startswith("Error: ") and "\n" not in str(exit_.value.code)


def test_the_recipes_normalize_option_reaches_the_kernel(triple2, tmp_path):
    recipe = write_recipe(tmp_path / "quantile.yml", one_donor_recipe(triple2, parameters={"normalize": "rank"}))
    reports, _ = inspection.inspect_recipe(recipe, quiet=True)
    name = "model.layers.1.mlp.gate_proj.weight"
    (r,) = [r for r in reports if r.name == name]
    assert r.parameters["normalize"] == "rank"
    drift = (read_tensor(triple2["target"], name).double() - read_tensor(triple2["base"], name).double()).abs()
    ranked = reference_fraction(drift, "rank").mean().item()  # the definition, not the kernel
    minmax = reference_fraction(drift, "minmax").mean().item()
    assert r.applied_fraction == pytest.approx(ranked, rel=1e-6)
    assert abs(ranked - minmax) > 1e-3  # the option changes the answer, so the check means something


def test_inspect_reports_the_share_the_projection_removes(triple2, tmp_path):
    protect = one_donor_recipe(
        triple2, parameters={"protect_subspace": "input", "protect_energy": 0.5, "gate": EXEMPT_VOCAB_AND_NORMS}
    )
    protect["models"][1]["parameters"] = {"weight": 1.2}
    recipe = write_recipe(tmp_path / "protect.yml", protect)
    summary = inspection.run(recipe, tmp_path / "report", quiet=True)
    reports = json.loads((tmp_path / "report" / "inspect.json").read_text())["tensors"]
    projected = [r for r in reports if r["mode"] == "subspace"]
    assert {r["kind"] for r in projected} == {"q", "k", "v", "o", "gate", "up", "down"}
    assert {r["mode"] for r in reports if r["kind"] in ("embed", "lm_head", "input_norm", "final_norm")} == {"plain"}
    for r in projected:
        name = r["name"]
        b, t, i = (read_tensor(triple2[k] if k != "donor" else triple2["donors"][0], name) for k in ("base", "target", "donor"))
        diff = 1.2 * (i.double() - b.double())
        kept = projected_diff(b, t, diff, "input", 0.5).square().sum().item() / diff.square().sum().item()
        assert r["removed_share"] == pytest.approx(1.0 - kept, abs=1e-5), name
        assert r["weighted_fraction"] == pytest.approx(kept, abs=1e-5), name
        assert 0.0 < r["removed_share"] < 1.0 and r["protected_rank"] >= 1
    grid = summary["removed_share_grid"]
    assert grid is not None and all(v is None or 0.0 < v < 1.0 for row in grid for v in row)
    assert summary["by_kind"]["embed"]["removed_share"] is None


def test_without_matplotlib_inspect_writes_the_json_and_says_how_to_get_the_heatmap(inspected, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "matplotlib" else real(name, *a, **k))
    recipe, _ = inspected
    inspection.run(recipe, tmp_path / "report", quiet=True)
    assert (tmp_path / "report" / "inspect.json").is_file()
    assert not (tmp_path / "report" / "inspect-heatmap.png").exists()
    assert "pip install 'mergekit-sigmoid-diff[plot]'" in capsys.readouterr().out


def test_heatmap_colour_scale_spans_the_values_present():
    """The rule of docs/inspect.md: min to max of the values present, at least 0.01 wide, in [0, 1]."""
    assert inspection.colour_range([0.2, None, 0.9, 0.5]) == (0.2, 0.9)
    lo, hi = inspection.colour_range([0.991, 0.993, None])
    assert hi - lo == pytest.approx(0.01) and lo <= 0.991 and hi >= 0.993
    lo, hi = inspection.colour_range([1.0, 1.0])
    assert hi <= 1.0 and hi - lo == pytest.approx(0.01)
    assert inspection.colour_range([None, None]) == (0.0, 1.0)


def test_tensors_with_no_donor_diff_are_marked_and_left_out_of_the_averages():
    base = torch.zeros(4, 8)
    target = torch.linspace(0, 1, 32).reshape(4, 8)
    moved = inspection.tensor_report("model.layers.0.self_attn.q_proj.weight", base, target, [base + 0.1], [1.0], kernel.GateSettings())
    still = inspection.tensor_report("model.layers.0.self_attn.k_proj.weight", base, target, [base.clone()], [1.0], kernel.GateSettings())
    assert not moved.donor_unchanged and still.donor_unchanged and still.weighted_fraction is None
    summary = inspection.summarize([moved, still])
    assert summary["applied_fraction_overall"] == pytest.approx(moved.applied_fraction)  # not the mean of both
    assert summary["by_kind"]["k"]["applied_fraction"] is None and summary["by_kind"]["k"]["donor_unchanged"] == 1
    row = summary["rows"].index("0")
    k, q = summary["kinds"].index("k"), summary["kinds"].index("q")
    assert summary["donor_unchanged_grid"][row][k] and not summary["donor_unchanged_grid"][row][q]
    assert "D=0" in inspection.format_tables(summary)
