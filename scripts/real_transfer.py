"""The main job as an experiment: a task_arithmetic λ grid, sigmoid_diff variants, several seeds.

    python scripts/real_transfer.py [--seeds 0 1] [--lambdas ...] [--out docs/real] [--threads 1] [--quick]

Everything but the grid comes from the package (:mod:`mergekit_sigmoid_diff.mainjob`: data,
held-out set, scoring, recipes with mergekit's ``model+lora`` syntax, merges through the real
``mergekit-yaml``, table and figure) and from ``scripts/train_adapters.py``:

- seed 0 uses the adapters the package ships (``train_adapters.py --seed 0``); every other seed
  trains its own pair with ``train_adapters.py --seed N`` into ``WORKDIR/adapters-seedN``
  (cached; about 8 minutes on one core);
- per seed, T = B + target adapter and I = B + donor adapter are materialised once in
  ``WORKDIR/lora-cache``; merges: ``task_arithmetic`` T + λ(I − B) over ``--lambdas`` (to 1.5),
  every sigmoid_diff variant in :data:`VARIANTS`, and ``task_arithmetic`` at each variant's
  λ_eff = ⟨out − T, I − B⟩ / ⟨I − B, I − B⟩;
- every model is scored on the shipped held-out set (``adapters/heldout.json``).

Scores are cached per seed under ``WORKDIR`` (default ``<cache>/real_transfer``) keyed by the
recipe, so a rerun only merges what changed; merged models are deleted once scored. Writes
``real_transfer.json``, ``real_transfer.md`` and ``real_transfer.png`` (if matplotlib is
installed) to ``--out``. ``--quick``: seed 0, λ = 1, the recommended variant, few held-out
items, output to a temporary folder (a plumbing check).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_adapters  # noqa: E402

from mergekit_sigmoid_diff import demo, mainjob, smollm2  # noqa: E402
from mergekit_sigmoid_diff.errors import SigmoidDiffError  # noqa: E402
from mergekit_sigmoid_diff.measure import effective_lambda  # noqa: E402

GATE_VOCAB_NORMS_UNGATED = demo.RECOMMENDED["gate"]
VARIANTS: dict[str, dict[str, Any]] = {  # row name → setting (top-level parameters; ``weight`` goes on the donor)
    "sigmoid_diff published default": {},
    "sigmoid_diff vocab+norms ungated": {"gate": GATE_VOCAB_NORMS_UNGATED},
    "sigmoid_diff recommended": demo.RECOMMENDED,
    # the subspace projection: the prototype's form and the two closest to a win on the tiny benchmark
    "sigmoid_diff protect input e=0.5 w=1.2": {
        "gate": GATE_VOCAB_NORMS_UNGATED, "protect_subspace": "input", "protect_energy": 0.5, "weight": 1.2},
    "sigmoid_diff protect input e=0.25 w=0.75": {
        "gate": GATE_VOCAB_NORMS_UNGATED, "protect_subspace": "input", "protect_energy": 0.25, "weight": 0.75},
    "sigmoid_diff protect output e=0.75 w=0.75": {
        "gate": GATE_VOCAB_NORMS_UNGATED, "protect_subspace": "output", "protect_energy": 0.75, "weight": 0.75},
}
LAMBDAS = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


def adapters_for(seed: int, workdir: Path, threads: int) -> Path:
    """The adapter folder for ``seed``: the shipped one for seed 0, else trained (and cached)."""
    if seed == 0:
        return mainjob.ADAPTERS
    folder = workdir / f"adapters-seed{seed}"
    if not (folder / "train_info.json").is_file():
        print(f"training adapters for seed {seed} into {folder}", flush=True)
        train_adapters.main(["--seed", str(seed), "--out", str(folder), "--threads", str(threads)])
    return folder


def lines_recipe(base: Path, target: str, donor: str, first: float, last: float) -> dict[str, Any]:
    """LiNeS: task_arithmetic with the donor weight rising linearly from the first to the last layer."""
    recipe = mainjob.arithmetic_recipe(base, target, donor, first)
    recipe["models"][1]["parameters"]["weight"] = [first, last]
    return recipe


def ties_recipe(base: Path, target: str, donor: str, density: float = 0.5) -> dict[str, Any]:
    """ties with all of T's diff and the donor's sparsified to ``density``."""
    recipe = mainjob.arithmetic_recipe(base, target, donor, 1.0)
    recipe["merge_method"] = "ties"
    recipe["models"][0]["parameters"]["density"] = 1.0
    recipe["models"][1]["parameters"]["density"] = density
    return recipe


BASELINES = {  # other methods, by row name
    "LiNeS λ=0.75→1.25": lambda b, t, i: lines_recipe(b, t, i, 0.75, 1.25),
    "LiNeS λ=0.5→1": lambda b, t, i: lines_recipe(b, t, i, 0.5, 1.0),
    "ties d=0.5": ties_recipe,
}


def key(recipe: dict[str, Any]) -> str:
    return hashlib.sha1(yaml.safe_dump(recipe, sort_keys=True).encode()).hexdigest()[:12]


def run_seed(seed: int, args: argparse.Namespace, base: Path, probe: mainjob.Probe, clock: mainjob.Clock) -> list[dict[str, Any]]:
    workdir: Path = args.workdir
    adapters = adapters_for(seed, workdir, args.threads)
    lora_cache = workdir / "lora-cache"
    target = clock.run("materialise", lambda: mainjob.materialise(base, adapters / "target", lora_cache), f"seed {seed}: T")
    donor = clock.run("materialise", lambda: mainjob.materialise(base, adapters / "donor", lora_cache), f"seed {seed}: I")
    target_ref, donor_ref = (mainjob.lora_ref(base, adapters / name) for name in ("target", "donor"))
    merges = workdir / f"merges-seed{seed}"
    merges.mkdir(parents=True, exist_ok=True)
    cache_file = merges / f"scores-{args.items}.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    rows: list[dict[str, Any]] = []

    def evaluate(name: str, folder: Path | None, recipe: dict[str, Any] | None) -> dict[str, Any]:
        entry = f"{name}|{key(recipe) if recipe else folder.name}|{adapters}"
        if entry not in cache:
            lam = None
            if recipe is not None:
                folder = merges / key(recipe)
                clock.run("merge", lambda: mainjob.run_merge(recipe, folder, lora_cache, args.threads), f"seed {seed}: merge {name}")
                lam = clock.run("lambda_eff", lambda: effective_lambda(folder, target, donor, base), f"seed {seed}: λ_eff {name}")
            cache[entry] = {"lambda_eff": lam, **clock.run("score", lambda: mainjob.score_folder(folder, probe), f"seed {seed}: score {name}")}
            cache_file.write_text(json.dumps(cache, indent=1, ensure_ascii=False))
            if recipe is not None and not args.keep_merges:
                import shutil

                shutil.rmtree(folder)  # 540 MB; the scores are cached
        row = {"model": name, "seed": seed, **cache[entry]}
        rows.append(row)
        return row

    evaluate("B (base)", base, None)
    evaluate("T (target)", target, None)
    evaluate("I (donor)", donor, None)
    for lam in args.lambdas:
        evaluate(f"task_arithmetic λ={lam:g}", None, mainjob.arithmetic_recipe(base, target_ref, donor_ref, lam))
    if not args.quick:
        for name, make in BASELINES.items():
            evaluate(name, None, make(base, target_ref, donor_ref))
    for name in args.variants:
        row = evaluate(name, None, demo.recommended_recipe(base, target_ref, donor_ref, VARIANTS[name]))
        lam = round(row["lambda_eff"], 4)
        evaluate(f"task_arithmetic @ λ_eff of {name.removeprefix('sigmoid_diff ')}", None,
                 mainjob.arithmetic_recipe(base, target_ref, donor_ref, lam))
    return rows


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model (in first-seen order), the mean of every score over seeds."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        merged: dict[str, Any] = {"model": name, "seeds": len(mine)}
        for field in ("lambda_eff", *mainjob.SCORES):
            values = [r[field] for r in mine]
            merged[field] = None if None in values else sum(values) / len(values)
        out.append(merged)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="cache: adapters of other seeds, lora-cache, scores")
    parser.add_argument("--out", type=Path, default=None, help="default docs/real (--quick: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lambdas", type=float, nargs="+", default=LAMBDAS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--keep-merges", action="store_true", help="keep the merged models (deleted once scored)")
    parser.add_argument("--quick", action="store_true", help="seed 0, λ=1, the recommended variant, few held-out items")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.lambdas, args.variants = [0], [1.0], ["sigmoid_diff recommended"]
    args.items = "quick" if args.quick else "full"
    args.out = (args.out or (Path(tempfile.mkdtemp(prefix="real-transfer-")) if args.quick
                             else Path(__file__).resolve().parents[1] / "docs" / "real")).absolute()
    args.workdir = (args.workdir or smollm2.cache_root() / "real_transfer").absolute()
    torch.set_num_threads(args.threads)
    clock = mainjob.Clock()
    try:
        base = clock.run("convert", smollm2.converted_model, "convert GGUF (cached)")
        heldout = mainjob.load_heldout()
    except SigmoidDiffError as error:
        raise SystemExit(f"error: {error}") from None
    import warnings

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    probe = mainjob.make_probe(tokenizer, heldout, **(demo.QUICK_ITEMS if args.quick else {}))
    rows = [row for seed in args.seeds for row in run_seed(seed, args, base, probe, clock)]
    means = mean_rows(rows)

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join(["python", "scripts/real_transfer.py", *(argv if argv is not None else sys.argv[1:])]),
        "seeds": args.seeds,
        "threads": args.threads,
        "variants": {name: VARIANTS[name] for name in args.variants},
        "adapter_settings": train_adapters.SETTINGS,
        "held_out": {**probe.sizes(), "plays": heldout["plays"], "questions": heldout["questions"]},
        "mean": means,
        "rows": rows,
        "seconds_this_run": {**{k: round(v, 1) for k, v in clock.seconds.items()}, "total": round(clock.total(), 1)},
    }
    (args.out / "real_transfer.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    per_seed = "".join(f"\n### seed {seed}\n\n" + mainjob.table([r for r in rows if r["seed"] == seed], markdown=True)
                       for seed in args.seeds)
    (args.out / "real_transfer.md").write_text(f"### mean over seeds {args.seeds}\n\n" + mainjob.table(means, markdown=True) + per_seed)
    if mainjob.plot_available():
        mainjob.plot(means, args.out / "real_transfer.png",
                     f"SmolLM2-135M-Instruct: T = Shakespeare LoRA, I = 'Quiz: → ANSWER:' LoRA (mean over seeds {args.seeds})")
    else:
        print(f"figure skipped: matplotlib is not installed (install it with: {mainjob.PLOT_HINT})")
    print("\n" + mainjob.table(means))
    print(f"wrote {args.out}; total {clock.total():.0f} s; phases {report['seconds_this_run']}")


if __name__ == "__main__":
    main()
