"""scripts/benchlib/baselines.py: the 2025 data-free merges and the data-aware anchors.

Each family has (1) a case worked out by hand, the arithmetic in a comment; (2) an
independent float64 oracle written in numpy another way (least squares on stacked rows for
WUDI and RegMean, inverse square roots by eigh for the polar factors, nuclear norm / k for
Iso-C, explicit projector matrices for DOP); (3) properties: s = 0, the 1-D fallback,
dtypes and shapes, orthogonal equivariance, the registry.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchlib import baselines as bl
from mergekit_sigmoid_diff.errors import SigmoidDiffError

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
R2 = math.sqrt(2.0)
F64 = torch.float64


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def triple(a, d, base=None):
    """(B, T, I) with T − B = a, I − B = d; B a fixed non-zero matrix unless given."""
    a, d = t(a), t(d)
    b = t(base) if base is not None else torch.arange(a.numel(), dtype=F64).reshape(a.shape) / 7 - 1
    return b, b + a, b + d


def close(x: torch.Tensor, y, tol: float = 1e-10) -> None:
    y = torch.as_tensor(np.asarray(y), dtype=F64)
    assert x.shape == y.shape, (x.shape, y.shape)
    err = float((x.to(F64) - y).abs().max()) if x.numel() else 0.0
    assert err <= tol * max(1.0, float(y.abs().max())), f"max error {err}\n{x}\n{y}"


def random_case(m: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(m, n, generator=g, dtype=F64)
    a = torch.randn(m, n, generator=g, dtype=F64)
    d = torch.randn(m, n, generator=g, dtype=F64)
    return b, b + a, b + d, a.numpy(), d.numpy()


shapes = st.tuples(st.integers(2, 7), st.integers(2, 7))
seeds = st.integers(0, 10_000)
scales = st.sampled_from([0.0, 0.3, 1.0, 1.7])


# ---------------------------------------------------------------- numpy oracles


def np_polar(x: np.ndarray) -> np.ndarray:
    """x (xᵀx)^{-1/2} (tall) or (x xᵀ)^{-1/2} x (wide), by eigh: full rank assumed."""
    if x.shape[0] >= x.shape[1]:
        w, q = np.linalg.eigh(x.T @ x)
        return x @ (q / np.sqrt(w)) @ q.T
    w, q = np.linalg.eigh(x @ x.T)
    return (q / np.sqrt(w)) @ q.T @ x


def np_wudi(a, d, s, weight):
    """τ minimising Σ c_i w_i ‖τ_i (τ − τ_i)ᵀ‖² as one least-squares problem in X = τᵀ."""
    rows, rhs = [], []
    for c, tau in ((1.0, a), (weight, s * d)):
        n2 = float((tau**2).sum())
        if c == 0 or n2 == 0:
            continue
        k = math.sqrt(c / n2)
        rows.append(k * tau)
        rhs.append(k * tau @ tau.T)
    x = np.linalg.lstsq(np.vstack(rows), np.vstack(rhs), rcond=None)[0]
    return x.T


def np_top(x, count):
    if not np.any(x):
        return np.zeros((x.shape[0], 0)), np.zeros(0), np.zeros((0, x.shape[1]))
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    return u[:, :count], s[:count], vh[:count]


def np_tsv(a, d, s):
    parts = [np_top(x, min(a.shape) // 2) for x in (a, s * d)]
    u = np.hstack([p[0] for p in parts])
    sig = np.concatenate([p[1] for p in parts])
    vh = np.vstack([p[2] for p in parts])
    return np_polar(u) @ np.diag(sig) @ np_polar(vh)


def np_iso_c(a, d, s):
    """(nuclear norm / k) · polar(M): the same as σ̄ U Vᵀ for a full-rank M."""
    m = a + s * d
    return np.linalg.norm(m, "nuc") / min(m.shape) * np_polar(m)


def np_iso_cts(a, d, s, common):
    k = min(a.shape)
    k_c, p = bl.common_split(k, common)
    u, sig, vh = np.linalg.svd(a + s * d, full_matrices=False)
    proj = np.eye(a.shape[0]) - u[:, :k_c] @ u[:, :k_c].T
    us, ss, vs = [u[:, :k_c]], [sig[:k_c]], [vh[:k_c]]
    for x in (a, s * d):
        pu, ps, pv = np_top(proj @ x, p)
        us.append(pu), ss.append(ps), vs.append(pv)
    mean = np.concatenate(ss).mean()
    return mean * np_polar(np.hstack(us)) @ np_polar(np.vstack(vs))


def np_dop(a, d, s, energy):
    u, sig, vh = np.linalg.svd(a)
    share = np.cumsum(sig**2) / np.sum(sig**2)
    r = int(np.argmax(share >= energy - 1e-12)) + 1 if energy > 0 else 0
    left = np.eye(a.shape[0]) - u[:, :r] @ u[:, :r].T
    right = np.eye(a.shape[1]) - vh[:r].T @ vh[:r]
    return a + left @ (s * d) @ right


def np_regmean(w_t, w_i, g_t, g_i, s, alpha):
    """argmin_W ‖(W − W_T) L_T‖² + s ‖(W − W_I) L_I‖², G̃ = L Lᵀ: stacked least squares."""
    def shrunk(g):
        return alpha * g + (1 - alpha) * np.diag(np.diag(g))

    l_t = np.linalg.cholesky(shrunk(g_t))
    l_i = np.linalg.cholesky(shrunk(g_i))
    lhs = np.vstack([l_t.T, math.sqrt(s) * l_i.T])
    rhs = np.vstack([l_t.T @ w_t.T, math.sqrt(s) * l_i.T @ w_i.T])
    return np.linalg.lstsq(lhs, rhs, rcond=None)[0].T


# ---------------------------------------------------------------- WUDI


def test_wudi_hand_one_input():
    # One input channel: P_A = P_D = [1], so τ = (A + c·s·D) / (1 + c).
    # A = (3, 0)ᵀ, D = (0, 2)ᵀ. c = s: s = 1 → (3, 2)/2 = (1.5, 1); s = 0.5 → (3, 0.5)/1.5 = (2, 1/3).
    # Fixed c = 1, s = 0.5: (3, 1)/2 = (1.5, 0.5).
    b, tt, i = triple([[3.0], [0.0]], [[0.0], [2.0]])
    close(bl.wudi(b, tt, i, 1.0) - b, [[1.5], [1.0]])
    close(bl.wudi(b, tt, i, 0.5) - b, [[2.0], [1 / 3]])
    close(bl.wudi(b, tt, i, 0.5, donor_weight=1.0) - b, [[1.5], [0.5]])
    close(bl.wudi(b, tt, i, 0.0), tt)


def test_wudi_hand_two_inputs():
    # A = 3 e1 e1ᵀ (P_A = e1e1ᵀ), D = 2 e2 wᵀ with w = (1, 1)/√2 (P_D = w wᵀ), D = [[0, 0], [√2, √2]].
    # With c = s: M = e1e1ᵀ + s wwᵀ = [[1 + s/2, s/2], [s/2, s/2]], det s/2,
    # M⁻¹ = [[1, −1], [−1, 1 + 2/s]]; N = A + s²·D = [[3, 0], [s²√2, s²√2]];
    # τ = N M⁻¹ = [[3, −3], [0, 2√2 s]]  (both constraints τ e1 = A e1, τ w = s D w met exactly).
    b, tt, i = triple([[3.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [R2, R2]])
    close(bl.wudi(b, tt, i, 1.0) - b, [[3.0, -3.0], [0.0, 2 * R2]])
    close(bl.wudi(b, tt, i, 0.5) - b, [[3.0, -3.0], [0.0, R2]])


@SETTINGS
@given(shapes, seeds, scales, st.sampled_from([None, 1.0, 0.25]))
def test_wudi_matches_least_squares(shape, seed, s, weight):
    b, tt, i, a, d = random_case(*shape, seed)
    c = s if weight is None else weight
    close(bl.wudi(b, tt, i, s, donor_weight=weight) - b, np_wudi(a, d, s, c), 1e-8)


def test_wudi_gradient_vanishes_at_its_output():
    b, tt, i, a, d = random_case(6, 4, 3)
    tau = (bl.wudi(b, tt, i, 0.7) - b).requires_grad_(True)
    loss = 0
    for c, x in ((1.0, torch.from_numpy(a)), (0.7, 0.7 * torch.from_numpy(d))):
        loss = loss + c * ((tau - x) @ x.T).square().sum() / x.square().sum()
    loss.backward()
    assert float(tau.grad.abs().max()) < 1e-9


# ---------------------------------------------------------------- TSV-M


def test_tsv_m_hand():
    # A = 3 e1e1ᵀ, D = 2 u uᵀ, u = (1, 1)/√2 at 45°; k = 2, each task keeps 1 triplet.
    # U = V = [e1, u]; the nearest orthonormal pair spreads them symmetrically about 22.5°:
    # q1 at −22.5°, q2 at 67.5°; merged = 3 q1q1ᵀ + 2s q2q2ᵀ, with
    # q1q1ᵀ = ½[[1 + c, −c], [−c, 1 − c]], q2q2ᵀ = ½[[1 − c, c], [c, 1 + c]], c = cos 45° = √2/2.
    # s = 1: [[2.5 + √2/4, −√2/4], [−√2/4, 2.5 − √2/4]];
    # s = 0.5: [[2 + √2/2, −√2/2], [−√2/2, 2 − √2/2]].
    # s = 0: D leaves (zero), A keeps its top triplet: A itself.
    b, tt, i = triple([[3.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]])
    q = R2 / 4
    close(bl.tsv_m(b, tt, i, 1.0) - b, [[2.5 + q, -q], [-q, 2.5 - q]])
    close(bl.tsv_m(b, tt, i, 0.5) - b, [[2 + 2 * q, -2 * q], [-2 * q, 2 - 2 * q]])
    close(bl.tsv_m(b, tt, i, 1.0, alpha=2.0) - b, [[5 + 2 * q, -2 * q], [-2 * q, 5 - 2 * q]])
    close(bl.tsv_m(b, tt, i, 0.0), tt)


@SETTINGS
@given(shapes, seeds, scales)
def test_tsv_m_matches_oracle(shape, seed, s):
    b, tt, i, a, d = random_case(*shape, seed)
    close(bl.tsv_m(b, tt, i, s) - b, np_tsv(a, d, s), 1e-8)


# ---------------------------------------------------------------- Iso-C


def test_iso_c_hand():
    # A = [[0, 0], [3, 0]], D = [[0, −1], [0, 0]]; s = 1: M = [[0, −1], [3, 0]], MᵀM = diag(9, 1):
    # V = I, σ = (3, 1), U = M V Σ⁻¹ = [[0, −1], [1, 0]]; σ̄ = 2 → 2 U Vᵀ = [[0, −2], [2, 0]].
    # s = 0.5: σ = (3, 0.5), σ̄ = 1.75, same U Vᵀ. α = 2 doubles. s = 0 with rtol: M = A, one
    # triplet (σ = 3) kept, σ̄ = 3 → A itself.
    b, tt, i = triple([[0.0, 0.0], [3.0, 0.0]], [[0.0, -1.0], [0.0, 0.0]])
    close(bl.iso_c(b, tt, i, 1.0) - b, [[0.0, -2.0], [2.0, 0.0]])
    close(bl.iso_c(b, tt, i, 0.5) - b, [[0.0, -1.75], [1.75, 0.0]])
    close(bl.iso_c(b, tt, i, 1.0, alpha=2.0) - b, [[0.0, -4.0], [4.0, 0.0]])
    close(bl.iso_c(b, tt, i, 0.0, rtol=1e-9), tt)


@SETTINGS
@given(shapes, seeds, scales)
def test_iso_c_matches_oracle(shape, seed, s):
    b, tt, i, a, d = random_case(*shape, seed)
    close(bl.iso_c(b, tt, i, s) - b, np_iso_c(a, d, s), 1e-8)


def test_iso_rtol_keeps_only_the_real_directions():
    # rank-2 drifts in 6 × 5: the sum has rank 4. The papers' rule flattens all 5 singular
    # values (a null direction gets σ̄); rtol drops it and flattens the 4 real ones.
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 2, generator=g, dtype=F64) @ torch.randn(2, 5, generator=g, dtype=F64)
    d = torch.randn(6, 2, generator=g, dtype=F64) @ torch.randn(2, 5, generator=g, dtype=F64)
    b = torch.zeros(6, 5, dtype=F64)
    sigma = np.linalg.svd((a + d).numpy(), compute_uv=False)
    paper = torch.linalg.svdvals(bl.iso_c(b, a, d, 1.0))
    close(paper, np.full(5, sigma.sum() / 5), 1e-9)
    kept = torch.linalg.svdvals(bl.iso_c(b, a, d, 1.0, rtol=1e-9))
    close(kept, np.r_[np.full(4, sigma[:4].mean()), 0.0], 1e-9)


# ---------------------------------------------------------------- Iso-CTS


def test_iso_cts_hand():
    # 3 × 3, A = diag(3, 1, 0), D = diag(0, 0.5, 2), s = 1, common = 1/3: k = 3, k_c = 1, p = 1.
    # Sum diag(3, 1.5, 2): common = e1 (σ 3). A − e1e1ᵀA = diag(0, 1, 0): e2 (σ 1).
    # D − e1e1ᵀD = diag(0, 0.5, 2): e3 (σ 2). U = V = [e2, e3, e1] (orthonormal already),
    # σ̄ = (1 + 2 + 3)/3 = 2 → 2 I (Iso-C would give the sum's mean (3 + 2 + 1.5)/3 = 13/6).
    # s = 0.5: D → diag(0, 0.25, 1), its residual's top is e3 (σ 1): σ̄ = (1 + 1 + 3)/3 = 5/3.
    # Rotating A and D as Q_L · Q_R moves the result the same way: 2 Q_L Q_R.
    b, tt, i = triple(np.diag([3.0, 1.0, 0.0]), np.diag([0.0, 0.5, 2.0]))
    close(bl.iso_cts(b, tt, i, 1.0, common=1 / 3) - b, 2 * np.eye(3))
    close(bl.iso_c(b, tt, i, 1.0) - b, 13 / 6 * np.eye(3))
    close(bl.iso_cts(b, tt, i, 0.5, common=1 / 3) - b, 5 / 3 * np.eye(3))
    c, s_ = math.cos(0.3), math.sin(0.3)
    ql = t([[c, -s_, 0], [s_, c, 0], [0, 0, 1]])
    qr = t([[0, 0, 1], [1, 0, 0], [0, 1, 0]])
    z = torch.zeros(3, 3, dtype=F64)
    rot = bl.iso_cts(z, ql @ t(np.diag([3.0, 1.0, 0.0])) @ qr, ql @ t(np.diag([0.0, 0.5, 2.0])) @ qr, 1.0, common=1 / 3)
    close(rot, 2 * (ql @ qr))


def _failing_gesdd(monkeypatch) -> list:
    """torch's SVD raising as LAPACK's gesdd does when it fails to converge; returns the calls."""
    calls = []

    def fail(x, full_matrices=True):
        calls.append(tuple(x.shape))
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge because the input matrix is "
                                       "ill-conditioned or has too many repeated singular values")

    monkeypatch.setattr(bl.torch.linalg, "svd", fail)
    return calls


def test_svd_falls_back_to_gesvd_hand(monkeypatch):
    # [[0, 4], [3, 0]] = U diag(4, 3) Vᵀ with U = I, Vᵀ = [[0, 1], [1, 0]] (up to signs of pairs)
    x = t([[0.0, 4.0], [3.0, 0.0]])
    calls = _failing_gesdd(monkeypatch)
    u, sigma, vh = bl.svd(x)
    assert calls == [(2, 2)]
    close(sigma, [4.0, 3.0])
    close(u @ torch.diag(sigma) @ vh, x)
    close(torch.abs(u), np.eye(2))
    close(torch.abs(vh), [[0.0, 1.0], [1.0, 0.0]])
    close(bl._polar(x), [[0.0, 1.0], [1.0, 0.0]])  # Procrustes: the nearest orthonormal matrix


def test_iso_cts_and_tsv_m_give_the_same_merge_when_gesdd_fails(monkeypatch):
    b, tt, i, _, _ = random_case(6, 5, 11)
    expected = {name: fn(b, tt, i, 0.8) for name, fn in (("Iso-CTS", bl.iso_cts), ("TSV-M", bl.tsv_m))}
    calls = _failing_gesdd(monkeypatch)
    close(bl.iso_cts(b, tt, i, 0.8), expected["Iso-CTS"], 1e-9)
    close(bl.tsv_m(b, tt, i, 0.8), expected["TSV-M"], 1e-9)
    assert len(calls) >= 4  # every SVD of both merges went through the fallback


def test_svd_reraises_torchs_error_when_both_drivers_fail(monkeypatch):
    import scipy.linalg

    _failing_gesdd(monkeypatch)

    def also_fail(*args, **kwargs):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(scipy.linalg, "svd", also_fail)
    with pytest.raises(torch.linalg.LinAlgError, match="failed to converge"):
        bl.svd(t([[1.0, 2.0], [3.0, 4.0]]))


def test_common_split_hand():
    # k = 576, f = 0.8: ⌊460.8⌋ = 460, (576 − 460)/2 = 58 per task → (460, 58)
    # k = 3, f = 0.8: ⌊2.4⌋ = 2, round(0.5) = 0 (banker's) → all common (3, 0)
    # k = 3, f = 0: round(1.5) = 2 > 3 // 2 = 1 → capped: (1, 1)
    assert bl.common_split(576, 0.8) == (460, 58)
    assert bl.common_split(3, 0.8) == (3, 0)
    assert bl.common_split(3, 0.0) == (1, 1)
    assert bl.common_split(4, 0.5) == (2, 1)


@SETTINGS
@given(shapes, seeds, st.sampled_from([0.3, 1.0, 1.7]), st.sampled_from([0.0, 0.4, 0.8]))
def test_iso_cts_matches_oracle(shape, seed, s, common):
    b, tt, i, a, d = random_case(*shape, seed)
    close(bl.iso_cts(b, tt, i, s, common=common) - b, np_iso_cts(a, d, s, common), 1e-8)


# ---------------------------------------------------------------- DOP


def test_dop_hand():
    # A = diag(3, 1): σ² = (9, 1); e = 0.5 → 9/10 ≥ 0.5, r = 1, U_1 = V_1 = e1.
    # (1 − e1e1ᵀ) D (1 − e1e1ᵀ) zeroes D's first row and column: [[1, 2], [3, 4]] → [[0, 0], [0, 4]].
    # e = 0.95 > 0.9 → r = 2, everything removed: T. 3 × 2: A = [[3, 0], [0, 0], [0, 1]]
    # (σ 3 on e1/e1, σ 1 on e3/e2), r = 1 → D = [[1, 2], [3, 4], [5, 6]] → [[0, 0], [0, 4], [0, 6]].
    b, tt, i = triple([[3.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]])
    close(bl.dop(b, tt, i, 1.0) - tt, [[0.0, 0.0], [0.0, 4.0]])
    close(bl.dop(b, tt, i, 0.5) - tt, [[0.0, 0.0], [0.0, 2.0]])
    close(bl.dop(b, tt, i, 1.0, energy=0.95), tt)
    close(bl.dop(b, tt, i, 1.0, energy=0.0) - tt, [[1.0, 2.0], [3.0, 4.0]])
    b, tt, i = triple([[3.0, 0.0], [0.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    close(bl.dop(b, tt, i, 1.0) - tt, [[0.0, 0.0], [0.0, 4.0], [0.0, 6.0]])


@SETTINGS
@given(shapes, seeds, scales, st.sampled_from([0.0, 0.3, 0.5, 0.9]))
def test_dop_matches_oracle(shape, seed, s, energy):
    b, tt, i, a, d = random_case(*shape, seed)
    close(bl.dop(b, tt, i, s, energy=energy) - b, np_dop(a, d, s, energy), 1e-8)


# ---------------------------------------------------------------- RegMean


def test_regmean_hand():
    # W_T = [2, 0], W_I = [0, 4]; G_T = [[2, 0], [0, 0]], G_I = [[1, 1], [1, 1]].
    # α = 1, s = 1: M = [[3, 1], [1, 1]], M⁻¹ = ½[[1, −1], [−1, 3]];
    # W_T G_T + W_I G_I = [4, 0] + [4, 4] = [8, 4] → [8, 4] M⁻¹ = [2, 2]
    # (it meets W e1 = 2 = W_T e1 and W (1, 1) = 4 = W_I (1, 1)).
    # α = 0.5: G̃_I = [[1, .5], [.5, 1]], M = [[3, .5], [.5, 1]], det 2.75;
    # [4, 0] + [0, 4] G̃_I = [6, 4] → [6 − 2, −3 + 12]/2.75 = [16/11, 36/11].
    b, tt, i = triple([[2.0, 0.0]], [[0.0, 4.0]], base=[[0.0, 0.0]])
    g_t, g_i = t([[2.0, 0.0], [0.0, 0.0]]), t([[1.0, 1.0], [1.0, 1.0]])
    close(bl.regmean(b, tt, i, 1.0, gram_t=g_t, gram_i=g_i, alpha=1.0), [[2.0, 2.0]])
    close(bl.regmean(b, tt, i, 1.0, gram_t=g_t, gram_i=g_i, alpha=0.5), [[16 / 11, 36 / 11]])
    close(bl.regmean(b, tt, i, 0.0, gram_t=g_t, gram_i=g_i), tt)


def test_regmean_hand_unused_inputs_keep_the_target():
    # Only input 1 is ever active: M = diag(2, 0, 0) is singular (the pseudo-inverse path).
    # (I − T) G_I M⁺ = [4, 4, 4] diag(1, 0, 0) diag(½, 0, 0) = [2, 0, 0] → T + that = [3, 2, 3].
    b, tt, i = triple([[1.0, 2.0, 3.0]], [[5.0, 6.0, 7.0]], base=[[0.0, 0.0, 0.0]])
    g = torch.diag(t([1.0, 0.0, 0.0]))
    close(bl.regmean(b, tt, i, 1.0, gram_t=g, gram_i=g, alpha=1.0), [[3.0, 2.0, 3.0]])


@SETTINGS
@given(shapes, seeds, st.sampled_from([0.2, 1.0, 3.0]), st.sampled_from([1.0, 0.9, 0.5]))
def test_regmean_matches_least_squares(shape, seed, s, alpha):
    b, tt, i, a, d = random_case(*shape, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x_t = torch.randn(shape[1], 3 * shape[1], generator=g, dtype=F64)
    x_i = torch.randn(shape[1], 2 * shape[1], generator=g, dtype=F64) + 0.5
    g_t, g_i = x_t @ x_t.T / x_t.shape[1], x_i @ x_i.T / x_i.shape[1]
    got = bl.regmean(b, tt, i, s, gram_t=g_t.float(), gram_i=g_i.float(), alpha=alpha)
    want = np_regmean(tt.numpy(), i.numpy(), g_t.float().double().numpy(), g_i.float().double().numpy(), s, alpha)
    close(got, want, 1e-8)


# ---------------------------------------------------------------- AIM


def test_aim_hand():
    # a = (1, 2, 4) → a / max = (.25, .5, 1); ω = 0.4 → ρ = 1 − (a/max)(0.6) = (.85, .7, .4).
    # A = [1, 1, 1], D = [2, 0, −2], s = 0.5: A + sD = [2, 1, 0] → base anchor B + [1.7, 0.7, 0];
    # target anchor T + sD ρ = T + [0.85, 0, −0.4].
    b, tt, i = triple([[1.0, 1.0, 1.0]], [[2.0, 0.0, -2.0]], base=[[10.0, 10.0, 10.0]])
    act = t([1.0, 2.0, 4.0])
    close(bl.aim(b, tt, i, 0.5, activations=act), [[11.7, 10.7, 10.0]])
    close(bl.aim(b, tt, i, 0.5, activations=act, anchor="target"), [[11.85, 11.0, 10.6]])
    close(bl.aim(b, tt, i, 0.0, activations=act, anchor="target"), tt)
    close(bl.aim(b, tt, i, 0.5, activations=act, omega=1.0), tt + 0.5 * (i - b))


def test_magnitudes_hand():
    # diag(G) = (4, 9, 0) → (2, 3, 0); off-diagonals are ignored
    close(bl.magnitudes(t([[4.0, 1.0, 0.0], [1.0, 9.0, 0.0], [0.0, 0.0, 0.0]])), [2.0, 3.0, 0.0])


@SETTINGS
@given(shapes, seeds, scales, st.sampled_from([0.0, 0.4, 1.0]), st.sampled_from(["base", "target"]))
def test_aim_matches_loop(shape, seed, s, omega, anchor):
    b, tt, i, a, d = random_case(*shape, seed)
    act = np.abs(np.random.default_rng(seed).normal(size=shape[1]))
    want = np.empty_like(a)
    for j in range(shape[1]):
        rho = 1 - act[j] / act.max() * (1 - omega)
        if anchor == "base":
            want[:, j] = b.numpy()[:, j] + rho * (a[:, j] + s * d[:, j])
        else:
            want[:, j] = tt.numpy()[:, j] + rho * s * d[:, j]
    close(bl.aim(b, tt, i, s, activations=torch.from_numpy(act), omega=omega, anchor=anchor), want, 1e-12)


# ---------------------------------------------------------------- properties


def _stats(family: str, n: int) -> dict:
    if family == "RegMean":
        return {"gram_t": torch.eye(n) * 2 + 0.1, "gram_i": torch.eye(n) + 0.3}
    if family == "AIM":
        return {"activations": torch.arange(1.0, n + 1)}
    return {}


@pytest.mark.parametrize("family", sorted(bl.FAMILIES))
def test_one_dimensional_tensors_take_task_arithmetic(family):
    g = torch.Generator().manual_seed(5)
    b, a, d = (torch.randn(7, generator=g) for _ in range(3))
    out = bl.FAMILIES[family](b, b + a, b + d, 0.6)
    assert torch.equal(out, bl.task_arithmetic(b, b + a, b + d, 0.6))
    close(out, (b + a).double() + 0.6 * d.double(), 1e-6)


@pytest.mark.parametrize("family", sorted(bl.FAMILIES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_shape_and_dtype_preserved(family, dtype):
    g = torch.Generator().manual_seed(2)
    b = torch.randn(5, 3, generator=g).to(dtype)
    tt = (b.float() + 0.1 * torch.randn(5, 3, generator=g)).to(dtype)
    i = (b.float() + 0.1 * torch.randn(5, 3, generator=g)).to(dtype)
    out = bl.FAMILIES[family](b, tt, i, 0.8, **_stats(family, 3))
    assert out.shape == tt.shape and out.dtype == dtype and bool(torch.isfinite(out).all())


@pytest.mark.parametrize(
    "family,knobs",
    [("WUDI", {}), ("DOP", {}), ("RegMean", {}), ("AIM", {"anchor": "target"}), ("TSV-M", {})],
)
def test_scale_zero_gives_the_target(family, knobs):
    # TSV-M: only where rank A ≤ k/2 (its kept half); here A has rank 2 in a 6 × 5 weight
    g = torch.Generator().manual_seed(4)
    b = torch.randn(6, 5, generator=g, dtype=F64)
    a = torch.randn(6, 2, generator=g, dtype=F64) @ torch.randn(2, 5, generator=g, dtype=F64)
    i = b + torch.randn(6, 5, generator=g, dtype=F64)
    close(bl.FAMILIES[family](b, b + a, i, 0.0, **_stats(family, 5), **knobs), b + a, 1e-10)


def test_undrifted_layer_stays_put_and_donor_only_layer_is_task_arithmetic():
    g = torch.Generator().manual_seed(6)
    b = torch.randn(4, 3, generator=g, dtype=F64)
    d = torch.randn(4, 3, generator=g, dtype=F64)
    for family in bl.FAMILIES:
        close(bl.FAMILIES[family](b, b, b, 0.7, **_stats(family, 3)), b, 1e-12)
    for family in ("WUDI", "DOP"):
        close(bl.FAMILIES[family](b, b, b + d, 0.7), b + 0.7 * d, 1e-10)


@pytest.mark.parametrize("family", ["WUDI", "TSV-M", "Iso-C", "Iso-CTS", "DOP"])
def test_orthogonal_equivariance(family):
    # f(Q_L A Q_R, Q_L D Q_R) = Q_L f(A, D) Q_R for every data-free family
    b, tt, i, a, d = random_case(6, 4, 11)
    g = torch.Generator().manual_seed(12)
    ql = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))[0]
    qr = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))[0]
    a, d = torch.from_numpy(a), torch.from_numpy(d)
    z = torch.zeros(6, 4, dtype=F64)
    f = bl.FAMILIES[family]
    close(f(z, ql @ a @ qr, ql @ d @ qr, 0.6), ql @ f(z, a, d, 0.6) @ qr, 1e-9)


# ---------------------------------------------------------------- registry and errors


def _model(seed: int, shift: float = 0.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g) + shift,
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g) + shift,
        "model.layers.0.mlp.down_proj.weight": torch.randn(4, 6, generator=g) + shift,
        "model.layers.0.input_layernorm.weight": torch.randn(4, generator=g) + shift,
    }


def test_apply_routes_every_tensor():
    base, target, donor = _model(0), _model(1), _model(2)
    q = "model.layers.0.self_attn.q_proj.weight"
    for family, fn in bl.FAMILIES.items():
        out = bl.apply(family, base, target, donor, 0.5)
        assert set(out) == set(target)
        norm = "model.layers.0.input_layernorm.weight"
        assert torch.equal(out[norm], bl.task_arithmetic(base[norm], target[norm], donor[norm], 0.5))
        if family not in bl.DATA_AWARE:
            assert torch.equal(out[q], fn(base[q], target[q], donor[q], 0.5))
    out = bl.apply("Iso-C", base, target, donor, 0.5, exclude=("embed",), alpha=1.5)
    e = "model.embed_tokens.weight"
    assert torch.equal(out[e], bl.task_arithmetic(base[e], target[e], donor[e], 0.5))
    assert torch.equal(out[q], bl.iso_c(base[q], target[q], donor[q], 0.5, alpha=1.5))


def test_apply_data_aware_statistics():
    base, target, donor = _model(0), _model(1), _model(2)
    q, down, e = (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.embed_tokens.weight",
    )
    grams = {q: (torch.eye(4) * 3 + 0.5, torch.eye(4) + 0.2), e: (torch.eye(4), torch.eye(4))}
    out = bl.apply("RegMean", base, target, donor, 0.5, grams=grams, alpha=0.8)
    want = bl.regmean(base[q], target[q], donor[q], 0.5, gram_t=grams[q][0], gram_i=grams[q][1], alpha=0.8)
    assert torch.equal(out[q], want)
    for name in (down, e):  # no Gram / an embedding: task arithmetic
        assert torch.equal(out[name], bl.task_arithmetic(base[name], target[name], donor[name], 0.5))
    out = bl.apply("AIM", base, target, donor, 0.5, grams=grams)
    want = bl.aim(base[q], target[q], donor[q], 0.5, activations=bl.magnitudes(grams[q][0]))
    assert torch.equal(out[q], want)
    assert not torch.equal(want, bl.task_arithmetic(base[q], target[q], donor[q], 0.5))
    act = torch.arange(1.0, 7.0)
    out = bl.apply("AIM", base, target, donor, 0.5, grams=grams, activations={down: act}, omega=0.2)
    assert torch.equal(out[down], bl.aim(base[down], target[down], donor[down], 0.5, activations=act, omega=0.2))


def test_errors_are_one_line_and_name_the_culprit():
    base, target, donor = _model(0), _model(1), _model(2)
    q = "model.layers.0.self_attn.q_proj.weight"
    b, tt, i = base[q], target[q], donor[q]
    no_q = {k: v for k, v in donor.items() if k != q}
    nan = torch.full((4, 4), math.nan)

    def run(family, scale=1.0, sd=donor, **kw):
        return lambda: bl.apply(family, base, target, sd, scale, **kw)

    cases = [
        (run("TSV"), "unknown baseline family 'TSV'"),
        (run("WUDI", sd=no_q), f"{q} is missing from the donor"),
        (run("WUDI", -1.0), "donor scale"),
        (run("DOP", energy=1.5), "DOP on model.embed_tokens.weight: energy must be in [0, 1], got 1.5"),
        (run("RegMean", grams={q: (torch.eye(3), torch.eye(3))}), f"RegMean on {q}: target Gram has shape (3, 3)"),
        (run("AIM", activations={q: torch.ones(3)}), f"AIM on {q}: activations have shape (3,)"),
        (run("AIM", activations={q: -torch.ones(4)}), "finite and ≥ 0"),
        (lambda: bl.aim(b, tt, i, 1.0, activations=torch.ones(4), anchor="donor"), "anchor must be one of"),
        (lambda: bl.iso_cts(b, tt, i, 1.0, common=2.0), "common must be in [0, 1]"),
        (lambda: bl.iso_c(b, tt, i, 1.0, rtol=-1.0), "rtol must be None or in [0, 1)"),
        (lambda: bl.wudi(b, tt, i[:2], 1.0), "shapes differ"),
        (lambda: bl.regmean(b, tt, i, 1.0, gram_t=torch.eye(4), gram_i=nan), "donor Gram has non-finite"),
    ]
    for call, text in cases:
        with pytest.raises(SigmoidDiffError) as info:
            call()
        message = str(info.value)
        assert text in message and "\n" not in message, message
