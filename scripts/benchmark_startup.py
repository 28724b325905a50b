"""What the import hook costs an unrelated Python program at start-up.

Runs ``python -X importtime -c pass`` N times and reports, side by side, the import time
of this package's hook modules (``mergekit_sigmoid_diff``, ``mergekit_sigmoid_diff._hook``:
all the .pth file loads) and the whole start-up's wall time, as a ratio. It also checks
that no heavy module (torch, mergekit, transformers) was imported.

    python scripts/benchmark_startup.py [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

HOOK_MODULES = ("mergekit_sigmoid_diff", "mergekit_sigmoid_diff._hook")


def one_run() -> tuple[float, float]:
    """(hook import µs, wall µs) for one interpreter start."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import sys; assert 'torch' not in sys.modules and "
         "'mergekit' not in sys.modules and 'transformers' not in sys.modules"],
        capture_output=True, text=True, check=True,
    )
    wall = (time.perf_counter() - start) * 1e6
    hook = 0.0
    for line in result.stderr.splitlines():  # "import time: self [us] | cumulative | name"
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[2] in HOOK_MODULES:
            hook += float(parts[0])
    return hook, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    runs = [one_run() for _ in range(args.runs)]
    hook = statistics.median(h for h, _ in runs)
    wall = statistics.median(w for _, w in runs)
    print(f"runs: {args.runs}")
    print(f"median hook import time:        {hook:8.0f} µs")
    print(f"median interpreter start (wall): {wall:8.0f} µs")
    print(f"hook / start-up:                 {hook / wall:8.4f}")


if __name__ == "__main__":
    main()
