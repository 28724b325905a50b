"""``protect_subspace: data``: the donor's diff, kept off what the target's own text uses (torch only).

For one linear weight W (out × in, ``y = W x``) with base B, target T and one donor I
(weight w), let D = w (I − B) and let G_T, G_I (in × in) be the uncentred second moments
G = X Xᵀ / n of the weight's inputs: X_T when T reads its own text (its domain), X_I when I
reads the donor's chats. The change Δ added to T minimises

    ‖Δ X_T‖² / n_T + β ‖(Δ − D) X_I‖² / n_I + α ‖Δ − D‖²_F

(leave T's outputs on its text alone; give the donor's change on the donor's inputs; stay near
task arithmetic where the data say nothing). Setting the gradient to zero,
Δ (G_T + β G_I + α 1) = D (β G_I + α 1), so

    Δ = D (β G_I + α 1)(G_T + β G_I + α 1)⁻¹ = D − D P,   P = G_T (G_T + β G_I + α 1)⁻¹

and ``out = T + Δ``. The weights enter through D only, so P is computed once per input
(:func:`prepare`) and applied to any D (:meth:`Prepared.apply`): q/k/v share one, and a
sweep over w reuses it. References: RegMean (arXiv 2212.09849) merges linear layers through
the same input Grams; AlphaEdit (arXiv 2410.02355) is the null-space limit below; issue 26.

Settings (:class:`DataSettings`, recipe parameters ``data_beta``, ``data_alpha``, ``data_hard``):

- α is relative: α = ``alpha`` · tr(G_T) / in, the mean eigenvalue of G_T times ``alpha``, so
  one value fits every layer whatever its activation scale.
- Limits. G_T = 0 (no statistics of T's text): Δ = D exactly, task arithmetic bit for bit
  (no product is computed). ``hard``: β = 0, α → 0, i.e. D projected off the span of G_T,
  Δ = D (1 − V Vᵀ) with V the eigenvectors of G_T whose eigenvalue exceeds
  λ_max · in · ε_float32 (:func:`numerical_tolerance`: the Grams are stored in float32, so
  smaller eigenvalues are rounding; numpy's ``matrix_rank`` rule). A full-rank G_T (more
  tokens than inputs, the usual case) leaves nothing of D: the hard limit suits little data.
  α = 0 without ``hard`` takes the same α → 0 limit of the soft form (pseudo-inverse of
  G_T + β G_I on eigenvalues above that tolerance).
- Embeddings (weight (vocab, hidden), one-hot inputs): G is diagonal, g = counts / n per file
  (each file normalised by its own token total), and P is too: each token's row of D is scaled
  by (β g_I + α) / (g_T + β g_I + α), α = ``alpha`` · mean(g_T) (= ``alpha`` / vocab, the counts summing to n); a token
  neither text uses keeps its row. ``hard``: the rows of the tokens T's text uses are zeroed
  (the diagonal is exact: no tolerance).

Arithmetic: the solve in float64 (Cholesky of G_T + β G_I + α 1, then ``cholesky_solve``,
no explicit inverse; the eigendecomposition only for ``hard`` and α = 0), on one CPU thread
(:mod:`mergekit_sigmoid_diff.threads`: a factorisation's many steps stall beside other
processes). D and Δ = D − D P (one ``addmm``, on the caller's threads) in the kernel's compute
dtype (float32, float64 if an input is float64), P cast to it once; ``out = T + Δ`` is rounded
once to the output dtype, exactly as the plain diff is. Cost per input of width d read by
tensors of ``out`` rows in all: d³/3 + 2 d³ float64 flops for the solve, 2 · out · d² flops in
the compute dtype for the products (SmolLM2-135M: 30 layers × (3 inputs of 576 + one of 1536),
about 300 G float64 and 170 G float32 flops).

The guard (:func:`survival`): the share of the donor's own effect on its own inputs that
survives, sqrt(tr(Δ G_I Δᵀ) / tr(D G_I Dᵀ)) = ‖Δ X_I‖ / ‖D X_I‖. It falls when G_T and G_I
overlap, e.g. when T's statistics came from chat text instead of its domain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

import torch

from mergekit_sigmoid_diff import gate_rules
from mergekit_sigmoid_diff.threads import single_threaded

# DataSettings field -> its recipe parameter (the rules of gate_rules are keyed by the latter)
PARAMETER_PREFIX = "data_"


@dataclass(frozen=True)
class DataSettings:
    """The knobs of the data-aware solve; each field is the recipe parameter ``data_<field>``.

    - ``beta``: β ≥ 0, the weight of the donor's change on the donor's inputs (β ‖(Δ − D) X_I‖²).
    - ``alpha``: ≥ 0, the pull towards task arithmetic, relative: α = alpha · tr(G_T) / in
      (embeddings: alpha · mean(g_T)).
    - ``hard``: true takes the null-space limit instead (β = 0, α → 0): D projected off the
      span of T's inputs.
    """

    beta: float = 0.1
    alpha: float = 0.01
    hard: bool = False

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            reason = gate_rules.problem(PARAMETER_PREFIX + item.name, value)
            if reason is not None:
                raise ValueError(f"{PARAMETER_PREFIX}{item.name}={value!r}: {reason}")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> "DataSettings":
        """The settings among resolved recipe parameters (``data_beta`` → ``beta``, ...)."""
        found = {f.name: parameters[PARAMETER_PREFIX + f.name] for f in fields(cls) if PARAMETER_PREFIX + f.name in parameters}
        return cls(**found)


def numerical_tolerance(largest: float, dim: int) -> float:
    """Eigenvalues at or below this are taken as zero: λ_max · dim · ε_float32."""
    return largest * dim * torch.finfo(torch.float32).eps


@dataclass(frozen=True, eq=False)
class Prepared:
    """The solve for one input, ready for any D (:func:`prepare` / :func:`prepare_tokens`).

    - ``projection``: P (in × in), float64; None for an embedding or when G_T = 0.
    - ``keep``: an embedding's 1 − diag P (vocab,), float64: the factor each token's row of D
      keeps; None for a dense weight or when G_T = 0.
    - ``donor_gram``: G_I, float64 ((in, in), or an embedding's (vocab,) diagonal), for
      :meth:`survival_terms`.

    Both None: G_T = 0, Δ = D. Each is cast to D's dtype and device once, on first use.
    """

    projection: Optional[torch.Tensor]
    keep: Optional[torch.Tensor]
    donor_gram: torch.Tensor
    _casts: dict = field(default_factory=dict, repr=False)

    def _as(self, name: str, like: torch.Tensor) -> torch.Tensor:
        key = (name, like.device, like.dtype)
        if key not in self._casts:
            with single_threaded(like.device.type == "cpu"):
                self._casts[key] = getattr(self, name).to(like.device, like.dtype)
        return self._casts[key]

    def delta(self, diff: torch.Tensor) -> torch.Tensor:
        """Δ for D = ``diff`` (compute dtype): a new tensor in D's dtype, or D itself when G_T = 0.
        Dense: D − D P in one product (``addmm``)."""
        if self.projection is not None:
            return torch.addmm(diff, diff, self._as("projection", diff), alpha=-1)
        if self.keep is not None:
            with single_threaded(diff.device.type == "cpu"):
                return diff * self._as("keep", diff).unsqueeze(1)
        return diff

    def apply(self, target: torch.Tensor, diff: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``T + Δ`` in D's dtype, rounded once to ``out_dtype`` (default: D's dtype)."""
        return self.apply_delta(target, self.delta(diff), out_dtype)

    @staticmethod
    def apply_delta(target: torch.Tensor, delta: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``T + Δ`` for a Δ from :meth:`delta` (the same arithmetic as :meth:`apply`)."""
        with single_threaded(delta.device.type == "cpu"):
            out = delta.add(target) if delta.dtype == target.dtype else delta.add(target.to(delta.dtype))
            return out if out_dtype is None or out_dtype == out.dtype else out.to(out_dtype)

    def survival_terms(self, diff: torch.Tensor, delta: torch.Tensor, rows: Optional[int] = None) -> tuple[float, float]:
        """(tr(Δ G_I Δᵀ), tr(D G_I Dᵀ)): what :func:`survival` divides, as floats (summed per layer).

        ``rows``: for a dense weight with more output rows, both traces over that many evenly
        spaced rows only (:func:`sampled_rows`): an estimate of the ratio at 2 · rows · in²
        multiply-adds instead of 2 · out · in² (a dense weight's traces are sums over its rows)."""
        gram = self._as("donor_gram", diff)
        if rows is None or gram.dim() == 1 or diff.shape[0] <= rows:
            return _quadratic(delta, gram), _quadratic(diff, gram)
        with single_threaded(diff.device.type == "cpu"):  # small products: no thread regions
            index = sampled_rows(diff.shape[0], rows).to(diff.device)
            return _quadratic(delta.index_select(0, index), gram), _quadratic(diff.index_select(0, index), gram)


def sampled_rows(count: int, rows: int) -> torch.Tensor:
    """``rows`` evenly spaced row indices out of ``count``, the first and the last included."""
    return torch.linspace(0, count - 1, rows, dtype=torch.float64).round().long()


def _quadratic(x: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(x G xᵀ) for a dense G acting on x's columns (one product, then one dot product),
    Σ_t g_t ‖x_t‖² for a diagonal one acting on its rows."""
    g = gram.to(x.device, x.dtype)
    if gram.dim() == 1:
        with single_threaded(x.device.type == "cpu"):
            rows = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64) ** 2
            return float(rows @ g.to(torch.float64))
    product = x @ g
    with single_threaded(x.device.type == "cpu"):
        return float(torch.dot(product.reshape(-1), x.reshape(-1)))


def survival(diff: torch.Tensor, delta: torch.Tensor, donor_gram: torch.Tensor) -> Optional[float]:
    """sqrt(tr(Δ G_I Δᵀ) / tr(D G_I Dᵀ)) (None when the donor's diff has no effect on its inputs).

    ``donor_gram``: G_I (in × in) acting on the columns of D (out × in); or, for an embedding
    (D of shape (vocab, hidden)), the (vocab,) diagonal g_I acting on its rows."""
    kept, total = _quadratic(delta, donor_gram), _quadratic(diff, donor_gram)
    return math.sqrt(max(kept, 0.0) / total) if total > 0 else None


def prepare(target_gram: torch.Tensor, donor_gram: torch.Tensor, settings: DataSettings = DataSettings()) -> Prepared:
    """P = G_T (G_T + β G_I + α 1)⁻¹ (or the ``hard`` projector) for dense (in, in) Grams.

    Float64 on the Grams' device, on one CPU thread (a factorisation's many small steps stall
    beside other processes: see :mod:`mergekit_sigmoid_diff.threads`). G_T = 0 gives
    ``projection=None`` (Δ = D exactly). The Grams are symmetric up to their float32 rounding;
    the factorisations read their lower triangle."""
    with single_threaded(target_gram.device.type == "cpu"):
        return _prepare(target_gram, donor_gram, settings)


def _prepare(target_gram: torch.Tensor, donor_gram: torch.Tensor, settings: DataSettings) -> Prepared:
    g_t = target_gram.to(torch.float64)
    g_i = donor_gram.to(torch.float64)
    dim = g_t.shape[0]
    if g_t.shape != (dim, dim) or g_i.shape != (dim, dim):
        raise ValueError(f"Grams of shape {tuple(g_t.shape)} and {tuple(g_i.shape)}: expected two (d, d)")
    if not torch.any(g_t):
        return Prepared(None, None, g_i)
    if settings.hard:
        return Prepared(_span_projector(g_t), None, g_i)
    alpha = settings.alpha * float(torch.trace(g_t)) / dim
    system = torch.add(g_t, g_i, alpha=settings.beta)
    if alpha > 0:
        system.diagonal().add_(alpha)
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) == 0:
            # system symmetric: system⁻¹ G_T = (G_T system⁻¹)ᵀ = Pᵀ
            return Prepared(torch.cholesky_solve(g_t, factor).T.contiguous(), None, g_i)
    return Prepared(g_t @ _pseudo_inverse(system), None, g_i)


def _span_projector(gram: torch.Tensor) -> torch.Tensor:
    """V Vᵀ over the eigenvectors of ``gram`` above :func:`numerical_tolerance`."""
    values, vectors = torch.linalg.eigh(gram)  # reads the lower triangle
    kept = vectors[:, values > numerical_tolerance(float(values[-1]), gram.shape[0])]
    return kept @ kept.T


def _pseudo_inverse(system: torch.Tensor) -> torch.Tensor:
    """The symmetric PSD ``system``'s inverse on eigenvalues above :func:`numerical_tolerance`."""
    values, vectors = torch.linalg.eigh(system)
    keep = values > numerical_tolerance(float(values[-1]), system.shape[0])
    kept = vectors[:, keep]
    return (kept / values[keep]) @ kept.T


def prepare_tokens(
    target_counts: torch.Tensor,
    target_total: int,
    donor_counts: torch.Tensor,
    donor_total: int,
    settings: DataSettings = DataSettings(),
) -> Prepared:
    """The embedding form: g = counts / total per file, each token's row of D kept by
    s = (β g_I + α) / (g_T + β g_I + α), α = ``alpha`` · mean(g_T); ``hard``: s = 0 where
    T's count is positive, 1 elsewhere. All-zero target counts: ``projection=None``."""
    if target_counts.shape != donor_counts.shape or target_counts.dim() != 1:
        raise ValueError(f"token counts of shape {tuple(target_counts.shape)} and {tuple(donor_counts.shape)}")
    g_t = target_counts.to(torch.float64) / target_total
    g_i = donor_counts.to(torch.float64) / donor_total
    if not torch.any(g_t):
        return Prepared(None, None, g_i)
    if settings.hard:
        return Prepared(None, (g_t <= 0).to(torch.float64), g_i)
    alpha = settings.alpha * float(g_t.mean())
    kept = settings.beta * g_i + alpha
    total = g_t + kept
    keep = torch.where(total > 0, kept / torch.where(total > 0, total, 1.0), 1.0)
    return Prepared(None, keep, g_i)


__all__ = [
    "DataSettings",
    "PARAMETER_PREFIX",
    "Prepared",
    "numerical_tolerance",
    "prepare",
    "prepare_tokens",
    "sampled_rows",
    "survival",
]
