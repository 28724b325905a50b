"""The package's cache folders (stdlib only).

- :func:`cache_root`: ``$MERGEKIT_SIGMOID_DIFF_CACHE``, else ``~/.cache/mergekit-sigmoid-diff``
  (the converted SmolLM2 model, the main job's work folder).
- :func:`default_lora_merge_cache`: where mergekit writes a ``model+lora`` reference's merged
  model when the user gave no ``--lora-merge-cache``: ``<cache_root>/lora-merge-cache/<key>``.

mergekit names a merged LoRA after the model's and the adapter's *paths* and reuses the folder
whenever it exists, so a retrained adapter at the same path would silently reuse the old
weights. The ``<key>`` sub-folder is therefore a hash of every adapter reference in the recipe
together with each adapter's contents (:func:`.codekey.adapter_key`: its configuration and
weights, the one rule for "has an adapter changed") and the size and modification time of its
model's files (hashing a base model would mean reading gigabytes): the same adapters reuse
their merged models, a changed adapter is merged afresh.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional

CACHE_ENV = "MERGEKIT_SIGMOID_DIFF_CACHE"
LORA_CACHE_NAME = "lora-merge-cache"


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """``cache``, else ``$MERGEKIT_SIGMOID_DIFF_CACHE``, else ``~/.cache/mergekit-sigmoid-diff``."""
    chosen = cache or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mergekit-sigmoid-diff"
    return Path(chosen).expanduser().absolute()


def _file_stamps(folder: str) -> list[str]:
    """name:size:mtime of the files directly in ``folder`` (none for a hub id)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    stamps = []
    for entry in entries:
        if entry.is_file():
            info = entry.stat()
            stamps.append(f"{entry.name}:{info.st_size}:{info.st_mtime_ns}")
    return stamps


def _adapter_stamp(adapter: str) -> str:
    """The adapter's content key, or "" for a reference that is not a local adapter folder."""
    from mergekit_sigmoid_diff.codekey import adapter_key
    from mergekit_sigmoid_diff.errors import SigmoidDiffError

    try:
        return adapter_key(adapter) if Path(adapter).is_dir() else ""
    except SigmoidDiffError:
        return ""


def default_lora_merge_cache(adapters: Iterable[tuple[str, str]], root: Optional[Path] = None) -> Path:
    """The default LoRA merge cache for a recipe whose ``model+lora`` references are
    ``adapters`` = [(model path, adapter path), ...] (see the module docstring)."""
    digest = hashlib.sha256()
    for model, adapter in sorted(set(adapters)):
        for part in (model, adapter, *_file_stamps(model), _adapter_stamp(adapter)):
            digest.update(part.encode())
            digest.update(b"\0")
    return (root or cache_root()) / LORA_CACHE_NAME / digest.hexdigest()[:16]
