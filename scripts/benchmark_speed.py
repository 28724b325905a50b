#!/usr/bin/env python
"""sigmoid_diff vs task_arithmetic: wall time, peak RSS and CPU time of real merges.

Builds (once, cached) a synthetic bf16 Llama triple, runs ``mergekit-yaml`` for
``task_arithmetic`` and for each recipe's recommended ``sigmoid_diff`` setting (the top-level
parameters of ``recipes/*.yml``) plus the published default, on the same models with the same
``dtype``/``out_dtype`` and thread count, alternating, and prints the median per-pair ratios;
then a per-tensor kernel micro-benchmark on the largest tensors.

    python scripts/benchmark_speed.py                      # default ~0.6B triple, 3 pairs
    python scripts/benchmark_speed.py --scale-layers 10    # also at half depth (memory scaling)
    python scripts/benchmark_speed.py --threads 0 --load    # torch's default threads, quiet and beside a torch load
    python scripts/benchmark_speed.py --layers 2 --hidden 384 --intermediate 512 --vocab 1000 --pairs 1  # smoke test

``--load`` runs, in every pair, each method once more while a background process started
here (and ended here, by its PID) does 512 x 512 torch matmuls on torch's default threads:
another torch program on the same cores, the case where many small OpenMP regions stall.
The table then has a quiet and an under-load ratio to ``task_arithmetic`` per setting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from benchlib.speed import (
    CONDITIONS,
    BackgroundLoad,
    DRIFTS,
    TASK_ARITHMETIC,
    LlamaShape,
    big_tensor_timings,
    build_synthetic_triple,
    compare_merges,
    kernel_timings,
    largest_tensor_names,
    machine_load,
)

from mergekit_sigmoid_diff.recommended import setting, split

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def recipe_variants() -> dict[str, dict]:
    """label -> sigmoid_diff top-level parameters: the published default and every recipe's."""
    import yaml

    variants = {"sigmoid_diff (published default)": {}}
    by_parameters: dict[str, list[str]] = {}  # recipes with the same parameters are one run
    for path in sorted(RECIPES.glob("*.yml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("merge_method") == "sigmoid_diff":
                if (doc.get("parameters") or {}).get("protect_subspace") == "data":
                    continue  # needs statistics of these very models: scripts/benchmark_data_cost.py times it
                key = json.dumps(doc.get("parameters") or {}, sort_keys=True)
                if path.stem not in by_parameters.setdefault(key, []):
                    by_parameters[key].append(path.stem)
    for key, stems in by_parameters.items():
        variants.setdefault("recipes/" + "+".join(stems), json.loads(key))
    # the recommended projection, if no recipe already measures it
    projection, _ = split(setting("chat-vector"))
    if projection not in variants.values():
        variants[f"protect_subspace {projection['protect_subspace']} e={projection['protect_energy']:g}"] = projection
    return variants


VARIANTS = recipe_variants()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = LlamaShape()
    parser.add_argument("--layers", type=int, default=default.layers)
    parser.add_argument("--hidden", type=int, default=default.hidden)
    parser.add_argument("--intermediate", type=int, default=default.intermediate)
    parser.add_argument("--vocab", type=int, default=default.vocab)
    parser.add_argument("--heads", type=int, default=default.heads)
    parser.add_argument("--kv-heads", type=int, default=default.kv_heads)
    parser.add_argument("--scale-layers", type=int, default=None, help="also run at this depth (memory scaling)")
    parser.add_argument("--pairs", type=int, default=3, help="alternating rounds of all methods (>= 3 for the goal)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every run (mergekit --num-threads); 0: torch's default, as plain mergekit-yaml")
    parser.add_argument("--load", action="store_true",
                        help="also run every pair beside a background torch matmul process (quiet and under-load ratios)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--drift", choices=DRIFTS, default="power-law",
                        help="the target's synthetic drift: full-rank Student-t noise, a decaying spectrum "
                             "(sigma_j ~ j^-0.5), or that spectrum plus 10%% noise energy (power-law)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mergekit-sigmoid-diff" / "speed")
    parser.add_argument("--workdir", type=Path, default=None, help="merge outputs (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=5, help="kernel micro-benchmark repeats")
    parser.add_argument("--skip-merges", action="store_true")
    parser.add_argument("--skip-kernel", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write all measurements here")
    parser.add_argument("--big-tensor", action="store_true",
                        help="seconds per 4096 x 14336 bf16 tensor (8B MLP) for task_arithmetic, the gate and the "
                             "projection (power-law and pure-noise drift), at --threads (1 if 0), and an 8B estimate")
    parser.add_argument("--subspace-tensor", action="store_true",
                        help="also time protect_subspace's basis and projection on one 4096 x 14336 drift (8B MLP shape)")
    args = parser.parse_args(argv)

    variants = {label: VARIANTS[label] for label in args.variants.split(",") if label}
    shape = LlamaShape(
        layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, vocab=args.vocab,
        heads=args.heads, kv_heads=args.kv_heads,
    )
    shapes = [shape] + ([replace(shape, layers=args.scale_layers)] if args.scale_layers else [])
    report: dict = {"threads": args.threads, "pairs": args.pairs, "drift": args.drift, "load": args.load,
                    "runs": {}, "kernel": {}}
    with tempfile.TemporaryDirectory(prefix="sd-speed-", dir=args.workdir) as workdir:
        for current in shapes:
            print(f"== {current.key}: {current.parameters() / 1e9:.3f}B parameters, bf16, {args.drift} drift", flush=True)
            started = time.perf_counter()
            triple = build_synthetic_triple(args.cache, current, drift=args.drift)
            print(f"   triple ready in {time.perf_counter() - started:.0f} s under {triple['base'].parent}", flush=True)
            if not args.skip_merges:
                print(f"   merges ({machine_load()} at start)", flush=True)
                conditions = CONDITIONS if args.load else ("quiet",)
                comparisons = compare_merges(
                    triple, variants, pairs=args.pairs, threads=args.threads, workdir=Path(workdir), log=_flush_print,
                    conditions=conditions,
                )
                print(f"   ({machine_load()} at end)", flush=True)
                for condition, comparison in comparisons.items():
                    print(f"   {condition}:\n" + comparison.table(), flush=True)
                if args.load:
                    print(ratio_table(comparisons), flush=True)
                report["runs"][current.key] = {
                    condition: {
                        "summary": comparison.summary(),
                        "runs": {label: [asdict(r) for r in runs] for label, runs in comparison.runs.items()},
                    }
                    for condition, comparison in comparisons.items()
                }
            if not args.skip_kernel and current is shape:
                report["kernel"][current.key] = {}
                for condition in (CONDITIONS if args.load else ("quiet",)):
                    with BackgroundLoad() if condition == "load" else contextlib.nullcontext():
                        print(f"   kernel micro-benchmark, {condition}, ms per tensor, threads={args.threads or 'default'}"
                              f" ({machine_load()})", flush=True)
                        rows = kernel_timings(triple, largest_tensor_names(current), variants, repeats=args.repeats,
                                              threads=args.threads)
                    for row in rows:
                        print(f"   {row['tensor']} {tuple(row['shape'])}")
                        ta_wall, ta_cpu = row["ms_wall"][TASK_ARITHMETIC], row["ms_cpu"][TASK_ARITHMETIC]
                        for label in row["ms_wall"]:
                            print(f"     {label:28s} wall {row['ms_wall'][label]:8.1f} ms ({row['ms_wall'][label] / ta_wall:5.2f}x)"
                                  f"  cpu {row['ms_cpu'][label]:8.1f} ms ({row['ms_cpu'][label] / ta_cpu:5.2f}x)")
                    report["kernel"][current.key][condition] = rows
    if args.big_tensor:
        threads = args.threads or 1
        print(f"   one 4096 x 14336 bf16 tensor, threads={threads} ({machine_load()})", flush=True)
        big = big_tensor_timings(threads=threads, repeats=args.repeats, log=_flush_print)
        report["big_tensor"] = big
        for label, seconds in big["seconds"].items():
            print(f"   {label:60s} {seconds:7.2f} s per tensor, Llama-3-8B compute ~{big['llama3_8b_estimate_s'][label] / 60:5.1f} min")
    if args.subspace_tensor:
        # the same measurement as scripts/subspace_sweep.py --speed, at this run's thread count
        from subspace_sweep import speed as subspace_speed, speed_markdown

        print(f"   protect_subspace on one 4096 x 14336 float32 drift, threads={args.threads} ({machine_load()})", flush=True)
        report["subspace_tensor"] = subspace_speed(threads=(args.threads,), exact=False, log=lambda line: None)
        print("\n".join(speed_markdown(report["subspace_tensor"])), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def ratio_table(comparisons) -> str:
    """One row per setting: median wall and peak-RSS ratios to task_arithmetic, quiet and under load."""
    quiet, load = comparisons["quiet"], comparisons["load"]
    width = max(len(label) for label in quiet.runs)
    rows = [f"   {'setting':{width}s} {'wall quiet':>10s} {'wall load':>10s} {'RSS quiet':>10s} {'RSS load':>10s}"]
    for label in quiet.runs:
        if label == TASK_ARITHMETIC:
            continue
        rows.append(
            f"   {label:{width}s} {quiet.median_ratio(label, 'wall'):10.3f} {load.median_ratio(label, 'wall'):10.3f}"
            f" {quiet.median_ratio(label, 'peak_rss'):10.3f} {load.median_ratio(label, 'peak_rss'):10.3f}"
        )
    return "\n".join(rows)


def _flush_print(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
