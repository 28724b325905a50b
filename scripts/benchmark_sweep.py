"""What ``sweep`` costs on the shipped pair: wall time, the share outside scoring, peak memory.

    python scripts/benchmark_sweep.py [--threads 2] [--refine] [--workdir DIR]

The main job's transfer (SmolLM2-135M-Instruct, the shipped LoRA pair, the recommended
``sigmoid_diff`` recipe with ``model+lora`` references), swept *warm* (the converted model and the
merged adapters exist; no score is cached: a fresh output folder) over task_arithmetic's 13 λ
(0.25 … 1.75) and the 5 default donor weights, on the default evaluation sizes (the shipped
held-out probe: 64 Shakespeare windows, 16 ``Quiz:`` prompts; B, T and I also on the leak and
chat checks). ``--refine`` adds the λ refinement (:func:`mergekit_sigmoid_diff.frontier.refine`).

Prints the wall time, scoring / loading / applying seconds, the share outside scoring, the
points scored, the peak resident memory (``ru_maxrss``; and, sampled, its anonymous part, the
tensors, and its file-backed part, the mapped safetensors files) against the estimate of
:func:`mergekit_sigmoid_diff.sweepload.model_memory` (B, T and I + one float32 working copy),
the CPU time and the machine's load average; the goals (issue 25): ≤ 3 min on 2 cores, ≤ 20 %
outside scoring, peak ≤ three models + one working copy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml


class MemoryPeaks:
    """Peaks of the process's resident memory, anonymous (heap: tensors) and file-backed (mapped
    safetensors), sampled from /proc/self/status every ``every`` seconds in a thread."""

    def __init__(self, every: float = 0.05):
        import threading

        self.peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in self.peaks:
                self.peaks[key] = max(self.peaks[key], int(value.split()[0]) * 1024)

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self._sample()

    def __enter__(self) -> "MemoryPeaks":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--refine", action="store_true", help="refine the λ grid around each weight")
    parser.add_argument("--workdir", type=Path, default=None, help="the main job's work folder (lora-cache)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from mergekit.options import MergeOptions
    from transformers.utils import logging as hf_logging

    from mergekit_sigmoid_diff import demo, mainjob, scoring, smollm2
    from mergekit_sigmoid_diff import sweep as sweeping
    from mergekit_sigmoid_diff.plugin import lora_notices_silenced
    from mergekit_sigmoid_diff.sweepload import model_memory

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    workdir = (args.workdir or smollm2.cache_root() / "main-job").absolute()
    base = smollm2.converted_model()
    lora_cache = workdir / "lora-cache"
    for name in ("target", "donor"):  # warm: the merged adapters exist before the clock starts
        mainjob.materialise(base, mainjob.ADAPTERS / name, lora_cache)
    heldout = mainjob.load_heldout()
    out = Path(tempfile.mkdtemp(prefix="benchmark-sweep-"))
    recipe = demo.recommended_recipe(base, *(mainjob.lora_ref(base, mainjob.ADAPTERS / n) for n in ("target", "donor")))
    (out / "recipe.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    settings = sweeping.SweepSettings(refine_evaluations=sweeping.REFINE_EVALUATIONS if args.refine else 0, device="cpu")
    cpu0, began = time.process_time(), time.perf_counter()
    with lora_notices_silenced(), MemoryPeaks() as memory:
        sweep = sweeping.Sweep(out / "recipe.yml", out / "sweep", settings, options=MergeOptions(quiet=True, lora_merge_cache=str(lora_cache)),
                               probe_for=lambda tokenizer: scoring.heldout_probe(tokenizer, heldout), axes=demo.AXES, quiet=True)
        result = sweep.run(progress=False)
    wall = time.perf_counter() - began
    cpu = time.process_time() - cpu0
    timing = sweep.timing
    numel = sum(p.numel() for p in sweep.transfer.model.parameters())
    estimate = model_memory(numel, torch.float32)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    points = len(result.rows)
    report = {
        "threads": args.threads, "points": points, "refined_lambdas": result.refined, "items": sweep.probe.only(*demo.AXES.point_sets()).sizes(),
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "score_s": round(timing["score"], 1), "load_s": round(timing["load"], 1),
        "apply_s": round(timing["apply"], 1), "outside_scoring_share": round(1 - timing["score"] / wall, 3),
        "peak_rss_gb": round(peak / 1e9, 2), "peak_anonymous_gb": round(memory.peaks["RssAnon"] / 1e9, 2),
        "peak_file_backed_gb": round(memory.peaks["RssFile"] / 1e9, 2), "estimate_gb": round(estimate / 1e9, 2), "model_float32_gb": round(numel * 4 / 1e9, 2),
        "prepared_gb": round(sweep.transfer.nbytes() / 1e9, 2), "load_average": os.getloadavg(),
        "chosen_weight": result.chosen,
    }
    print(result.table())
    print(json.dumps(report, indent=1))
    print(f"wall {wall:.0f} s ({points} points), {100 * report['outside_scoring_share']:.0f} % outside scoring; "
          f"peak RSS {report['peak_rss_gb']} GB (anonymous {report['peak_anonymous_gb']} GB, mapped files "
          f"{report['peak_file_backed_gb']} GB) vs B, T, I + one working copy = {report['estimate_gb']} GB "
          f"(one model in float32: {report['model_float32_gb']} GB); load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
