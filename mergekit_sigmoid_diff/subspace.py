"""Protect the target's drift subspace: remove it from the donor's diff (pure torch).

For one 2-D weight with base B, target T and donor I (m × n, ``out = W x``):

    A  = T − B                      the target's drift
    D  = I − B                      the donor's diff
    A  = U Σ Vᵀ                     thin SVD, σ_1 ≥ σ_2 ≥ …
    r  = min { k : σ_1² + … + σ_k² ≥ e · ‖A‖²_F }        e = ``energy`` ∈ [0, 1]
    U_r, V_r = the first r columns of U and V

    side="input"    D' = D − (D V_r) V_rᵀ           removes the input directions the drift reads
    side="output"   D' = D − U_r (U_rᵀ D)           removes the output directions it writes
    side="both"     D' = (I − U_r U_rᵀ) D (I − V_r V_rᵀ)

and the merge is out = T + w · D' (the projection is linear, so Σ_j w_j D_j can be
projected once). e = 0 or A = 0 gives an empty basis (D' = D); e = 1 keeps every direction
with a non-negligible singular value (σ > max(m, n) · eps(dtype) · σ_1), i.e. full numerical
rank. Each call of :func:`drift_basis` returns a :class:`Basis`: the orthonormal factors the
side needs, r, and ``covered`` = (σ_1² + … + σ_r²) / ‖A‖²_F, the share actually covered
(≥ e). :func:`project_out_` applies the projection in place; :func:`project_out_share_`
also returns the share of ‖D‖²_F it removed, computed from the small products
(‖D V_r‖² etc., exact for orthonormal factors), and :func:`removed_share` computes that
share without changing D.

Finding the basis. ‖A‖²_F is known (a float64 sum of the rows' squared norms), so the
captured energy of any candidate subspace says whether it is large enough. Small matrices
(min(m, n) ≤ ``EXACT_MAX_DIM`` = 256) use ``torch.linalg.svd`` (a 512 × 1536 SVD took
195 ms on one thread, the sketch below 34 ms: hence 256, no longer 512). Larger ones use a seeded
randomized range finder with power iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4
and 5.1): Ω ~ N(0, 1)^{n×l} from a ``torch.Generator`` on the tensor's device (seed
``DEFAULT_SEED``, so reruns are byte-identical on the same device, library and thread
count, and ``--cuda`` runs stay on the GPU), Q = orth((A Aᵀ)^q A Ω) with a QR after every
product (q = 2: one power iteration fewer failed the tests' 1e-3 bound where the spectrum
has a gap, 5e-3), then the singular values and vectors of the small l × n matrix B = Qᵀ A
from the float64 eigendecomposition of the l × l matrix B Bᵀ (2 ms against 17–21 ms for
the SVD of B at l = 80, n = 4096). Its singular values lower-bound
the true ones (σ_j(QᵀA) ≤ σ_j(A)), so the rank picked from them is ≥ the exact r and the
covered share, Σ_{j≤r} σ_j(QᵀA)², is what the returned basis really captures (exactly
for U_r: ‖U_rᵀ A‖² ; a lower bound of ‖A V_r‖² for V_r). Adaptive rank: start with
l = ``INITIAL_RANK`` + ``OVERSAMPLE`` columns; while the top l − ``OVERSAMPLE`` do not
cover e · ‖A‖², grow l to max(2l, the rank the tail predicts: deficit / σ_l² more
directions × 1.5) and sketch again; once l would exceed min(m, n) / ``GRAM_SHARE`` (3), the
eigendecomposition of the Gram matrix A Aᵀ of the smaller side is cheaper and is used
instead (:func:`_gram`: the exact factors up to the Gram matrix's rounding; on a
1536 × 4096 float32 drift, 1 thread, machine shared: 6.2 s against 35 s for
``torch.linalg.svd``, which it replaces there). Measured alternatives not taken: the Gram
matrix from the start (4096 × 1536 power-law drift: 0.27 s for AᵀA plus 0.43–0.71 s for
``eigh``, against 0.19 s for the whole sketch); one power iteration (4 products instead
of 6: 1.3× faster, but the tests' gap case fails); block Krylov [AΩ, AAᵀAΩ] (no more
accurate at the same cost on that drift).

Accuracy and speed, measured (``python scripts/subspace_sweep.py --speed``, table in
docs/quality/subspace-sweep.md): one 4096 × 14336 float32 drift, e = 0.5, 1 CPU thread,
donor diff D = an independent drift; "err" = ‖D'_rand − D'_exact‖_F / ‖D‖_F, "err/removed"
the same over ‖D − D'_exact‖_F:

    drift                                r (exact)     covered error  err    err/removed  basis s (exact SVD s)
    steep: rank 256, σ_j ∝ j^−0.7 + noise     8 (8)       −7e−7          2e−6   7e−5          1.1 (91)
    spread: rank 1024, σ_j ∝ j^−0.35 + noise  321 (317)   −3e−4          0.04   0.26         15.7 (94)
    pure Gaussian noise (worst case)          1262 (1209) +9e−5          0.14   0.48         50.4 (87)

("+ noise": Gaussian noise holding 30 % of ‖A‖²; project_out_ took 0.3 / 1.2 / 4.0 s
on the input side, twice that for "both". This table predates the Gram-matrix fallback:
pure noise now takes that path, whose rank and subspace are the exact ones up to rounding
— on a 4096 × 1536 noise drift rank 417 = exact 417, where the sketch gave 434 — and its
time is in docs/performance.md.)

The covered share always meets the target and matches the exact one to < 1e-3; the
subspace itself matches the exact one where the spectrum decays (steep), while where it
is nearly flat at the cut (spread, noise) a two-power-iteration sketch
swaps some of the last directions for others of almost the same energy, so the projection
differs by a quarter to a half of the removed part. Use ``exact=True`` when that matters.
The tests hold the exact path to a float64 oracle within 1e-10 (float64) / 1e-4 (float32)
and the randomized path within 1e-3 where the spectrum has a gap at the cut.

Threads: the matrix products run on the caller's torch threads, the QRs and the small
eigendecompositions on one (:func:`mergekit_sigmoid_diff.threads.single_threaded`). Measured
on a 4096 × 1536 power-law drift, e = 0.5, 2 cores: the basis took 71 ms with the products on
2 threads against 115 ms all on one, quiet, and 182 against 173 ms beside a 512 × 512 matmul
loop on torch's default threads: a few large products per tensor do not stall the way
thousands of small element-wise regions did. The QRs on 2 threads saved ~3 % quiet and were
no faster under that load (noisy), so they keep one thread.

Related: Task Singular Vectors (TSV-Merge, Gargiulo et al., CVPR 2025) and Iso-C/Iso-CTS
(Marczak et al. 2025, arXiv:2502.04959) also merge through the SVD of per-layer task
matrices; here the SVD only decides which of the donor's directions to drop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from mergekit_sigmoid_diff.threads import single_threaded

__all__ = [
    "DEFAULT_SEED",
    "EXACT_MAX_DIM",
    "GRAM_SHARE",
    "INITIAL_RANK",
    "OVERSAMPLE",
    "POWER_ITERATIONS",
    "SIDES",
    "Basis",
    "Side",
    "drift_basis",
    "project_out_",
    "project_out_share_",
    "removed_share",
    "squared_norm",
]

Side = Literal["input", "output", "both"]
SIDES: tuple[str, ...] = ("input", "output", "both")

DEFAULT_SEED = 20240611
EXACT_MAX_DIM = 256  # min(m, n) at or below this: plain torch.linalg.svd
INITIAL_RANK = 64
OVERSAMPLE = 16
POWER_ITERATIONS = 2
# A sketch wider than min(m, n) / GRAM_SHARE costs more than the Gram matrix's eigh (measured
# on a 1536 × 4096 float32 drift, 1 thread, machine shared: sketch l = 400: 4.4 s; a aᵀ +
# eigh + V: 6.2 s; l ≈ 700, which pure noise at e = 0.5 asks for: ~11 s; full SVD: 35 s).
GRAM_SHARE = 3


@dataclass(frozen=True)
class Basis:
    """Orthonormal factors of a drift's top-r singular subspace.

    ``u`` (m × r) is set for side "output"/"both", ``v`` (n × r) for "input"/"both"
    (zero-width when r = 0). ``covered`` is the share of ‖A‖²_F the top r singular values
    hold; ``exact`` says whether a full SVD produced it (else the randomized sketch).
    """

    u: Optional[Tensor]
    v: Optional[Tensor]
    rank: int
    covered: float
    exact: bool = True


def squared_norm(x: Tensor, chunk: int = 1 << 20) -> float:
    """‖x‖²_F, summed in float64 over the rows' float32 (or float64) norms: one reduction,
    no copy (5 ms on a 4096 × 1536 float32 matrix, 1 thread; a float64 copy a chunk of rows at
    a time took 22 ms). Rows' norms are sums of at most n squares with torch's pairwise
    summation, relative error ~1e-7 in float32. NaN or Inf (or a row norm that overflows
    float32) is re-checked the slow exact way, so only a truly non-finite x returns inf/nan."""
    if x.numel() == 0:
        return 0.0
    flat = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
    rows = torch.linalg.vector_norm(flat, dim=1)
    total = float(rows.double().square_().sum())
    if math.isfinite(total):
        return total
    step = max(1, chunk // max(1, flat.shape[1]))
    return sum(float(flat[i : i + step].double().square().sum()) for i in range(0, flat.shape[0], step))


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")


def _pick_rank(energies: Tensor, total: float, energy: float) -> Optional[int]:
    """Smallest k with energies[:k].sum() ≥ energy · total (``energies``: σ² in float64,
    descending), or None if they fall short or energy = 1 (never reached by a sketch)."""
    if energy >= 1.0:
        return None
    cum = torch.cumsum(energies, 0)
    hit = torch.nonzero(cum >= energy * total)
    if hit.numel() == 0:
        return None
    return int(hit[0, 0]) + 1


def _numerical_rank(s: Tensor, shape: tuple[int, int]) -> int:
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = max(shape) * torch.finfo(s.dtype).eps * float(s[0])
    return int((s > tol).sum())


def _empty(m: int, n: int, side: str, like: Tensor) -> Basis:
    u = like.new_zeros((m, 0)) if side in ("output", "both") else None
    v = like.new_zeros((n, 0)) if side in ("input", "both") else None
    return Basis(u, v, 0, 0.0, True)


def _make(u: Tensor, s2: Tensor, vh: Tensor, r: int, total: float, side: str, exact: bool) -> Basis:
    covered = float(s2[:r].sum()) / total if r else 0.0
    keep_u = side in ("output", "both")
    keep_v = side in ("input", "both")
    return Basis(
        u[:, :r].contiguous() if keep_u else None,
        vh[:r].T.contiguous() if keep_v else None,
        r,
        min(covered, 1.0),
        exact,
    )


def _exact(a: Tensor, total: float, energy: float, side: str) -> Basis:
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    s2 = s.double() ** 2
    if energy >= 1.0:
        r = _numerical_rank(s, tuple(a.shape))
    else:
        # normalise by Σσ² so that rounding between it and the sum of squares cannot
        # leave the target unreachable
        r = _pick_rank(s2, float(s2.sum()), energy) or s.numel()
    return _make(u, s2, vh, r, float(s2.sum()) if s2.numel() else total, side, True)


def _sketch(a: Tensor, l: int, q: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Randomized range finder of ``a`` (m ≤ n): (Q, B = Qᵀ a, the eigenvalues σ_j² of B Bᵀ
    in float64, descending, and its eigenvectors W, float64).

    The small l × l Gram B Bᵀ = W Σ² Wᵀ is formed and diagonalised in float64 instead of an
    SVD of the l × n matrix B: the same σ and left factors, ~2 ms instead of 17–21 ms at
    l = 80, n = 4096 (1 CPU thread); :func:`_from_sketch` builds only the r factors needed.
    """
    omega = torch.randn(a.shape[1], l, generator=gen, device=a.device, dtype=a.dtype)
    y = a @ omega
    del omega
    qm = _orth(y)
    for _ in range(q):
        z = _orth(_t_times(a, qm))
        qm = _orth(a @ z)
        del z
    b = _t_times(a, qm).T  # l × n
    b64 = b.double()
    with single_threaded(a.device.type == "cpu"):
        w, vecs = torch.linalg.eigh(b64 @ b64.T)
    return qm, b64, w.flip(0).clamp_min_(0.0), vecs.flip(1)


def _t_times(a: Tensor, x: Tensor) -> Tensor:
    """aᵀ x, in the layout MKL multiplies fastest: (xᵀ a)ᵀ when ``a`` is row-major (a 1536 × 4096
    float32 ``a``, 80 columns: 9.4 ms against 11.4 ms on 2 threads, 15.8 against 22.9 on one),
    else aᵀ x directly (``a`` a transposed view: 7.3 ms; (xᵀ a)ᵀ 10.0 ms)."""
    return (x.T @ a).T if a.is_contiguous() else a.T @ x


def _orth(y: Tensor) -> Tensor:
    """Q of the thin QR of ``y`` (tall, l columns), on one thread on CPU: Householder QR is
    many small parallel regions, and a second thread saved only ~3 % of the projection's time
    on an idle machine (see the module docstring); the products around it use the caller's."""
    with single_threaded(y.device.type == "cpu"):
        return torch.linalg.qr(y)[0]


def _from_sketch(qm: Tensor, b64: Tensor, s2: Tensor, vecs: Tensor, r: int, total: float, side: str) -> Basis:
    """The rank-r :class:`Basis` of a sketch: U_r = Q W_r, V_r = Bᵀ W_r Σ_r⁻¹ (float64, then
    the input's dtype: orthonormal to rounding, since W is)."""
    covered = float(s2[:r].sum()) / total if r else 0.0
    wr = vecs[:, :r]
    u = (qm @ wr.to(qm.dtype)).contiguous() if side in ("output", "both") else None
    v = None
    if side in ("input", "both"):
        v = (b64.T @ wr).div_(s2[:r].sqrt()).to(qm.dtype).contiguous()
    return Basis(u, v, r, min(covered, 1.0), False)


def drift_basis(
    drift: Tensor,
    energy: float,
    side: Side,
    *,
    seed: int = DEFAULT_SEED,
    exact: bool = False,
    total: Optional[float] = None,
) -> Basis:
    """The top-r singular subspace of ``drift`` covering ≥ ``energy`` of ‖drift‖²_F.

    ``drift`` is a 2-D floating tensor (the caller upcasts bf16/fp16 to float32); the
    factors come back in its dtype and on its device. ``exact=True`` always uses the full
    SVD (slow at 8B size). ``total``: ‖drift‖²_F if the caller already has it
    (:func:`squared_norm`). See the module docstring.
    """
    _check_side(side)
    if drift.dim() != 2:
        raise ValueError(f"drift must be 2-D, got shape {tuple(drift.shape)}")
    if not drift.is_floating_point() or drift.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(f"drift must be float32 or float64 (upcast first), got {drift.dtype}")
    energy = float(energy)
    if not 0.0 <= energy <= 1.0:  # also rejects NaN
        raise ValueError(f"energy must be in [0, 1], got {energy}")
    m, n = drift.shape
    total = squared_norm(drift) if total is None else float(total)
    if not math.isfinite(total):
        raise ValueError("drift has non-finite values")
    if energy == 0.0 or total == 0.0 or min(m, n) == 0:
        return _empty(m, n, side, drift)

    # work on the wide orientation (m ≤ n): the sketch and its QRs are then the smaller side
    flip = m > n
    a = drift.T if flip else drift
    small = min(m, n)
    flip_side = {"input": "output", "output": "input", "both": "both"}[side] if flip else side

    def oriented(basis: Basis) -> Basis:
        if not flip:
            return basis
        return Basis(basis.v, basis.u, basis.rank, basis.covered, basis.exact)

    if exact or small <= EXACT_MAX_DIM or energy >= 1.0:
        return oriented(_exact(a, total, energy, flip_side))

    gen = torch.Generator(device=drift.device)
    gen.manual_seed(seed)
    k = INITIAL_RANK
    while (k + OVERSAMPLE) * GRAM_SHARE <= small:
        l = k + OVERSAMPLE
        qm, b64, s2, vecs = _sketch(a, l, POWER_ITERATIONS, gen)
        r = _pick_rank(s2[:k], total, energy)
        if r is not None and float(s2[r - 1]) > 0:
            return oriented(_from_sketch(qm, b64, s2, vecs, r, total, flip_side))
        # not enough: each further direction holds at most ~σ_k², so at least deficit / σ_k²
        # more are needed (a lower bound; 1.5× it allows for the decay); at least double
        deficit = energy * total - float(s2[:k].sum())
        tail = float(s2[k - 1])
        predicted = k + math.ceil(1.5 * deficit / tail) if tail > 0 else 2 * k
        k = max(2 * k, predicted)
        del qm, b64, s2, vecs
    return oriented(_gram(a, energy, flip_side))


def _gram(a: Tensor, energy: float, side: str) -> Basis:
    """The basis from the eigendecomposition of the small Gram matrix a aᵀ (m × m, m ≤ n).

    Used once an adaptive sketch would exceed min(m, n) / ``GRAM_SHARE`` columns (a flat
    spectrum, e.g. pure-noise drift): on one CPU thread a 1536 × 4096 float32 drift took 0.27–0.39 s for
    a aᵀ plus 0.43–0.71 s for ``eigh`` against 6.3 s for ``torch.linalg.svd``. The factors
    are the exact ones up to the Gram matrix's rounding (eigenvalues σ² to ~1e-7 · σ_1² in
    float32: the cut is far above that unless ``energy`` is within ~1e-6 of 1, which takes
    the SVD path). U_r = the top eigenvectors; V_r = orth(aᵀ U_r) (the same span as
    aᵀ U_r Σ_r⁻¹, re-orthonormalised against rounding).
    """
    w, vecs = torch.linalg.eigh(a @ a.T)
    s2 = w.double().flip(0).clamp_min_(0.0)
    r = _pick_rank(s2, float(s2.sum()), energy) or s2.numel()
    ur = vecs.flip(1)[:, :r]
    covered = float(s2[:r].sum() / s2.sum()) if r else 0.0
    u = ur.contiguous() if side in ("output", "both") else None
    v = _orth(a.T @ ur).contiguous() if side in ("input", "both") else None
    return Basis(u, v, r, min(covered, 1.0), False)


def _factor(t: Optional[Tensor], like: Tensor, name: str) -> Tensor:
    if t is None:
        raise ValueError(f"basis has no {name!r} factor for this side (built for another side?)")
    return t.to(device=like.device, dtype=like.dtype)


def _apply(diff: Tensor, basis: Basis, side: Side, in_place: bool, measure: bool = True) -> tuple[Tensor, float]:
    """(projected diff, removed ‖·‖² in float64; 0 unless ``measure``)."""
    _check_side(side)
    if diff.dim() != 2:
        raise ValueError(f"diff must be 2-D, got shape {tuple(diff.shape)}")
    removed = 0.0
    if basis.rank == 0:
        return diff, 0.0
    out = diff if in_place else None
    if side in ("output", "both"):
        u = _factor(basis.u, diff, "u")
        if u.shape[0] != diff.shape[0]:
            raise ValueError(f"basis u has {u.shape[0]} rows, diff has {diff.shape[0]}")
        p = u.T @ (diff if out is None else out)  # r × n
        if measure:
            removed += float(p.double().square().sum())
        if out is None:
            out = torch.addmm(diff, u, p, alpha=-1)
        else:
            out.addmm_(u, p, alpha=-1)
        del p
    if side in ("input", "both"):
        v = _factor(basis.v, diff, "v")
        if v.shape[0] != diff.shape[1]:
            raise ValueError(f"basis v has {v.shape[0]} rows, diff has {diff.shape[1]} columns")
        src = diff if out is None else out
        p = src @ v  # m × r
        if measure:
            removed += float(p.double().square().sum())
        if out is None:
            out = torch.addmm(diff, p, v.T, alpha=-1)
        else:
            out.addmm_(p, v.T, alpha=-1)
        del p
    return out, removed


def project_out_share_(diff: Tensor, basis: Basis, side: Side) -> tuple[Tensor, float]:
    """:func:`project_out_`, plus the share of ‖diff‖²_F it removed (0 if diff = 0)."""
    before = squared_norm(diff)
    out, removed = _apply(diff, basis, side, in_place=True)
    return out, (min(removed / before, 1.0) if before > 0 else 0.0)


def project_out_(diff: Tensor, basis: Basis, side: Side) -> Tensor:
    """Remove ``basis``'s subspace from ``diff`` (m × n) in place and return it.

    Memory: one r × n (output side) or m × r (input side) product beyond ``diff``; the
    update is an in-place ``addmm_``. ``diff`` should be float32/float64: the factors are
    cast to its dtype.
    """
    return _apply(diff, basis, side, in_place=True, measure=False)[0]


def removed_share(diff: Tensor, basis: Basis, side: Side) -> float:
    """The share of ‖diff‖²_F that :func:`project_out_` would remove; ``diff`` is unchanged.

    Input/output side: ‖D V‖² / ‖D‖² or ‖Uᵀ D‖² / ‖D‖² (no m × n temporary). Both: one
    m × n temporary (the output-side projection), then the input side on it.
    """
    _check_side(side)
    before = squared_norm(diff)
    if before == 0.0 or basis.rank == 0:
        return 0.0
    if side == "both":
        _, removed = _apply(diff, basis, side, in_place=False)
    elif side == "output":
        removed = float((_factor(basis.u, diff, "u").T @ diff).double().square().sum())
    else:
        removed = float((diff @ _factor(basis.v, diff, "v")).double().square().sum())
    return min(removed / before, 1.0)
