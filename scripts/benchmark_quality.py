#!/usr/bin/env python
"""Quality benchmark: does sigmoid_diff move a donor's feature onto a target while the
target keeps what it learned, better than task_arithmetic and mergekit's other methods?

Trains tiny Llamas on CPU (cached by seed), merges them with mergekit, scores every merge
and writes results.json, results.md and quality.png. Re-running reuses models and scores.

    python scripts/benchmark_quality.py                      # full: 3 seeds, 3 donors
    python scripts/benchmark_quality.py --quick              # 1 seed, few steps, few methods
    python scripts/benchmark_quality.py --donors chat --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergekit-sigmoid-diff" / "quality"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"models and scores (default {DEFAULT_CACHE})")
    parser.add_argument("--out", type=Path, default=Path("docs/quality"), help="where results.{json,md} and quality.png go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--donors", nargs="+", default=["chat", "long", "domain"], choices=["chat", "long", "domain"])
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny training budget, 4 methods, chat donor")
    parser.add_argument("--backend", choices=["inprocess", "subprocess"], default="inprocess",
                        help="mergekit.merge.run_merge in this process, or a mergekit-yaml subprocess per merge")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/results.json's rows")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from benchlib import quality, recipes, report, training

    if args.report_only:
        import json

        written = json.loads((args.out / "results.json").read_text())
        paths = report.write(written["rows"], args.out, written["meta"])
        print("rewrote " + ", ".join(str(p) for p in paths.values()))
        return

    schedule = training.QUICK if args.quick else training.FULL
    seeds = args.seeds[:1] if args.quick else args.seeds
    donors = ("chat",) if args.quick and args.donors == ["chat", "long", "domain"] else tuple(args.donors)
    cache = args.cache_dir / ("quick" if args.quick else "full")
    variants, notes = recipes.available_variants(quick=args.quick)
    for note in notes:
        print(f"note: {note}")
    started = time.perf_counter()
    rows = quality.run(cache, seeds, donors, schedule, variants, args.backend, progress=not args.no_progress)
    meta = {
        "command": "python scripts/benchmark_quality.py" + (" --quick" if args.quick else ""),
        "seeds": seeds,
        "donors": list(donors),
        "schedule": schedule.__dict__,
        "backend": args.backend,
        "notes": notes,
    }
    paths = report.write(rows, args.out, meta)
    print(f"{len(rows)} scores in {time.perf_counter() - started:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
