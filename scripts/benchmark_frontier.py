"""The real-weight suite on in-memory points: every setting and baseline against task_arithmetic's
refined λ-frontier, with paired-bootstrap intervals, per case and seed.

    python scripts/benchmark_frontier.py [--cases ...] [--seeds 0 1 2] [--families ...]
                                         [--workdir DIR] [--out docs/real] [--threads 2]

Per case and seed (models trained by ``scripts/benchmark_real.py --train-only`` and
``python -m benchlib.alllayers``; statistics by :mod:`benchlib.calibration`):

1. our settings run through :class:`mergekit_sigmoid_diff.sweep.Sweep`, the engine of the
   ``sweep`` command: B, T and I are read once, every point is applied in memory, bit for bit
   what ``mergekit-yaml`` writes for that recipe at that weight (``tests/test_sweep.py``), and
   task_arithmetic's λ grid is refined around every point until a halving changes its
   ``gap_closed`` by < 0.02 (:func:`mergekit_sigmoid_diff.frontier.refine`);
2. the baselines (:mod:`benchlib.baselines`: WUDI, TSV-M, Iso-C, Iso-CTS, DOP, RegMean, AIM)
   are applied to the same B, T and I in memory, at several donor scales, and the curve is
   refined around each of their points the same way;
3. every point is scored once by :mod:`mergekit_sigmoid_diff.scoring` (cached in
   ``WORKDIR/frontier/<case>-seed<seed>/scores.jsonl``, keyed by the models' stamps, the point,
   the merge code and the score key: a rerun scores only what is missing);
4. each family is taken at its best point (largest ``gap_closed``), never at the edge of what
   was tried while a step past it is allowed (:func:`widen`); its interval is a paired
   bootstrap over the evaluation items (:func:`mergekit_sigmoid_diff.frontier.bootstrap_gaps`).

``--statistics-only`` makes or checks the statistics files and scores nothing
(:func:`benchlib.calibration.current`: a file is reused only while today's ``calibrate`` writes
the same numbers).

Writes ``frontier.json`` (every point, its gap and interval) and ``frontier.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import alllayers, baselines, calibration, real  # noqa: E402

from mergekit_sigmoid_diff import codekey, frontier, mainjob, scoring, smollm2  # noqa: E402
from mergekit_sigmoid_diff import sweep as sweep_module  # noqa: E402
from mergekit_sigmoid_diff.errors import SigmoidDiffError  # noqa: E402
from mergekit_sigmoid_diff.sweep import Axes, Sweep, SweepSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = [*real.CASES, alllayers.CASE]
UNGATED = [{"filter": "embed_tokens", "value": False}, {"filter": "lm_head", "value": False},
           {"filter": "norm", "value": False}, {"value": True}]
# the statistics a data family reads: (sequences per file, the model that reads the donor's data)
Statistics = tuple[int, str]
OWN = (128, "donor")  # T on its training text, I on its training chats: 128 sequences each
# (family, recipe parameters, donor weights, statistics or None)
SETTINGS: list[tuple[str, dict[str, Any], tuple[float, ...], Statistics | None]] = [
    ("protect both e=0.5 (recommended)", {"gate": UNGATED, "protect_subspace": "both", "protect_energy": 0.5},
     (0.75, 1.0, 1.25, 1.5), None),
    ("protect input e=0.5", {"gate": UNGATED, "protect_subspace": "input", "protect_energy": 0.5},
     (0.75, 1.0, 1.25, 1.5), None),
    ("published default", {}, (1.0, 1.25), None),
    ("data β=0.1 α=0.01", {"protect_subspace": "data"}, (1.0, 1.5, 2.0), OWN),
    ("data β=1 α=0.01", {"protect_subspace": "data", "data_beta": 1.0}, (1.0, 1.5, 2.0), OWN),
]
# issue 26's grid around the data default (asked for by name: --families ... "data hard")
GRID: list[tuple[str, dict[str, Any], tuple[float, ...], Statistics | None]] = [
    ("data β=0.1 α=0.1", {"protect_subspace": "data", "data_alpha": 0.1}, (1.0, 1.5, 2.0), OWN),
    ("data hard", {"protect_subspace": "data", "data_hard": True}, (1.0, 1.5, 2.0), OWN),
    ("data X_I from T", {"protect_subspace": "data"}, (1.0, 1.5, 2.0), (128, "target")),
    ("data 32 sequences", {"protect_subspace": "data"}, (1.0, 1.5, 2.0), (32, "donor")),
    ("data 512 sequences", {"protect_subspace": "data"}, (1.0, 1.5, 2.0), (512, "donor")),
]
BASELINE_SCALES = (0.75, 1.0, 1.25)
# a family's best point must not sit at the edge of what was tried: the weights (or scales) are
# widened by one step past an edge holding the best gap, up to these limits and this many steps
WIDEN_LIMITS = (0.25, 3.0)
WIDEN_STEPS = 3
EXCLUDE = ("embed_tokens", "lm_head")  # vocabulary tensors take T + s·D in every baseline (as our recipes)


def case_models(case: str, seed: int, workdir: Path, base: Path) -> tuple[Path, Path]:
    """The trained T and I of a case and seed (full model folders); never trains."""
    cache = workdir / "lora-cache"
    if case in ("lora-chat", alllayers.CASE):
        folder = (mainjob.ADAPTERS if seed == 0 else workdir / "lora" / f"seed{seed}") if case == "lora-chat" \
            else workdir / "alllayers" / f"seed{seed}"
        if not (folder / "target").is_dir():
            raise SystemExit(f"{case} seed {seed}: {folder} is not trained yet")
        return mainjob.materialise(base, folder / "target", cache), mainjob.materialise(base, folder / "donor", cache)
    folder = workdir / "full" / f"seed{seed}"
    donor = folder / ("donor" if case == "full-chat" else "domain")
    if not (donor / "train_info.json").is_file():
        raise SystemExit(f"{case} seed {seed}: {donor} is not trained yet")
    return folder / "target", donor


def probe_and_axes(case: str, tokenizer) -> tuple[scoring.Probe, Axes]:
    if case == alllayers.CASE:
        return alllayers.make_probe(tokenizer), Axes(knowledge="pydoc", feature="feature", both="pydoc_both")
    heldout = mainjob.load_heldout()
    if case == "full-domain":
        probe = scoring.heldout_probe(tokenizer, heldout, extra={"domain": real.domain_windows(tokenizer)[1]})
        return probe, Axes(knowledge="shakespeare", feature="domain")
    return scoring.heldout_probe(tokenizer, heldout), Axes(knowledge="shakespeare", feature="feature", both="both")


def write_recipe(path: Path, base: Path, target: Path, donor: Path, parameters: dict[str, Any]) -> Path:
    recipe = {"merge_method": "sigmoid_diff", "base_model": str(base),
              "models": [{"model": str(target), "parameters": {"role": "target"}}, {"model": str(donor)}],
              "dtype": "float32"}
    if parameters:
        recipe["parameters"] = parameters
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(str(shard)).items()})
    return out


BASELINE_CODE = hashlib.sha256(inspect.getsource(baselines).encode()).hexdigest()[:16]
SWEEP_CODE = codekey.code_key(*codekey.package_sources("sweepload"))  # how the sweep reaches the merge (part of its keys)


@dataclass(frozen=True)
class Keys:
    """What a run's rows depend on, each recorded in the run: ``merge_key`` (the merge math),
    ``sweep_code`` (how the sweep reaches it), ``baseline_code`` (the baselines' formulas) and, per
    case, ``score_key`` (the scoring code and the evaluation items: :func:`case_score_key`). A run
    is current only when every key given here matches its own; a key left None is not checked."""

    merge_key: str
    sweep_code: str | None = None
    baseline_code: str | None = None
    score_keys: Mapping[str, str] | None = None  # by case

    def current(self, run: dict[str, Any]) -> bool:
        return (run.get("merge_key") == self.merge_key
                and (self.sweep_code is None or run.get("sweep_code") == self.sweep_code)
                and (self.baseline_code is None or run.get("baseline_code") == self.baseline_code)
                and (self.score_keys is None or run.get("score_key") == self.score_keys.get(run["case"])))


def case_score_key(case: str, tokenizer) -> str:
    """What a case's scores depend on: the scoring code and its probe's items (:func:`probe_and_axes`)."""
    return scoring.score_key(probe_and_axes(case, tokenizer)[0])


def today(tokenizer, cases: list[str]) -> Keys:
    """Today's keys, for ``cases``."""
    return Keys(codekey.merge_key(), SWEEP_CODE, BASELINE_CODE, {case: case_score_key(case, tokenizer) for case in cases})


def fresh(runs: list[dict[str, Any]], keys: Keys) -> tuple[list[dict], list[dict]]:
    """(current runs, stale runs) by :meth:`Keys.current`: a stale run is reported as such and
    rerun, never mixed into the tables."""
    ok = [r for r in runs if keys.current(r)]
    return ok, [r for r in runs if r not in ok]


class Ledger:
    """The wall time spent on one case and seed, per invocation, in ``ledger.json`` beside its score
    cache: each invocation rewrites its own entry after every family, so an invocation that is
    killed keeps the time up to its last finished family. Their sum is the run's cold cost (the
    cache and the ledger start empty together, in the same folder)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / "ledger.json"
        self.name = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()}"
        self.began = time.perf_counter()

    def entries(self) -> dict[str, float]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def touch(self) -> None:
        entries = {**self.entries(), self.name: round(time.perf_counter() - self.began, 1)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(entries, indent=1) + "\n")
        partial.replace(self.path)

    def total(self) -> float:
        return round(sum(self.entries().values()), 1)


class NoPoint(Exception):
    """A baseline that cannot be computed at a scale (reported with the run, never a score)."""


class Baselines:
    """The baselines' points, applied into the sweep's working model and scored there."""

    def __init__(self, sweep: Sweep, statistics: dict[str, Path] | None):
        """``statistics``: the files RegMean's and AIM's Grams come from ({"target": …, "donor": …};
        None when no data-aware family runs); their stamps are part of those families' keys."""
        self.sweep = sweep
        self.statistics = statistics
        self.stamps = (sweep_module.statistics_stamps({f"{k}_statistics": v for k, v in statistics.items()})
                       if statistics else None)
        self._inputs: tuple | None = None
        self._grams: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def grams(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """RegMean's and AIM's Grams, read from the statistics files once (on the first point not cached)."""
        if self._grams is None:
            self._grams = grams_for(self.statistics)
        return self._grams

    def inputs(self) -> tuple:
        """B, T and I as full tensors, read once per case and seed (the sweep keeps prepared diffs,
        not the models, so the baselines' formulas read their own copy)."""
        if self._inputs is None:
            folders = self.sweep.models.folders
            self._inputs = tuple(_load(folders[k]) for k in ("B", "T", "I"))
        return self._inputs

    def score(self, family: str, scale: float) -> dict[str, Any]:
        s = self.sweep
        sets = s.axes.point_sets()
        data_aware = family in baselines.DATA_AWARE
        if data_aware and not self.statistics:
            raise SigmoidDiffError(f"{family} needs statistics files: the Baselines engine was given none")
        key = hashlib.sha256(json.dumps({"baseline": family, "scale": scale, "code": BASELINE_CODE,
                                         "stamps": s.models.stamps, "score": scoring.score_key(s.probe.only(*sets)),
                                         "statistics": self.stamps if data_aware else None,
                                         "exclude": EXCLUDE}, sort_keys=True).encode()).hexdigest()[:24]
        cached = s.cache.get(key)
        if cached is not None:
            return cached
        b, t, i = self.inputs()
        try:
            merged = baselines.apply(family, b, t, i, scale, grams=self.grams() if data_aware else None,
                                     exclude=EXCLUDE)
        except torch.linalg.LinAlgError as error:  # LAPACK's SVD fails on nearly repeated singular values
            raise NoPoint(f"{family} s={scale:g}: {str(error).splitlines()[0].split(' because')[0]}") from None
        with torch.no_grad():  # into the sweep's working model, scored as every other point
            for name, parameter in s.transfer.model.named_parameters():
                parameter.copy_(merged[name])
        del merged
        scores = scoring.score(s.transfer.model, s.probe, sets)
        row = {"key": key, "name": f"{family} s={scale:g}", "kind": "baseline", "value": scale, "family": family, **scores}
        s.cache.put(row)
        return row


def grams_for(statistics: dict[str, Path]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """RegMean's and AIM's Grams per weight, from the same statistics files as the data-aware merge."""
    from mergekit_sigmoid_diff.statistics import InputStats, StatisticsFile

    target, donor = StatisticsFile(statistics["target"]), StatisticsFile(statistics["donor"])
    out = {}
    for name in target.weights:
        gt, gi = target.for_weight(name), donor.for_weight(name)
        if isinstance(gt, InputStats) and isinstance(gi, InputStats):
            out[name] = (gt.matrix(), gi.matrix())
    return out


def widen(values: tuple[float, ...], gaps: dict[float, float | None],
          limits: tuple[float, float] = WIDEN_LIMITS) -> tuple[float, ...] | None:
    """``values`` with one more step (the family's own spacing at that end) past the edge that
    holds the best gap; None when the best lies inside, at a limit, or nothing can be compared
    (every gap n/a)."""
    known = {v: g for v, g in gaps.items() if g is not None}
    if not known:
        return None
    ordered = sorted(values)
    best = max(known, key=lambda v: known[v])
    if len(ordered) < 2:
        return None
    if best == ordered[-1] and ordered[-1] + (ordered[-1] - ordered[-2]) <= limits[1] + 1e-9:
        return (*ordered, round(2 * ordered[-1] - ordered[-2], 6))
    if best == ordered[0] and ordered[0] - (ordered[1] - ordered[0]) >= limits[0] - 1e-9:
        return (round(2 * ordered[0] - ordered[1], 6), *ordered)
    return None


def refined_curve(sweep: Sweep, inputs: dict, ta_rows: dict, rows: Iterable[dict]) -> frontier.Curve:
    """task_arithmetic's curve (T and ``ta_rows``), refined around each of ``rows``' points until
    a halving moves its gap by < 0.02 (:func:`mergekit_sigmoid_diff.frontier.refine`, at most 8
    λ each); every λ scored joins ``ta_rows``, so later refinements read it from there."""
    grid_max = max(SweepSettings().grid())

    def measure(lam: float) -> frontier.Point:
        if lam not in ta_rows:
            ta_rows[lam] = sweep.score("task_arithmetic", lam, f"task_arithmetic λ={lam:g}")
        return sweep.point(ta_rows[lam], lam)

    curve = frontier.Curve.of(sweep.point(inputs["T"], 0.0), [sweep.point(r, lam) for lam, r in ta_rows.items()])
    for row in rows:
        p = sweep.point(row, 0.0)
        curve = frontier.refine(measure, curve, p.feature, p.knowledge, max_evaluations=8, max_lambda=grid_max).curve
    return curve


def wider(sweep: Sweep, inputs: dict, ta_rows: dict, rows: dict[float, dict], values: tuple[float, ...],
          steps: int) -> tuple[float, ...] | None:
    """:func:`widen` on the family's gaps against task_arithmetic's curve refined around the
    family's points (as the report reads them: a best point that only the refinement moves to
    an edge is widened too); None once :data:`WIDEN_STEPS` steps were added."""
    if steps >= WIDEN_STEPS:
        return None
    curve = refined_curve(sweep, inputs, ta_rows, rows.values())
    gaps = {}
    for value, row in rows.items():
        p = sweep.point(row, 0.0)
        gaps[value] = frontier.gap(curve, p.feature, p.knowledge).value
    return widen(values, gaps)


def statistics_files(case: str, models: tuple[Path, Path], which: Statistics, workdir: Path, base: Path, tokenizer,
                     log: Callable) -> dict[str, Path]:
    """A data family's statistics files (T on its text; I, or T if so named, on the donor's data),
    made or checked current by :func:`benchlib.calibration.statistics_files`."""
    target, donor = models
    sequences, reader = which
    return calibration.statistics_files(case, {"target": target, "donor": donor if reader == "donor" else target},
                                        workdir, base, tokenizer, sequences=sequences, log=log)


def needed_statistics(families: list[str]) -> list[Statistics]:
    """The statistics the named families read (the data settings' and the data-aware baselines')."""
    out = [data for family, _, _, data in SETTINGS + GRID if family in families and data]
    if any(f in baselines.DATA_AWARE for f in families):
        out.append(OWN)
    return list(dict.fromkeys(out))


def run_case(case: str, seed: int, families: list[str], workdir: Path, base: Path, tokenizer, log: Callable,
             bootstrap: int, scales: tuple[float, ...] = BASELINE_SCALES) -> dict[str, Any]:
    target, donor = case_models(case, seed, workdir, base)
    folder = workdir / "frontier" / f"{case}-seed{seed}"
    ledger = Ledger(folder)
    probe, axes = probe_and_axes(case, tokenizer)
    files: dict[Statistics, dict[str, Path]] = {}

    def statistics_for(which: Statistics) -> dict[str, Path]:
        if which not in files:
            files[which] = statistics_files(case, (target, donor), which, workdir, base, tokenizer, log)
        return files[which]

    points: dict[str, list[tuple[str, dict]]] = {}
    sweep: Sweep | None = None
    ta_rows: dict[float, dict] = {}
    for family, parameters, weights, data in SETTINGS + GRID:
        if family not in families:
            continue
        params = dict(parameters)
        if data:
            stats = statistics_for(data)
            params.update(target_statistics=str(stats["target"]), donor_statistics=str(stats["donor"]))
        slug = hashlib.sha1(family.encode()).hexdigest()[:8]
        recipe = write_recipe(folder / "recipes" / f"{slug}.yml", base, target, donor, params)
        started = time.perf_counter()
        first = weights
        while weights:
            sweep = Sweep(recipe, folder, SweepSettings(weights=weights, bootstrap=0), probe_for=lambda _tok: probe,
                          axes=axes, log=log, quiet=True)
            result = sweep.run(progress=False)
            ta_rows.update({k[1]: r for k, r in result.rows.items() if k[0] == "task_arithmetic"})
            inputs = {k[1]: r for k, r in result.rows.items() if k[0] == "input"}
            points[family] = [(f"w={w:g}", result.rows["recipe", w]) for w in weights]
            weights = wider(sweep, inputs, ta_rows, dict(zip(weights, (r for _, r in points[family]))), weights,
                            len(weights) - len(first))
        log(f"{case} seed {seed}: {family}: {time.perf_counter() - started:.0f} s ({sweep.timing})")
        ledger.touch()
    if sweep is None:  # baselines only: a sweep of the recommended recipe provides the engine and the grid
        family, parameters, weights, _ = SETTINGS[0]
        recipe = write_recipe(folder / "recipes" / "engine.yml", base, target, donor, parameters)
        sweep = Sweep(recipe, folder, SweepSettings(weights=weights, bootstrap=0), probe_for=lambda _tok: probe,
                      axes=axes, log=log, quiet=True)
        result = sweep.run(progress=False)
        ta_rows.update({k[1]: r for k, r in result.rows.items() if k[0] == "task_arithmetic"})
        inputs = {k[1]: r for k, r in result.rows.items() if k[0] == "input"}
    failures: list[str] = []
    needs_grams = any(f in baselines.DATA_AWARE for f in families)
    engine = Baselines(sweep, statistics_for(OWN) if needs_grams else None)
    for family in families:
        if family in baselines.FAMILIES:
            started = time.perf_counter()
            tried: tuple[float, ...] = ()
            rows: dict[float, dict] = {}
            more: tuple[float, ...] | None = tuple(scales)
            while more:
                for scale in (s for s in more if s not in tried):
                    try:
                        rows[scale] = engine.score(family, scale)
                    except NoPoint as error:
                        failures.append(str(error))
                        log(f"{case} seed {seed}: no point: {error}")
                tried = more
                more = wider(sweep, inputs, ta_rows, rows, tried, len(tried) - len(scales))
            if rows:
                points[family] = [(f"s={s:g}", rows[s]) for s in tried if s in rows]
            log(f"{case} seed {seed}: {family}: {time.perf_counter() - started:.0f} s")
            ledger.touch()
    # one curve for every family: T, the grid and every refined λ; then refine around each point
    curve = refined_curve(sweep, inputs, ta_rows, (row for rows in points.values() for _, row in rows))
    lams = sorted({p.lam for p in curve.points[1:]})
    target_items = sweep.items(inputs["T"])
    sweep_items = [(lam, sweep.items(ta_rows[lam])) for lam in lams]
    merges = {f"{family} {label}": sweep.items(row) for family, rows in points.items() for label, row in rows}
    intervals = frontier.bootstrap_gaps(target_items, sweep_items, merges, resamples=bootstrap, seed=seed)
    ledger.touch()
    both = axes.both
    both_curve = None
    if both:
        both_curve = frontier.Curve.of(frontier.Point(0.0, inputs["T"][f"{axes.feature}_nll"], inputs["T"][f"{both}_nll"]),
                                       [frontier.Point(lam, ta_rows[lam][f"{axes.feature}_nll"], ta_rows[lam][f"{both}_nll"])
                                        for lam in lams])
    out_points = []
    for family, rows in points.items():
        for label, row in rows:
            p = sweep.point(row, 0.0)
            gap = frontier.gap(curve, p.feature, p.knowledge)
            boot = intervals[f"{family} {label}"]
            record = {"case": case, "seed": seed, "family": family, "point": label,
                      "feature": p.feature, "knowledge": p.knowledge,
                      "gap_closed": gap.value, "gap_exact": gap.exact, "gap_note": gap.reason,
                      "gap_se": boot.se, "gap_ci_lo": boot.lo, "gap_ci_hi": boot.hi}
            if both_curve is not None:
                bg = frontier.gap(both_curve, p.feature, row[f"{both}_nll"])
                record.update(both_nll=row[f"{both}_nll"], both_gap=bg.value, both_exact=bg.exact, both_note=bg.reason,
                              both_best_ta=min(r[f"{both}_nll"] for r in ta_rows.values()))
            out_points.append(record)
    return {"case": case, "seed": seed, "axes": {"knowledge": axes.knowledge, "feature": axes.feature, "both": both},
            "items": probe.sizes(), "stamps": sweep.models.stamps, "merge_key": codekey.merge_key(),
            "sweep_code": SWEEP_CODE, "baseline_code": BASELINE_CODE, "score_key": scoring.score_key(probe),
            "lambdas": lams,
            "inputs": {k: {n: v for n, v in r.items() if n != "items" and n.endswith("_nll")} for k, r in inputs.items()},
            "task_arithmetic": [{"lambda": lam, "feature": ta_rows[lam][f"{axes.feature}_nll"],
                                 "knowledge": ta_rows[lam][f"{axes.knowledge}_nll"],
                                 **({"both": ta_rows[lam][f"{both}_nll"]} if both else {})} for lam in lams],
            "points": out_points, "no_point": failures, "cold_seconds": ledger.total(), "invocations": ledger.entries()}


def best(points: list[dict[str, Any]]) -> dict[str, Any]:
    """A family's best point: the largest gap_closed (n/a points last)."""
    return max(points, key=lambda r: (r["gap_closed"] is not None, r["gap_closed"] if r["gap_closed"] is not None else 0))


def at_edge(points: list[dict[str, Any]], chosen: dict[str, Any]) -> bool:
    """Whether ``chosen`` (with a gap) is the smallest or largest weight or scale its family tried
    (a family tried at one scale included): its best may lie beyond what was tried (a run that
    widened stops at a limit or after :data:`WIDEN_STEPS` steps)."""
    values = [float(p["point"].split("=")[1]) for p in points]
    return chosen["gap_closed"] is not None and float(chosen["point"].split("=")[1]) in (min(values), max(values))


def seed_gap(r: dict[str, Any]) -> frontier.SeedGap:
    """A seed's best point for the verdict: a value without its interval (task_arithmetic's loss
    under the floor in too many resamples) counts as n/a, never as an exact value."""
    value = r["gap_closed"] if r["gap_ci_lo"] is not None else None
    return frontier.SeedGap(value, r["gap_exact"], r["gap_se"], r["gap_ci_lo"], r["gap_ci_hi"])


def _gap(r: dict[str, Any]) -> str:
    if r["gap_closed"] is None:
        return r.get("gap_note") or "n/a"
    # no interval: in more than 2.5 % of the resamples task_arithmetic loses less than the floor there
    ci = " [no interval: TA's loss near the floor]" if r["gap_ci_lo"] is None else f" [{r['gap_ci_lo']:+.2f}, {r['gap_ci_hi']:+.2f}]"
    return f"{'≥ ' if not r['gap_exact'] else ''}{r['gap_closed']:+.2f}{ci}"


def glance(document: dict[str, Any], keys: Keys, families: list[str] | None = None) -> str:
    """README's table: per family and case, each seed's best ``gap_closed`` (≥ a bound, n/a, † at
    the edge of what was tried) and the verdict over the seeds; the same numbers as frontier.md,
    from the same runs."""
    runs, _ = fresh(document["runs"], keys)
    cases = list(dict.fromkeys(r["case"] for r in runs))
    families = families or list(dict.fromkeys(p["family"] for r in runs for p in r["points"]))
    lines = ["| setting | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
    for family in families:
        cells = []
        for case in cases:
            per_seed, shown = [], []
            for r in sorted((r for r in runs if r["case"] == case), key=lambda r: r["seed"]):
                pts = [p for p in r["points"] if p["family"] == family]
                if not pts:
                    continue
                b = best(pts)
                per_seed.append(seed_gap(b))
                shown.append("n/a" if b["gap_closed"] is None else f"{'≥' if not b['gap_exact'] else ''}{b['gap_closed']:+.2f}"
                             + ("†" if at_edge(pts, b) else "") + (" (no interval)" if b["gap_ci_lo"] is None else ""))
            verdict = frontier.verdict(per_seed) if len(per_seed) > 1 else ("one seed" if per_seed else "")
            cells.append(f"{' / '.join(shown)} ({verdict})" if shown else "—")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def combine(document: dict[str, Any], parts: Iterable[dict[str, Any]], note: str | None = None) -> dict[str, Any]:
    """``document`` with the runs of ``parts`` (the ``frontier.json`` of several ``--out`` folders,
    e.g. two jobs run side by side): a later part's run replaces an earlier one's for the same case
    and seed. ``note`` (a sentence for frontier.md's header) replaces the document's; "" drops it."""
    runs = {(r["case"], r["seed"]): r for r in document.get("runs", [])}
    for part in parts:
        runs.update({(r["case"], r["seed"]): r for r in part.get("runs", [])})
    out = {**document, "runs": list(runs.values())}
    if note is not None:
        out.pop("note", None)
        if note:
            out["note"] = note
    return out


def markdown(document: dict[str, Any], keys: Keys | None = None) -> str:
    """frontier.md: per case, each family at its best point per seed, with its interval and the
    verdict over the seeds (:func:`mergekit_sigmoid_diff.frontier.verdict`). Only runs current
    under ``keys`` (default: the first run's merge key) are shown; stale runs are named, not used."""
    all_runs = document["runs"]
    keys = keys or Keys(all_runs[0]["merge_key"] if all_runs else "")
    key = keys.merge_key
    runs, stale = fresh(all_runs, keys)
    commands = list(dict.fromkeys(r.get("command") or document.get("command", "") for r in runs))
    seconds = [r["seconds"] for r in runs if r.get("seconds") is not None]
    cold = [r["cold_seconds"] for r in runs if r.get("cold_seconds") is not None]
    stale_names = ", ".join(f"{r['case']} seed {r['seed']}" for r in stale)
    codes = sorted({r["sweep_code"] for r in runs if r.get("sweep_code")})
    cost = (f" Wall time of the runs that record it: {sum(seconds) / 60:.0f} min over {len(seconds)} case-seeds "
            f"(1 thread each, two at a time on 2 cores)." if seconds else "")
    if cold:
        cost += (f" Cold cost (every invocation of each case-seed since its cache was empty, a stopped one up to its "
                 f"last finished family; `cold_seconds` per run): {sum(cold) / 3600:.1f} h over {len(cold)} case-seeds.")
    lines = ["# The frontier suite: in-memory points, refined λ grid, paired bootstrap", "",
             "Commands: " + "; ".join(f"`{c}`" for c in commands) + f". Merge code `{key}`"
             + (f", sweep code `{'`, `'.join(codes)}`" if codes else "") + "." + cost + " "
             + (f"**Stale runs left out** (another merge, sweep, baseline or score key; rerun them): {stale_names}. "
                if stale else "")
             + (f"{document['note']} " if document.get("note") else "")
             + "Every row below was computed by this code on these models (each run records the models' stamps "
             "in `frontier.json`). `gap_closed` = share of task_arithmetic's knowledge loss avoided at the "
             "point's own feature, against task_arithmetic's λ curve refined until a halving changes it by "
             "< 0.02; [lo, hi] = 95 % paired bootstrap over the evaluation items (1000 resamples); ≥ = a lower "
             "bound (the point's feature is beyond any λ); n/a = task_arithmetic loses < 0.01 nats there. "
             "Each family is shown at its best point per seed; \"edge\" = that point is the smallest or largest "
             "weight or scale its family tried there, so a better one may lie beyond. Verdict over seeds: beats = every seed's "
             "interval above 0 and the mean beyond the combined noise.", ""]
    for case in dict.fromkeys(r["case"] for r in runs):
        case_runs = sorted((r for r in runs if r["case"] == case), key=lambda r: r["seed"])
        seeds = [r["seed"] for r in case_runs]
        axes = case_runs[0]["axes"]
        lines += [f"## {case}", "", f"Axes: knowledge = `{axes['knowledge']}_nll`, feature = `{axes['feature']}_nll`"
                  + (f", both at once = `{axes['both']}_nll`" if axes["both"] else "") + f"; items {case_runs[0]['items']}.", ""]
        head = "| family | " + " | ".join(f"seed {s}" for s in seeds) + " | verdict |" + (" both at once (seed 0: merge / TA's best λ) |" if axes["both"] else "")
        lines += [head, "|---|" + "---|" * (len(seeds) + 1 + (1 if axes["both"] else 0))]
        families = list(dict.fromkeys(p["family"] for r in case_runs for p in r["points"]))
        for family in families:
            per_seed, cells = [], []
            for r in case_runs:
                pts = [p for p in r["points"] if p["family"] == family]
                if not pts:
                    per_seed.append(None)
                    cells.append("—")
                    continue
                b = best(pts)
                per_seed.append(seed_gap(b))
                cells.append(f"{_gap(b)} ({b['point']}{', edge' if at_edge(pts, b) else ''})")
            row = f"| {family} | " + " | ".join(cells) + f" | {frontier.verdict(per_seed) if len(seeds) > 1 else 'one seed'} |"
            if axes["both"]:
                first = [p for p in case_runs[0]["points"] if p["family"] == family]
                if first:
                    b = best(first)
                    row += f" {b['both_nll']:.3f} / {b['both_best_ta']:.3f} |"
                else:
                    row += " — |"
            lines.append(row)
        lines.append("")
        failed = [f"seed {r['seed']}: {f}" for r in case_runs for f in r.get("no_point", [])]
        if failed:
            lines += ["Not computable (no point, so not in the table): " + "; ".join(failed) + ".", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--families", nargs="+", default=[s[0] for s in SETTINGS] + list(baselines.FAMILIES),
                        choices=[s[0] for s in SETTINGS + GRID] + list(baselines.FAMILIES),
                        help="default: every setting and baseline; the data grid's families by name")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "real")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--scales", type=float, nargs="+", default=list(BASELINE_SCALES), help="the baselines' donor scales")
    parser.add_argument("--report-only", action="store_true", help="rewrite frontier.md from frontier.json")
    parser.add_argument("--statistics-only", action="store_true",
                        help="make or check current the statistics files the families read, and score nothing")
    parser.add_argument("--combine", type=Path, nargs="+", default=None, metavar="FOLDER",
                        help="score nothing: add the runs of these folders' frontier.json to --out's "
                             "(a later folder's run replaces an earlier one's for the same case and seed)")
    parser.add_argument("--note", default=None, help="with --combine: a sentence for frontier.md's header ('' drops it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = (args.workdir or smollm2.cache_root() / "real_suite").absolute()
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f} s] {message}", flush=True)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    base = smollm2.converted_model()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    results_path = args.out / "frontier.json"
    document = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": []}
    if args.combine:
        missing = [str(f / "frontier.json") for f in args.combine if not (f / "frontier.json").is_file()]
        if missing:
            raise SystemExit(f"--combine: no {missing[0]}")
        document = combine(document, (json.loads((f / "frontier.json").read_text()) for f in args.combine), args.note)
        args.out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    keys = today(tokenizer, list(dict.fromkeys([*args.cases, *(r["case"] for r in document["runs"])])))
    if args.report_only or args.combine:
        (args.out / "frontier.md").write_text(markdown(document, keys))
        return
    if args.statistics_only:
        for case in args.cases:
            for seed in args.seeds:
                models = case_models(case, seed, workdir, base)
                for which in needed_statistics(args.families):
                    for role, path in statistics_files(case, models, which, workdir, base, tokenizer, log).items():
                        log(f"{case} seed {seed} {which}: {role} {path.name} current")
        return
    for case in args.cases:
        for seed in args.seeds:
            started = time.perf_counter()
            run = run_case(case, seed, args.families, workdir, base, tokenizer, log, args.bootstrap, tuple(args.scales))
            run["seconds"] = round(time.perf_counter() - started, 1)
            run["command"] = shlex.join(["python", "scripts/benchmark_frontier.py", *(argv or sys.argv[1:])])
            document["runs"] = [r for r in document["runs"] if (r["case"], r["seed"]) != (case, seed)] + [run]
            document["command"] = run["command"]
            args.out.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
            (args.out / "frontier.md").write_text(markdown(document, keys))
            log(f"{case} seed {seed}: written")
            for family in dict.fromkeys(p["family"] for p in run["points"]):
                b = best([p for p in run["points"] if p["family"] == family])
                g = "n/a" if b["gap_closed"] is None else f"{'≥' if not b['gap_exact'] else ''}{b['gap_closed']:+.3f}"
                ci = "" if b["gap_ci_lo"] is None else f" [{b['gap_ci_lo']:+.2f}, {b['gap_ci_hi']:+.2f}]"
                both = f"  both {b['both_nll']:.4f} (TA best {b['both_best_ta']:.4f})" if "both_nll" in b else ""
                log(f"  {family:<36} {b['point']:<7} gap {g}{ci}{both}")


if __name__ == "__main__":
    main()
