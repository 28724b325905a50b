"""``calibrate``: what one model's linear layers read on one text set, as a statistics file.

    python -m mergekit_sigmoid_diff calibrate MODEL (--texts FILE | --chats FILE.jsonl) --out FILE.safetensors
        [--seq-len 256] [--max-sequences 128] [--batch 8] [--device cpu|cuda] [--dtype float32]
        [--sketch-rank R] [--sketch-above 2048] [--max-size-share 0.10] [--threads N]
        [--lora-merge-cache DIR]

MODEL is a local folder, a hub id, or mergekit's ``model+lora`` (the adapter is merged into
the package's LoRA merge cache exactly as ``mergekit-yaml`` merges it, and the statistics are
stamped with the merged weights). ``--texts``: plain text, tokenised as one stream and cut into
``--seq-len`` windows spread evenly over it (at most ``--max-sequences``). ``--chats``: one
``{"messages": [...]}`` per line, each rendered with the model's chat template, one sequence per
chat (truncated to ``--seq-len``).

Forward pre-hooks on every ``nn.Linear`` (the output embedding only when it is not tied to the
input embedding) accumulate, per DISTINCT input tensor, Σ x xᵀ over the non-padding tokens: the
layers that read one tensor object in the forward pass (q/k/v, gate/up) are found in a first
short pass and share one Gram. Each batch's product is taken in float32 and summed in float64;
nothing of the activations is kept. An input wider than ``--sketch-above`` is accumulated as a
Frequent Directions sketch (Ghashami, Liberty, Phillips, Woodruff, arXiv 1501.01711: ℓ = 2r rows,
‖XᵀX − BᵀB‖₂ ≤ ‖X − X_k‖²_F / (ℓ − k), memory ℓ·d) so memory stays bounded; narrower inputs
are accumulated in full. An input is *stored* as its top-r eigenpairs plus the trace-preserving
residual (:mod:`.statistics`) when it was sketched, or when the file with full Grams would exceed
``--max-size-share`` of the model's weight bytes (small models: a d × d Gram is large next to a
d-wide layer, so SmolLM2-135M's full Grams would take 75 % of its size); r is the largest rank
that keeps the file within that share, or ``--sketch-rank``.
The forward stops at the output embedding's input: logits are never computed.

Which text: the TARGET's statistics need text of the target's DOMAIN (what it was tuned on);
the DONOR's need chats in the donor's FORMAT. Statistics of the target built from generic chat
text make the data-aware merge cancel the donor.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from mergekit_sigmoid_diff import statistics
from mergekit_sigmoid_diff.codekey import code_key, package_sources
from mergekit_sigmoid_diff.errors import SigmoidDiffError, reported

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_SKETCH_RANK = 8
ADVICE = ("which text: the TARGET's file needs text of its DOMAIN (--texts), "
          "the DONOR's file needs chats in its FORMAT (--chats)")


@dataclass(frozen=True)
class CalibrationSettings:
    """How ``calibrate`` reads the text and stores the statistics."""

    seq_len: int = 256
    max_sequences: int = 128
    batch: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    sketch_rank: Optional[int] = None  # None: from max_size_share
    sketch_above: int = 2048
    max_size_share: float = 0.10


@dataclass(frozen=True)
class Summary:
    """What a finished calibration wrote."""

    out: Path
    file_bytes: int
    model_bytes: int
    tokens: int
    sequences: int
    seconds: float
    sketch_rank: Optional[int]  # None when no input is sketched
    kind: str
    settings: CalibrationSettings


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------- texts


def read_texts(path: Path) -> tuple[str, str]:
    """(text, sha256 of its bytes) of a plain-text file; one-line errors for unreadable/empty."""
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise SigmoidDiffError(f"cannot read text file {path}: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SigmoidDiffError(f"text file {path} is not UTF-8 ({error.reason} at byte {error.start})") from None
    if not text.strip():
        raise SigmoidDiffError(f"text file {path} is empty")
    return text, hashlib.sha256(raw).hexdigest()


def read_chats(path: Path) -> tuple[list[list[dict]], str]:
    """(chats, sha256 of the file's bytes) of a JSONL file of ``{"messages": [...]}`` lines."""
    try:
        raw = Path(path).read_bytes()
        lines = raw.decode("utf-8").splitlines()
    except OSError as error:
        raise SigmoidDiffError(f"cannot read chat file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise SigmoidDiffError(f"chat file {path} is not UTF-8 ({error.reason} at byte {error.start})") from None
    chats = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SigmoidDiffError(f"chat file {path} line {number} is not JSON ({error.msg}); expected JSONL") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not (isinstance(messages, list) and messages
                and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise SigmoidDiffError(
                f"chat file {path} line {number} lacks a 'messages' list of {{'role', 'content'}} objects")
        chats.append(messages)
    if not chats:
        raise SigmoidDiffError(f"chat file {path} is empty")
    return chats, hashlib.sha256(raw).hexdigest()


def spread(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over range(total), first and last included."""
    count = min(count, total)
    if count <= 1:
        return [0][:count]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def text_windows(ids: Sequence[int], settings: CalibrationSettings) -> list[list[int]]:
    """Up to ``max_sequences`` disjoint ``seq_len`` windows spread evenly over the token stream
    (one shorter window when the stream is shorter than ``seq_len``)."""
    size = settings.seq_len
    if len(ids) <= size:
        return [list(ids)] if ids else []
    starts = spread(len(ids) - size + 1, min(settings.max_sequences, len(ids) // size))
    return [list(ids[s:s + size]) for s in starts]


def chat_sequences(tokenizer: Any, chats: list[list[dict]], path: Path, model: str,
                   settings: CalibrationSettings) -> list[list[int]]:
    """Up to ``max_sequences`` chats (spread evenly over the file), rendered with the model's chat
    template, tokenised and truncated to ``seq_len``."""
    if not getattr(tokenizer, "chat_template", None):
        raise SigmoidDiffError(f"model {model} has no chat template to render chat file {path}")
    sequences = []
    for index in spread(len(chats), settings.max_sequences):
        try:
            text = tokenizer.apply_chat_template(chats[index], tokenize=False)
        except Exception as error:  # jinja2 errors, template exceptions
            raise SigmoidDiffError(
                f"the chat template of model {model} cannot render chat {index + 1} of {path}: {_first_line(error)}"
            ) from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: settings.seq_len]
        if ids:
            sequences.append(ids)
    if not sequences:
        raise SigmoidDiffError(f"chat file {path} renders to no tokens with model {model}'s chat template")
    return sequences


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelSource:
    spec: str  # as given
    folder: Path  # the weights actually run (a merged LoRA's cache folder)
    tokenizer: Path  # where the tokenizer comes from


def _local_folder(name: str, spec: str) -> Path:
    if Path(name).is_dir():
        return Path(name).absolute()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
    except Exception as error:
        raise SigmoidDiffError(f"model {spec} does not load: {name} is neither a folder nor a reachable hub "
                               f"model ({_first_line(error)})") from None


def resolve_model(spec: str, lora_cache: Optional[Path] = None) -> ModelSource:
    """The folder whose weights ``spec`` means; a ``model+lora`` is merged (once) into the LoRA
    merge cache with mergekit's own merge, as ``mergekit-yaml`` does."""
    if "+" not in spec or Path(spec).is_dir():
        folder = _local_folder(spec, spec)
        return ModelSource(spec, folder, folder)
    base_name, adapter_name = spec.rsplit("+", 1)
    base = _local_folder(base_name, spec)
    adapter = Path(adapter_name).absolute()
    if not (adapter / "adapter_model.safetensors").is_file():
        raise SigmoidDiffError(f"model {spec} does not load: {adapter} holds no adapter_model.safetensors")
    from mergekit_sigmoid_diff.cache import default_lora_merge_cache
    from mergekit_sigmoid_diff.mainjob import materialise
    from mergekit_sigmoid_diff.plugin import lora_notices_silenced

    cache = Path(lora_cache) if lora_cache else default_lora_merge_cache([(str(base), str(adapter))])
    try:
        with lora_notices_silenced(), _transformers_quiet():
            folder = materialise(base, adapter, cache)
    except SigmoidDiffError:
        raise
    except Exception as error:
        raise SigmoidDiffError(f"model {spec} does not load: merging the adapter failed ({_first_line(error)})") from None
    has_tokenizer = any((adapter / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return ModelSource(spec, folder, adapter if has_tokenizer else base)


@contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' info lines and loading/saving progress bars off (our own bar is the one shown)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(source: ModelSource, settings: CalibrationSettings) -> tuple[Any, Any]:
    """(model in eval mode on the device, tokenizer); one-line error when either does not load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _transformers_quiet():
            model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=DTYPES[settings.dtype])
            tokenizer = AutoTokenizer.from_pretrained(source.tokenizer)
    except Exception as error:
        raise SigmoidDiffError(f"model {source.spec} does not load: {_first_line(error)}") from None
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and settings.seq_len > limit:
        raise SigmoidDiffError(
            f"--seq-len {settings.seq_len} is above model {source.spec}'s max_position_embeddings {limit}")
    return model.to(settings.device).eval(), tokenizer


def checkpoint_names(folder: Path) -> set[str]:
    """The tensor names of a model folder's checkpoint (safetensors headers, or .bin keys)."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    if not names:
        for file in sorted(folder.glob("*.bin")):
            names.update(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
    return names


def checkpoint_name(name: str, names: set[str]) -> str:
    """``name`` (a parameter of the loaded model) as the checkpoint spells it: itself, else the
    one checkpoint name that ends with it or that it ends with (a prefix added or dropped)."""
    if not names or name in names:
        return name
    matches = [n for n in names if n.endswith("." + name) or name.endswith("." + n)]
    return matches[0] if len(matches) == 1 else name


def weight_bytes(folder: Path) -> int:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


# ---------------------------------------------------------------- accumulation


class _Stop(Exception):
    """Raised at the output embedding's input: the rest of the forward (logits) is not needed."""


class FullGram:
    """Σ x xᵀ in float64 (each batch's product in float32)."""

    def __init__(self, dim: int, device: str) -> None:
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        self.gram.add_(x.T @ x)

    def result(self, count: int, rank: Optional[int]) -> Any:
        gram = (self.gram / count).cpu()
        return gram.float() if rank is None else statistics.eigen_sketch(gram, rank)


class FrequentDirections:
    """A Frequent Directions sketch B (≤ ℓ rows) of X with BᵀB ≼ XᵀX, plus the exact trace
    Σ‖x‖² (arXiv 1501.01711, Alg. 1 with the batch appended at once)."""

    def __init__(self, dim: int, rows: int, device: str) -> None:
        self.rows, self.dim = rows, dim
        self.b = torch.zeros(0, dim, dtype=torch.float64, device=device)
        self.trace = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        self.trace += float((x * x).sum())
        z = torch.cat([self.b, x])
        if z.shape[0] <= self.rows:
            self.b = z
            return
        vals, vecs = torch.linalg.eigh(z @ z.T)  # ascending; z zᵀ = U Σ² Uᵀ, V = zᵀ U / σ
        vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
        shrink = vals[self.rows]  # σ²_{ℓ+1}
        keep = vals[: self.rows]
        scale = torch.where(keep > 0, ((keep - shrink).clamp_min(0) / keep.clamp_min(1e-300)).sqrt(), 0.0)
        self.b = (vecs[:, : self.rows] * scale).T @ z

    def result(self, count: int, rank: Optional[int]) -> statistics.Sketch:
        vals, vecs = torch.linalg.eigh(self.b @ self.b.T)
        vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
        r = min(int(rank), int((vals > 0).sum()))
        eigvecs = (self.b.T @ vecs[:, :r]) / vals[:r].sqrt()
        eigvals = vals[:r] / count
        residual = max(0.0, (self.trace / count - float(eigvals.sum())) / (self.dim - r)) if r < self.dim else 0.0
        return eigvecs.cpu(), eigvals.cpu(), residual


@dataclass
class _Batch:
    rows: int = 0
    keep: Optional[torch.Tensor] = None  # flat indices of the non-padding tokens (None: all)


class Collector:
    """Hooks on a model's linear layers: one accumulator per distinct input tensor."""

    def __init__(self, model: torch.nn.Module, device: str) -> None:
        self.model, self.device = model, device
        embedding = model.get_input_embeddings()
        output = model.get_output_embeddings()
        self.embedding_weight = embedding.weight
        self.output = output if isinstance(output, torch.nn.Module) else None
        tied = self.output is not None and getattr(self.output, "weight", None) is self.embedding_weight
        self.linears = {name: m for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and not (tied and m is self.output)}
        self.groups: dict[str, list[str]] = {}  # leader module name -> every module reading that input
        self.accumulators: dict[str, Any] = {}
        self.batch = _Batch()
        self.counts = torch.zeros(embedding.weight.shape[0], dtype=torch.float64, device=device)
        self.tokens = 0

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """One forward pass, stopped at the output embedding."""
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass

    def _stopper(self) -> Any:
        def stop(module, args, kwargs):
            raise _Stop

        return self.output.register_forward_pre_hook(stop, with_kwargs=True) if self.output is not None else None

    def discover(self, input_ids: torch.Tensor) -> None:
        """Group the linear layers by the tensor object they read, in one short forward pass."""
        seen: list[tuple[str, torch.Tensor]] = []

        def hook_for(name):
            def record(module, args, kwargs):
                seen.append((name, args[0] if args else kwargs["input"]))
            return record

        handles = [m.register_forward_pre_hook(hook_for(n), with_kwargs=True) for n, m in self.linears.items()]
        handles.append(self._stopper())
        try:
            with torch.inference_mode():
                self.run(input_ids, torch.ones_like(input_ids))
        finally:
            for handle in handles:
                if handle is not None:
                    handle.remove()
        leader_of: dict[int, str] = {}
        for name, tensor in seen:  # the tensors are alive in `seen`, so their ids are distinct
            leader = leader_of.setdefault(id(tensor), name)
            if name not in self.groups.get(leader, []):
                self.groups.setdefault(leader, []).append(name)

    def dims(self) -> dict[str, int]:
        return {leader: self.linears[leader].in_features for leader in self.groups}

    def start(self, ranks: dict[str, Optional[int]], sketch_above: int) -> list[Any]:
        """Accumulators (a Frequent Directions sketch for an input wider than ``sketch_above``
        stored at a rank with 2·rank < d; a full Gram otherwise, eigen-sketched when stored) and
        their hooks."""
        for leader, dim in self.dims().items():
            rank = ranks.get(leader)
            sketched = rank is not None and dim > sketch_above and 2 * rank < dim
            self.accumulators[leader] = (FrequentDirections(dim, 2 * rank, self.device) if sketched
                                         else FullGram(dim, self.device))

        def hook_for(leader):
            accumulator = self.accumulators[leader]

            def accumulate(module, args, kwargs):
                x = args[0] if args else kwargs["input"]
                x = x.reshape(-1, x.shape[-1])
                if x.shape[0] != self.batch.rows:
                    raise SigmoidDiffError(f"module {leader} reads {x.shape[0]} rows for {self.batch.rows} tokens: "
                                           "only layers that read one row per token are supported")
                accumulator.add(x if self.batch.keep is None else x.index_select(0, self.batch.keep))
            return accumulate

        handles = [self.linears[leader].register_forward_pre_hook(hook_for(leader), with_kwargs=True)
                   for leader in self.groups]
        handles.append(self._stopper())
        return handles

    def add_batch(self, sequences: list[list[int]], pad_id: int) -> None:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[row, : len(sequence)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        flat = mask.reshape(-1).bool()
        self.batch = _Batch(rows=flat.numel(), keep=None if bool(flat.all()) else flat.nonzero().reshape(-1))
        valid = ids.reshape(-1)[flat]
        self.counts += torch.bincount(valid, minlength=self.counts.numel()).to(self.counts.dtype)
        self.tokens += int(valid.numel())
        with torch.inference_mode():
            self.run(ids, mask)


# ---------------------------------------------------------------- sizes


def file_bytes(dims: dict[str, int], ranks: dict[str, Optional[int]], vocab: int) -> int:
    """The tensor bytes of a statistics file (float32): d² per full input, d·r + r + 1 per sketch."""
    total = 4 * vocab
    for leader, dim in dims.items():
        rank = ranks.get(leader)
        total += 4 * (dim * dim if rank is None else dim * rank + rank + 1)
    return total


def choose_ranks(dims: dict[str, int], vocab: int, model_bytes: int,
                 settings: CalibrationSettings) -> dict[str, Optional[int]]:
    """Per input: None (full Gram) for d ≤ sketch_above, else the sketch rank: ``sketch_rank``, or
    the largest r that keeps the file within ``max_size_share`` of the model's bytes (at least
    :data:`MIN_SKETCH_RANK`)."""
    limit = settings.max_size_share * model_bytes
    wide = [leader for leader, dim in dims.items() if dim > settings.sketch_above]
    if wide and file_bytes(dims, {k: 0 for k in wide}, vocab) > limit:
        wide = list(dims)  # the narrow inputs' full Grams alone break the size share
    elif not wide and file_bytes(dims, {}, vocab) > limit:
        wide = list(dims)  # every input fits in memory, but not in the file
    if not wide:
        return {}
    if settings.sketch_rank is not None:
        rank = settings.sketch_rank
    else:
        budget = limit - file_bytes(dims, {k: 0 for k in wide}, vocab)
        per_rank = 4 * sum(dims[leader] + 1 for leader in wide)
        rank = max(MIN_SKETCH_RANK, int(budget // per_rank))
    return {leader: min(rank, dims[leader]) for leader in wide}


# ---------------------------------------------------------------- the command


def calibrate(model: str, out: Path, *, texts: Optional[Path] = None, chats: Optional[Path] = None,
              settings: CalibrationSettings = CalibrationSettings(), lora_cache: Optional[Path] = None,
              progress: bool = True, tokenizer: Optional[str] = None) -> Summary:
    """Write the statistics of ``model`` on ``texts`` or ``chats`` to ``out`` (see the module docstring).
    ``tokenizer``: a folder or hub id to take the tokenizer from, for a model folder that has none
    (default: the model's own, or for ``model+lora`` the adapter's, else its model's)."""
    started = time.perf_counter()
    out = Path(out).absolute()
    if (texts is None) == (chats is None):
        raise SigmoidDiffError("calibrate needs exactly one of --texts FILE and --chats FILE.jsonl")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise SigmoidDiffError(f"cannot write statistics file {out}: folder {out.parent} is missing or not writable")
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise SigmoidDiffError(f"--device {settings.device}: CUDA is not available on this machine")
    if settings.sketch_rank is not None and settings.sketch_rank < 1:
        raise SigmoidDiffError(f"--sketch-rank must be at least 1, not {settings.sketch_rank}")
    for name in ("seq_len", "max_sequences", "batch"):
        if getattr(settings, name) < 1:
            raise SigmoidDiffError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(settings, name)}")
    kind = "texts" if texts is not None else "chats"
    text, text_hash = read_texts(texts) if texts is not None else (None, None)
    chat_list, chat_hash = read_chats(chats) if chats is not None else (None, None)

    source = resolve_model(model, lora_cache)
    if tokenizer is not None:
        source = replace(source, tokenizer=Path(tokenizer))
    net, tokenizer = load_model(source, settings)
    if text is not None:
        with _transformers_quiet():  # "sequence longer than the model's maximum": it is cut into windows
            stream = tokenizer(text, add_special_tokens=False)["input_ids"]
        sequences = text_windows(stream, settings)
        if not sequences:
            raise SigmoidDiffError(f"text file {texts} holds no tokens for model {model}")
    else:
        sequences = chat_sequences(tokenizer, chat_list, chats, model, settings)

    collector = Collector(net, settings.device)
    collector.discover(torch.tensor([sequences[0][:8]], dtype=torch.long, device=settings.device))
    dims = collector.dims()
    vocab = collector.counts.numel()
    model_bytes = weight_bytes(source.folder)
    ranks = choose_ranks(dims, vocab, model_bytes, settings)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    from tqdm import tqdm

    handles = collector.start(ranks, settings.sketch_above)
    try:
        batches = range(0, len(sequences), settings.batch)
        for first in tqdm(batches, desc="calibrate", unit="batch", disable=not progress, file=sys.stderr):
            collector.add_batch(sequences[first: first + settings.batch], pad_id)
    finally:
        for handle in handles:
            if handle is not None:
                handle.remove()

    names = checkpoint_names(source.folder)
    n = collector.tokens
    # popped one by one: each float64 accumulator is freed once its result exists
    inputs = {leader: collector.accumulators.pop(leader).result(n, ranks.get(leader)) for leader in collector.groups}
    weights = {checkpoint_name(f"{member}.weight", names): leader
               for leader, members in collector.groups.items() for member in members}
    embedding = next(name for name, p in net.named_parameters(remove_duplicate=False)
                     if p is collector.embedding_weight)
    metadata = {
        "model_stamp": statistics.model_stamp(source.folder),
        "model": model,
        "text_hash": text_hash or chat_hash,
        "text_kind": kind,
        "sequences": str(len(sequences)),
        "seq_len": str(settings.seq_len),
        "code": code_version(),
        "sketch_above": str(settings.sketch_above),
        "sketch_rank": "" if not ranks else str(max(ranks.values())),
    }
    partial = out.with_name(out.name + ".partial")  # renamed when complete: an interrupted run leaves no file at out
    statistics.write_statistics(partial, inputs, weights, collector.counts, checkpoint_name(embedding, names),
                                metadata, n)
    partial.replace(out)
    return Summary(out, out.stat().st_size, model_bytes, n, len(sequences), time.perf_counter() - started,
                   max(ranks.values()) if ranks else None, kind, settings)


def code_version() -> str:
    """The key of the code that writes a statistics file (its ``code`` metadata): a file written
    under another key may hold other numbers."""
    return code_key(*package_sources("statistics", "calibrate"))


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 1e5 else f"{count / 1e3:.1f} kB"


def describe(summary: Summary) -> str:
    """The closing lines: the file, its size against the model's, tokens, sequences, seconds, advice."""
    share = summary.file_bytes / summary.model_bytes if summary.model_bytes else float("nan")
    sketch = ("no input sketched" if summary.sketch_rank is None
              else f"inputs above the sketch threshold kept at rank {summary.sketch_rank}")
    lines = [
        f"wrote {summary.out}: {_size(summary.file_bytes)} = {100 * share:.1f} % of the model's "
        f"{_size(summary.model_bytes)} ({sketch}); {summary.tokens} tokens in {summary.sequences} "
        f"sequences ({summary.kind}); {summary.seconds:.1f} s",
        f"{ADVICE}; this file holds {summary.kind}",
    ]
    limit = summary.settings.max_size_share
    if summary.model_bytes and share > limit:
        lines.insert(1, f"note: the file is above --max-size-share {limit:g}: inputs up to --sketch-above "
                        f"{summary.settings.sketch_above} wide are kept in full (lower --sketch-above to sketch them)")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mergekit_sigmoid_diff calibrate",
                                description="Statistics of one model on one text set, for the data-aware merge. "
                                + ADVICE + ".")
    p.add_argument("model", help="a model folder, a hub id, or base_folder+adapter_folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--texts", type=Path, help="plain text (the target's domain)")
    source.add_argument("--chats", type=Path, help="JSONL of {'messages': [...]} (the donor's format)")
    p.add_argument("--out", type=Path, required=True, help="the statistics file to write (.safetensors)")
    d = CalibrationSettings()
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--max-sequences", type=int, default=d.max_sequences)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--device", default=d.device, help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype, help="the model's dtype while it runs")
    p.add_argument("--sketch-rank", type=int, default=None, help="rank of the sketched inputs (default: from the size share)")
    p.add_argument("--sketch-above", type=int, default=d.sketch_above, help="sketch inputs wider than this")
    p.add_argument("--max-size-share", type=float, default=d.max_size_share,
                   help="the file's size budget, as a share of the model's weight bytes")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--lora-merge-cache", type=Path, default=None, help="where a model+lora is merged")
    p.add_argument("--tokenizer", default=None, help="take the tokenizer from this folder or hub id (a model folder without one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str]) -> None:
    args = parser().parse_args(list(argv))
    with reported():
        if args.threads is not None:
            if args.threads < 1:
                raise SigmoidDiffError(f"--threads must be at least 1, not {args.threads}")
            torch.set_num_threads(args.threads)
        settings = CalibrationSettings(
            seq_len=args.seq_len, max_sequences=args.max_sequences, batch=args.batch, device=args.device,
            dtype=args.dtype, sketch_rank=args.sketch_rank, sketch_above=args.sketch_above,
            max_size_share=args.max_size_share,
        )
        summary = calibrate(args.model, args.out, texts=args.texts, chats=args.chats, settings=settings,
                            lora_cache=args.lora_merge_cache, progress=not args.quiet,
                            tokenizer=args.tokenizer)
        print(describe(summary))


__all__ = ["CalibrationSettings", "Summary", "calibrate", "describe", "main"]
