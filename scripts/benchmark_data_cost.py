#!/usr/bin/env python
"""The data-aware merge's cost at Llama-3-8B size: measured per tensor, scaled (issue 26).

``protect_subspace: data`` costs, per input of width d (q/k/v share one, gate/up one), one
float64 solve (:func:`mergekit_sigmoid_diff.datasolve.prepare`: Cholesky of G_T + β G_I + α 1,
then ``cholesky_solve``, ~7/3 d³ flops, on one thread by design), and per weight of ``out``
rows one product D − D P (2 · out · d² flops, the compute dtype, the caller's threads).
task_arithmetic costs T + λD (two flops per element).

This script times both at the widths it can hold here (random SPD Grams, float32 diffs), fits
each time to its flop count at the largest width measured, and scales to Llama-3-8B's shapes:
32 layers of hidden 4096 (q 4096, k/v 1024 rows), intermediate 14336. Scaled, not measured
whole; the largest width (14336) is extrapolated by d³.

    python scripts/benchmark_data_cost.py [--widths 1024 2048 4096] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mergekit_sigmoid_diff import datasolve

# Llama-3-8B: per layer, each input (width) and the rows of the weights that read it
LLAMA3_8B = {"layers": 32, "inputs": [(4096, 4096 + 1024 + 1024), (4096, 4096), (4096, 2 * 14336), (14336, 4096)]}


def timed(work, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def measure(width: int, device: torch.device, seed: int = 0) -> dict[str, float]:
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(width, 2 * width, generator=generator)
    x_i = torch.randn(width, width // 2, generator=generator)
    g_t, g_i = ((x @ x.T / x.shape[1]).to(device) for x in (x_t, x_i))
    diff = (torch.randn(width, width, generator=generator) * 1e-2).to(device)
    target = torch.randn(width, width, generator=generator).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def solve():
        datasolve.prepare(g_t, g_i)
        sync()

    solved = datasolve.prepare(g_t, g_i)

    def product():
        solved.apply(target, diff)
        sync()

    def plain():
        target.add(diff, alpha=1.25)
        sync()

    return {"width": width, "solve_s": timed(solve, 2), "product_s": timed(product), "task_arithmetic_s": timed(plain)}


def scale(rows: list[dict[str, float]], model: dict) -> dict[str, float]:
    """Seconds for the whole model from the largest width's per-flop rates."""
    top = max(rows, key=lambda r: r["width"])
    d = top["width"]
    solve_rate = top["solve_s"] / d ** 3                 # per d³
    product_rate = top["product_s"] / (d * d * d)        # per out · d², out = d
    plain_rate = top["task_arithmetic_s"] / (d * d)      # per element
    solve = product = plain = 0.0
    for width, out in model["inputs"]:
        solve += solve_rate * width ** 3
        product += product_rate * out * width ** 2
        plain += plain_rate * out * width
    layers = model["layers"]
    return {"solve_s": layers * solve, "product_s": layers * product, "task_arithmetic_s": layers * plain}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    rows = []
    print(f"device {device}, {args.threads} threads (the solve runs on one by design)")
    print(f"{'width':>6} {'solve s':>9} {'D − D P s':>10} {'T + λD s':>9}")
    for width in args.widths:
        row = measure(width, device)
        rows.append(row)
        print(f"{width:>6} {row['solve_s']:>9.3f} {row['product_s']:>10.4f} {row['task_arithmetic_s']:>9.5f}", flush=True)
    whole = scale(rows, LLAMA3_8B)
    total = whole["solve_s"] + whole["product_s"]
    print(f"\nLlama-3-8B (32 layers; scaled from width {max(args.widths)}; 14336 extrapolated by d³):")
    print(f"  solves {whole['solve_s'] / 60:.1f} min + products {whole['product_s'] / 60:.1f} min = {total / 60:.1f} min of "
          f"linear-layer work, against {whole['task_arithmetic_s']:.1f} s for task_arithmetic's T + λD on the same weights "
          "(reading and writing the tensors, the same for both, not included)")
    if args.out:
        args.out.write_text(json.dumps({"device": str(device), "threads": args.threads, "rows": rows,
                                        "llama3_8b": whole}, indent=1) + "\n")


if __name__ == "__main__":
    main()
