"""Comparison baselines for the real-weight suite: the 2025 data-free merges and two data-aware anchors.

Setting (issues 24 and 26): base B, target T, donor I, same shapes; A = T − B is the target's
drift, D = I − B the donor's diff. Every family maps (B, T, I, s, knobs) to the merged tensor, in
T's dtype and on T's device (the math runs in float64). s ≥ 0 is the donor scale that sweeps the
family along its own curve; what it does differs per family (below). Where a method is not
defined, it falls back to task arithmetic T + s·D: tensors that are not 2-D (norms), and for the
data-aware families a weight without statistics. Names in the formulas: ``out = W x`` for a
weight W of shape (m, n) = (out, in); SVD M = U Σ Vᵀ, σ_1 ≥ σ_2 ≥ …; k = min(m, n).

Families (``FAMILIES``; ``rtol``: see "Rank" below):

- ``WUDI`` (Cheng et al., ICML 2025, arXiv 2503.08099). τ minimises
  Σ_i c_i ‖(τ − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F over τ_T = A, τ_I = s·D with c_T = 1, c_I = s (or the
  fixed ``donor_weight``). Setting the gradient to zero gives the closed form
  τ = (Σ_i c_i τ_i P_i)(Σ_i c_i P_i)⁺, P_i = τ_iᵀτ_i / ‖τ_i‖²_F (a zero τ_i drops out: its term
  vanishes), out = B + τ. The paper runs 300 Adam steps (lr 1e-5) from Σ_i τ_i, which need not
  reach this minimiser; gradient descent from there stays in the rows' span, where the
  minimum-norm solution above is its fixed point. Its LLM code skips ``lm_head`` (tied to the
  embedding in SmolLM2, so absent here); every other 2-D tensor, the embedding included, is merged.
  s: s = 1 is the paper's merge of (A, D). c_I = s makes s = 0 give T exactly; the paper's
  1/‖τ_i‖² weights make a task vector's pull independent of its scale, so with a fixed
  ``donor_weight`` c the s → 0 limit is A P_A (P_A + c P_D)⁺ (A's response shrunk on the
  inputs D's rows share), not T.
  Even with c_I = s, where A's and D's constraints can both be met (low-rank drifts), s → 0⁺
  keeps T's drift re-fitted to send D's input directions to zero (a jump at s = 0). Where only
  the donor drifted, out = T + s·D.
- ``TSV-M`` (Gargiulo et al., CVPR 2025, arXiv 2412.00081). Per task τ_i ∈ {A, s·D}: the top
  ⌊k/2⌋ singular triplets (1/n of the spectrum, n = 2 tasks); concatenate
  U = [U_A | U_D], Σ = diag(σ_A, σ_D), Vᵀ = [V_Aᵀ ; V_Dᵀ]; decorrelate each factor by its polar
  factor (Procrustes: X = P S Qᵀ → P Qᵀ); out = B + α · polar(U) Σ polar(Vᵀ), α = 1 (the
  paper's default). s: s = 0 gives B + A truncated to rank ⌊k/2⌋ (= T when rank A ≤ k/2, as for
  LoRA drifts); for s > 0 the decorrelation rotates A's kept directions away from D's, whatever
  s is, so s → 0⁺ does not return to T.
- ``Iso-C`` (Marczak et al., ICML 2025, arXiv 2502.04959). M = A + s·D = U Σ Vᵀ; every singular
  value replaced by their mean σ̄ (the paper's convention: the mean, so ‖·‖_F shrinks to
  σ̄·√k ≤ ‖M‖_F); out = B + α · σ̄ U Vᵀ, α = 1 (the paper's default; it tunes α). s: the donor's
  share of the sum; s = 0 gives B + α · (A with its spectrum flattened), not T.
- ``Iso-CTS`` (same paper). Common subspace: the top k_c singular triplets of A + s·D,
  k_c = ⌊f k⌋ (f = ``common``, default 0.8), then k_c raised so that the rest splits evenly,
  p = round((k − k_c)/2) per task, k_c = k − 2p. Task-specific: for each τ_i, the top p
  triplets of τ_i − U_c U_cᵀ τ_i. Concatenate the common and task triplets, decorrelate U and Vᵀ
  by their polar factors, flatten all singular values to their mean σ̄:
  out = B + α · σ̄ polar(U) polar(Vᵀ). s: as Iso-C (s = 0: A's own triplets, flattened).
- ``DOP`` (after DOP, "Continual Model Merging without Data: Dual Projections for Balancing
  Stability and Plasticity", NeurIPS 2025, and OPCM, Tang et al. 2025, arXiv 2501.09522). U_r, V_r = the top-r singular
  vectors of A, r = min{r : σ_1² + … + σ_r² ≥ e ‖A‖²_F} (e = ``energy``, default 0.5);
  out = T + (1 − U_r U_rᵀ) s·D (1 − V_r V_rᵀ). This is the hard limit of DOP's stability term
  (DOP penalises ‖Σ_r U_rᵀ ΔW‖² + ‖ΔW V_r Σ_r‖² for the earlier model, balanced against the new
  one by an MGDA-weighted Adam run, and cuts r where Σσ, not Σσ², reaches its ε); OPCM
  removes only the U_rᵀ·V_r block (and the diagonal) of the new task vector in the old one's
  singular basis, then rescales by task-vector norms. The projection is the plugin's
  ``protect_subspace: both`` (:mod:`mergekit_sigmoid_diff.subspace`, used here with an exact
  SVD). s: scales the projected diff; s = 0 gives T.
- ``RegMean`` (Jin et al., ICLR 2023, arXiv 2212.09849), on T and I with input Grams G_T, G_I
  (G = X Xᵀ / n, (in, in)). Off-diagonals shrunk: G̃ = α G + (1 − α) diag(G), α = ``alpha``
  (default 0.9). W* = (W_T G̃_T + s W_I G̃_I)(G̃_T + s G̃_I)⁻¹, evaluated as
  W* = T + s (I − T) G̃_I (G̃_T + s G̃_I)⁺ (the same where the sum is invertible; a pseudo-inverse
  leaves T's columns on inputs neither model uses). s: the weight of the donor's Gram (the share
  of its data in the regression); s = 0 gives T exactly, s = 1 is the paper's RegMean, s → ∞
  tends to I on the donor's inputs.
- ``AIM`` (Nobari et al., arXiv 2502.02421), on top of task arithmetic. Per input channel j,
  importance a_j / max a (a = input activation magnitudes), relaxation
  ρ_j = 1 − (a_j / max a)(1 − ω), ω = ``omega`` (default 0.4, the authors' CLI default).
  ``anchor="base"`` (the paper: relax a merge's update toward the base):
  out = B + (A + s·D) ρ (columns scaled); s = 0 gives B + A ρ, not T (unless ω = 1).
  ``anchor="target"`` (the transfer reading: relax only the donor's update toward T):
  out = T + s·D ρ; s = 0 gives T. Deviations: a_j is the root mean square sqrt(G_jj) (what a
  Gram's diagonal holds; :func:`magnitudes`) where the paper's code uses the mean |x_j|; the
  paper measures the base on a task-agnostic set, the suite passes whichever statistics it
  chooses; the paper also relaxes norm weights, which fall back here (no statistics for them).

Rank (``rtol``, TSV-M / Iso-C / Iso-CTS). The papers take every one of the k singular
triplets. When a matrix is rank-deficient (a LoRA drift: rank 8 plus float32 rounding noise)
the extra triplets are rounding noise, yet flattening gives them the weight σ̄ (Iso) and
decorrelation lets them rotate the real ones (TSV-M). ``rtol=None`` (default) follows the
papers; ``rtol=x`` keeps only σ_j > x · σ_1 of each decomposed matrix (the mean is then over
the kept ones). Either way a task vector that is exactly zero (s = 0, or an undrifted layer)
is left out: its singular vectors are undefined.

Fallbacks and exclusions: tensors that are not 2-D take T + s·D in every family; RegMean and
AIM also take it for weights without statistics, and (as in their papers' code, which merges
only linear layers / skips ``embed``) for names containing ``embed``. :func:`apply` can route
more names to task arithmetic with ``exclude``.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.subspace import drift_basis, project_out_

WORK = torch.float64
PINV_RTOL = 1e-10  # WUDI's pseudo-inverse: eigenvalues below this share of the largest count as 0
EMBEDDING_MARK = "embed"  # RegMean and AIM skip these names (their papers' code: linear layers only)


# ---------------------------------------------------------------- shared pieces


def _check_scale(scale: float) -> float:
    s = float(scale)
    if not (math.isfinite(s) and s >= 0.0):
        raise SigmoidDiffError(f"donor scale must be a finite number ≥ 0, got {scale!r}")
    return s


def _check_unit(name: str, value: float) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        raise SigmoidDiffError(f"{name} must be in [0, 1], got {value!r}")
    return v


def _check_rtol(rtol: Optional[float]) -> Optional[float]:
    if rtol is not None and not (math.isfinite(float(rtol)) and 0.0 <= float(rtol) < 1.0):
        raise SigmoidDiffError(f"rtol must be None or in [0, 1), got {rtol!r}")
    return rtol


def _diffs(base: Tensor, target: Tensor, donor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, A, D) in float64 on T's device, after checking the three shapes agree."""
    if not (base.shape == target.shape == donor.shape):
        raise SigmoidDiffError(
            f"base, target and donor shapes differ: {tuple(base.shape)}, {tuple(target.shape)}, {tuple(donor.shape)}"
        )
    b = base.to(device=target.device, dtype=WORK)
    return b, target.to(WORK) - b, donor.to(device=target.device, dtype=WORK) - b


def _out(merged: Tensor, target: Tensor) -> Tensor:
    return merged.to(dtype=target.dtype, device=target.device)


def task_arithmetic(base: Tensor, target: Tensor, donor: Tensor, scale: float) -> Tensor:
    """T + s·D: the fallback of every family (and the suite's reference curve)."""
    s = _check_scale(scale)
    b, a, d = _diffs(base, target, donor)
    return _out(b + a + s * d, target)


def _kept(sigma: Tensor, rtol: Optional[float]) -> int:
    """How many leading singular values count: all (the papers), or those > rtol · σ_1."""
    if sigma.numel() == 0 or float(sigma[0]) == 0.0:
        return 0
    if rtol is None:
        return sigma.numel()
    return int((sigma > rtol * sigma[0]).sum())


def svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD (U, σ, Vᵀ). torch's CPU SVD is LAPACK's divide-and-conquer ``gesdd``, which can
    fail to converge on matrices with nearly repeated singular values (it did in Iso-CTS on two
    real cases); there the SVD is taken again by LAPACK's QR-iteration ``gesvd`` (scipy), slower
    but the standard remedy. Raises torch's LinAlgError only if both fail."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError as first:
        import numpy as np
        import scipy.linalg

        try:
            found = scipy.linalg.svd(x.detach().cpu().numpy(), full_matrices=False, lapack_driver="gesvd")
        except np.linalg.LinAlgError:
            raise first from None
        u, sigma, vh = (torch.from_numpy(m).to(device=x.device, dtype=x.dtype) for m in found)
        return u, sigma, vh


def _polar(x: Tensor) -> Tensor:
    """The orthonormal polar factor P Qᵀ of x = P S Qᵀ (Procrustes: the nearest orthonormal)."""
    p, _, qh = svd(x)
    return p @ qh


def _top(x: Tensor, count: int, rtol: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """The top min(count, kept) singular triplets (U, σ, Vᵀ) of x; none if x is exactly zero."""
    if count <= 0 or not bool(x.any()):
        return x.new_zeros(x.shape[0], 0), x.new_zeros(0), x.new_zeros(0, x.shape[1])
    u, sigma, vh = svd(x)
    r = min(count, _kept(sigma, rtol))
    return u[:, :r], sigma[:r], vh[:r]


def _decorrelated(parts: list[tuple[Tensor, Tensor, Tensor]], like: Tensor, flat: bool) -> Tensor:
    """polar(U) diag(σ) polar(Vᵀ) of the concatenated triplets; σ → mean σ if ``flat``."""
    u = torch.cat([p[0] for p in parts], dim=1)
    sigma = torch.cat([p[1] for p in parts])
    vh = torch.cat([p[2] for p in parts], dim=0)
    if sigma.numel() == 0:
        return torch.zeros_like(like)
    if flat:
        sigma = torch.full_like(sigma, float(sigma.mean()))
    return _polar(u) @ torch.diag(sigma) @ _polar(vh)


# ---------------------------------------------------------------- data-free families


def wudi(
    base: Tensor, target: Tensor, donor: Tensor, scale: float, *, donor_weight: Optional[float] = None
) -> Tensor:
    """WUDI's closed form with τ_T = A, τ_I = s·D, weights c_T = 1, c_I = s (or ``donor_weight``).

    τ = (Σ c_i τ_i P_i)(Σ c_i P_i)⁺, P_i = τ_iᵀ τ_i / ‖τ_i‖²_F; out = B + τ (module docstring)."""
    s = _check_scale(scale)
    if target.dim() != 2:
        return task_arithmetic(base, target, donor, s)
    c = s if donor_weight is None else _check_scale(donor_weight)
    b, a, d = _diffs(base, target, donor)
    numerator = torch.zeros_like(a)
    gram = a.new_zeros(a.shape[1], a.shape[1])
    for weight, tau in ((1.0, a), (c, s * d)):
        norm2 = float(tau.square().sum())
        if weight == 0.0 or norm2 == 0.0:
            continue  # a zero task vector's term is identically zero
        p = (tau.T @ tau) * (weight / norm2)
        gram += p
        numerator += tau @ p
    if bool(numerator.any()):
        numerator = numerator @ torch.linalg.pinv(gram, rtol=PINV_RTOL, hermitian=True)
    return _out(b + numerator, target)


def tsv_m(
    base: Tensor, target: Tensor, donor: Tensor, scale: float, *, alpha: float = 1.0, rtol: Optional[float] = None
) -> Tensor:
    """TSV-M: each task's top ⌊k/2⌋ triplets, concatenated, U and Vᵀ decorrelated by their polar
    factors; out = B + α · polar(U) Σ polar(Vᵀ)."""
    s = _check_scale(scale)
    if target.dim() != 2:
        return task_arithmetic(base, target, donor, s)
    rtol = _check_rtol(rtol)
    b, a, d = _diffs(base, target, donor)
    share = min(a.shape) // 2
    parts = [_top(tau, share, rtol) for tau in (a, s * d)]
    return _out(b + float(alpha) * _decorrelated(parts, a, flat=False), target)


def iso_c(
    base: Tensor, target: Tensor, donor: Tensor, scale: float, *, alpha: float = 1.0, rtol: Optional[float] = None
) -> Tensor:
    """Iso-C: A + s·D with every singular value set to their mean; out = B + α · σ̄ U Vᵀ."""
    s = _check_scale(scale)
    if target.dim() != 2:
        return task_arithmetic(base, target, donor, s)
    rtol = _check_rtol(rtol)
    b, a, d = _diffs(base, target, donor)
    u, sigma, vh = _top(a + s * d, min(a.shape), rtol)
    merged = float(sigma.mean()) * (u @ vh) if sigma.numel() else torch.zeros_like(a)
    return _out(b + float(alpha) * merged, target)


def common_split(k: int, common: float, tasks: int = 2) -> tuple[int, int]:
    """Iso-CTS's (k_c common directions, p per task): k_c = ⌊common · k⌋, p = round((k − k_c)/tasks)
    (Python's round, as the reference code; capped at k // tasks), then k_c = k − tasks · p."""
    p = min(round((k - int(k * common)) / tasks), k // tasks)
    return k - tasks * p, p


def iso_cts(
    base: Tensor,
    target: Tensor,
    donor: Tensor,
    scale: float,
    *,
    alpha: float = 1.0,
    common: float = 0.8,
    rtol: Optional[float] = None,
) -> Tensor:
    """Iso-CTS: the common subspace of A + s·D plus each task's own residual directions,
    decorrelated and flattened; out = B + α · σ̄ polar(U) polar(Vᵀ)."""
    s = _check_scale(scale)
    if target.dim() != 2:
        return task_arithmetic(base, target, donor, s)
    common = _check_unit("common", common)
    rtol = _check_rtol(rtol)
    b, a, d = _diffs(base, target, donor)
    k_common, per_task = common_split(min(a.shape), common)
    shared = _top(a + s * d, k_common, rtol)
    uc = shared[0]
    parts = [_top(tau - uc @ (uc.T @ tau), per_task, rtol) for tau in (a, s * d)]
    return _out(b + float(alpha) * _decorrelated(parts + [shared], a, flat=True), target)


def dop(base: Tensor, target: Tensor, donor: Tensor, scale: float, *, energy: float = 0.5) -> Tensor:
    """DOP-style dual projection: out = T + (1 − U_r U_rᵀ) s·D (1 − V_r V_rᵀ), U_r, V_r covering
    ≥ ``energy`` of ‖A‖²_F (the plugin's ``protect_subspace: both``, exact SVD)."""
    s = _check_scale(scale)
    if target.dim() != 2:
        return task_arithmetic(base, target, donor, s)
    energy = _check_unit("energy", energy)
    b, a, d = _diffs(base, target, donor)
    kept = project_out_(s * d, drift_basis(a, energy, "both", exact=True), "both")
    return _out(b + a + kept, target)


# ---------------------------------------------------------------- data-aware anchors


def shrink(gram: Tensor, alpha: float) -> Tensor:
    """RegMean's G̃ = α G + (1 − α) diag(G): off-diagonals scaled by α, the diagonal kept."""
    g = gram.to(WORK)
    return alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g))


def _times_inverse(rhs: Tensor, sym: Tensor) -> Tensor:
    """rhs · sym⁻¹ for a symmetric PSD ``sym``: Cholesky when it is definite, else the
    pseudo-inverse (inputs neither Gram sees then keep rhs's zero)."""
    factor, info = torch.linalg.cholesky_ex(sym)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, factor).T
    return rhs @ torch.linalg.pinv(sym, hermitian=True)


def _check_gram(gram: Tensor, n: int, which: str) -> None:
    if gram.shape != (n, n):
        raise SigmoidDiffError(f"{which} has shape {tuple(gram.shape)}, the weight's input needs ({n}, {n})")
    if not bool(torch.isfinite(gram).all()):
        raise SigmoidDiffError(f"{which} has non-finite values")


def regmean(
    base: Tensor,
    target: Tensor,
    donor: Tensor,
    scale: float,
    *,
    gram_t: Optional[Tensor] = None,
    gram_i: Optional[Tensor] = None,
    alpha: float = 0.9,
) -> Tensor:
    """RegMean of T and I, the donor's Gram weighted by s:
    out = T + s (I − T) G̃_I (G̃_T + s G̃_I)⁺; task arithmetic without both Grams."""
    s = _check_scale(scale)
    if target.dim() != 2 or gram_t is None or gram_i is None:
        return task_arithmetic(base, target, donor, s)
    alpha = _check_unit("alpha", alpha)
    n = target.shape[1]
    _check_gram(gram_t, n, "target Gram")
    _check_gram(gram_i, n, "donor Gram")
    b, a, d = _diffs(base, target, donor)
    gt = shrink(gram_t.to(a.device), alpha)
    gi = shrink(gram_i.to(a.device), alpha)
    delta = _times_inverse(s * (d - a) @ gi, gt + s * gi)
    return _out(b + a + delta, target)


def magnitudes(gram: Tensor) -> Tensor:
    """Per input channel activation magnitude from a Gram: sqrt(G_jj), the root mean square."""
    return torch.diagonal(gram.to(WORK)).clamp_min(0.0).sqrt()


ANCHORS = ("base", "target")


def aim(
    base: Tensor,
    target: Tensor,
    donor: Tensor,
    scale: float,
    *,
    activations: Optional[Tensor] = None,
    omega: float = 0.4,
    anchor: str = "base",
) -> Tensor:
    """AIM on task arithmetic: columns of the update relaxed by ρ_j = 1 − (a_j / max a)(1 − ω);
    anchor "base": B + (A + s·D) ρ; "target": T + s·D ρ; task arithmetic without activations."""
    s = _check_scale(scale)
    if target.dim() != 2 or activations is None:
        return task_arithmetic(base, target, donor, s)
    omega = _check_unit("omega", omega)
    if anchor not in ANCHORS:
        raise SigmoidDiffError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
    n = target.shape[1]
    act = activations.to(device=target.device, dtype=WORK)
    if act.shape != (n,):
        raise SigmoidDiffError(f"activations have shape {tuple(act.shape)}, the weight's input needs ({n},)")
    if not bool(torch.isfinite(act).all()) or bool((act < 0).any()):
        raise SigmoidDiffError("activations must be finite and ≥ 0")
    b, a, d = _diffs(base, target, donor)
    peak = float(act.max()) if n else 0.0
    relax = 1.0 - (act / peak if peak > 0 else torch.zeros_like(act)) * (1.0 - omega)
    if anchor == "base":
        return _out(b + (a + s * d) * relax, target)
    return _out(b + a + s * d * relax, target)


# ---------------------------------------------------------------- registry

FAMILIES: dict[str, Callable[..., Tensor]] = {
    "WUDI": wudi,
    "TSV-M": tsv_m,
    "Iso-C": iso_c,
    "Iso-CTS": iso_cts,
    "DOP": dop,
    "RegMean": regmean,
    "AIM": aim,
}
DATA_AWARE = frozenset({"RegMean", "AIM"})


def _statistics(
    family: str,
    name: str,
    grams: Optional[Mapping[str, tuple[Tensor, Tensor]]],
    activations: Optional[Mapping[str, Tensor]],
) -> dict[str, Tensor]:
    """The keyword arguments a data-aware family takes for ``name`` (none: task arithmetic)."""
    if family not in DATA_AWARE or EMBEDDING_MARK in name:
        return {}
    pair = (grams or {}).get(name)
    if family == "RegMean":
        return {} if pair is None else {"gram_t": pair[0], "gram_i": pair[1]}
    act = (activations or {}).get(name)
    if act is None and pair is not None:
        act = magnitudes(pair[0])
    return {} if act is None else {"activations": act}


def apply(
    family: str,
    base_sd: Mapping[str, Tensor],
    target_sd: Mapping[str, Tensor],
    donor_sd: Mapping[str, Tensor],
    scale: float,
    *,
    grams: Optional[Mapping[str, tuple[Tensor, Tensor]]] = None,
    activations: Optional[Mapping[str, Tensor]] = None,
    exclude: tuple[str, ...] = (),
    **knobs,
) -> dict[str, Tensor]:
    """Apply ``family`` to every tensor of ``target_sd`` (by name); returns a new state dict.

    ``grams``: weight name → (G_T, G_I), each (in, in), for RegMean (AIM uses sqrt(diag G_T) of
    it when ``activations`` has no entry for the name). ``activations``: weight name → (in,)
    magnitudes for AIM. A weight without them takes task arithmetic, as does any name containing
    one of ``exclude``'s substrings. ``knobs`` go to the family's function.
    """
    if family not in FAMILIES:
        raise SigmoidDiffError(f"unknown baseline family {family!r}; known: {', '.join(FAMILIES)}")
    fn = FAMILIES[family]
    out = {}
    for name, t in target_sd.items():
        for which, sd in (("base", base_sd), ("donor", donor_sd)):
            if name not in sd:
                raise SigmoidDiffError(f"{family}: tensor {name} is missing from the {which} state dict")
        try:
            if any(part in name for part in exclude):
                out[name] = task_arithmetic(base_sd[name], t, donor_sd[name], scale)
            else:
                extra = _statistics(family, name, grams, activations)
                out[name] = fn(base_sd[name], t, donor_sd[name], scale, **extra, **knobs)
        except SigmoidDiffError as error:
            raise SigmoidDiffError(f"{family} on {name}: {error}") from error
    return out
