"""The statistics file (contract A): writing, lazy reading, the eigen-sketch and the model stamp.

Oracles: matrices with a spectrum chosen by hand (Q diag(s) Qᵀ, Q orthogonal from a QR), so the
top eigenpairs and the trace are known without an eigensolver; the sketch's dense form is
checked against V diag(λ) Vᵀ + ρ (I − V Vᵀ) written out here; the LoRA-merged model for the
stamp is built from the adapter's own A and B (tests/support.lora_delta), not through peft.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_sigmoid_diff import statistics
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.statistics import (
    FORMAT, InputStats, StatisticsFile, TokenCounts, eigen_sketch, model_stamp, write_statistics,
)
from mergekit_sigmoid_diff.tiny import save_state, tiny_config
from tests.support import load_model_tensors, lora_delta, save_lora_adapter


def known_spectrum(values: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, Q) with G = Q diag(values) Qᵀ, Q a seeded random orthogonal matrix."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=generator, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ q.T, q


def test_eigen_sketch_reproduces_the_top_eigenpairs_and_the_trace():
    values = [9.0, 5.0, 3.0, 1.0, 0.5, 0.25]
    gram, q = known_spectrum(values)
    vecs, vals, residual = eigen_sketch(gram, 2)
    assert vals.tolist() == pytest.approx([9.0, 5.0], abs=1e-12)
    for i in range(2):  # each eigenvector up to its sign
        assert abs(float(vecs[:, i] @ q[:, i])) == pytest.approx(1.0, abs=1e-12)
    assert residual == pytest.approx((3.0 + 1.0 + 0.5 + 0.25) / 4, abs=1e-12)  # the rest's mean
    full = eigen_sketch(gram, 10)  # rank ≥ d: every pair, no residual
    assert full[1].shape == (6,) and full[2] == 0.0


def write_example(path, gram, sketch_of, rank):
    sketch = eigen_sketch(sketch_of, rank)
    write_statistics(
        path,
        inputs={"attn": gram, "mlp": sketch},
        weights={"l.q.weight": "attn", "l.k.weight": "attn", "l.down.weight": "mlp"},
        counts=torch.tensor([3.0, 0.0, 7.0]),
        embedding="embed.weight",
        metadata={"model_stamp": "abc", "model": "m", "text_kind": "texts"},
        count=10,
    )
    return sketch


def test_a_written_file_reads_back_per_weight(tmp_path):
    gram, _ = known_spectrum([4.0, 2.0, 1.0], seed=1)
    wide, _ = known_spectrum([8.0, 6.0, 1.0, 1.0, 0.5], seed=2)
    path = tmp_path / "stats.safetensors"
    write_example(path, gram, wide, 2)
    stats = StatisticsFile(path)
    assert stats.metadata["format"] == FORMAT and stats.model_stamp == "abc" and stats.count == 10
    assert stats.weights == {"l.q.weight": "attn", "l.k.weight": "attn", "l.down.weight": "mlp"}

    q, k = stats.for_weight("l.q.weight"), stats.for_weight("l.k.weight")
    assert isinstance(q, InputStats) and not q.sketched and q.dim == 3 and q.count == 10
    torch.testing.assert_close(q.matrix(), gram.float().double(), rtol=0, atol=0)  # exact (as stored)
    torch.testing.assert_close(k.matrix(), q.matrix(), rtol=0, atol=0)

    down = stats.for_weight("l.down.weight")
    assert down.sketched and down.dim == 5 and down.eigvecs.shape == (5, 2)
    v, lam, rho = down.eigvecs.double(), down.eigvals.double(), down.residual
    by_hand = sum(lam[i] * torch.outer(v[:, i], v[:, i]) for i in range(2)) + rho * (torch.eye(5, dtype=torch.float64) - v @ v.T)
    torch.testing.assert_close(down.matrix(), by_hand, rtol=1e-12, atol=1e-12)
    assert float(torch.trace(down.matrix())) == pytest.approx(8 + 6 + 1 + 1 + 0.5, rel=1e-6)  # trace kept
    top = torch.linalg.eigvalsh(down.matrix()).flip(0)[:2]
    assert top.tolist() == pytest.approx([8.0, 6.0], rel=1e-6)

    tokens = stats.for_weight("embed.weight")
    assert isinstance(tokens, TokenCounts) and tokens.count == 10 and tokens.counts.tolist() == [3.0, 0.0, 7.0]
    assert stats.for_weight("lm_head.weight") is None


def test_reading_one_weight_reads_only_its_tensors(tmp_path, monkeypatch):
    gram, _ = known_spectrum([4.0, 2.0, 1.0])
    wide, _ = known_spectrum([8.0, 6.0, 1.0, 1.0, 0.5])
    path = tmp_path / "stats.safetensors"
    write_example(path, gram, wide, 2)
    stats = StatisticsFile(path)  # the header only
    read: list[str] = []
    real_open = statistics.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.handle.get_tensor(name)

    monkeypatch.setattr(statistics, "safe_open", Spy)
    stats.for_weight("l.q.weight")
    assert read == ["input.attn.gram"]
    read.clear()
    stats.for_weight("l.down.weight")
    assert sorted(read) == ["input.mlp.eigvals", "input.mlp.eigvecs", "input.mlp.residual"]


def test_the_file_is_all_or_nothing(tmp_path):
    gram, _ = known_spectrum([1.0, 2.0])
    with pytest.raises(SigmoidDiffError, match="missing/stats.safetensors"):
        write_statistics(tmp_path / "missing" / "stats.safetensors", {"a": gram}, {"w": "a"}, None, None, {}, 4)
    with pytest.raises(SigmoidDiffError, match=r"weight w2 reads input b, which has no statistics"):
        write_statistics(tmp_path / "s.safetensors", {"a": gram}, {"w": "a", "w2": "b"}, None, None, {}, 4)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["not safetensors", "other format", "missing", "no metadata", "lacks tensor"])
def test_a_bad_statistics_file_is_one_line_naming_it(tmp_path, case):
    path = tmp_path / "bad.safetensors"
    if case == "not safetensors":
        path.write_text("hello")
    elif case == "other format":
        save_file({"x": torch.zeros(1)}, path, metadata={"format": "pt"})
    elif case == "no metadata":
        save_file({"x": torch.zeros(1)}, path, metadata={"format": FORMAT})
    elif case == "lacks tensor":
        gram, _ = known_spectrum([1.0, 2.0])
        write_statistics(path, {"a": gram}, {"w": "a"}, None, None, {"model_stamp": "s"}, 4)
        tensors = load_file(path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        meta["weights"] = json.dumps({"w": "a", "w2": "zz"})
        save_file(tensors, path, metadata=meta)
    with pytest.raises(SigmoidDiffError) as caught:
        StatisticsFile(path).for_weight("w2")
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    if case == "lacks tensor":
        assert "input.zz.gram" in message and "w2" in message


# ---------------------------------------------------------------- model stamp


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("stamp")
    config = tiny_config()
    torch.manual_seed(3)
    from transformers import LlamaForCausalLM

    state = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    return {"root": root, "config": config, "state": state, "base": save_state(state, config, root / "base")}


def test_identical_copies_share_a_stamp_also_when_sharded_differently(tiny_model, tmp_path):
    copy = shutil.copytree(tiny_model["base"], tmp_path / "copy")
    assert model_stamp(copy) == model_stamp(tiny_model["base"])
    # the same tensors split over two shards
    tensors = load_model_tensors(tiny_model["base"])
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({n: tensors[n] for n in names[:5]}, sharded / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[5:]}, sharded / "model-00002-of-00002.safetensors")
    assert model_stamp(sharded) == model_stamp(tiny_model["base"])
    # the same weights in another dtype, or one changed element in a first row, are another model
    other = tmp_path / "bf16"
    other.mkdir()
    save_file({n: t.to(torch.bfloat16) for n, t in tensors.items()}, other / "model.safetensors")
    assert model_stamp(other) != model_stamp(tiny_model["base"])
    nudged = dict(tensors)
    nudged["model.layers.1.mlp.up_proj.weight"] = nudged["model.layers.1.mlp.up_proj.weight"].clone()
    nudged["model.layers.1.mlp.up_proj.weight"][0, 3] += 1e-3
    (tmp_path / "nudged").mkdir()
    save_file(nudged, tmp_path / "nudged" / "model.safetensors")
    assert model_stamp(tmp_path / "nudged") != model_stamp(tiny_model["base"])


def test_a_lora_merged_model_has_another_stamp_than_its_base(tiny_model, tmp_path):
    adapter = save_lora_adapter(tiny_model["base"], tmp_path / "adapter", targets=("v_proj",), seed=4)
    state = {n: t.clone() for n, t in tiny_model["state"].items()}
    for name, delta in lora_delta(adapter).items():  # the merge written out by hand
        state[name] = (state[name].double() + delta).float()
    merged = save_state(state, tiny_model["config"], tmp_path / "merged")
    assert model_stamp(merged) != model_stamp(tiny_model["base"])


def test_a_folder_without_weights_cannot_be_stamped(tmp_path):
    with pytest.raises(SigmoidDiffError, match=rf"model {tmp_path} has no \*\.safetensors or \*\.bin weights"):
        model_stamp(tmp_path)
