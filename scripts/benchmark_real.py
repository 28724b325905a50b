"""The real-weight quality suite: which setting lies beyond task_arithmetic's λ-frontier, per case.

    python scripts/benchmark_real.py [--cases ...] [--seeds 0 1 2] [--tiers 1 2 3 4]
                                     [--workdir DIR] [--out docs/real] [--threads 1] [--report-only] [--quick]

On SmolLM2-135M-Instruct (cases, training and scores: :mod:`benchlib.real`), per case and seed:

1. T and I are trained (or reused from ``WORKDIR``): LoRA pairs by ``scripts/train_adapters.py``
   (seed 0: the pair the package ships), full fine-tunes by :func:`benchlib.real.train_full`;
2. every merge runs through mergekit's ``run_merge`` in this process (the code ``mergekit-yaml``
   runs, with this package's checks; ``--random-seed`` = the seed), into a RAM folder, is scored
   on the held-out sets and deleted;
3. task_arithmetic T + λ(I − B) over λ = 0.25 … 1.75 in steps of 0.125 traces the frontier
   (knowledge loss against feature loss, T as λ = 0); every other merge gets, by
   :mod:`mergekit_sigmoid_diff.frontier`, the knowledge task_arithmetic keeps at its feature,
   ``gap_closed`` (the share of task_arithmetic's knowledge loss it avoids) and the feature
   task_arithmetic reaches at its knowledge.

Merges run in tiers, every case and seed through one tier before the next starts, so an
interrupted run still has whole tiers (:func:`merges`): 1 = task_arithmetic every 0.25, the
published default, the element-wise recommendation of before and ``protect_subspace: input``
(energy 0.5); 2 = the λ grid's in-between points, the projection's other side and energies,
LiNeS and ties / dare_linear / della / breadcrumbs at density 0.6; 3 and 4 = the rest of the
``protect_subspace`` grid (side × energy {0.25, 0.5, 0.75} × weight {1, 1.25}), the other
densities (0.3, 0.9) and weights.

Resumable: trained models, scores (one JSON line each, keyed by case, seed, recipe, the
models' weights, the scoring code and, for a merge, the code that merges it) live in
``WORKDIR`` (default ``~/.cache/mergekit-sigmoid-diff/real_suite``); a rerun scores only what
has no current row, and ``--report-only`` rewrites the report from the cache. Each row records
its merge code (:func:`mergekit_sigmoid_diff.codekey.merge_key` for ``sigmoid_diff``, mergekit's
version for mergekit's methods), its scoring key, the stamps of its own case and seed's B, T and
I, the command that produced it and its seconds. The report shows only rows current by all three
(stamps computed now from the models on disk: :func:`benchlib.realreport.select`); the rest are
counted as stale in its header, with the command that reruns them, never mixed in. Writes
``benchmark_real.json`` (one row per case, seed and merge; per-item scores stay in the cache),
``benchmark_real.md`` and ``frontier.png`` to ``--out``. ``--quick``: one seed of the LoRA
case, four λ and two settings, few held-out items, into a temporary folder (a plumbing check).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_adapters  # noqa: E402
from benchlib import quality  # noqa: E402
from benchlib import real  # noqa: E402
from benchlib import realreport  # noqa: E402

from mergekit_sigmoid_diff import codekey, demo, frontier, mainjob, recommended, smollm2  # noqa: E402
from mergekit_sigmoid_diff.measure import effective_lambda  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

VOCAB_NORMS_UNGATED = recommended.VOCAB_AND_NORMS_UNGATED
ELEMENTWISE = {"gate": VOCAB_NORMS_UNGATED, "midpoint": [0.3, 0.7]}  # the element-wise recommendation before this suite
ELEMENTWISE_FAMILY = "element-wise (vocab+norms out, midpoint 0.3→0.7)"
LAMBDAS = [0.25 + 0.125 * i for i in range(13)]  # 0.25 … 1.75
RECOMMENDED_FAMILY = "protect input e=0.5"  # mergekit_sigmoid_diff/recommended.py's chat and domain setting (the star in the figure)


def _two(base: Path, target: Path, donor: Path, method: str, parameters: dict[str, Any] | None = None,
         target_params: dict[str, Any] | None = None, donor_params: dict[str, Any] | None = None) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(target), "parameters": target_params or {}},
                   {"model": str(donor), "parameters": donor_params or {}}],
        "dtype": "float32",
    }
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def task_arithmetic(lam: float) -> Callable:
    return lambda b, t, i: _two(b, t, i, "task_arithmetic", {"normalize": False}, {"weight": 1.0}, {"weight": lam})


def sigmoid(setting: dict[str, Any], weight: float) -> Callable:
    return lambda b, t, i: _two(b, t, i, "sigmoid_diff", dict(setting), {"role": "target"}, {"weight": weight})


def lines(first: float, last: float) -> Callable:
    return lambda b, t, i: _two(b, t, i, "task_arithmetic", {"normalize": False}, {"weight": 1.0}, {"weight": [first, last]})


def sparsified(method: str, density: float, weight: float) -> Callable:
    extra = {"epsilon": 0.05} if method == "della" else {}
    return lambda b, t, i: _two(b, t, i, method, {"normalize": False}, {"weight": 1.0, "density": 1.0, **extra},
                                {"weight": weight, "density": density, **extra})


PROTECT = {"gate": VOCAB_NORMS_UNGATED}  # protect_subspace settings add side and energy to this


def merges() -> list[tuple[int, str, str, Callable]]:
    """(tier, family, row name, recipe builder) for every merge. Tier 1 gives every case the
    core picture (task_arithmetic every 0.25, the gates, the projection's main form); tier 2
    fills the λ grid to steps of 0.125 and adds the projection's other sides and energies and
    one of each baseline; tiers 3 and 4 sweep the rest."""
    out: list[tuple[int, str, str, Callable]] = [
        (1 if i % 2 == 0 else 2, "task_arithmetic", f"task_arithmetic λ={lam:g}", task_arithmetic(lam)) for i, lam in enumerate(LAMBDAS)]
    out += [(1, "published default", "published default w=1", sigmoid({}, 1.0)),
            (1, ELEMENTWISE_FAMILY, "element-wise w=1", sigmoid(ELEMENTWISE, 1.0)),
            (3, "published default", "published default w=1.25", sigmoid({}, 1.25)),
            (3, ELEMENTWISE_FAMILY, "element-wise w=1.25", sigmoid(ELEMENTWISE, 1.25))]
    tiers = {("input", 0.5, 1.0): 1, ("input", 0.5, 1.25): 1, ("output", 0.5, 1.0): 2, ("output", 0.5, 1.25): 2,
             ("input", 0.25, 1.25): 2, ("input", 0.75, 1.25): 2}
    for side in ("input", "output", "both"):
        for energy in (0.25, 0.5, 0.75):
            if side == "both" and energy != 0.5:
                continue
            for weight in (1.0, 1.25):
                setting = {**PROTECT, "protect_subspace": side, "protect_energy": energy}
                out.append((tiers.get((side, energy, weight), 3), f"protect {side} e={energy:g}",
                            f"protect {side} e={energy:g} w={weight:g}", sigmoid(setting, weight)))
    for tier, first, last in ((2, 0.5, 1.0), (3, 0.75, 1.25), (3, 1.0, 1.5)):
        out.append((tier, "LiNeS", f"LiNeS {first:g}→{last:g}", lines(first, last)))
    for weight in (1.0, 1.25):
        for method in ("ties", "dare_linear", "della", "breadcrumbs"):
            for density in (0.3, 0.6, 0.9):
                tier = 2 if (weight, density) == (1.0, 0.6) else 3 if weight == 1.0 else 4
                out.append((tier, f"{method} d={density:g}", f"{method} d={density:g} w={weight:g}",
                            sparsified(method, density, weight)))
    return out


# ---------------------------------------------------------------- models


def lora_pair(seed: int, workdir: Path, base: Path, threads: int, log: Callable) -> tuple[Path, Path]:
    adapters = mainjob.ADAPTERS if seed == 0 else workdir / "lora" / f"seed{seed}"
    if not (adapters / "train_info.json").is_file():
        log(f"training LoRA pair seed {seed} into {adapters}")
        train_adapters.main(["--seed", str(seed), "--out", str(adapters), "--threads", str(threads)])
    cache = workdir / "lora-cache"
    return (mainjob.materialise(base, adapters / "target", cache), mainjob.materialise(base, adapters / "donor", cache))


def full_model(what: str, seed: int, workdir: Path, base: Path, tokenizer, log: Callable) -> Path:
    folder = workdir / "full" / f"seed{seed}" / what
    info = folder / "train_info.json"
    if not info.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        log(f"full fine-tune: {what}, seed {seed} → {folder}")
        start = time.perf_counter()
        record = real.train_full(base, tokenizer, folder, seed, what, train_adapters.train)
        record["seconds"] = round(time.perf_counter() - start, 1)
        info.write_text(json.dumps(record, indent=1) + "\n")  # written last: the folder is complete
    return folder


def trained(case: str, seed: int, workdir: Path) -> bool:
    if case == "lora-chat":
        return seed == 0 or (workdir / "lora" / f"seed{seed}" / "train_info.json").is_file()
    whats = ("target", "donor" if case == "full-chat" else "domain")
    return all((workdir / "full" / f"seed{seed}" / what / "train_info.json").is_file() for what in whats)


def models_for(case: str, seed: int, workdir: Path, base: Path, tokenizer, threads: int, log: Callable) -> tuple[Path, Path]:
    if case == "lora-chat":
        return lora_pair(seed, workdir, base, threads, log)
    target = full_model("target", seed, workdir, base, tokenizer, log)
    return target, full_model("donor" if case == "full-chat" else "domain", seed, workdir, base, tokenizer, log)


# ---------------------------------------------------------------- the run


def today_keys() -> tuple[str, dict[str, str], str]:
    """(scoring key, merge code per method, merge code of mergekit's own methods): what a row
    must carry to count (:class:`benchlib.realreport.Today`)."""
    return real.scoring_key(), {"sigmoid_diff": codekey.merge_key()}, f"mergekit {version('mergekit')}"


def load_base() -> tuple[Path, Any]:
    """(B's folder, its tokenizer)."""
    from transformers import AutoTokenizer

    base = smollm2.converted_model()
    return base, AutoTokenizer.from_pretrained(str(base))


def make_probe(tokenizer, quick: bool) -> real.Probe:
    """The held-out sets, tokenised (fewer items with ``quick``)."""
    return real.make_probe(tokenizer, mainjob.load_heldout(), **(demo.QUICK_ITEMS if quick else {}))


def training_seconds(workdir: Path, pairs) -> tuple[float, int]:
    """(seconds, models) recorded in the train_info.json of the models the pairs use."""
    infos = set()
    for pair in pairs:
        if pair.case == "lora-chat":
            infos.add((mainjob.ADAPTERS if pair.seed == 0 else workdir / "lora" / f"seed{pair.seed}") / "train_info.json")
        else:
            infos.update(folder / "train_info.json" for folder in (pair.target, pair.donor))
    total, models = 0.0, 0
    for info in sorted(infos):
        seconds = json.loads(info.read_text()).get("seconds") if info.is_file() else None
        if isinstance(seconds, dict):  # scripts/train_adapters.py: seconds per stage, both adapters
            seconds, count = sum(seconds.values()), 2
        else:
            count = 1
        if isinstance(seconds, (int, float)):
            total, models = total + seconds, models + count
    return total, models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(real.CASES), choices=list(real.CASES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tiers", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--workdir", type=Path, default=None, help="cache: trained models, lora-cache, scores")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default docs/real; --quick: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--scratch", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                        help="where merges are written before scoring (default /dev/shm)")
    parser.add_argument("--only", nargs="+", default=None, metavar="PREFIX",
                        help="merge only the settings whose family starts with one of these (the report keeps every current row)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the cached scores")
    parser.add_argument("--train-only", action="store_true", help="train (or check) every case's models, merge nothing")
    parser.add_argument("--no-train", action="store_true", help="skip a case and seed whose models are not trained yet")
    parser.add_argument("--quick", action="store_true", help="plumbing check: LoRA case, seed 0, 4 λ, 2 settings, few items")
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.seeds, args.tiers = ["lora-chat"], [0], [1]
    workdir = (args.workdir or smollm2.cache_root() / "real_suite").absolute()
    out = (args.out or (Path(tempfile.mkdtemp(prefix="benchmark-real-")) if args.quick else ROOT / "docs" / "real")).absolute()
    command = " ".join(["python", "scripts/benchmark_real.py", *(argv if argv is not None else sys.argv[1:])])
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f} s] {message}", flush=True)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    workdir.mkdir(parents=True, exist_ok=True)
    cache = quality.ScoreCache(workdir / ("scores-quick.jsonl" if args.quick else "scores.jsonl"))
    plan = merges()
    if args.quick:
        keep = {"task_arithmetic λ=0.5", "task_arithmetic λ=1", "task_arithmetic λ=1.5", "task_arithmetic λ=1.75",
                "published default w=1", "protect input e=0.5 w=1.25"}
        plan = [m for m in plan if m[2] in keep]
    # today's models (trained now unless --no-train or --report-only) and their stamps: a row
    # counts only with these (the report re-reads them from disk, whatever the cache says)
    base, tokenizer = load_base()
    pairs: dict[tuple[str, int], Pair] = {}
    missing = []
    for case in args.cases:
        for seed in args.seeds:
            if (args.no_train or args.report_only) and not trained(case, seed, workdir):
                log(f"{case} seed {seed}: models not trained yet, skipped")
                missing.append((case, seed))
                continue
            target, donor = models_for(case, seed, workdir, base, tokenizer, args.threads, log)
            stamps = {"B": real.weights_stamp(base), "T": real.weights_stamp(target), "I": real.weights_stamp(donor)}
            pairs[case, seed] = Pair(case, seed, base, target, donor, stamps)
    if args.train_only:
        return
    scoring_key, merge_codes, mergekit_code = today_keys()
    today = realreport.Today(scoring_key, merge_codes, mergekit_code, {k: p.stamps for k, p in pairs.items()})
    if not args.report_only:
        scratch = Path(tempfile.mkdtemp(prefix="real-suite-", dir=args.scratch))
        run = Run(today, cache, make_probe(tokenizer, args.quick), scratch, log, args.quick, command)
        try:
            # merge by merge across every case and seed, so an interrupted run leaves whole
            # families (every seed of a setting) rather than whole cases
            chosen = [m for m in plan if not args.only or m[1].startswith(tuple(args.only))]
            for tier in sorted(set(args.tiers)):
                for pair in pairs.values():
                    for name, folder in (("B (base)", base), ("T (target)", pair.target), ("I (donor)", pair.donor)):
                        score_one(run, pair, name, "input", None, folder)
                for t, family, name, make in chosen:
                    if t == tier:
                        for pair in pairs.values():
                            score_one(run, pair, name, family, make(base, pair.target, pair.donor), None)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    rows, stale = realreport.select(cache.rows.values(), today, args.cases, args.seeds, [name for *_, name, _ in plan])
    if stale:
        log(f"{sum(stale.values())} stale rows, not shown, rerun: " + ", ".join(f"{n} {why}" for why, n in stale.items()))
    trained_seconds, trained_models = training_seconds(workdir, pairs.values())
    meta = {
        "command": command,
        "commands": dict(Counter(r.get("command", "unrecorded") for r in rows)),
        "merge_key": merge_codes["sigmoid_diff"],
        "mergekit": version("mergekit"),
        "scoring_key": scoring_key,
        "stale": dict(stale),
        "rerun": " ".join(["python", "scripts/benchmark_real.py", "--no-train", "--cases", *args.cases,
                           "--seeds", *map(str, args.seeds)]),
        "missing_models": missing,
        "cold_seconds": round(sum(r.get("seconds") or 0.0 for r in rows), 1),
        "training_seconds": round(trained_seconds, 1),
        "trained_models": trained_models,
        "cases": {c: real.CASES[c] for c in args.cases},
        "axes": {c: real.AXES[c] for c in args.cases},
        "seeds": args.seeds,
        "full_fine_tune": real.FULL_SETTINGS,
        "lora": train_adapters.SETTINGS,
        "recommended_family": RECOMMENDED_FAMILY,
        "bootstrap": realreport.BOOTSTRAP,
        "knowledge_floor": frontier.KNOWLEDGE_FLOOR,
        "per_item_scores": str(cache.path),
        "seconds_this_run": round(time.perf_counter() - began, 1),
    }
    paths = realreport.report(rows, plan, out, meta)
    log(f"wrote {', '.join(str(p) for p in paths)}")


@dataclass(frozen=True)
class Pair:
    """One case and seed: its models and their weights' stamps (part of every cache key)."""

    case: str
    seed: int
    base: Path
    target: Path
    donor: Path
    stamps: dict


@dataclass(frozen=True)
class Run:
    """What every score of one run shares."""

    today: realreport.Today
    cache: quality.ScoreCache
    probe: Any
    scratch: Path
    log: Callable[[str], None]
    quick: bool
    command: str


def score_one(run: Run, pair: Pair, name: str, family: str, recipe: dict[str, Any] | None, folder: Path | None) -> None:
    """Score one model of a case and seed (merging it first when ``recipe`` is given), unless
    the cache holds a current row for it (:meth:`benchlib.realreport.Today.stale`)."""
    case, seed, stamps, cache = pair.case, pair.seed, pair.stamps, run.cache
    base, target, donor = pair.base, pair.target, pair.donor
    code = run.today.merge_code(recipe)  # a merge is keyed by the code that merges it
    key = quality.row_key(case, seed, name, recipe, stamps, run.today.scoring_key, run.quick, *([code] if code else []))
    # B, T and I get every score, whatever the case: one entry per model's weights serves every
    # case and seed that uses that model (B is in all of them; the full-fine-tuned T in two cases)
    shared = quality.row_key("input", real.weights_stamp(folder), run.today.scoring_key, run.quick) if recipe is None else None
    mine = {"key": key, "case": case, "seed": seed, "model": name, "family": family, "recipe": recipe,
            "merge_code": code, "scoring_key": run.today.scoring_key, "stamps": stamps}
    if cache.get(key) is not None and run.today.stale(cache.get(key)) is None:
        if shared is not None and cache.get(shared) is None:
            cache.put({**cache.get(key), "key": shared, "case": None, "seed": None})
        return
    if shared is not None and cache.get(shared) is not None:
        # the scores of these very weights, measured for another case or seed: this row's own
        # identity and stamps, and no seconds (the cold cost counts each input model once)
        cache.put({**cache.get(shared), **mine, "seconds": 0.0, "reused": True, "command": run.command})
        return
    lam = None
    clock = [time.perf_counter()]

    def lap() -> str:
        clock.append(time.perf_counter())
        return f"{clock[-1] - clock[-2]:.0f}"

    laps = []
    if recipe is not None:
        folder = run.scratch / key
        torch.manual_seed(seed)
        quality.run_merge(recipe, folder, seed)
        laps.append("merge " + lap())
        if family == "task_arithmetic":
            lam = recipe["models"][1]["parameters"]["weight"]  # T + λ(I − B): λ_eff = λ exactly (tests/test_benchmark_quality.py measures it)
        else:
            lam = effective_lambda(folder, target, donor, base)
            laps.append("λ_eff " + lap())
    model = mainjob.load_model(folder)
    values = real.score(model, run.probe, real.ALL_SCORES if recipe is None else real.MERGE_SCORES[case])
    laps.append("score " + lap())
    del model
    if recipe is not None:
        shutil.rmtree(folder)
    row = {**mine, "lambda_eff": lam, **values, "seconds": round(clock[-1] - clock[0], 1), "command": run.command}
    cache.put(row)
    if shared is not None:
        cache.put({**row, "key": shared, "case": None, "seed": None})
    run.log(f"{case} seed {seed}: {name}: λ_eff {'' if lam is None else f'{lam:.3f}'} ({', '.join(laps)} s)")


if __name__ == "__main__":
    main()
