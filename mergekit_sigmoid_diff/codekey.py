"""Keys for caches of computed results, from the code that computed them (stdlib only).

A cached score is only valid for the code that produced it: a rerun after a change to the
scoring or to the kernel must not report the old numbers. :func:`code_key` hashes the bytes
of the given source files (a module stands for its file) together with the package version
and a schema number the caller bumps when the cached record's layout changes, so any edit to
those files gives a new key and the old entries are simply no longer found.

    from mergekit_sigmoid_diff.codekey import code_key, package_sources
    key = code_key(*package_sources("kernel", "normalization", "subspace", "method"), scoring_module, schema=1)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import ModuleType
from typing import Union

Source = Union[str, "os.PathLike[str]", ModuleType]

PACKAGE_DIR = Path(__file__).resolve().parent
# the modules a merged tensor's values depend on (the arithmetic and how a recipe reaches it)
MERGE_MATH = ("kernel", "normalization", "subspace", "gate_rules", "method", "varm")


def package_sources(*modules: str) -> list[Path]:
    """The source files of this package's modules, by name (``"kernel"`` → kernel.py)."""
    return [PACKAGE_DIR / f"{name}.py" for name in modules]


def _path(source: Source) -> Path:
    if isinstance(source, ModuleType):
        if not getattr(source, "__file__", None):
            raise ValueError(f"module {source.__name__} has no source file to hash")
        return Path(source.__file__)
    return Path(source)


def code_key(*sources: Source, schema: int = 1) -> str:
    """16 hex digits from the contents of ``sources`` (files or modules, in the order given),
    the package version and ``schema``. Raises FileNotFoundError for a missing file."""
    from mergekit_sigmoid_diff import __version__

    digest = hashlib.sha256(f"mergekit-sigmoid-diff {__version__} schema {schema}\0".encode())
    for source in sources:
        path = _path(source)
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


__all__ = ["MERGE_MATH", "code_key", "package_sources"]
