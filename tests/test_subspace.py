"""mergekit_sigmoid_diff.subspace: the drift basis and the projection of the donor's diff.

The oracle is written here, independently: a full float64 ``torch.linalg.svd`` of the
drift, the rank by cumulative energy, and the projection as explicit matrices
(I − V Vᵀ etc.). Tolerances:

- exact path (min(m, n) ≤ EXACT_MAX_DIM), float64 input: 1e-10 relative to ‖D‖;
  float32 input: 1e-4 relative to ‖D‖ (float32 SVD and products);
- randomized path with a spectral gap at the cut: the same rank as the oracle and
  projection within 1e-3 relative to ‖D‖;
- randomized path in general (cut inside a noise floor, where single directions are not
  determined): covered share ≥ the target, within 2e-2 of the oracle's covered share,
  and a rank within 10 % + 2 of the oracle's.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_sigmoid_diff import subspace as S

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def lowrank_drift(m: int, n: int, k: int, noise: float, seed: int, dtype=torch.float32, gap: float = 1.0) -> torch.Tensor:
    """rank-k signal with power-law singular values (× ``gap`` on the first half) plus
    Gaussian noise holding ``noise`` of the squared norm."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -0.7
    s[: k // 2] *= gap
    signal = (u * s) @ v.T
    if noise > 0:
        z = torch.randn(m, n, generator=g, dtype=torch.float64)
        z *= (noise / (1 - noise) * signal.square().sum() / z.square().sum()).sqrt()
        signal = signal + z
    return signal.to(dtype)


def oracle(drift: torch.Tensor, diff: torch.Tensor, energy: float, side: str) -> tuple[torch.Tensor, int, float]:
    """(projected diff, rank, covered share) in float64 by full SVD and explicit projectors."""
    a, d = drift.double(), diff.double()
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    s2 = s**2
    total = float(s2.sum())
    if energy == 0 or total == 0:
        return d.clone(), 0, 0.0
    if energy >= 1:
        r = int((s > max(a.shape) * torch.finfo(drift.dtype).eps * s[0]).sum())
    else:
        r = int((torch.cumsum(s2, 0) < energy * total).sum()) + 1
    ur, vr = u[:, :r], vh[:r].T
    pu = torch.eye(a.shape[0], dtype=torch.float64) - ur @ ur.T
    pv = torch.eye(a.shape[1], dtype=torch.float64) - vr @ vr.T
    out = {"input": d @ pv, "output": pu @ d, "both": pu @ d @ pv}[side]
    return out, r, float(s2[:r].sum()) / total


def rel(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / scale.double().norm())


@pytest.fixture
def small_sketch(monkeypatch):
    """Force the randomized path on small matrices."""
    monkeypatch.setattr(S, "EXACT_MAX_DIM", 8)
    monkeypatch.setattr(S, "INITIAL_RANK", 4)
    monkeypatch.setattr(S, "OVERSAMPLE", 6)


shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))
sides = st.sampled_from(S.SIDES)
energies = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])


@SETTINGS
@given(shape=shapes, side=sides, energy=energies, seed=st.integers(0, 1000))
def test_target_equals_base_leaves_diff_unchanged(shape, side, energy, seed):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g)
    d = torch.randn(shape, generator=g)
    basis = S.drift_basis(b - b, energy, side)
    assert basis.rank == 0 and basis.covered == 0.0
    out = S.project_out_(d.clone(), basis, side)
    assert torch.equal(out, d)
    assert S.removed_share(d, basis, side) == 0.0


@SETTINGS
@given(shape=shapes, side=sides, energy=energies, seed=st.integers(0, 1000))
def test_matches_float64_oracle_exact_path(shape, side, energy, seed):
    m, n = shape
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, generator=g, dtype=torch.float64)
    d = torch.randn(m, n, generator=g, dtype=torch.float64)
    basis = S.drift_basis(a, energy, side)
    want, r, covered = oracle(a, d, energy, side)
    assert basis.rank == r
    assert basis.covered == pytest.approx(covered, abs=1e-12)
    assert basis.covered >= energy - 1e-12 or energy == 1.0
    got = S.project_out_(d.clone(), basis, side)
    assert rel(got, want, d) < 1e-10


@pytest.mark.parametrize("side", S.SIDES)
@pytest.mark.parametrize("energy", [0.25, 0.5, 0.75, 1.0])
def test_matches_oracle_float32(side, energy):
    a = lowrank_drift(60, 150, 20, 0.3, seed=1)
    d = lowrank_drift(60, 150, 30, 0.5, seed=2)
    basis = S.drift_basis(a, energy, side)
    want, r, covered = oracle(a, d, energy, side)
    assert basis.exact and basis.rank == r
    assert basis.covered == pytest.approx(covered, abs=1e-5)
    assert rel(S.project_out_(d.clone(), basis, side), want, d) < 1e-4


@pytest.mark.parametrize("side", S.SIDES)
@pytest.mark.parametrize("energy", [0.25, 0.5])
def test_randomized_matches_oracle_with_gap(side, energy, small_sketch):
    # signal with a 10× gap after the first half: cuts at 25 % / 50 % fall inside it
    a = lowrank_drift(90, 200, 24, 0.01, seed=3, gap=10.0)
    d = lowrank_drift(90, 200, 40, 0.3, seed=4)
    basis = S.drift_basis(a, energy, side)
    want, r, covered = oracle(a, d, energy, side)
    assert not basis.exact
    assert basis.rank == r
    assert basis.covered == pytest.approx(covered, abs=1e-4)
    assert rel(S.project_out_(d.clone(), basis, side), want, d) < 1e-3


@pytest.mark.parametrize("energy", [0.25, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("shape", [(90, 200), (200, 90)])
def test_randomized_covers_target_share(energy, shape, small_sketch):
    a = lowrank_drift(*shape, 30, 0.4, seed=5)
    basis = S.drift_basis(a, energy, "both")
    _, r, covered = oracle(a, a, energy, "both")
    assert basis.covered >= energy
    assert basis.covered == pytest.approx(covered, abs=2e-2)
    assert r <= basis.rank <= 1.1 * r + 2
    assert basis.u.shape == (shape[0], basis.rank) and basis.v.shape == (shape[1], basis.rank)
    # the factors are orthonormal
    eye = torch.eye(basis.rank)
    assert torch.allclose(basis.u.T @ basis.u, eye, atol=1e-5)
    assert torch.allclose(basis.v.T @ basis.v, eye, atol=1e-5)


def test_randomized_default_constants_realistic_size():
    """The real code path (no monkeypatch): 600 × 1600 is above EXACT_MAX_DIM."""
    a = lowrank_drift(600, 1600, 64, 0.3, seed=6)
    d = lowrank_drift(600, 1600, 64, 0.5, seed=7)
    basis = S.drift_basis(a, 0.5, "input")
    want, r, covered = oracle(a, d, 0.5, "input")
    assert not basis.exact
    assert basis.covered >= 0.5 and basis.covered == pytest.approx(covered, abs=2e-3)
    assert r <= basis.rank <= r + 2
    assert rel(S.project_out_(d.clone(), basis, "input"), want, d) < 2e-2
    forced = S.drift_basis(a, 0.5, "input", exact=True)
    assert forced.exact and forced.rank == r
    assert rel(S.project_out_(d.clone(), forced, "input"), want, d) < 1e-4


@pytest.mark.parametrize("side", S.SIDES)
def test_orthogonal_diff_is_unchanged(side):
    a = lowrank_drift(50, 120, 10, 0.0, seed=8)
    basis = S.drift_basis(a, 0.75, side)
    x = torch.randn(50, 120, generator=torch.Generator().manual_seed(9), dtype=torch.float32)
    u, v = basis.u, basis.v
    if u is not None:
        x = x - u @ (u.T @ x)
    if v is not None:
        x = x - (x @ v) @ v.T
    out = S.project_out_(x.clone(), basis, side)
    assert rel(out, x, x) < 1e-6
    assert S.removed_share(x, basis, side) < 1e-10


@SETTINGS
@given(shape=st.tuples(st.integers(2, 30), st.integers(2, 30)), side=sides, energy=energies, seed=st.integers(0, 1000))
def test_projecting_twice_equals_once(shape, side, energy, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    d = torch.randn(shape, generator=g)
    basis = S.drift_basis(a, energy, side)
    once = S.project_out_(d.clone(), basis, side)
    twice = S.project_out_(once.clone(), basis, side)
    assert rel(twice, once, d) < 1e-5


@pytest.mark.parametrize("side", S.SIDES)
def test_removed_share(side):
    a = lowrank_drift(40, 70, 12, 0.2, seed=10)
    d = lowrank_drift(40, 70, 20, 0.4, seed=11)
    basis = S.drift_basis(a, 0.5, side)
    share = S.removed_share(d, basis, side)
    before = d.clone()
    out, share2 = S.project_out_share_(d, basis, side)
    assert out is d  # in place
    truth = 1 - float(out.double().square().sum() / before.double().square().sum())
    assert share == pytest.approx(truth, abs=1e-5)
    assert share2 == pytest.approx(truth, abs=1e-5)
    assert 0 < share < 1


def test_deterministic_byte_identical(small_sketch):
    a = lowrank_drift(120, 300, 40, 0.4, seed=12)
    d = lowrank_drift(120, 300, 40, 0.4, seed=13)
    runs = []
    for _ in range(2):
        basis = S.drift_basis(a, 0.5, "both")
        runs.append((basis, S.project_out_(d.clone(), basis, "both")))
    (b1, o1), (b2, o2) = runs
    assert not b1.exact
    assert b1.rank == b2.rank and b1.covered == b2.covered
    assert torch.equal(b1.u, b2.u) and torch.equal(b1.v, b2.v) and torch.equal(o1, o2)
    other = S.drift_basis(a, 0.5, "both", seed=S.DEFAULT_SEED + 1)
    assert not torch.equal(other.u, b1.u)  # the seed is really used


@pytest.mark.parametrize("path", ["exact", "randomized"])
def test_rank_grows_with_energy(path, request):
    if path == "randomized":
        request.getfixturevalue("small_sketch")
    a = lowrank_drift(80, 160, 40, 0.3, seed=14)
    levels = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0]
    ranks = [S.drift_basis(a, e, "input").rank for e in levels]
    assert ranks[0] == 0
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    assert ranks[-1] == 80  # energy 1: full rank of a full-rank matrix
    covered = [S.drift_basis(a, e, "output").covered for e in levels[1:-1]]
    assert all(c >= e for c, e in zip(covered, levels[1:-1]))


@pytest.mark.parametrize("side", S.SIDES)
def test_bf16_origin_inputs(side):
    """bf16 checkpoints upcast to float32 agree with the float64 oracle on the same values."""
    g = torch.Generator().manual_seed(15)
    b = torch.randn(64, 160, generator=g).bfloat16()
    t = (b.float() + lowrank_drift(64, 160, 16, 0.3, seed=16) * 0.05).bfloat16()
    i = (b.float() + lowrank_drift(64, 160, 16, 0.3, seed=17) * 0.05).bfloat16()
    drift, diff = t.float() - b.float(), i.float() - b.float()
    basis = S.drift_basis(drift, 0.5, side)
    want, r, _ = oracle(t.double() - b.double(), i.double() - b.double(), 0.5, side)
    assert basis.rank == r
    assert rel(S.project_out_(diff, basis, side), want, i.double() - b.double()) < 1e-4


def test_errors():
    a = torch.randn(4, 5)
    with pytest.raises(ValueError, match="side"):
        S.drift_basis(a, 0.5, "left")
    with pytest.raises(ValueError, match="2-D"):
        S.drift_basis(torch.randn(4), 0.5, "input")
    with pytest.raises(TypeError, match="upcast"):
        S.drift_basis(a.bfloat16(), 0.5, "input")
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="energy"):
            S.drift_basis(a, bad, "input")
    with pytest.raises(ValueError, match="non-finite"):
        S.drift_basis(torch.full((4, 5), float("inf")), 0.5, "input")
    basis = S.drift_basis(a, 0.5, "input")
    with pytest.raises(ValueError, match="'u'"):
        S.project_out_(a.clone(), basis, "output")
    with pytest.raises(ValueError, match="columns"):
        S.project_out_(torch.randn(4, 6), basis, "input")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("side", S.SIDES)
def test_cuda(side):
    a = lowrank_drift(700, 1500, 64, 0.3, seed=18)
    d = lowrank_drift(700, 1500, 64, 0.4, seed=19)
    basis = S.drift_basis(a.cuda(), 0.5, side)
    for f in (basis.u, basis.v):
        assert f is None or f.is_cuda
    again = S.drift_basis(a.cuda(), 0.5, side)
    assert basis.rank == again.rank and basis.covered == again.covered
    out = S.project_out_(d.cuda(), basis, side)
    assert out.is_cuda
    want, r, _ = oracle(a, d, 0.5, side)
    assert r <= basis.rank <= r + 2
    assert rel(out.cpu(), want, d) < 2e-2
