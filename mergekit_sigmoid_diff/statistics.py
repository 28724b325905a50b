"""The statistics file: what one model's linear layers read on one text set (torch + safetensors only).

One safetensors file per (model, text set), written by ``python -m mergekit_sigmoid_diff
calibrate`` and read, lazily and per tensor, by the data-aware merge. For every distinct input
of a linear layer (q/k/v of a layer read one tensor, gate/up another) it holds the
uncentred second moment G = X Xᵀ / n over the n text tokens, either

- full: ``input.<id>.gram`` (d, d), or
- sketched (wide inputs): ``input.<id>.eigvecs`` V (d, r), ``input.<id>.eigvals`` λ (r,) and
  ``input.<id>.residual`` ρ (1,), standing for G ≈ V diag(λ) Vᵀ + ρ (I − V Vᵀ) with
  ρ = (tr G − Σλ)/(d − r): the top-r eigenpairs exactly, the rest of the spectrum flattened to its
  mean, so the trace is preserved (the "top-r + isotropic residual" sketch of RegMean-style
  statistics, e.g. arXiv 2212.09849 §3.2 for why the Gram is all a linear layer's merge needs);

and ``tokens.counts`` (vocab,): how often each token id occurs (an embedding is a linear map from
one-hot tokens, so its G is diagonal: counts / n).

Metadata (str → str): ``format`` (:data:`FORMAT`), ``model_stamp`` (:func:`model_stamp` of the
model that was run), ``model`` (as the user gave it), ``text_hash``, ``text_kind`` (texts|chats),
``tokens`` (n), ``sequences``, ``seq_len``, ``code``, ``weights`` (JSON: checkpoint weight name →
input id) and ``embedding`` (the input embedding's weight name).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_sigmoid_diff.errors import SigmoidDiffError

FORMAT = "mergekit-sigmoid-diff-statistics/1"
COUNTS = "tokens.counts"
PARTS = ("gram", "eigvecs", "eigvals", "residual")
Sketch = tuple[torch.Tensor, torch.Tensor, float]  # (V (d, r), λ (r,), ρ)


def tensor_name(input_id: str, part: str) -> str:
    """``input.<id>.<part>``, part one of :data:`PARTS`."""
    return f"input.{input_id}.{part}"


@dataclass(frozen=True)
class InputStats:
    """G = X Xᵀ / n of one linear-layer input over ``count`` = n tokens, full or sketched."""

    dim: int
    count: int
    gram: Optional[torch.Tensor]
    eigvecs: Optional[torch.Tensor]
    eigvals: Optional[torch.Tensor]
    residual: float

    @property
    def sketched(self) -> bool:
        return self.gram is None

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense (d, d) G: exact when full, V diag(λ) Vᵀ + ρ (I − V Vᵀ) when sketched."""
        if self.gram is not None:
            return self.gram.to(dtype)
        v, lam = self.eigvecs.to(dtype), self.eigvals.to(dtype)
        eye = torch.eye(self.dim, dtype=dtype)
        return (v * lam) @ v.T + self.residual * (eye - v @ v.T)


@dataclass(frozen=True)
class TokenCounts:
    """Token occurrences over ``count`` = n tokens: the embedding's diagonal G = counts / count."""

    counts: torch.Tensor
    count: int


def eigen_sketch(gram: torch.Tensor, rank: int) -> Sketch:
    """Top-``rank`` eigenpairs of the symmetric ``gram`` (largest first) and the residual
    ρ = (tr G − Σλ)/(d − r) that keeps the trace (ρ = 0 when rank ≥ d)."""
    g = gram.to(torch.float64)
    d = g.shape[0]
    rank = max(0, min(int(rank), d))
    vals, vecs = torch.linalg.eigh((g + g.T) / 2)  # ascending
    vals, vecs = vals.flip(0)[:rank], vecs.flip(1)[:, :rank]
    residual = float((torch.trace(g) - vals.sum()) / (d - rank)) if rank < d else 0.0
    return vecs, vals, residual


# ---------------------------------------------------------------- reading


class StatisticsFile:
    """A statistics file, opened lazily: the header is read here, a weight's tensors only by
    :meth:`for_weight`. Raises :class:`SigmoidDiffError` (one line naming the file) for a file
    that is unreadable, not safetensors, or not in :data:`FORMAT`."""

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                self.metadata: dict[str, str] = dict(handle.metadata() or {})
                self._keys = frozenset(handle.keys())
        except FileNotFoundError:
            raise SigmoidDiffError(f"statistics file {self.path} does not exist") from None
        except Exception as error:  # safetensors raises its own error types (and OSError)
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise SigmoidDiffError(f"statistics file {self.path} is not a readable safetensors file ({first})") from None
        found = self.metadata.get("format")
        if found != FORMAT:
            raise SigmoidDiffError(f"{self.path} is not a statistics file (format {found!r}, expected {FORMAT!r})")
        try:
            weights = json.loads(self.metadata["weights"])
            self.count = int(self.metadata["tokens"])
            self.model_stamp: str = self.metadata["model_stamp"]
        except (KeyError, ValueError) as error:
            raise SigmoidDiffError(f"statistics file {self.path} has broken metadata ({error!r})") from None
        if not isinstance(weights, dict) or self.count <= 0:
            raise SigmoidDiffError(f"statistics file {self.path} has broken metadata (weights or tokens)")
        self.weights: dict[str, str] = {str(k): str(v) for k, v in weights.items()}
        self.embedding: Optional[str] = self.metadata.get("embedding") or None

    def __repr__(self) -> str:
        return f"StatisticsFile({str(self.path)!r})"

    def _tensor(self, name: str, weight: str) -> torch.Tensor:
        if name not in self._keys:
            raise SigmoidDiffError(f"statistics file {self.path} lacks tensor {name} (for {weight})")
        with safe_open(str(self.path), framework="pt") as handle:
            return handle.get_tensor(name)

    def for_input(self, input_id: str, weight: str = "") -> InputStats:
        """The statistics of input ``input_id`` (``weight`` names the asker in errors)."""
        asker = weight or f"input {input_id}"
        if tensor_name(input_id, "gram") in self._keys:
            gram = self._tensor(tensor_name(input_id, "gram"), asker)
            return InputStats(gram.shape[0], self.count, gram, None, None, 0.0)
        if tensor_name(input_id, "eigvecs") not in self._keys:
            raise SigmoidDiffError(f"statistics file {self.path} lacks input {input_id} (for {asker}): neither "
                                   f"{tensor_name(input_id, 'gram')} nor {tensor_name(input_id, 'eigvecs')}")
        vecs = self._tensor(tensor_name(input_id, "eigvecs"), asker)
        vals = self._tensor(tensor_name(input_id, "eigvals"), asker)
        residual = float(self._tensor(tensor_name(input_id, "residual"), asker).reshape(-1)[0])
        return InputStats(vecs.shape[0], self.count, None, vecs, vals, residual)

    def for_weight(self, name: str) -> Union[InputStats, TokenCounts, None]:
        """What weight ``name`` (a checkpoint tensor name) reads: its input's :class:`InputStats`,
        :class:`TokenCounts` for the input embedding, None when the file has nothing for it."""
        if self.embedding is not None and name == self.embedding:
            return TokenCounts(self._tensor(COUNTS, name), self.count)
        if name in self.weights:
            return self.for_input(self.weights[name], name)
        return None


# ---------------------------------------------------------------- writing


def _check_inputs(path: Path, inputs: dict, weights: dict[str, str]) -> None:
    for input_id, value in inputs.items():
        if isinstance(value, torch.Tensor):
            if value.ndim != 2 or value.shape[0] != value.shape[1]:
                raise SigmoidDiffError(f"{path}: Gram of input {input_id} has shape {tuple(value.shape)}, not (d, d)")
        else:
            vecs, vals, _ = value
            if vecs.ndim != 2 or vals.shape != (vecs.shape[1],):
                raise SigmoidDiffError(
                    f"{path}: sketch of input {input_id} has eigvecs {tuple(vecs.shape)} and eigvals {tuple(vals.shape)}")
    for weight, input_id in weights.items():
        if input_id not in inputs:
            raise SigmoidDiffError(f"{path}: weight {weight} reads input {input_id}, which has no statistics")


def write_statistics(
    path: Union[str, os.PathLike],
    inputs: dict[str, Union[torch.Tensor, Sketch]],
    weights: dict[str, str],
    counts: Optional[torch.Tensor],
    embedding: Optional[str],
    metadata: dict[str, str],
    count: int,
) -> None:
    """Write a statistics file at ``path``, all or nothing (a temporary file next to it, renamed).

    ``inputs``: input id → the normalised Gram G = X Xᵀ / n (d, d), or its sketch (V, λ, ρ) as
    :func:`eigen_sketch` returns it; ``weights``: weight name → input id; ``counts``: per-token
    occurrences (raw counts, not divided) with ``embedding`` the weight they belong to;
    ``count`` = n, the number of tokens; ``metadata``: the other keys of the module docstring."""
    path = Path(path)
    _check_inputs(path, inputs, weights)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def stored(tensor: torch.Tensor) -> torch.Tensor:
        """float32, contiguous, on the CPU; copied only when it shares storage with another entry."""
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        return tensor

    for input_id, value in inputs.items():
        if isinstance(value, torch.Tensor):
            tensors[tensor_name(input_id, "gram")] = stored(value)
        else:
            vecs, vals, residual = value
            tensors[tensor_name(input_id, "eigvecs")] = stored(vecs)
            tensors[tensor_name(input_id, "eigvals")] = stored(vals)
            tensors[tensor_name(input_id, "residual")] = torch.tensor([float(residual)], dtype=torch.float32)
    if counts is not None:
        tensors[COUNTS] = stored(counts.reshape(-1))
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta.update(format=FORMAT, tokens=str(int(count)), weights=json.dumps(dict(sorted(weights.items()))))
    if counts is not None and embedding:
        meta["embedding"] = embedding
    meta.setdefault("model_stamp", "")
    try:
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise SigmoidDiffError(f"cannot write statistics file {path}: {error.strerror or error}") from None
    os.close(handle)
    try:
        save_file(tensors, temp, metadata=meta)
        os.replace(temp, path)
    except OSError as error:
        raise SigmoidDiffError(f"cannot write statistics file {path}: {error.strerror or error}") from None
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


# ---------------------------------------------------------------- model stamp


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    return files or sorted(folder.glob("*.bin"))


def _row_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _stamp_entry(name: str, shape: list[int], rows: list[torch.Tensor]) -> bytes:
    """Name, dtype, shape and the given rows' bytes of one tensor."""
    head = f"{name}\0{str(rows[0].dtype).replace('torch.', '')}\0{list(shape)}\0".encode()
    return head + b"".join(_row_bytes(row) for row in rows)


def _stamp_rows(sliceable, shape: list[int]) -> list[torch.Tensor]:
    """First and last row of a >= 2-d tensor; the whole of a 1-d one (norms, biases)."""
    if len(shape) >= 2 and shape[0] > 0:
        return [sliceable[0:1], sliceable[shape[0] - 1:shape[0]]]
    return [sliceable[:]]


def model_stamp(folder: Union[str, os.PathLike]) -> str:
    """A fingerprint of the weights in model ``folder``: every tensor's name, dtype, shape and
    its first and last rows (cheap: a slice per tensor; independent of how the checkpoint is
    sharded). Two copies of a model share it; a model with a LoRA merged in does not share its
    base's. Raises :class:`SigmoidDiffError` when ``folder`` holds no weights."""
    folder = Path(folder)
    files = _weight_files(folder) if folder.is_dir() else []
    if not files:
        raise SigmoidDiffError(f"model {folder} has no *.safetensors or *.bin weights to stamp")
    entries: dict[str, bytes] = {}
    try:
        for file in files:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():
                        piece = handle.get_slice(name)
                        shape = list(piece.get_shape())
                        rows = _stamp_rows(piece, shape) if shape else [handle.get_tensor(name)]
                        entries[name] = _stamp_entry(name, shape, rows)
            else:
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
                for name, tensor in state.items():
                    shape = list(tensor.shape)
                    entries[name] = _stamp_entry(name, shape, _stamp_rows(tensor, shape) if shape else [tensor])
    except Exception as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SigmoidDiffError(f"model {folder}: cannot read weights to stamp ({first})") from None
    digest = hashlib.sha256(b"mergekit-sigmoid-diff model stamp 1\0")
    for name in sorted(entries):
        digest.update(entries[name])
    return digest.hexdigest()[:32]


__all__ = [
    "COUNTS", "FORMAT", "InputStats", "StatisticsFile", "TokenCounts",
    "eigen_sketch", "model_stamp", "tensor_name", "write_statistics",
]
