"""The sigmoid_diff arithmetic on plain tensors, free of mergekit.

For one output tensor, with base B, target T and donors I_j with weights w_j:

    x      = (|T − B| − min) / (max − min)        min/max over the whole tensor, x ∈ [0, 1]
    ratio  = sigmoid(k · (x − m))                  k = steepness, m = midpoint
    out    = T + (1 − ratio) ⊙ Σ_j w_j · (I_j − B)
    if max − min < eps or max = min: ratio = 0     (the whole diff goes in)

``1 − ratio`` is the *applied fraction*: 1 where the target stayed near the base, → 0
where it drifted furthest. It is computed as ``sigmoid(−k · (x − m))``, which equals
``1 − sigmoid(k · (x − m))`` but does not lose digits to cancellation as ratio → 1.
``normalize`` chooses how |T − B| becomes x: ``minmax`` above (the default), or the robust
``quantile`` and ``rank`` options defined in :mod:`mergekit_sigmoid_diff.normalization`.

Reference: StableFluffy/EasyLLMFeaturePorter, ``1-Click.ipynb`` (2024):
``sigmoid(normalized_diff * 12 - 6)``, i.e. k = 12, m = 0.5, eps = 1e-6.

``protect_subspace`` (off by default) replaces the element-wise gate on 2-D weights other
than the vocabulary tensors by a projection in the target drift's singular basis:

    D  = Σ_j w_j (I_j − B),   A = T − B = U Σ Vᵀ
    r  = the smallest rank whose top singular values hold ``protect_energy`` of ‖A‖²_F
    D' = D − D V_r V_rᵀ (input), U_r U_rᵀ D removed (output), or both sides
    out = T + D'

The donor's diff loses exactly the input (or output) directions the target's own update
uses most, and is untouched elsewhere (:mod:`mergekit_sigmoid_diff.subspace`).

All knobs travel together as one :class:`GateSettings`.

Arithmetic is float32 (float64 if any input is float64) whatever the input dtype; the
result is returned in that compute dtype unless ``out_dtype`` says otherwise.

Memory and speed (the element-wise gate): the tensor is processed in chunks along its flat
storage, in two passes. Pass 1 reads T and B for min and max of |T − B|; pass 2 computes
the gate and the output chunk by chunk, writing straight into the output tensor (cast to
``out_dtype`` as it is written). The upcast copies, the drift and the accumulator exist for
one chunk at a time (five scratch buffers of one chunk each, in the compute dtype), so
beyond its inputs the kernel holds only the output, on the inputs' device:

- CPU: chunks of ``CHUNK`` = 2**17 elements, i.e. 5 × 512 KiB = 2.5 MiB of float32 scratch
  (5 MiB in float64) per worker thread: the chunks are shared among as many threads as
  torch's intra-op count (mergekit's ``--num-threads``; at most ``MAX_WORKERS`` = 4), each
  running torch on one thread (:func:`_each_chunk`, :func:`single_threaded`; the count is
  restored afterwards), so 2 threads hold 5 MiB and 4 at most 10 MiB.
- CUDA and other accelerators: chunks of ``DEVICE_CHUNK`` = 2**24 elements, i.e.
  5 × 64 MiB = 320 MiB of float32 scratch (640 MiB in float64) at most, whatever the
  tensor's size (an 8B model's 128256 × 4096 embedding is 32 chunks, not 5 × 2.1 GB).

Why not torch's own threads on CPU (measured on one 2048 × 5504 bf16 tensor, 2-core machine
with another single-threaded job on the second core; ``scripts/benchmark_speed.py`` has the
merge-level figures): every torch op on more than 32768 elements (``at::internal::GRAIN_SIZE``) is an
OpenMP parallel region, and the two passes make ~17 ops per chunk, ~3000 regions per tensor
at the former 64 K-element chunks. Each region waits for its slowest thread, so when the
cores are shared with another process the regions, not the arithmetic, set the time: with
torch's default 2 threads the kernel took 8.9 s (median; task_arithmetic's whole-tensor ops
93 ms) beside the single-threaded job alone, and 13.7 s (vs 170 ms) with a second process
running 512 × 512 matmuls too; 4 M-element chunks still took 0.94 s vs 0.24 s. With one
thread there are no regions: 64 K / 128 K / 256 K / 512 K-element chunks took
105 / 82 / 79 / 77 ms (task_arithmetic 71 ms on one thread), 32 K chunks (the largest that
stays below the grain size, so that no global setting would be needed) 84–131 ms, the
per-op overhead showing. Setting the thread count costs < 1 µs.

So torch's own threads are never used inside the chunk loop; instead the chunks themselves
are divided among threads (:func:`_each_chunk`): each thread takes the next chunk from a
shared counter and runs torch on one thread, so no op waits for another thread and the only
join is after the tensor's last chunk; a thread the OS pauses delays its own chunk only.
Measured on a 4096 × 1536 bf16 tensor, 2 threads against 1, paired medians of 15
(``2 workers / 1 worker``): the gate 0.59× quiet and 0.61× beside a 512 × 512 matmul loop on
torch's default threads, the plain diff (``gate: false``) 0.52× / 0.47×, the 32000 × 1536
embedding 0.61× / 0.76×. The first version ran the loop on one thread only: safe under load,
but 1.2× ``task_arithmetic``'s wall for a whole 0.6B merge on an idle machine, where
``task_arithmetic``'s whole-tensor ops use both cores.
"""

from __future__ import annotations

import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, Callable, Literal, Mapping, NamedTuple, Optional, Sequence, get_args

import torch

from mergekit_sigmoid_diff import gate_rules, subspace
from mergekit_sigmoid_diff.threads import single_threaded

from mergekit_sigmoid_diff.normalization import (
    DEFAULT_NORMALIZE,
    DEFAULT_QUANTILE,
    NORMALIZATIONS,
    Gate,
    make_gate,
    sample_drift,
    sample_of,
)

DEFAULT_STEEPNESS = 12.0
DEFAULT_MIDPOINT = 0.5
DEFAULT_EPS = 1e-6
# Elements per chunk on CPU: 2**17 float32 = 512 KiB per scratch buffer (5 buffers: 2.5 MiB
# per worker thread). Per chunk: 2**15 costs ~30 % more (torch's few µs per call, ~17 calls per chunk),
# 2**17 to 2**19 measured alike (see the module docstring), and the scratch stays cache-sized.
CHUNK = 1 << 17
# Elements per chunk on CUDA and other accelerators: 2**24 float32 = 64 MiB per buffer, at
# most 320 MiB of scratch; a chunk is large enough to fill a GPU (a few kernel launches per
# ~16 M elements), while an 8B embedding would otherwise need 5 × 2.1 GB of float32 scratch.
DEVICE_CHUNK = 1 << 24
# At most this many threads per chunk loop. Measured on 2 cores only; each thread holds Python's
# global lock for ~20 % of a chunk's time (the calls around torch's ops), which bounds the useful
# count near 4–5 whatever the core count, and element-wise work is memory-bound before that.
MAX_WORKERS = 4

Protect = Literal["none", "input", "output", "both", "data"]
PROTECT_OPTIONS: tuple[str, ...] = get_args(Protect)
DEFAULT_PROTECT_ENERGY = 0.5
Mode = Literal["plain", "elementwise", "subspace", "data"]


@dataclass(frozen=True)
class GateSettings:
    """How one tensor's donor diff is damped; each field is a recipe parameter of the same name.

    - ``steepness``: k > 0, the slope of the element-wise gate.
    - ``midpoint``: m ∈ [0, 1], the normalised drift at which half of an element's diff goes in.
    - ``eps``: if max − min of |T − B| is below this, the whole diff goes in.
    - ``normalize``: how |T − B| becomes the gate's input x: ``minmax`` (the published gate),
      ``quantile`` or ``rank`` (see :mod:`.normalization`).
    - ``quantile``: p ∈ (0, 1], the level ``normalize: quantile`` uses.
    - ``gate``: false takes the tensor out of every damping: ``T + Σ w_j (I_j − B)``.
    - ``protect_subspace``: ``none`` (default: the element-wise gate), or ``input`` / ``output`` /
      ``both``: on 2-D non-vocabulary weights, remove from the donor diff the target drift's top
      input (right-singular) / output (left-singular) / both directions instead; or ``data``:
      the data-aware solve from statistics files, which the method runs
      (:mod:`mergekit_sigmoid_diff.datamerge`; :func:`sigmoid_diff` refuses it).
    - ``protect_energy``: e ∈ [0, 1], the share of ‖T − B‖²_F those directions hold
      (0: nothing removed; 1: the drift's whole row or column space).
    """

    steepness: float = DEFAULT_STEEPNESS
    midpoint: float = DEFAULT_MIDPOINT
    eps: float = DEFAULT_EPS
    normalize: str = DEFAULT_NORMALIZE
    quantile: float = DEFAULT_QUANTILE
    gate: bool = True
    protect_subspace: str = "none"
    protect_energy: float = DEFAULT_PROTECT_ENERGY

    def __post_init__(self) -> None:
        # the numeric rules live in gate_rules; the recipe checks (method's types) apply the same
        for item in fields(self):
            value = getattr(self, item.name)
            reason = gate_rules.problem(item.name, value)
            if reason is not None:
                raise ValueError(f"{item.name}={value!r}: {reason}")
        # the options are the Literals the recipe types are made of
        for name, options in (("normalize", NORMALIZATIONS), ("protect_subspace", PROTECT_OPTIONS)):
            if getattr(self, name) not in options:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(options)}")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> "GateSettings":
        """The settings among resolved recipe parameters (other keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in parameters.items() if k in names})

    def mode(self, ndim: int, vocabulary: bool = False) -> Mode:
        """How a tensor of ``ndim`` dimensions is treated: the plain diff, the element-wise
        gate, the subspace projection (2-D weights other than vocabulary tensors only), or
        ``data`` (every tensor: the method picks the solve, the token form or the plain diff
        per tensor, see :mod:`mergekit_sigmoid_diff.datamerge`)."""
        if not self.gate:
            return "plain"
        if self.protect_subspace == "data":
            return "data"
        if self.protect_subspace != "none" and ndim == 2 and not vocabulary:
            return "subspace"
        return "elementwise"


DEFAULT_SETTINGS = GateSettings()

__all__ = [
    "CHUNK",
    "DEVICE_CHUNK",
    "DEFAULT_SETTINGS",
    "GateSettings",
    "DEFAULT_EPS",
    "DEFAULT_MIDPOINT",
    "DEFAULT_NORMALIZE",
    "DEFAULT_QUANTILE",
    "DEFAULT_STEEPNESS",
    "NORMALIZATIONS",
    "NonFiniteError",
    "applied_fraction_",
    "compute_dtype",
    "donor_diff",
    "protected_diff",
    "sigmoid_diff",
    "single_threaded",
]


class NonFiniteError(ArithmeticError):
    """The output would hold NaN or Inf (raised only when ``check_finite=True``).

    The kernel knows no tensor or model names; the caller catches this and names them.
    """


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def applied_fraction_(drift: torch.Tensor, settings: GateSettings = DEFAULT_SETTINGS) -> torch.Tensor:
    """Turn ``drift = |T − B|`` (floating point) into the element-wise ``1 − ratio``, in place.

    Returns ``drift`` itself, now holding values in [0, 1]. A non-finite drift
    (NaN or Inf in T or B) is left for the caller to report: under ``minmax`` min/max
    propagate it; the other options return NaN everywhere.
    """
    if drift.numel() == 0:
        return drift
    lo, hi = torch.aminmax(drift)
    gate = _make_gate(settings, lo, hi, lambda: sample_of(drift.reshape(-1)))
    if gate is None:  # the notebook's "all values are the same" branch: ratio = 0
        return drift.fill_(1.0)
    return gate.fraction_(drift)


def _make_gate(settings: GateSettings, lo, hi, sample) -> Optional[Gate]:
    return make_gate(
        settings.normalize,
        lo,
        hi,
        sample,
        steepness=settings.steepness,
        midpoint=settings.midpoint,
        eps=settings.eps,
        quantile=settings.quantile,
    )


def sigmoid_diff(
    base: torch.Tensor,
    target: torch.Tensor,
    donors: Sequence[torch.Tensor],
    weights: Sequence[float],
    settings: GateSettings = DEFAULT_SETTINGS,
    *,
    vocabulary: bool = False,
    out_dtype: Optional[torch.dtype] = None,
    check_finite: bool = False,
) -> torch.Tensor:
    """The transfer of one tensor under ``settings``; see the module docstring.

    - ``vocabulary``: the tensor is indexed by token (embeddings, lm_head): never projected.
    - ``out_dtype``: dtype of the result (default: the compute dtype); under the element-wise
      gate each chunk is cast as it is written, so no full-size compute-dtype copy of the
      output exists (the subspace projection holds one full-size buffer in the compute dtype:
      T − B, then D in it).
    - ``check_finite``: raise :class:`NonFiniteError` if the output holds NaN or Inf,
      instead of returning it: judged from the min and max of every written chunk (a
      by-product-sized reduction, no second pass over the output), or at once after pass 1
      when T or B is non-finite.

    The result is a new tensor on the inputs' device; the inputs are not modified.
    """
    if len(donors) != len(weights):
        raise ValueError(f"{len(donors)} donors but {len(weights)} weights")
    if not donors:
        raise ValueError("sigmoid_diff needs at least one donor")
    for tensor in (base, *donors):
        if tensor.shape != target.shape:
            raise ValueError(f"shape {tuple(tensor.shape)} differs from the target's {tuple(target.shape)}")
    mode = settings.mode(target.dim(), vocabulary)
    if mode == "data":
        raise ValueError("protect_subspace: data needs statistics files: mergekit_sigmoid_diff.datamerge runs it")
    if mode == "subspace":
        # on the caller's threads: the projection is a few large matrix products, which do
        # not stall beside another torch process; its QRs and chunk loops, which would, run
        # single-threaded inside (see mergekit_sigmoid_diff.subspace and docs/performance.md)
        return _projected(base, target, donors, weights, settings, out_dtype, check_finite)
    dtype = compute_dtype(base, target, *donors)
    b, t = base.reshape(-1), target.reshape(-1)
    flat_donors = [d.reshape(-1) for d in donors]
    numel = t.numel()
    out = torch.empty(numel, dtype=out_dtype or dtype, device=target.device)
    if numel == 0:
        return out.view(target.shape)
    on_cpu = target.device.type == "cpu"
    chunk = CHUNK if on_cpu else DEVICE_CHUNK  # the memory bound; see the module docstring
    starts = range(0, numel, chunk)
    workers = _workers(target.device)
    with single_threaded(on_cpu):
        _gate_chunks(b, t, flat_donors, weights, settings, mode, out, starts, dtype, check_finite, workers)
    return out.view(target.shape)


def _gate_chunks(b, t, flat_donors, weights, settings, mode, out, starts, dtype, check_finite, workers) -> None:
    """Both passes of the element-wise path over ``starts``, writing ``out`` (flat)."""
    numel, chunk = t.numel(), starts.step

    def scratch() -> _Scratch:
        return _Scratch(min(chunk, numel), dtype, t.device)

    fraction_gate: Optional[Gate] = None
    if mode == "elementwise":
        lo, hi = _drift_range(b, t, starts, scratch, workers, dtype)
        if check_finite and not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise NonFiniteError("base or target holds NaN or Inf")
        fraction_gate = _make_gate(settings, lo, hi, lambda: sample_drift(b, t, dtype))

    # (min, max) of each written chunk: NaN propagates and Inf shows, so finite ranges mean
    # a finite output; one check at the end instead of a host sync per chunk.
    written_ranges = torch.empty(len(starts), 2, dtype=out.dtype, device=out.device) if check_finite else None

    def write(index: int, own: _Scratch) -> None:
        start, stop = _span(starts, index, numel)
        buf = own.cut(stop - start)
        bc = _upcast(b[start:stop], buf.base)
        tc = _upcast(t[start:stop], buf.target)
        acc = torch.sub(_upcast(flat_donors[0][start:stop], buf.donor), bc, out=buf.acc)
        if weights[0] != 1.0:
            acc.mul_(weights[0])
        for donor, weight in zip(flat_donors[1:], weights[1:]):
            acc.add_(torch.sub(_upcast(donor[start:stop], buf.donor), bc, out=buf.donor), alpha=weight)
        written = out[start:stop]
        result = written if written.dtype == dtype else acc
        if fraction_gate is None:
            torch.add(acc, tc, out=result)
        else:
            fraction = fraction_gate.fraction_(torch.sub(tc, bc, out=buf.drift).abs_())
            torch.addcmul(tc, acc, fraction, out=result)  # T + acc · fraction
        if result is not written:
            written.copy_(result)  # the one rounding to the output dtype
        if written_ranges is not None:
            torch.aminmax(written, out=(written_ranges[index, 0], written_ranges[index, 1]))

    _each_chunk(len(starts), write, scratch, workers)
    if written_ranges is not None and not torch.isfinite(written_ranges).all():
        raise NonFiniteError("output holds NaN or Inf")


def donor_diff(
    base: torch.Tensor,
    donors: Sequence[torch.Tensor],
    weights: Sequence[float],
    dtype: torch.dtype,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """D = Σ_j w_j (I_j − B) in ``dtype`` (``base`` may already be in it), as a new tensor or
    written into ``out`` (a spent buffer of that shape and dtype: no fresh allocation).

    Each I_j − B is a copy of I_j in ``dtype`` minus B in place (the op upcasts B's elements
    as it reads them: the same float arithmetic as subtracting an upcast copy, without one).
    """
    diff = _difference(donors[0], base, dtype, out)
    if weights[0] != 1.0:
        diff.mul_(weights[0])
    for donor, weight in zip(donors[1:], weights[1:]):
        diff.add_(_difference(donor, base, dtype), alpha=weight)
    return diff


def _difference(x: torch.Tensor, base: torch.Tensor, dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x − B in ``dtype``, as a new contiguous tensor (never a view of the inputs; contiguous
    whatever x's strides, so the chunk loops can flatten it) or in ``out``."""
    acc = torch.empty(x.shape, dtype=dtype, device=x.device) if out is None else out
    return _combine_(acc.copy_(x), base, torch.Tensor.sub_)


def _sum_cast(acc: torch.Tensor, other: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """acc + other in ``out_dtype`` (default ``acc``'s): chunk by chunk into a new tensor when
    a cast is due, so ``acc`` is read once and rounded once (in place otherwise)."""
    if out_dtype is None or out_dtype == acc.dtype:
        return _combine_(acc, other, torch.Tensor.add_)
    out = torch.empty(acc.shape, dtype=out_dtype, device=acc.device)
    flat, source, written = acc.view(-1), other.reshape(-1), out.view(-1)
    _for_chunks(flat, lambda a, b, own: written[a:b].copy_(own.copy_(source[a:b]).add_(flat[a:b])))
    return out


def _combine_(acc: torch.Tensor, other: torch.Tensor, op) -> torch.Tensor:
    """``op(acc, other)`` in place, ``other`` upcast to ``acc``'s dtype a chunk at a time.

    On CPU an op mixing dtypes first casts ``other`` to a full-size temporary (measured: an
    in-place ``sub_`` of a bf16 4096 × 1536 matrix from a float32 one took 13.5 ms against
    6 + 5 ms for an upcast copy and a float32 ``sub_``); chunk-sized scratch keeps the same
    float arithmetic (the upcast is exact) without that copy. Chunks run as in the gate
    (:func:`_each_chunk`).
    """
    if other.dtype == acc.dtype:
        return op(acc, other)
    flat, source = acc.view(-1), other.reshape(-1)
    _for_chunks(flat, lambda a, b, own: op(flat[a:b], own.copy_(source[a:b])))
    return acc


def _for_chunks(flat: torch.Tensor, body: Callable[[int, int, torch.Tensor], Any]) -> None:
    """``body(start, stop, scratch)`` for every chunk of the 1-D ``flat`` (the device's chunk
    size), on the chunk threads; ``scratch`` is that thread's chunk-sized buffer in ``flat``'s
    dtype, cut to the chunk's length."""
    numel = flat.numel()
    starts = range(0, numel, CHUNK if flat.device.type == "cpu" else DEVICE_CHUNK)
    size = min(starts.step, numel)

    def chunk(index: int, own: torch.Tensor) -> None:
        start, stop = _span(starts, index, numel)
        body(start, stop, own[: stop - start])

    _each_chunk(len(starts), chunk, lambda: torch.empty(size, dtype=flat.dtype, device=flat.device),
                _workers(flat.device))


def _span(starts: range, index: int, numel: int) -> tuple[int, int]:
    """(start, stop) of chunk ``index``; only the last chunk is shorter."""
    start = starts[index]
    return start, min(start + starts.step, numel)


def protected_diff(
    base: torch.Tensor,
    target: torch.Tensor,
    donors: Sequence[torch.Tensor],
    weights: Sequence[float],
    settings: GateSettings,
    diff: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, subspace.Basis, float]:
    """(D', the basis removed, the share of ‖D‖² removed): Σ w_j (I_j − B) without the target
    drift's top ``protect_energy`` directions on the ``protect_subspace`` side (2-D tensors).
    A ``diff`` already computed (:func:`donor_diff`, compute dtype) is projected in place.

    Raises :class:`NonFiniteError` when T − B holds NaN or Inf (no singular basis exists).
    Memory beyond the inputs: one full-size buffer in the compute dtype (T − B, then D built in
    it once the basis is found; a second and later donor adds one more while it is summed),
    plus the basis, plus the output.
    """
    basis, diff = _basis_and_diff(base, target, donors, weights, settings, diff)
    projected, share = subspace.project_out_share_(diff, basis, settings.protect_subspace)
    return projected, basis, share


def _basis_and_diff(base, target, donors, weights, settings, diff=None) -> tuple[subspace.Basis, torch.Tensor]:
    """The drift basis, then D (``diff``, or :func:`donor_diff` written over T − B's buffer).

    Finiteness of T − B comes from its squared norm (one reduction that the basis needs
    anyway) instead of a separate ``isfinite`` pass and its full-size bool tensor.
    """
    dtype = compute_dtype(base, target, *donors)
    drift = _difference(target, base, dtype)
    total = subspace.squared_norm(drift)
    if not math.isfinite(total):
        raise NonFiniteError("T − B holds NaN or Inf")
    basis = subspace.drift_basis(drift, settings.protect_energy, settings.protect_subspace, total=total)
    if diff is None:
        diff = donor_diff(base, donors, weights, dtype, out=drift)  # T − B is spent: its buffer holds D
    return basis, diff


def _projected(base, target, donors, weights, settings, out_dtype, check_finite) -> torch.Tensor:
    """``T + D'`` (see :func:`protected_diff`; the merge needs no removed share), cast to
    ``out_dtype`` once."""
    basis, diff = _basis_and_diff(base, target, donors, weights, settings)
    out = _sum_cast(subspace.project_out_(diff, basis, settings.protect_subspace), target, out_dtype)
    if check_finite and not _all_finite(out):
        raise NonFiniteError("output holds NaN or Inf")
    return out


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in ``x``: a finite sum proves it (NaN and Inf propagate into a sum); only
    when the sum is not finite (or overflowed) is every element checked. ~4× cheaper than
    ``isfinite(x).all()`` on a 4096 × 1536 float32 matrix (1 thread), and no bool copy."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


class _Buffers(NamedTuple):
    """One chunk's scratch, all in the compute dtype and of the chunk's length."""

    base: torch.Tensor  # B upcast
    target: torch.Tensor  # T upcast
    donor: torch.Tensor  # I_j upcast, then I_j − B for the second and later donors
    acc: torch.Tensor  # Σ w_j (I_j − B), then the output before its final cast
    drift: torch.Tensor  # |T − B|, then the applied fraction


class _Scratch:
    """Chunk-sized buffers, allocated once per thread of a chunk loop and reused by its chunks."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device):
        self.full = _Buffers(*(torch.empty(size, dtype=dtype, device=device) for _ in _Buffers._fields))

    def cut(self, length: int) -> _Buffers:
        """The buffers for a chunk of ``length`` elements (only the last chunk is shorter)."""
        if length == self.full.acc.numel():
            return self.full
        return _Buffers(*(buffer[:length] for buffer in self.full))


def _upcast(chunk: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``chunk`` in the buffer's dtype: itself if already there (read only), else copied in."""
    return chunk if chunk.dtype == buffer.dtype else buffer.copy_(chunk)


def _drift_range(
    b: torch.Tensor, t: torch.Tensor, starts: range, scratch: Callable[[], _Scratch], workers: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of |T − B| over the whole tensor, one chunk at a time (pass 1).

    NaN in T or B makes both NaN; Inf makes the max Inf.
    """
    ranges = torch.empty(len(starts), 2, dtype=dtype, device=t.device)

    def measure(index: int, own: _Scratch) -> None:
        start, stop = _span(starts, index, t.numel())
        buf = own.cut(stop - start)
        bc = _upcast(b[start:stop], buf.base)
        drift = torch.sub(_upcast(t[start:stop], buf.target), bc, out=buf.drift).abs_()
        torch.aminmax(drift, out=(ranges[index, 0], ranges[index, 1]))

    _each_chunk(len(starts), measure, scratch, workers)
    return ranges[:, 0].min(), ranges[:, 1].max()


def _workers(device: torch.device) -> int:
    """How many threads a chunk loop on ``device`` runs on: torch's intra-op count on CPU
    (mergekit's ``--num-threads``, else one per core; at most :data:`MAX_WORKERS`), one
    elsewhere (a GPU queues the chunks)."""
    return min(torch.get_num_threads(), MAX_WORKERS) if device.type == "cpu" else 1


def _each_chunk(count: int, work: Callable[[int, Any], None], scratch: Callable[[], Any], workers: int) -> None:
    """``work(i, scratch)`` for every chunk index i < ``count``, on ``workers`` threads.

    Each thread has its own scratch (made by ``scratch()``) and runs torch
    on one intra-op thread; the threads take the next chunk index from one shared counter, so
    a thread the OS pauses holds up one chunk, not the others, and the only wait is for the
    last chunk. (torch's own parallel ops would be ~17 OpenMP regions per chunk, each a
    barrier; see the module docstring.) Chunks write disjoint slices; torch releases the GIL
    inside every op, so the threads compute in parallel.
    """
    workers = max(1, min(workers, count))
    indices = itertools.count()  # next() on it is atomic under the GIL
    stop = threading.Event()  # set when any thread fails: the others stop taking chunks

    def run(own: Any) -> None:
        try:
            while not stop.is_set() and (index := next(indices)) < count:
                work(index, own)
        except BaseException:
            stop.set()
            raise

    if workers == 1:
        run(scratch())
        return
    # grad and inference mode are per thread in torch: the helpers take the caller's
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def helper() -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad), single_threaded():
            run(scratch())

    with ThreadPoolExecutor(workers - 1, thread_name_prefix="sigmoid-diff-chunks") as pool:
        helpers = [pool.submit(helper) for _ in range(workers - 1)]
        with single_threaded():
            run(scratch())
        for done in helpers:
            done.result()
