"""``protect_subspace: data`` in a merge: the statistics files, one tensor's transfer, the guard.

The math is :mod:`mergekit_sigmoid_diff.datasolve`; the files are
:mod:`mergekit_sigmoid_diff.statistics` (no mergekit here). Per output tensor, with the
recipe's ``target_statistics`` (T on its own text) and ``donor_statistics`` (the donor's chats):

- a weight both files cover (a linear layer's input Gram): the closed form ``T + Δ``;
- the input embedding (``tokens.counts`` in both files): the token-count form;
- a tensor neither file covers (norms, biases, an ``lm_head`` without statistics): the plain
  diff ``T + w (I − B)``, as the element-wise path with ``gate: false`` computes it.

The recipe checks (:func:`mergekit_sigmoid_diff.preflight.check_statistics`) refuse every other
case before a tensor is read: a 2-D non-vocabulary weight missing from a file, statistics of
another model, wrong shapes, more than one donor.

Files are opened once per process (:func:`open_statistics`, keyed by path, size and mtime) and
read per tensor; the solve of one input is kept for the next tensors that read it (q/k/v,
gate/up: :func:`prepared_for`).

The guard: every solved tensor adds tr(Δ G_I Δᵀ) and tr(D G_I Dᵀ) (over at most
:data:`SURVIVAL_ROWS` of its rows) to the active :class:`SurvivalLog` (:func:`collecting`; the
merge wrapper opens one and prints its :meth:`SurvivalLog.report`); per layer, survival =
sqrt(Σ kept / Σ total) = ‖Δ X_I‖ / ‖D X_I‖ over the layer's tensors. Below
:data:`SURVIVAL_THRESHOLD` the donor's own effect is mostly cancelled: the two files overlap
(T's statistics built on chat text instead of its domain).
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from safetensors import safe_open

from mergekit_sigmoid_diff import datasolve, kernel, statistics
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.threads import single_threaded

# the recipe parameters naming the files (documented on the method)
TARGET_STATISTICS = "target_statistics"
DONOR_STATISTICS = "donor_statistics"
DATA = "data"  # protect_subspace: data

# The merge's survival per tensor is estimated on at most this many evenly spaced output rows
# (datasolve.Prepared.survival_terms): exact tr(Δ G_I Δᵀ) costs two more products of the
# weight's size, as much as the solve's own product (measured on SmolLM2-135M: a quarter of the
# data merge's time); 64 rows cost a few % of it. ``inspect`` reports the exact value per tensor.
SURVIVAL_ROWS = 64

# Below this survival (‖Δ X_I‖ / ‖D X_I‖ over a layer) the merge warns: less than half of the
# donor's own effect on its own inputs is left. In issue 26's prototype, T's statistics from chat
# text instead of its domain cancelled the donor (P(feature) 0.96 -> 0.10 at β 0.1, w 1.5); the
# survival is the symptom the merge can see. The value 0.5 is not yet calibrated on real statistics.
SURVIVAL_THRESHOLD = 0.5

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_index(name: str) -> Optional[int]:
    """The decoder layer a tensor belongs to (``model.layers.3.…`` → 3), None outside layers."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


# --- the files ----------------------------------------------------------------------------

_FILES: dict[tuple, statistics.StatisticsFile] = {}
_FILES_LOCK = threading.Lock()


def open_statistics(path: Union[str, os.PathLike], parameter: str) -> statistics.StatisticsFile:
    """The statistics file at ``path``, opened once per process (reopened if it changed);
    errors name ``parameter`` and the file."""
    resolved = Path(path).expanduser().absolute()
    try:
        status = resolved.stat()
        key = (str(resolved), status.st_size, status.st_mtime_ns)
    except OSError:
        raise SigmoidDiffError(f"{parameter}: statistics file {resolved} does not exist or is unreadable") from None
    with _FILES_LOCK:
        found = _FILES.get(key)
    if found is not None:
        return found
    try:
        opened = statistics.StatisticsFile(resolved)
    except SigmoidDiffError as error:
        raise SigmoidDiffError(f"{parameter}: {error}") from None
    with _FILES_LOCK:
        return _FILES.setdefault(key, opened)


@dataclass(frozen=True)
class Coverage:
    """What a statistics file holds for one weight, from its header (no tensor read).

    ``kind``: ``input`` (a Gram of ``size`` × ``size``) or ``tokens`` (``size`` counts)."""

    kind: str
    size: int
    key: str  # the input id, or statistics.COUNTS


def coverage(file: statistics.StatisticsFile, weight: str) -> Optional[Coverage]:
    """What ``file`` holds for ``weight``, None if nothing (shapes from the safetensors header)."""
    if file.embedding is not None and weight == file.embedding:
        names, kind, key = [statistics.COUNTS], "tokens", statistics.COUNTS
    elif weight in file.weights:
        key = file.weights[weight]
        names = [statistics.tensor_name(key, part) for part in ("gram", "eigvecs")]
        kind = "input"
    else:
        return None
    with safe_open(str(file.path), framework="pt") as handle:
        present = set(handle.keys())
        for name in names:
            if name in present:
                return Coverage(kind, int(handle.get_slice(name).get_shape()[0]), key)
    raise SigmoidDiffError(f"statistics file {file.path} lists weight {weight} but holds no tensor for it")


# --- one tensor ---------------------------------------------------------------------------

_PREPARED: "OrderedDict[tuple, datasolve.Prepared]" = OrderedDict()
_PREPARED_LOCK = threading.Lock()
# Solves kept per process: mergekit plans an input's tensors one after another (q, k, v; gate,
# up), and a solve holds P and G_I in float64 (2 × 8 d² bytes; 38 MB at d = 1536).
PREPARED_KEPT = 2


def _finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in ``x``: a finite float64 sum proves it (one pass, one thread); only a
    non-finite sum is checked element by element."""
    with single_threaded(x.device.type == "cpu"):
        return bool(torch.isfinite(x.sum(dtype=torch.float64))) or bool(torch.isfinite(x).all())


def _matrix(file: statistics.StatisticsFile, stats: statistics.InputStats, weight: str) -> torch.Tensor:
    with single_threaded():
        gram = stats.matrix(torch.float64)
    if not _finite(gram):
        raise SigmoidDiffError(f"statistics file {file.path} holds NaN or Inf for weight {weight}")
    return gram


def _counts(file: statistics.StatisticsFile, stats: statistics.TokenCounts, weight: str) -> torch.Tensor:
    if not _finite(stats.counts) or bool((stats.counts < 0).any()):
        raise SigmoidDiffError(f"statistics file {file.path} holds invalid token counts for weight {weight}")
    return stats.counts


def prepared_for(
    weight: str,
    shape: Sequence[int],
    target_file: statistics.StatisticsFile,
    donor_file: statistics.StatisticsFile,
    settings: datasolve.DataSettings,
) -> Optional[datasolve.Prepared]:
    """The solve for ``weight`` (of ``shape``), or None when neither file covers it (plain diff).

    Raises :class:`SigmoidDiffError` when only one file covers it, or the statistics do not fit
    the weight (the recipe checks say so first; this is the merge's own guard)."""
    found = [(file, coverage(file, weight)) for file in (target_file, donor_file)]
    if all(c is None for _, c in found):
        return None
    check_fit(weight, shape, found)
    (_, target_cover), (_, donor_cover) = found
    key = (target_file, target_cover.key, donor_file, donor_cover.key, settings)  # files by identity
    with _PREPARED_LOCK:
        if key in _PREPARED:
            _PREPARED.move_to_end(key)
            return _PREPARED[key]
    t_stats, i_stats = target_file.for_weight(weight), donor_file.for_weight(weight)
    if target_cover.kind == "tokens":
        solve = datasolve.prepare_tokens(
            _counts(target_file, t_stats, weight), t_stats.count, _counts(donor_file, i_stats, weight), i_stats.count, settings
        )
    else:
        solve = datasolve.prepare(_matrix(target_file, t_stats, weight), _matrix(donor_file, i_stats, weight), settings)
    with _PREPARED_LOCK:
        _PREPARED[key] = solve
        while len(_PREPARED) > PREPARED_KEPT:
            _PREPARED.popitem(last=False)
    return solve


def check_fit(weight: str, shape: Sequence[int], found: list) -> None:
    """Both files cover ``weight`` alike, with statistics of its input's size (one line if not)."""
    for (file, cover), (other, other_cover) in (found, found[::-1]):
        if cover is None:
            raise SigmoidDiffError(
                f"statistics file {file.path} has nothing for tensor {weight}, which {other.path} covers: "
                "compute both files with the same calibrate version on the same architecture"
            )
    for file, cover in found:
        if cover.kind == "tokens":
            if len(shape) != 2 or cover.size != shape[0]:
                raise SigmoidDiffError(
                    f"statistics file {file.path} counts {cover.size} tokens, but tensor {weight} has shape "
                    f"{list(shape)}: its vocabulary is {shape[0] if shape else '?'}"
                )
        elif len(shape) != 2 or cover.size != shape[1]:
            raise SigmoidDiffError(
                f"statistics file {file.path} holds a {cover.size} x {cover.size} Gram for tensor {weight}, "
                f"but its shape is {list(shape)}: the input has {shape[-1] if shape else '?'} features"
            )
    kinds = {cover.kind for _, cover in found}
    if len(kinds) > 1:
        raise SigmoidDiffError(f"tensor {weight}: one statistics file holds token counts, the other a Gram")


def transfer(
    weight: str,
    base: torch.Tensor,
    target: torch.Tensor,
    donor: torch.Tensor,
    donor_weight: float,
    gate_settings: kernel.GateSettings,
    settings: datasolve.DataSettings,
    target_file: statistics.StatisticsFile,
    donor_file: statistics.StatisticsFile,
    *,
    vocabulary: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """One tensor under ``protect_subspace: data``: ``T + Δ`` (the solve of :func:`prepared_for`,
    then :meth:`~.datasolve.Prepared.apply`), or the plain diff where no statistics apply. Adds
    the tensor's survival terms to the active :class:`SurvivalLog`. Raises
    :class:`~.kernel.NonFiniteError` for a non-finite output (the method names the input)."""
    solve = prepared_for(weight, tuple(target.shape), target_file, donor_file, settings)
    if solve is None:
        return kernel.sigmoid_diff(
            base, target, [donor], [donor_weight], replace(gate_settings, gate=False),
            vocabulary=vocabulary, out_dtype=out_dtype, check_finite=True,
        )
    diff = kernel.donor_diff(base, [donor], [donor_weight], kernel.compute_dtype(base, target, donor))
    delta = solve.delta(diff)
    log = _ACTIVE
    if log is not None:
        log.add(weight, *solve.survival_terms(diff, delta, rows=SURVIVAL_ROWS))
    out = solve.apply_delta(target, delta, out_dtype)  # = solve.apply(target, diff, out_dtype)
    if not _finite(out):
        raise kernel.NonFiniteError("output holds NaN or Inf")
    return out


# --- the guard ----------------------------------------------------------------------------


class SurvivalLog:
    """tr(Δ G_I Δᵀ) and tr(D G_I Dᵀ) per solved tensor, summed per layer (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.terms: dict[str, tuple[float, float]] = {}

    def add(self, weight: str, kept: float, total: float) -> None:
        with self._lock:
            self.terms[weight] = (kept, total)

    def by_layer(self) -> dict[str, float]:
        """Row label (the layer index, or the tensor's name outside the layers) → survival,
        in layer order; rows whose donor diff has no effect on its inputs are left out."""
        sums: dict[tuple, list[float]] = {}
        for weight, (kept, total) in self.terms.items():
            index = layer_index(weight)
            row = (0, index, "") if index is not None else (1, 0, weight)
            cell = sums.setdefault(row, [0.0, 0.0])
            cell[0] += kept
            cell[1] += total
        return {
            (str(row[1]) if row[0] == 0 else row[2]): math.sqrt(max(kept, 0.0) / total)
            for row, (kept, total) in sorted(sums.items())
            if total > 0
        }

    def report(self, per_line: int = 10) -> list[str]:
        """The merge's closing lines: the per-layer survival and, where it is below
        :data:`SURVIVAL_THRESHOLD`, one warning line naming the layers. Empty if nothing was solved."""
        rows = self.by_layer()
        if not rows:
            return []
        lines = ["protect_subspace: data: share of the donor's effect on its own inputs kept (‖Δ X_I‖ / ‖D X_I‖), per layer:"]
        items = [f"{row}: {value:.3f}" for row, value in rows.items()]
        lines += ["  " + "  ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
        low = [row for row, value in rows.items() if value < SURVIVAL_THRESHOLD]
        if low:
            where = ", ".join(low)
            lines.append(
                f"Warning: protect_subspace: data keeps less than {SURVIVAL_THRESHOLD:g} of the donor's effect in "
                f"layer(s) {where} (lowest {min(rows[r] for r in low):.3f}): the two statistics files overlap; was "
                f"{TARGET_STATISTICS} built on chat text instead of the target's own domain text?"
            )
        return lines


_ACTIVE: Optional[SurvivalLog] = None


@contextmanager
def collecting() -> Iterator[SurvivalLog]:
    """Collect the survival terms of the tensors merged inside the block."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, SurvivalLog()
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = previous


__all__ = [
    "Coverage",
    "DATA",
    "check_fit",
    "DONOR_STATISTICS",
    "SURVIVAL_ROWS",
    "SURVIVAL_THRESHOLD",
    "SurvivalLog",
    "TARGET_STATISTICS",
    "collecting",
    "coverage",
    "layer_index",
    "open_statistics",
    "prepared_for",
    "transfer",
]
