"""``protect_subspace: data`` through mergekit: the merge equals the solve, the checks refuse bad
statistics before anything is written, the guard warns on overlapping statistics, ``inspect``
shows the kept share.

Statistics files are written here with :func:`mergekit_sigmoid_diff.statistics.write_statistics`
from known inputs X (G = X Xᵀ / n): T's inputs live on the first half of every input's features
and I's on the second half (disjoint: the donor's effect on its own inputs survives whole), or
both on all features.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from mergekit.common import ModelReference
from mergekit.options import MergeOptions
from safetensors import safe_open

from mergekit_sigmoid_diff import datasolve, kernel, statistics
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.inspection import format_tables, inspect_recipe, summarize
from mergekit_sigmoid_diff.plugin import activate, lora_notices_silenced
from tests.support import (
    assert_left_nothing,
    load_model_tensors,
    looks_finished,
    merge_in_process,
    run_mergekit_yaml,
    save_lora_adapter,
    write_recipe,
)

activate()

EMBED = "model.embed_tokens.weight"
WEIGHT, BETA, ALPHA = 1.5, 0.3, 0.05


# --- statistics files ----------------------------------------------------------------------


def input_of(name: str) -> Optional[str]:
    """The input a linear weight reads (q/k/v share one, gate/up share one), None for others."""
    module = name.rsplit(".", 1)[0]
    leaf = module.rsplit(".", 1)[-1]
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return module.rsplit(".", 1)[0] + ".qkv"
    if leaf in ("gate_proj", "up_proj"):
        return module.rsplit(".", 1)[0] + ".gate_up"
    if leaf in ("o_proj", "down_proj") or name == "lm_head.weight":
        return module
    return None


def header_shapes(folder: Path) -> dict[str, list[int]]:
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as handle:
        return {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}


def write_stats(
    path: Path,
    model: Path,
    *,
    half: str = "all",
    seed: int = 0,
    tokens: int = 40,
    stamp_of: Optional[Path] = None,
    zero: bool = False,
    drop: tuple[str, ...] = (),
    gram_dim: Optional[int] = None,
    counts_len: Optional[int] = None,
) -> Path:
    """A statistics file for ``model``: per input, G = X Xᵀ / n of seeded X on the ``first`` or
    ``second`` half of the features (or ``all``); token counts on the same half of the vocabulary.
    ``zero``: every Gram and count 0; ``drop``: weights left out; ``gram_dim`` / ``counts_len``:
    wrong sizes; ``stamp_of``: the model whose stamp the file claims (default ``model``)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = header_shapes(model)
    inputs: dict[str, torch.Tensor] = {}
    weights: dict[str, str] = {}
    for name, shape in sorted(shapes.items()):
        key = input_of(name)
        if key is None or name in drop:
            continue
        weights[name] = key
        if key in inputs:
            continue
        dim = gram_dim or shape[1]
        x = torch.randn(dim, tokens, generator=generator, dtype=torch.float64)
        x[_outside(half, dim)] = 0.0
        inputs[key] = torch.zeros(dim, dim) if zero else (x @ x.T / tokens).float()
    vocab = counts_len or shapes[EMBED][0]
    counts = torch.randint(1, 6, (vocab,), generator=generator).double()
    counts[_outside(half, vocab)] = 0.0
    if zero:
        counts.zero_()
    metadata = {"model_stamp": statistics.model_stamp(stamp_of or model), "model": str(stamp_of or model)}
    statistics.write_statistics(path, inputs, weights, counts, EMBED, metadata, tokens)
    return path


def _outside(half: str, size: int) -> slice:
    """The features a half leaves at zero."""
    return {"all": slice(0, 0), "first": slice(size // 2, size), "second": slice(0, size // 2)}[half]


@pytest.fixture(scope="module")
def files(triple, triple2, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("statistics")
    target, donor, base = triple["target"], triple["donors"][0], triple["base"]
    text = root / "notes.txt"
    text.write_text("not a statistics file\n")
    return {
        "target": write_stats(root / "target.safetensors", target, half="first", seed=1),
        "donor": write_stats(root / "donor.safetensors", donor, half="second", seed=2),
        "target_all": write_stats(root / "target_all.safetensors", target, seed=3),
        "zero": write_stats(root / "zero.safetensors", target, zero=True),
        "other": write_stats(root / "other.safetensors", target, seed=1, stamp_of=base),
        "other_donor": write_stats(root / "other_donor.safetensors", donor, seed=2, stamp_of=triple2["donors"][0]),
        "narrow": write_stats(root / "narrow.safetensors", target, gram_dim=16),
        "short_counts": write_stats(root / "short_counts.safetensors", target, counts_len=50),
        "no_down": write_stats(root / "no_down.safetensors", target, drop=("model.layers.1.mlp.down_proj.weight",)),
        "no_o": write_stats(root / "no_o.safetensors", donor, drop=("model.layers.0.self_attn.o_proj.weight",)),
        "text": text,
        "model": target / "model.safetensors",
    }


def data_recipe(paths: dict[str, Any], target_statistics: Any, donor_statistics: Any, **parameters: Any) -> dict:
    params = {"protect_subspace": "data", "data_beta": BETA, "data_alpha": ALPHA, **parameters}
    for key, value in (("target_statistics", target_statistics), ("donor_statistics", donor_statistics)):
        if value is not None:
            params[key] = str(value)
    return {
        "merge_method": "sigmoid_diff",
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths["target"]), "parameters": {"role": "target"}},
            {"model": str(paths["donors"][0]), "parameters": {"weight": WEIGHT}},
        ],
        "parameters": params,
        "dtype": "float32",
    }


# --- what the merge computes -----------------------------------------------------------------


def oracle(name: str, base, target, donor, target_file: Path, donor_file: Path) -> torch.Tensor:
    """The expected output in float64, written from the objective's first form
    Δ = D (β G_I + α 1)(G_T + β G_I + α 1)⁻¹ with an LU solve (not the code's Cholesky of
    D − D P); embeddings scale rows by (β g_I + α)/(g_T + β g_I + α); others T + w D."""
    diff = WEIGHT * (donor.double() - base.double())
    t_file, i_file = statistics.StatisticsFile(target_file), statistics.StatisticsFile(donor_file)
    if name == EMBED:
        g_t = t_file.for_weight(name).counts.double() / t_file.count
        g_i = i_file.for_weight(name).counts.double() / i_file.count
        alpha = ALPHA * g_t.mean()
        return target.double() + diff * ((BETA * g_i + alpha) / (g_t + BETA * g_i + alpha))[:, None]
    if input_of(name) is None:
        return target.double() + diff
    g_t, g_i = t_file.for_weight(name).gram.double(), i_file.for_weight(name).gram.double()
    dim = g_t.shape[0]
    eye = torch.eye(dim, dtype=torch.float64)
    alpha = ALPHA * torch.trace(g_t) / dim
    keep = BETA * g_i + alpha * eye
    delta_t = torch.linalg.solve(g_t + keep, keep @ diff.T)  # Δᵀ = M⁻¹ (β G_I + α 1) Dᵀ, M symmetric
    return target.double() + delta_t.T


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch sees no CUDA device"))])
def test_merge_matches_the_float64_oracle_and_prints_the_survival(triple, files, tmp_path, device):
    """The real ``mergekit-yaml`` (with ``--cuda`` where torch sees a GPU): every tensor within
    float32 rounding of the oracle and equal to datasolve applied by hand; the closing lines give
    the survival per layer (1 here: T's and I's inputs are disjoint) and no warning."""
    out = tmp_path / "merged"
    result = run_mergekit_yaml(data_recipe(triple, files["target"], files["donor"]), out, *(["--cuda"] if device == "cuda" else []))
    assert result.returncode == 0, result.stderr[-3000:]
    merged = load_model_tensors(out)
    base, target = load_model_tensors(triple["base"]), load_model_tensors(triple["target"])
    donor = load_model_tensors(triple["donors"][0])
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        want = oracle(name, base[name], target[name], donor[name], files["target"], files["donor"])
        assert (tensor.double() - want).abs().max() <= 2e-6, name
    if device == "cpu":  # and exactly datasolve by hand (on the CPU: CUDA's products round their own way)
        assert_prepare_then_apply(merged, triple, files)
    # the solve did change the covered tensors (not the plain diff)
    q = "model.layers.0.self_attn.q_proj.weight"
    plain = target[q].double() + WEIGHT * (donor[q].double() - base[q].double())
    assert (merged[q].double() - plain).abs().max() > 1e-3
    lines = result.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("protect_subspace: data: share of the donor's effect"))
    assert lines[start + 1].split() == ["0:", "1.000", "1:", "1.000", "lm_head.weight:", "1.000", f"{EMBED}:", "1.000"]
    assert not any(line.startswith("Warning:") for line in lines)


def by_hand(name: str, base, target, donor, target_file: Path, donor_file: Path) -> torch.Tensor:
    """``datasolve.prepare`` (or ``prepare_tokens``) then ``Prepared.apply`` on
    ``kernel.donor_diff``, called here directly; tensors without statistics: D + T."""
    diff = kernel.donor_diff(base, [donor], [WEIGHT], torch.float32)
    t_file, i_file = statistics.StatisticsFile(target_file), statistics.StatisticsFile(donor_file)
    settings = datasolve.DataSettings(beta=BETA, alpha=ALPHA)
    if name == EMBED:
        t, i = t_file.for_weight(name), i_file.for_weight(name)
        solve = datasolve.prepare_tokens(t.counts, t.count, i.counts, i.count, settings)
    elif input_of(name) is not None:
        solve = datasolve.prepare(t_file.for_weight(name).matrix(), i_file.for_weight(name).matrix(), settings)
    else:
        return diff + target
    return solve.apply(target, diff, torch.float32)


def assert_prepare_then_apply(merged: dict, triple, files) -> None:
    base, target = load_model_tensors(triple["base"]), load_model_tensors(triple["target"])
    donor = load_model_tensors(triple["donors"][0])
    for name, tensor in merged.items():
        assert torch.equal(tensor, by_hand(name, base[name], target[name], donor[name], files["target"], files["donor"])), name


def test_merge_is_prepare_then_apply_bit_for_bit(triple, files, tmp_path):
    """The merge path is ``datasolve.prepare`` then ``Prepared.apply`` on ``kernel.donor_diff``
    (so a sweep holding the prepared solve reproduces the merge exactly)."""
    out = tmp_path / "merged"
    merge_in_process(data_recipe(triple, files["target"], files["donor"]), out)
    assert_prepare_then_apply(load_model_tensors(out), triple, files)


def test_zero_target_statistics_are_task_arithmetic_bit_for_bit(triple, files, tmp_path):
    """G_T = 0 everywhere: the output is exactly the plain transfer T + w (I − B) (``gate: false``)."""
    data, plain = tmp_path / "data", tmp_path / "plain"
    merge_in_process(data_recipe(triple, files["zero"], files["donor"]), data)
    plain_recipe = data_recipe(triple, None, None)
    plain_recipe["parameters"] = {"gate": False}
    merge_in_process(plain_recipe, plain)
    ours, theirs = load_model_tensors(data), load_model_tensors(plain)
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    base, target = load_model_tensors(triple["base"]), load_model_tensors(triple["target"])
    donor = load_model_tensors(triple["donors"][0])
    q = "model.layers.1.self_attn.q_proj.weight"
    want = target[q].double() + WEIGHT * (donor[q].double() - base[q].double())
    assert (ours[q].double() - want).abs().max() <= 1e-6


def test_overlapping_statistics_trigger_one_warning_naming_the_layers(triple, files, tmp_path):
    """T's file as the donor's too (what chat text through T would give): the solve cancels most of
    the donor's effect on its own inputs, and the merge says so in one line."""
    out = tmp_path / "merged"
    result = run_mergekit_yaml(data_recipe(triple, files["target_all"], files["target_all"]), out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert looks_finished(out)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert "layer(s) 0, 1, lm_head.weight, model.embed_tokens.weight" in warnings[0]
    assert "target_statistics built on chat text" in warnings[0]


# --- refused before anything is read or written --------------------------------------------

BAD = {
    "no target_statistics": (dict(target_statistics=None), r"^protect_subspace: data needs the parameter target_statistics \("),
    "no donor_statistics": (dict(donor_statistics=None), r"^protect_subspace: data needs the parameter donor_statistics \("),
    "missing file": (
        dict(target_statistics="/nonexistent/t.safetensors"),
        r"^target_statistics: statistics file /nonexistent/t\.safetensors does not exist or is unreadable$",
    ),
    "a model, not statistics": (dict(donor_statistics="model"), r"^donor_statistics: \S+/model\.safetensors is not a statistics file \(format"),
    "not safetensors": (dict(donor_statistics="text"), r"^donor_statistics: statistics file \S+/notes\.txt is not a readable safetensors file"),
    "target file of another model": (
        dict(target_statistics="other"),
        r"^target_statistics: statistics file \S+/other\.safetensors was computed on another model \(\S+/base, stamp \w+\), "
        r"not on the target \S+/target: run calibrate on that model$",
    ),
    "donor file of another model": (
        dict(donor_statistics="other_donor"),
        r"^donor_statistics: statistics file \S+/other_donor\.safetensors was computed on another model .*, "
        r"not on the donor \S+/donor0 or the target \S+/target",
    ),
    "Grams of the wrong size": (
        dict(target_statistics="narrow"),
        r"^statistics file \S+/narrow\.safetensors holds a 16 x 16 Gram for tensor \S+, but its shape is \[\d+, 32\]",
    ),
    "counts of the wrong length": (
        dict(target_statistics="short_counts"),
        r"^statistics file \S+/short_counts\.safetensors counts 50 tokens, but tensor model\.embed_tokens\.weight of the "
        r"target has 64 rows: protect_subspace: data needs base, target and donor to share one vocabulary",
    ),
    "a 2-D weight missing from both files": (
        dict(target_statistics="no_down", donor_statistics="no_down_donor"),
        r"^tensor model\.layers\.1\.mlp\.down_proj\.weight is missing from statistics file \S+/no_down\.safetensors \(target_statistics\)",
    ),
    "a weight one file lacks": (
        dict(donor_statistics="no_o"),
        r"^statistics file \S+/no_o\.safetensors has nothing for tensor model\.layers\.0\.self_attn\.o_proj\.weight, which \S+ covers",
    ),
    "negative data_beta": (dict(data_beta=-0.5), r"^parameter data_beta=-0\.5 in the top-level parameters: expected a finite number >= 0$"),
    "infinite data_alpha": (dict(data_alpha=math.inf), r"^parameter data_alpha=inf in the top-level parameters: expected a finite number >= 0$"),
}


@pytest.fixture(scope="module")
def no_down_donor(triple, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("statistics_donor") / "no_down_donor.safetensors"
    return write_stats(path, triple["donors"][0], half="second", drop=("model.layers.1.mlp.down_proj.weight",))


def bad_recipe(triple, files, no_down_donor, changes: dict) -> dict:
    known = {**files, "no_down_donor": no_down_donor}
    chosen = {"target_statistics": files["target"], "donor_statistics": files["donor"]}
    extra = {}
    for key, value in changes.items():
        if key in chosen:
            chosen[key] = known.get(value, value) if value is not None else None
        else:
            extra[key] = value
    return data_recipe(triple, chosen["target_statistics"], chosen["donor_statistics"], **extra)


@pytest.mark.parametrize("case", BAD)
def test_bad_statistics_stop_the_merge_before_anything_is_read(case, triple, files, no_down_donor, tmp_path, no_tensor_reads):
    changes, pattern = BAD[case]
    out = tmp_path / "out"
    with pytest.raises(SigmoidDiffError, match=pattern) as caught:
        merge_in_process(bad_recipe(triple, files, no_down_donor, changes), out)
    assert "\n" not in str(caught.value)
    assert_left_nothing(out)


def test_two_donors_are_refused_naming_them(triple2, tmp_path, no_tensor_reads):
    recipe = {
        "merge_method": "sigmoid_diff",
        "base_model": str(triple2["base"]),
        "models": [{"model": str(triple2["target"]), "parameters": {"role": "target"}}]
        + [{"model": str(d)} for d in triple2["donors"]],
        "parameters": {"protect_subspace": "data", "target_statistics": "t", "donor_statistics": "i"},
    }
    with pytest.raises(SigmoidDiffError, match=r"^protect_subspace: data takes one donor, but tensor \S+ has 2 \(\S+/donor0, \S+/donor1\)$"):
        merge_in_process(recipe, tmp_path / "out")
    assert_left_nothing(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["mergekit-yaml", "python -m mergekit_sigmoid_diff merge"])
def test_cli_refuses_another_models_statistics_before_writing(command, triple, files, tmp_path):
    out = tmp_path / "out"
    runner = None if command == "mergekit-yaml" else [__import__("sys").executable, "-m", "mergekit_sigmoid_diff", "merge"]
    result = run_mergekit_yaml(data_recipe(triple, files["other"], files["donor"]), out, command=runner)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert f"statistics file {files['other']} was computed on another model ({triple['base']}" in errors[0]
    assert f"not on the target {triple['target']}" in errors[0]
    assert_left_nothing(out)


def test_gate_false_and_other_modes_need_no_statistics(triple, tmp_path, no_tensor_reads):
    """The checks concern only tensors under protect_subspace: data with the gate on."""
    from mergekit.config import MergeConfiguration

    from mergekit_sigmoid_diff import preflight

    recipe = data_recipe(triple, None, None)
    recipe["parameters"]["gate"] = False
    config = MergeConfiguration.model_validate(recipe)
    options = MergeOptions()
    preflight.check_statistics(config, options, preflight.check_models(config, options))


# --- a model+lora target is stamped as merged ----------------------------------------------


def test_lora_target_statistics_are_checked_against_the_merged_model(triple, files, tmp_path):
    adapter = save_lora_adapter(triple["target"], tmp_path / "adapter")
    cache = tmp_path / "lora_cache"
    reference = ModelReference.model_validate(f"{triple['target']}+{adapter}")
    with lora_notices_silenced():  # mergekit's own LoRA merge (the folder the merge will use)
        merged = Path(reference.merged(cache_dir=str(cache)).model.path)
    good = write_stats(tmp_path / "lora_target.safetensors", merged, half="first", seed=1)
    recipe = data_recipe(triple, good, files["donor"])
    recipe["models"][0]["model"] = f"{triple['target']}+{adapter}"
    merge_in_process(recipe, tmp_path / "out", lora_merge_cache=str(cache))
    assert looks_finished(tmp_path / "out")
    # the plain target's statistics are another model's
    recipe = data_recipe(triple, files["target"], files["donor"])
    recipe["models"][0]["model"] = f"{triple['target']}+{adapter}"
    with pytest.raises(SigmoidDiffError, match=r"^target_statistics: statistics file \S+ was computed on another model .* not on the target \S+\+\S+/adapter"):
        merge_in_process(recipe, tmp_path / "out2", lora_merge_cache=str(cache))
    assert_left_nothing(tmp_path / "out2")


# --- inspect ------------------------------------------------------------------------------------


def test_inspect_shows_the_share_of_the_diff_each_tensor_keeps(triple, files, tmp_path):
    recipe = write_recipe(tmp_path / "data.yml", data_recipe(triple, files["target"], files["donor"]))
    reports, _ = inspect_recipe(recipe, MergeOptions(quiet=True))
    by_name = {r.name: r for r in reports}
    base, target = load_model_tensors(triple["base"]), load_model_tensors(triple["target"])
    donor = load_model_tensors(triple["donors"][0])
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", EMBED):
        report = by_name[name]
        delta = oracle(name, base[name], target[name], donor[name], files["target"], files["donor"]) - target[name].double()
        diff = WEIGHT * (donor[name].double() - base[name].double())
        share = float(delta.norm() ** 2 / diff.norm() ** 2)
        assert report.kept_share == pytest.approx(share, rel=1e-5), name
        assert report.weighted_fraction == pytest.approx(share, rel=1e-5)
        assert 0.05 < share < 0.95  # the solve removed part of the diff, not all
        assert report.survival == pytest.approx(1.0, abs=1e-5)  # T's and I's inputs are disjoint
        assert report.data_form == ("tokens" if name == EMBED else "solve")
    norm = by_name["model.layers.0.input_layernorm.weight"]
    assert (norm.data_form, norm.kept_share, norm.mode) == ("plain", 1.0, "data")
    summary = summarize(reports)
    grid, rows, kinds = summary["kept_share_grid"], summary["rows"], summary["kinds"]
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert grid[rows.index("0")][kinds.index("q")] == pytest.approx(q.kept_share, rel=1e-12)
    assert "share of the donor's diff kept, ‖Δ‖² / ‖D‖²" in format_tables(summary)


def test_inspect_refuses_what_the_merge_refuses(triple, files, tmp_path, no_tensor_reads):
    recipe = write_recipe(tmp_path / "bad.yml", data_recipe(triple, files["other"], files["donor"]))
    with pytest.raises(SigmoidDiffError, match=r"^target_statistics: statistics file \S+/other\.safetensors was computed on another model"):
        inspect_recipe(recipe, MergeOptions(quiet=True))
