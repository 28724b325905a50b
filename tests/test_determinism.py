"""The same recipe run twice writes byte-identical safetensors, for every ``normalize``
option the method declares (new options are picked up from its spec automatically) and for
the ``protect_subspace`` projection, with the kernel's chunk loops shared among two threads."""

from __future__ import annotations

import pytest
import torch

from mergekit_sigmoid_diff import kernel
from mergekit_sigmoid_diff.normalization import SAMPLE_SIZE
from mergekit_sigmoid_diff.tiny import build_triple, tiny_config
from tests.support import merge_in_process, NORMALIZE_OPTIONS, run_mergekit_yaml

HIDDEN = 32
# each MLP matrix (HIDDEN × INTERMEDIATE) holds a little over two CHUNKs: three chunks, the last
# one short, so the threaded chunk loop hands chunks to both threads; and far above the
# normalizations' sample size, so the sampled statistics run too
INTERMEDIATE = 2 * kernel.CHUNK // HIDDEN + 64
MLP_ELEMENTS = HIDDEN * INTERMEDIATE
CHUNKS = -(-MLP_ELEMENTS // kernel.CHUNK)
WIDE = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE)
# every normalize option's element-wise gate, and the projection: bfloat16 models, so the
# projection's own chunk loops run too (the donor diff's upcast to float32, the final add-and-cast)
SETTINGS = {**{option: {"normalize": option} for option in NORMALIZE_OPTIONS},
            "protect input": {"protect_subspace": "input", "protect_energy": 0.5},
            "protect output": {"protect_subspace": "output", "protect_energy": 0.5}}


def test_the_mlp_matrices_span_several_chunks_and_the_sample():
    assert CHUNKS == 3 and MLP_ELEMENTS > 2 * kernel.CHUNK and MLP_ELEMENTS > SAMPLE_SIZE


@pytest.fixture(scope="session")
def wide_triple(tmp_path_factory):
    return build_triple(tmp_path_factory.mktemp("wide"), seed=5, config=tiny_config(**WIDE), dtype=torch.bfloat16)


def recipe(triple, parameters: dict) -> dict:
    return {
        "merge_method": "sigmoid_diff",
        "base_model": str(triple["base"]),
        "models": [
            {"model": str(triple["target"]), "parameters": {"role": "target"}},
            {"model": str(triple["donors"][0]), "parameters": {"weight": 0.8}},
        ],
        "parameters": dict(parameters),
        "dtype": "bfloat16",
    }


def safetensors_bytes(folder) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}
    assert files, f"no safetensors in {folder}"
    return files


@pytest.fixture
def chunk_loops(monkeypatch) -> list[tuple[int, int]]:
    """(chunk count, threads) of every chunk loop the kernel runs during the test."""
    loops: list[tuple[int, int]] = []
    real = kernel._each_chunk

    def spy(count, work, scratch, workers, *rest):
        loops.append((count, max(1, min(workers, count))))
        return real(count, work, scratch, workers, *rest)

    monkeypatch.setattr(kernel, "_each_chunk", spy)
    return loops


@pytest.mark.parametrize("name", SETTINGS)
def test_rerun_is_byte_identical(wide_triple, tmp_path, name, two_threads, chunk_loops):
    first, second = tmp_path / "first", tmp_path / "second"
    merge_in_process(recipe(wide_triple, SETTINGS[name]), first)
    merge_in_process(recipe(wide_triple, SETTINGS[name]), second)
    assert safetensors_bytes(first) == safetensors_bytes(second)
    # the reruns crossed the threaded loop: the MLP matrices' chunks were shared by two threads
    assert (CHUNKS, 2) in chunk_loops, chunk_loops


def test_the_settings_give_different_merges(wide_triple, tmp_path):
    """Guards the test above: each option reaches the kernel, so the reruns compare
    merges that really depend on it."""
    outputs = set()
    for name, parameters in SETTINGS.items():
        merge_in_process(recipe(wide_triple, parameters), tmp_path / name)
        outputs.add(b"".join(safetensors_bytes(tmp_path / name).values()))
    assert len(outputs) == len(SETTINGS)


@pytest.mark.slow
@pytest.mark.parametrize("name", [NORMALIZE_OPTIONS[-1], "protect input"])
def test_command_line_run_matches_an_in_process_run(wide_triple, tmp_path, name, two_threads):
    """Another process (another hash seed, fresh caches) writes the same bytes, on the same
    thread count (the projection's matrix products round differently on another count)."""
    merge_in_process(recipe(wide_triple, SETTINGS[name]), tmp_path / "in_process", num_threads=2)
    result = run_mergekit_yaml(recipe(wide_triple, SETTINGS[name]), tmp_path / "cli", "--num-threads", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert safetensors_bytes(tmp_path / "cli") == safetensors_bytes(tmp_path / "in_process")
