"""``python -m mergekit_sigmoid_diff`` / ``mergekit-sigmoid-diff``: commands that work
where the import hook cannot (``python -S``, ``python -I``, pipx environments).

    merge RECIPE OUT [mergekit-yaml options]   mergekit-yaml with the methods registered
    demo [--workdir DIR] [--quick]             the main job: a real transfer on SmolLM2-135M,
                                               measured against task_arithmetic
    demo --tiny [--workdir DIR]                the plumbing check on tiny random models
    inspect RECIPE [--out DIR] [mergekit-yaml options]
                                               per layer and tensor kind, how much of the donor
                                               diff a recipe applies (no merge; JSON + heatmap),
                                               after the merge's own checks
    calibrate MODEL (--texts FILE | --chats FILE.jsonl) --out FILE.safetensors [options]
                                               statistics of a model's layer inputs on a text
                                               set, for the data-aware merge
    sweep RECIPE --knowledge FILE --feature FILE.jsonl [--both FILE.jsonl] --out DIR [options]
                                               task_arithmetic's λ-curve and the recipe over donor
                                               weights, in memory, scored on your text; writes the
                                               chosen weight's recipe (DIR/chosen.yml)
"""

from __future__ import annotations

import sys
from typing import Sequence

USAGE = __doc__.split("\n\n", 1)[1]


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args else "--help"
    if command == "merge":
        from mergekit_sigmoid_diff.plugin import activate

        activate()
        from mergekit.scripts import run_yaml

        run_yaml.main.main(args=args, prog_name="mergekit-sigmoid-diff merge")
    elif command == "demo":
        from mergekit_sigmoid_diff import demo
        from mergekit_sigmoid_diff.errors import reported

        with reported():
            demo.main(args)
    elif command == "inspect":
        from mergekit_sigmoid_diff import inspection

        inspection.main(args)
    elif command == "calibrate":
        from mergekit_sigmoid_diff import calibrate

        calibrate.main(args)
    elif command == "sweep":
        from mergekit_sigmoid_diff import sweep

        sweep.main(args)
    elif command in ("-h", "--help", "help"):
        print("usage: python -m mergekit_sigmoid_diff COMMAND ...\n\n" + USAGE)
    else:
        sys.exit(f"unknown command {command!r}\n\n{USAGE}")
