"""The same recipe run twice writes byte-identical safetensors, for every ``normalize``
option the method declares (new options are picked up from its spec automatically)."""

from __future__ import annotations

import pytest

from mergekit_sigmoid_diff.tiny import build_triple, tiny_config
from tests.support import merge_in_process, NORMALIZE_OPTIONS, run_mergekit_yaml

# 32 × 2112 = 67584 elements in each MLP matrix: above the kernel's chunk and the
# normalizations' sample size (both 65536), so the chunked and sampled paths run too.
WIDE = dict(intermediate_size=2112)


@pytest.fixture(scope="session")
def wide_triple(tmp_path_factory):
    return build_triple(tmp_path_factory.mktemp("wide"), seed=5, config=tiny_config(**WIDE))


def recipe(triple, normalize: str) -> dict:
    return {
        "merge_method": "sigmoid_diff",
        "base_model": str(triple["base"]),
        "models": [
            {"model": str(triple["target"]), "parameters": {"role": "target"}},
            {"model": str(triple["donors"][0]), "parameters": {"weight": 0.8}},
        ],
        "parameters": {"normalize": normalize},
        "dtype": "float32",
    }


def safetensors_bytes(folder) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}
    assert files, f"no safetensors in {folder}"
    return files


@pytest.mark.parametrize("normalize", NORMALIZE_OPTIONS)
def test_rerun_is_byte_identical(wide_triple, tmp_path, normalize):
    first, second = tmp_path / "first", tmp_path / "second"
    merge_in_process(recipe(wide_triple, normalize), first)
    merge_in_process(recipe(wide_triple, normalize), second)
    assert safetensors_bytes(first) == safetensors_bytes(second)


def test_normalize_options_give_different_merges(wide_triple, tmp_path):
    """Guards the test above: the option reaches the kernel, so the reruns compare
    merges that really depend on it."""
    outputs = set()
    for option in NORMALIZE_OPTIONS:
        merge_in_process(recipe(wide_triple, option), tmp_path / option)
        outputs.add(b"".join(safetensors_bytes(tmp_path / option).values()))
    assert len(outputs) == len(NORMALIZE_OPTIONS)


@pytest.mark.slow
def test_command_line_run_matches_an_in_process_run(wide_triple, tmp_path):
    """Another process (another hash seed, fresh caches) writes the same bytes."""
    option = NORMALIZE_OPTIONS[-1]
    merge_in_process(recipe(wide_triple, option), tmp_path / "in_process")
    result = run_mergekit_yaml(recipe(wide_triple, option), tmp_path / "cli")
    assert result.returncode == 0, result.stderr[-2000:]
    assert safetensors_bytes(tmp_path / "cli") == safetensors_bytes(tmp_path / "in_process")
