"""The projection path of the kernel (``protect_subspace``) around its math: the thread count
its products and QRs run at, the buffer it reuses for D, and the one rounding to ``out_dtype``.
The math itself is held to the float64 SVD in test_subspace*.py and test_merge_e2e.py; here
every value is compared with tests/reference.py's float64 rule or with the float32 result."""

from __future__ import annotations

import pytest
import torch

from mergekit_sigmoid_diff import kernel, subspace
from mergekit_sigmoid_diff.kernel import GateSettings
from tests.reference import reference_transfer

PROJECT = GateSettings(protect_subspace="input", protect_energy=0.5)


def _weights(shape=(300, 520), donors=1, seed=0, dtype=torch.float32):
    """(B, T, [I_j]) with a decaying drift spectrum, large enough for the randomized sketch."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64) * 0.02
    scale = torch.arange(1, min(shape) + 1, dtype=torch.float64).rsqrt()
    drift = (torch.randn(shape[0], min(shape), generator=g, dtype=torch.float64) * scale) @ torch.randn(
        min(shape), shape[1], generator=g, dtype=torch.float64)
    target = base + 1e-3 * drift / drift.square().mean().sqrt()
    ds = [base + 1e-3 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(donors)]
    return base.to(dtype), target.to(dtype), [d.to(dtype) for d in ds]


def test_products_run_on_the_callers_threads_and_qr_on_one(two_threads, monkeypatch):
    assert min(_weights()[0].shape) > subspace.EXACT_MAX_DIM  # the sketch, with its QRs
    seen: dict[str, list[int]] = {"basis": [], "qr": []}
    real_basis, real_qr = subspace.drift_basis, torch.linalg.qr

    def basis_spy(*args, **kwargs):
        seen["basis"].append(torch.get_num_threads())
        return real_basis(*args, **kwargs)

    def qr_spy(*args, **kwargs):
        seen["qr"].append(torch.get_num_threads())
        return real_qr(*args, **kwargs)

    monkeypatch.setattr(subspace, "drift_basis", basis_spy)
    monkeypatch.setattr(torch.linalg, "qr", qr_spy)
    base, target, donors = _weights()
    kernel.sigmoid_diff(base, target, donors, [1.0], PROJECT)
    assert seen["basis"] == [2]
    assert seen["qr"] and set(seen["qr"]) == {1}
    assert torch.get_num_threads() == 2


def test_the_thread_count_comes_back_after_a_non_finite_drift(two_threads):
    base, target, donors = _weights()
    target[5, 7] = float("inf")
    with pytest.raises(kernel.NonFiniteError):
        kernel.sigmoid_diff(base, target, donors, [1.0], PROJECT)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("donors", [1, 3])
def test_projection_matches_the_float64_rule_whatever_the_thread_count(donors, two_threads):
    base, target, ds = _weights(donors=donors, dtype=torch.float64)
    weights = [1.25, -0.5, 0.75][:donors]
    want = reference_transfer(base, target, ds, weights, {"protect_subspace": "input", "protect_energy": 0.5})
    for threads in (1, 2):
        torch.set_num_threads(threads)
        got = kernel.sigmoid_diff(base, target, ds, weights, PROJECT)
        # the randomized sketch where the spectrum decays smoothly: within 1e-3 of ‖D‖ (test_subspace)
        scale = sum(w * (d - base) for d, w in zip(ds, weights)).norm()
        assert float((got - want).norm() / scale) < 1e-3
    # the inputs are untouched
    torch.testing.assert_close(ds[0], _weights(donors=donors, dtype=torch.float64)[2][0], rtol=0, atol=0)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_out_dtype_is_one_rounding_of_the_float32_result(out_dtype):
    base, target, donors = (t.bfloat16() if isinstance(t, torch.Tensor) else [d.bfloat16() for d in t]
                            for t in _weights(donors=2))
    full = kernel.sigmoid_diff(base, target, donors, [1.0, 0.5], PROJECT)
    assert full.dtype == torch.float32
    rounded = kernel.sigmoid_diff(base, target, donors, [1.0, 0.5], PROJECT, out_dtype=out_dtype, check_finite=True)
    assert rounded.dtype == out_dtype
    torch.testing.assert_close(rounded, full.to(out_dtype), rtol=0, atol=0)


def test_chunked_sum_cast_over_many_chunks_is_exact(monkeypatch):
    monkeypatch.setattr(kernel, "CHUNK", 1000)  # 157 chunks, the last one short
    g = torch.Generator().manual_seed(3)
    acc = torch.randn(313, 500, generator=g)
    other = torch.randn(313, 500, generator=g).bfloat16()
    out = kernel._sum_cast(acc.clone(), other, torch.bfloat16)
    torch.testing.assert_close(out, (acc + other.float()).bfloat16(), rtol=0, atol=0)
