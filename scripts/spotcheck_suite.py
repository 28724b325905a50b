#!/usr/bin/env python
"""Spot-check the suite's in-memory points against real merges on real weights.

The frontier suite (``benchmark_frontier.py``) scores every setting in memory, through
``sweep``'s engine. This takes the recipe the suite wrote for a family of a case and seed,
merges it at one weight through the real ``mergekit-yaml`` on the suite's thread count, and
compares every written tensor with the in-memory one, bit for bit.

    python scripts/spotcheck_suite.py --case lora-chat --seed 0 --family "data β=0.1 α=0.01" --weight 1.5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark_frontier  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from mergekit_sigmoid_diff import codekey, demo, mainjob, smollm2  # noqa: E402
from mergekit_sigmoid_diff.sweep import Sweep, SweepSettings, recipe_at  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--family", required=True, help="a family name of benchmark_frontier.SETTINGS")
    parser.add_argument("--weight", type=float, required=True)
    parser.add_argument("--threads", type=int, default=1, help="the suite's thread count (its default runs: 1)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="append the result as a JSON line here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = (args.workdir or smollm2.cache_root() / "real_suite").absolute()
    folder = workdir / "frontier" / f"{args.case}-seed{args.seed}"
    recipe_path = folder / "recipes" / f"{hashlib.sha1(args.family.encode()).hexdigest()[:8]}.yml"
    if not recipe_path.is_file():
        raise SystemExit(f"{recipe_path}: the suite has not run {args.family!r} on {args.case} seed {args.seed}")
    with tempfile.TemporaryDirectory() as tmp:
        # the case's own probe and axes, as the suite builds them (no point is scored here)
        probe, axes = benchmark_frontier.probe_and_axes(args.case, AutoTokenizer.from_pretrained(str(smollm2.converted_model())))
        sweep = Sweep(recipe_path, Path(tmp) / "scores", SweepSettings(weights=(args.weight,), bootstrap=0),
                      probe_for=lambda _tokenizer: probe, axes=axes, quiet=True)
        merged = mainjob.run_merge(recipe_at(yaml.safe_load(recipe_path.read_text()), args.weight), Path(tmp) / "merged",
                                   threads=args.threads)
        check = demo.compare(merged, sweep.transfer, args.weight)
    result = {"case": args.case, "seed": args.seed, "family": args.family, "weight": args.weight,
              "threads": args.threads, **check, "merge_key": codekey.merge_key(), "sweep_code": benchmark_frontier.SWEEP_CODE,
              "stamps": sweep.models.stamps}
    print(json.dumps(result))
    if args.out:
        with args.out.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
    return 0 if check["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
