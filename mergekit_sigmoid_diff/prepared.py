"""One tensor's one-donor transfer, prepared once and applied at any donor weight (pure torch).

For one donor, ``sigmoid_diff``'s output is linear in the donor weight w: the gate's applied
fraction f, the projection basis and the data-aware solve depend on T − B (and the statistics)
only, never on w. :func:`prepare` computes everything that does not depend on w once:

    D = I − B                      in the kernel's compute dtype (weight 1)
    elementwise: f = 1 − ratio     per chunk, exactly as the kernel computes it
    subspace:    the basis of T − B (:func:`mergekit_sigmoid_diff.kernel.protected_diff`'s)
    data:        the solve (:mod:`mergekit_sigmoid_diff.datasolve`), given by the caller

and :meth:`PreparedTensor.at` then costs one combination per weight. It is bit for bit the
tensor :func:`mergekit_sigmoid_diff.kernel.sigmoid_diff` returns for ``[donor], [w]`` with
``out_dtype`` = the inputs' dtype (what the merge method asks for): the same kernel helpers,
in the kernel's own operation order, on the same chunks:

    elementwise / plain (per chunk): acc = D (a copy); acc *= w if w ≠ 1;
                                     out = addcmul(T, acc, f)  (plain, or a gate-free range: T + acc)
    subspace:                        D_w = D (a copy) *= w if w ≠ 1; project_out_(D_w); T + D_w
    data:                            D_w as above; Δ = solve.delta(D_w); T + Δ

The element-wise path's chunks and their single-threaded ops are the kernel's (the same
chunk boundaries give the same vectorised and scalar elements, whatever the thread count); the
projection's matrix products run on the caller's torch threads, as in the merge, so a merge
run on the same thread count gives the same bits. Every other whole-tensor op here runs on one
thread (exactly rounded element-wise ops: the same bits on any count; and on a shared machine
a parallel region per op waits for the slowest thread, see :mod:`.threads`).

:meth:`PreparedTensor.arithmetic` is task_arithmetic's ``T + λ D`` from the same D.

Memory per tensor: T (the inputs' dtype), D and f (compute dtype), or D and the basis: base
and donor are not kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from mergekit_sigmoid_diff import kernel, subspace
from mergekit_sigmoid_diff.kernel import GateSettings
from mergekit_sigmoid_diff.normalization import Gate, sample_drift
from mergekit_sigmoid_diff.threads import single_threaded

__all__ = ["PreparedTensor", "prepare"]

# The kernel's own chunk helpers (private to it: this module is its second caller, and must
# walk the very same chunks in the very same order of operations).
_chunks = kernel._each_chunk  # noqa: SLF001
_span = kernel._span  # noqa: SLF001
_upcast = kernel._upcast  # noqa: SLF001
_workers = kernel._workers  # noqa: SLF001


@dataclass(eq=False)
class PreparedTensor:
    """What one output tensor's transfer needs at any weight (see the module docstring).

    - ``mode``: ``plain`` | ``elementwise`` | ``subspace`` | ``data`` (:meth:`GateSettings.mode`);
    - ``target``: T in the inputs' dtype; ``diff``: D = I − B in the compute dtype;
    - ``fraction``: the element-wise 1 − ratio (flat, compute dtype), None when the gate takes
      everything (plain, or a drift range below ``eps``);
    - ``basis`` / ``side``: the projection's; ``solve``: the data-aware solve (None: plain diff).
    """

    mode: str
    target: torch.Tensor
    diff: torch.Tensor
    fraction: Optional[torch.Tensor] = None
    basis: Optional[subspace.Basis] = None
    side: str = "none"
    solve: Any = None

    @property
    def dtype(self) -> torch.dtype:
        """The output dtype of :meth:`at` (the inputs', as the merge method asks for)."""
        return self.target.dtype

    def nbytes(self) -> int:
        held = [self.target, self.diff, self.fraction]
        if self.basis is not None:
            held += [self.basis.u, self.basis.v]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def at(self, weight: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sigmoid_diff(B, T, [I], [weight])`` in T's dtype (written into ``out`` when given:
        a tensor of T's shape and dtype on T's device)."""
        if self.mode in ("plain", "elementwise"):
            return self._elementwise(float(weight), out)
        if self.mode == "data" and self.solve is None:  # no statistics for this tensor: the plain diff (datamerge's rule)
            return PreparedTensor("plain", self.target, self.diff).at(weight, out)
        on_cpu = self.diff.device.type == "cpu"
        with single_threaded(on_cpu):  # element-wise: the same bits on any thread count
            diff = self.diff.clone()
            if weight != 1.0:
                diff.mul_(weight)
        if self.mode == "subspace":  # the products on the caller's threads, as in the merge
            projected = subspace.project_out_(diff, self.basis, self.side)
            with single_threaded(on_cpu):
                result = kernel._sum_cast(projected, self.target, self.dtype)  # noqa: SLF001
        else:
            result = self.solve.apply_delta(self.target, self.solve.delta(diff), self.dtype)
        if out is None:
            return result
        with single_threaded(on_cpu):
            return out.copy_(result)

    def arithmetic(self, lam: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """task_arithmetic ``T + λ (I − B)`` in the compute dtype, rounded once to T's dtype."""
        with single_threaded(self.diff.device.type == "cpu"):
            if out is not None and self.dtype == self.diff.dtype == out.dtype:
                return torch.add(self.target, self.diff, alpha=float(lam), out=out)
            total = torch.add(self.target.to(self.diff.dtype), self.diff, alpha=float(lam))
            result = total if total.dtype == self.dtype else total.to(self.dtype)
            return result if out is None else out.copy_(result)

    def _elementwise(self, weight: float, out: Optional[torch.Tensor]) -> torch.Tensor:
        t, d = self.target.reshape(-1), self.diff.reshape(-1)
        f = None if self.fraction is None else self.fraction.reshape(-1)
        numel, dtype = t.numel(), self.diff.dtype
        if out is None:
            out = torch.empty(self.target.shape, dtype=self.dtype, device=t.device)
        written_all = out.view(-1)
        if numel == 0:
            return out
        starts = _starts(t)

        def scratch() -> tuple[torch.Tensor, torch.Tensor]:
            size = min(starts.step, numel)
            return torch.empty(size, dtype=dtype, device=t.device), torch.empty(size, dtype=dtype, device=t.device)

        def write(index: int, own: tuple[torch.Tensor, torch.Tensor]) -> None:
            start, stop = _span(starts, index, numel)
            target_buf, acc_buf = (b[: stop - start] for b in own)
            tc = _upcast(t[start:stop], target_buf)
            acc = acc_buf.copy_(d[start:stop])
            if weight != 1.0:
                acc.mul_(weight)
            written = written_all[start:stop]
            result = written if written.dtype == dtype else acc
            if f is None:
                torch.add(acc, tc, out=result)
            else:
                torch.addcmul(tc, acc, f[start:stop], out=result)
            if result is not written:
                written.copy_(result)

        with single_threaded(t.device.type == "cpu"):
            _chunks(len(starts), write, scratch, _workers(t.device))
        return out


def _starts(flat: torch.Tensor) -> range:
    """The kernel's chunk starts for a tensor on ``flat``'s device."""
    return range(0, flat.numel(), kernel.CHUNK if flat.device.type == "cpu" else kernel.DEVICE_CHUNK)


def prepare(
    base: torch.Tensor,
    target: torch.Tensor,
    donor: torch.Tensor,
    settings: GateSettings = kernel.DEFAULT_SETTINGS,
    *,
    vocabulary: bool = False,
    solve: Any = None,
) -> PreparedTensor:
    """Prepare one tensor's transfer (inputs already in the merge's input dtype, as mergekit
    hands them to the method). ``solve``: for ``protect_subspace: data``, the tensor's
    :class:`~mergekit_sigmoid_diff.datasolve.Prepared` (None: no statistics, the plain diff)."""
    for tensor in (base, donor):
        if tensor.shape != target.shape:
            raise ValueError(f"shape {tuple(tensor.shape)} differs from the target's {tuple(target.shape)}")
    mode = settings.mode(target.dim(), vocabulary)
    dtype = kernel.compute_dtype(base, target, donor)
    if mode == "subspace":
        basis, diff = kernel._basis_and_diff(base, target, [donor], [1.0], settings)  # noqa: SLF001
        return PreparedTensor(mode, target, diff, basis=basis, side=settings.protect_subspace)
    diff = kernel._difference(donor, base, dtype)  # noqa: SLF001  (the kernel's I − B)
    if mode == "data":
        return PreparedTensor(mode, target, diff, solve=solve)
    fraction = _fraction(base, target, settings, dtype) if mode == "elementwise" else None
    return PreparedTensor(mode, target, diff, fraction=fraction)


def _fraction(base: torch.Tensor, target: torch.Tensor, settings: GateSettings, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The element-wise applied fraction, flat, chunk by chunk as the kernel's second pass
    computes it (None when the drift's range is below ``eps``: the whole diff goes in)."""
    b, t = base.reshape(-1), target.reshape(-1)
    numel = t.numel()
    if numel == 0:
        return None
    starts = _starts(t)
    workers = _workers(t.device)

    def scratch() -> kernel._Scratch:  # noqa: SLF001
        return kernel._Scratch(min(starts.step, numel), dtype, t.device)  # noqa: SLF001

    with single_threaded(t.device.type == "cpu"):
        lo, hi = kernel._drift_range(b, t, starts, scratch, workers, dtype)  # noqa: SLF001
        gate: Optional[Gate] = kernel._make_gate(settings, lo, hi, lambda: sample_drift(b, t, dtype))  # noqa: SLF001
        if gate is None:
            return None
        fraction = torch.empty(numel, dtype=dtype, device=t.device)

        def compute(index: int, own: kernel._Scratch) -> None:  # noqa: SLF001
            start, stop = _span(starts, index, numel)
            buf = own.cut(stop - start)
            bc = _upcast(b[start:stop], buf.base)
            tc = _upcast(t[start:stop], buf.target)
            gate.fraction_(torch.sub(tc, bc, out=fraction[start:stop]).abs_())

        _chunks(len(starts), compute, scratch, workers)
    return fraction
