"""Keys for cached results, from what produced them (stdlib only). One key per question:

- :func:`merge_key`: what a merge depends on: the source of the merge math
  (:data:`MERGE_MODULES`: the kernel, the normalizations, the projection, the gate rules, the
  method and VarM, the statistics files, the data-aware solve and its glue, and the prepared
  one-donor transfer the sweep applies at many weights).
- :func:`score_key`: what a score depends on: the scoring module (``scoring.py``) and the bytes
  of the evaluation data the caller names.
- :func:`adapter_key`: whether a LoRA adapter has changed: the bytes of its configuration and
  its weights (not their paths or times: a retrained adapter at the same path gets a new key, a
  copy or a ``touch`` keeps it).

A cached result is valid only for the code and data that produced it: :func:`code_key` hashes
the bytes of the given files (a module stands for its file) together with the package version
and a schema number the caller bumps when the cached record's layout changes, so any edit gives
a new key and the old entries are simply no longer found.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import ModuleType
from typing import Iterable, Union

from mergekit_sigmoid_diff.errors import SigmoidDiffError

Source = Union[str, "os.PathLike[str]", ModuleType]

PACKAGE_DIR = Path(__file__).resolve().parent
# the modules a merged tensor's values depend on (the arithmetic and how a recipe reaches it)
MERGE_MODULES = ("kernel", "normalization", "subspace", "gate_rules", "method", "varm",
                 "statistics", "datasolve", "datamerge", "prepared")
SCORING_MODULE = "scoring"
# what of an adapter folder a LoRA merge reads (peft's file names)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def package_sources(*modules: str) -> list[Path]:
    """The source files of this package's modules, by name (``"kernel"`` → kernel.py)."""
    return [PACKAGE_DIR / f"{name}.py" for name in modules]


def _path(source: Source) -> Path:
    if isinstance(source, ModuleType):
        if not getattr(source, "__file__", None):
            raise ValueError(f"module {source.__name__} has no source file to hash")
        return Path(source.__file__)
    return Path(source)


def _named(source: Union[Source, bytes]) -> tuple[str, bytes]:
    """(name, contents) of a file or module, or ("", the bytes) for data already in memory."""
    if isinstance(source, bytes):
        return "", source
    path = _path(source)
    return path.name, path.read_bytes()


def _digest(head: str, sources: Iterable[Union[Source, bytes]]) -> str:
    digest = hashlib.sha256(head.encode() + b"\0")
    for source in sources:
        name, contents = _named(source)
        digest.update(name.encode() + b"\0")
        digest.update(contents)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def code_key(*sources: Source, schema: int = 1) -> str:
    """16 hex digits from the contents of ``sources`` (files or modules, in the order given),
    the package version and ``schema``. Raises FileNotFoundError for a missing file."""
    return _digest(_head(schema), sources)


def _head(schema: int) -> str:
    from mergekit_sigmoid_diff import __version__

    return f"mergekit-sigmoid-diff {__version__} schema {schema}"


def merge_sources() -> list[Path]:
    """The files :func:`merge_key` hashes (a missing one is an error when hashed)."""
    return package_sources(*MERGE_MODULES)


def merge_key(schema: int = 1) -> str:
    """What a merge depends on: the merge math's source (:data:`MERGE_MODULES`)."""
    return code_key(*merge_sources(), schema=schema)


def score_key(*data: Union[Source, bytes], schema: int = 1) -> str:
    """What a score depends on: the scoring module and ``data``, the evaluation sets in the
    order given, as files or as bytes already in memory (e.g. a digest of the tokenised
    items). Raises FileNotFoundError for a missing file."""
    return _digest(_head(schema), [*package_sources(SCORING_MODULE), *data])


def adapter_key(folder: str | os.PathLike) -> str:
    """Whether a LoRA adapter changed: 16 hex digits from the bytes of the :data:`ADAPTER_FILES`
    in ``folder`` (its configuration, scaling included, and its weights)."""
    paths = [Path(folder) / name for name in ADAPTER_FILES if (Path(folder) / name).is_file()]
    if not any(p.name != "adapter_config.json" for p in paths):
        raise SigmoidDiffError(f"{folder} holds no LoRA adapter weights (adapter_model.safetensors or .bin)")
    return _digest("lora adapter", paths)


__all__ = ["MERGE_MODULES", "ADAPTER_FILES", "adapter_key", "code_key", "merge_key", "merge_sources",
           "package_sources", "score_key"]
