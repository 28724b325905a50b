"""The Gram-matrix path of mergekit_sigmoid_diff.subspace (``_gram``, taken once an adaptive
sketch would be wider than min(m, n) / GRAM_SHARE): held to the float64 SVD oracle of
test_subspace.py (an explicit full SVD and explicit projectors, not the code under test)."""

from __future__ import annotations

import pytest
import torch

from mergekit_sigmoid_diff import subspace as S
from tests.test_subspace import lowrank_drift, oracle, rel


@pytest.fixture
def gram_after_one_round(monkeypatch):
    """Small matrices on the sketch path whose first round cannot cover the energy."""
    monkeypatch.setattr(S, "EXACT_MAX_DIM", 8)
    monkeypatch.setattr(S, "INITIAL_RANK", 4)
    monkeypatch.setattr(S, "OVERSAMPLE", 4)


@pytest.mark.parametrize("side", S.SIDES)
@pytest.mark.parametrize("energy", [0.5, 0.9])
@pytest.mark.parametrize("shape", [(60, 150), (150, 60)])
def test_flat_spectrum_takes_the_gram_path_and_matches_the_oracle(side, energy, shape, gram_after_one_round):
    g = torch.Generator().manual_seed(21)
    a = torch.randn(*shape, generator=g)  # pure noise: the first round of 8 columns falls far short
    d = lowrank_drift(*shape, 20, 0.3, seed=22)
    calls = []
    real = S._gram
    S._gram = lambda *args: calls.append(args) or real(*args)
    try:
        basis = S.drift_basis(a, energy, side)
    finally:
        S._gram = real
    assert len(calls) == 1 and not basis.exact
    want, r, covered = oracle(a, d, energy, side)
    assert basis.rank == r
    assert basis.covered == pytest.approx(covered, abs=1e-5)
    assert rel(S.project_out_(d.clone(), basis, side), want, d) < 1e-4
    for f in (basis.u, basis.v):
        if f is not None:
            torch.testing.assert_close(f.T @ f, torch.eye(r), atol=1e-5, rtol=0)


def test_float64_gram_path_is_within_1e_10(gram_after_one_round):
    g = torch.Generator().manual_seed(23)
    a = torch.randn(50, 120, generator=g, dtype=torch.float64)
    d = torch.randn(50, 120, generator=g, dtype=torch.float64)
    basis = S.drift_basis(a, 0.5, "both")
    want, r, covered = oracle(a, d, 0.5, "both")
    assert basis.rank == r and basis.covered == pytest.approx(covered, abs=1e-10)
    assert rel(S.project_out_(d.clone(), basis, "both"), want, d) < 1e-10


def test_given_total_is_used_and_squared_norm_is_the_float64_sum(gram_after_one_round):
    a = lowrank_drift(70, 90, 40, 0.05, seed=24)  # a decaying spectrum: the first round suffices
    exact = float(a.double().square().sum())
    assert S.squared_norm(a) == pytest.approx(exact, rel=1e-6)
    assert S.squared_norm(torch.full((3, 4), float("inf"))) == float("inf")
    assert S.squared_norm(torch.full((3, 4), 1e30)) == pytest.approx(12e60)  # float32 row norms overflow: exact fallback
    total = S.squared_norm(a)
    default, given = S.drift_basis(a, 0.6, "input"), S.drift_basis(a, 0.6, "input", total=total)
    assert not given.exact and (default.rank, default.covered) == (given.rank, given.covered)
    # a smaller total asks for fewer directions: proof that the given one is used
    assert S.drift_basis(a, 0.6, "input", total=0.5 * total).rank < given.rank
