"""The data-aware solve (``protect_subspace: data``) on plain tensors: hand cases, a least-squares
oracle, its limits, the embedding form and the guard's survival."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_sigmoid_diff.datasolve import DataSettings, prepare, prepare_tokens, survival

# --- a 3 × 4 case worked out by hand -------------------------------------------------------
#
# G_T = [[1,1,0,0],[1,1,0,0],0,0]  (tr 2), G_I = diag(0, 1, 2, 0), β = 1, alpha = 2:
# α = alpha · tr(G_T) / in = 2 · 2 / 4 = 1, so
#   M = G_T + β G_I + α 1 = [[2,1,0,0],[1,3,0,0],[0,0,3,0],[0,0,0,1]]
#   upper block [[2,1],[1,3]]⁻¹ = (1/5) [[3,−1],[−1,2]]   (det 5)
#   β G_I + α 1 = diag(1, 2, 3, 1), so Δ = D (β G_I + α 1) M⁻¹ has, on the block,
#   (a, b) · (1/5) [[3,−1],[−2,4]] = ((3a − 2b)/5, (−a + 4b)/5), and columns 3, 4 unchanged
#   (3 · (1/3) = 1 and 1 · 1 = 1).
# Rows of D: (1, 2, 3, 4) → (−0.2, 1.4, 3, 4); (5, 0, −1, 2) → (3, −1, −1, 2); (0, 5, 1, 1) → (−2, 4, 1, 1).
# Survival with G_I: tr(Δ G_I Δᵀ) = Σ_rows (Δ₂² + 2 Δ₃²) = (1.96 + 18) + (1 + 2) + (16 + 2) = 40.96,
# tr(D G_I Dᵀ) = (4 + 18) + (0 + 2) + (25 + 2) = 51.

HAND_D = [[1.0, 2.0, 3.0, 4.0], [5.0, 0.0, -1.0, 2.0], [0.0, 5.0, 1.0, 1.0]]
HAND_GT = [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
HAND_GI = [[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
HAND_DELTA = [[-0.2, 1.4, 3.0, 4.0], [3.0, -1.0, -1.0, 2.0], [-2.0, 4.0, 1.0, 1.0]]
HAND_SURVIVAL = math.sqrt(40.96 / 51.0)


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_closed_form_on_the_hand_case():
    solve = prepare(t64(HAND_GT), t64(HAND_GI), DataSettings(beta=1.0, alpha=2.0))
    delta = solve.delta(t64(HAND_D))
    assert torch.allclose(delta, t64(HAND_DELTA), rtol=0, atol=1e-12)
    target = t64([[10.0, 0.0, 0.0, 0.0], [0.0, 10.0, 0.0, 0.0], [0.0, 0.0, 10.0, 0.0]])
    out = solve.apply(target, t64(HAND_D))
    assert torch.allclose(out, target + t64(HAND_DELTA), rtol=0, atol=1e-12)


def test_closed_form_in_float32_rounds_once_to_the_output_dtype():
    solve = prepare(t64(HAND_GT), t64(HAND_GI), DataSettings(beta=1.0, alpha=2.0))
    diff = torch.tensor(HAND_D, dtype=torch.float32)
    target = torch.full((3, 4), 0.5, dtype=torch.bfloat16)
    out = solve.apply(target, diff, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    want = (t64(HAND_DELTA) + 0.5).to(torch.bfloat16)
    assert torch.equal(out, want)


def test_survival_on_the_hand_case():
    delta = t64(HAND_DELTA)
    assert survival(t64(HAND_D), delta, t64(HAND_GI)) == pytest.approx(HAND_SURVIVAL, rel=1e-12)
    solve = prepare(t64(HAND_GT), t64(HAND_GI), DataSettings(beta=1.0, alpha=2.0))
    kept, total = solve.survival_terms(t64(HAND_D), solve.delta(t64(HAND_D)))
    assert (kept, total) == (pytest.approx(40.96, rel=1e-12), pytest.approx(51.0, rel=1e-12))


def test_survival_terms_on_sampled_rows_are_the_traces_over_those_rows():
    """The merge's guard estimates the traces on evenly spaced rows (first and last included)."""
    generator = torch.Generator().manual_seed(8)
    x_t = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    x_i = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    g_i = x_i @ x_i.T / 9
    solve = prepare(x_t @ x_t.T / 9, g_i, DataSettings())
    diff = torch.randn(300, 6, generator=generator, dtype=torch.float64)
    delta = solve.delta(diff)
    picked = [round(i * 299 / 6) for i in range(7)]  # 0, 50, 100, 150, 199, 249, 299
    want_kept = sum(float(delta[i] @ g_i @ delta[i]) for i in picked)
    want_total = sum(float(diff[i] @ g_i @ diff[i]) for i in picked)
    kept, total = solve.survival_terms(diff, delta, rows=7)
    assert (kept, total) == (pytest.approx(want_kept, rel=1e-12), pytest.approx(want_total, rel=1e-12))
    # as many rows as the tensor has, or more: the exact traces
    exact = solve.survival_terms(diff, delta)
    assert solve.survival_terms(diff, delta, rows=300) == exact
    assert exact[0] == pytest.approx(float(torch.einsum("ri,ij,rj->", delta, g_i, delta)), rel=1e-12)


def test_survival_is_none_when_the_diff_does_not_touch_the_donor_inputs():
    diff = t64([[1.0, 0.0, 0.0, 0.0]])  # only the first input, where G_I is 0
    assert survival(diff, diff, t64(HAND_GI)) is None


# --- an independent oracle: the three terms stacked, solved by least squares ---------------


def least_squares_delta(diff, x_t, x_i, beta, alpha_abs):
    """argmin_Δ ‖Δ X_T‖²/n_T + β ‖(Δ − D) X_I‖²/n_I + α ‖Δ − D‖², row by row as one stacked
    least-squares problem A Δᵀ ≈ B (float64, SVD-based ``gelsd``; no normal equations)."""
    n_t, n_i, dim = x_t.shape[1], x_i.shape[1], diff.shape[1]
    a = torch.cat([x_t.T / math.sqrt(n_t), math.sqrt(beta / n_i) * x_i.T, math.sqrt(alpha_abs) * torch.eye(dim, dtype=torch.float64)])
    b = torch.cat([torch.zeros(n_t, diff.shape[0], dtype=torch.float64), math.sqrt(beta / n_i) * (x_i.T @ diff.T), math.sqrt(alpha_abs) * diff.T])
    return torch.linalg.lstsq(a, b, driver="gelsd").solution.T


@pytest.mark.parametrize("beta, alpha", [(0.1, 0.01), (1.0, 0.01), (3.0, 0.5), (0.0, 0.2)])
@pytest.mark.parametrize("n_t", [5, 40])  # fewer tokens than inputs (G_T singular), and more
def test_closed_form_matches_the_least_squares_oracle(beta, alpha, n_t):
    generator = torch.Generator().manual_seed(n_t + int(100 * beta))
    dim, out, n_i = 12, 7, 9
    scale = torch.logspace(0, -2, dim, dtype=torch.float64)[:, None]  # an uneven spectrum
    x_t = torch.randn(dim, n_t, generator=generator, dtype=torch.float64) * scale
    x_i = torch.randn(dim, n_i, generator=generator, dtype=torch.float64)
    diff = torch.randn(out, dim, generator=generator, dtype=torch.float64)
    g_t, g_i = x_t @ x_t.T / n_t, x_i @ x_i.T / n_i
    alpha_abs = alpha * float((x_t**2).sum()) / n_t / dim  # alpha · tr(G_T) / in, from X directly
    want = least_squares_delta(diff, x_t, x_i, beta, alpha_abs)
    got = prepare(g_t, g_i, DataSettings(beta=beta, alpha=alpha)).delta(diff)
    assert (got - want).norm() <= 1e-9 * diff.norm()
    # float32 D (the kernel's compute dtype): P is cast once, the product in float32
    got32 = prepare(g_t, g_i, DataSettings(beta=beta, alpha=alpha)).delta(diff.float())
    assert got32.dtype == torch.float32
    assert (got32.double() - want).norm() <= 1e-5 * diff.norm()


def test_zero_target_gram_gives_the_diff_itself():
    g_i = t64(HAND_GI)
    diff = torch.tensor(HAND_D, dtype=torch.float32)
    solve = prepare(torch.zeros(4, 4), g_i, DataSettings())
    assert solve.projection is None and solve.delta(diff) is diff
    target = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert torch.equal(solve.apply(target, diff, torch.bfloat16), (diff + target.float()).to(torch.bfloat16))


# --- the hard limit: the null-space projection ----------------------------------------------


def null_space_projection(diff, x_t):
    """D (1 − Q Qᵀ), Q an orthonormal basis of the column space of X_T (QR; X_T has full column rank)."""
    q, _ = torch.linalg.qr(x_t)
    return diff - diff @ q @ q.T


def test_hard_limit_is_the_null_space_projection():
    generator = torch.Generator().manual_seed(3)
    dim, out, n_t = 10, 6, 3
    x_t = torch.randn(dim, n_t, generator=generator, dtype=torch.float64)
    g_t = x_t @ x_t.T / n_t
    g_i = torch.eye(dim, dtype=torch.float64)
    diff = torch.randn(out, dim, generator=generator, dtype=torch.float64)
    want = null_space_projection(diff, x_t)
    hard = prepare(g_t, g_i, DataSettings(hard=True)).delta(diff)
    assert (hard - want).norm() <= 1e-10 * diff.norm()
    # and it is the limit of the soft form with β = 0, α → 0
    soft = prepare(g_t, g_i, DataSettings(beta=0.0, alpha=1e-9)).delta(diff)
    assert (soft - want).norm() <= 1e-6 * diff.norm()
    exact_zero = prepare(g_t, g_i, DataSettings(beta=0.0, alpha=0.0)).delta(diff)  # the pseudo-inverse path
    assert (exact_zero - want).norm() <= 1e-10 * diff.norm()


def test_hard_limit_drops_rounding_level_eigenvalues():
    """A rank-2 Gram stored in float32 has eigenvalues of rounding size elsewhere: they are not
    part of the span (the documented tolerance λ_max · in · ε_float32)."""
    generator = torch.Generator().manual_seed(4)
    x_t = torch.randn(16, 2, generator=generator, dtype=torch.float64)
    stored = (x_t @ x_t.T / 2).float()  # as a statistics file holds it
    diff = torch.randn(5, 16, generator=generator, dtype=torch.float64)
    got = prepare(stored, torch.eye(16), DataSettings(hard=True)).delta(diff)
    assert (got - null_space_projection(diff, x_t)).norm() <= 1e-5 * diff.norm()


# --- embeddings: diagonal Grams from token counts --------------------------------------------
#
# counts T (3, 0, 1, 0) over 4 tokens → g_T = (0.75, 0, 0.25, 0); counts I (0, 2, 2, 0) over 4 →
# g_I = (0, 0.5, 0.5, 0); β = 1, alpha = 1: α = alpha · mean(g_T) = 0.25. Each row keeps
# (β g_I + α)/(g_T + β g_I + α): token 0: 0.25/1.0 = 0.25; token 1: 0.75/0.75 = 1;
# token 2: 0.75/1.0 = 0.75; token 3: 0.25/0.25 = 1.


def test_token_form_on_a_hand_case():
    solve = prepare_tokens(t64([3, 0, 1, 0]), 4, t64([0, 2, 2, 0]), 4, DataSettings(beta=1.0, alpha=1.0))
    diff = t64([[1.0, -2.0], [3.0, 4.0], [8.0, 0.0], [-1.0, 1.0]])
    want = t64([[0.25, -0.5], [3.0, 4.0], [6.0, 0.0], [-1.0, 1.0]])
    assert torch.allclose(solve.delta(diff), want, rtol=0, atol=1e-12)
    # survival: g_I-weighted row energies: kept 0.5·25 + 0.5·36 = 30.5, total 0.5·25 + 0.5·64 = 44.5
    assert survival(diff, solve.delta(diff), solve.donor_gram) == pytest.approx(math.sqrt(30.5 / 44.5), rel=1e-12)


def test_token_form_hard_zeroes_the_rows_of_the_tokens_the_target_uses():
    solve = prepare_tokens(t64([3, 0, 1, 0]), 4, t64([0, 2, 2, 0]), 4, DataSettings(hard=True))
    diff = torch.ones(4, 3)
    assert torch.equal(solve.delta(diff), torch.tensor([[0.0] * 3, [1.0] * 3, [0.0] * 3, [1.0] * 3]))


def test_token_form_normalises_each_file_by_its_own_total():
    """Counts ×10 with a total ×10 are the same statistics."""
    settings = DataSettings(beta=0.3, alpha=0.05)
    one = prepare_tokens(t64([3, 0, 1, 7]), 11, t64([0, 2, 2, 1]), 5, settings)
    ten = prepare_tokens(t64([30, 0, 10, 70]), 110, t64([0, 2, 2, 1]), 5, settings)
    assert torch.allclose(one.keep, ten.keep, rtol=1e-14, atol=0)


def test_token_form_is_the_dense_form_with_diagonal_grams():
    """An embedding row is the output for a one-hot input: in y = E x form (E = Wᵀ), the dense
    solve with diagonal Grams must scale W's rows exactly as the token form does."""
    generator = torch.Generator().manual_seed(5)
    counts_t = torch.randint(0, 6, (9,), generator=generator).double()
    counts_i = torch.randint(0, 6, (9,), generator=generator).double()
    diff = torch.randn(9, 4, generator=generator, dtype=torch.float64)  # (vocab, hidden)
    settings = DataSettings(beta=0.7, alpha=0.3)
    tokens = prepare_tokens(counts_t, 40, counts_i, 25, settings).delta(diff)
    dense = prepare(torch.diag(counts_t / 40), torch.diag(counts_i / 25), settings).delta(diff.T).T
    assert torch.allclose(tokens, dense, rtol=0, atol=1e-12)


def test_token_form_with_no_target_counts_is_the_diff_itself():
    diff = torch.randn(4, 3)
    solve = prepare_tokens(torch.zeros(4), 10, t64([0, 2, 2, 0]), 4, DataSettings())
    assert solve.delta(diff) is diff


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("beta", -0.1), ("alpha", math.nan), ("alpha", math.inf), ("beta", "1")])
def test_settings_refuse_bad_values_naming_the_parameter(field, value):
    with pytest.raises(ValueError, match=rf"^data_{field}="):
        DataSettings(**{field: value})


def test_settings_read_the_data_parameters_only():
    settings = DataSettings.from_parameters({"data_beta": 0.5, "data_hard": True, "beta": 9.0, "steepness": 3.0})
    assert settings == DataSettings(beta=0.5, alpha=DataSettings().alpha, hard=True)
