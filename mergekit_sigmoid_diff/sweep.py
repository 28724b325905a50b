"""``sweep``: the user's own frontier, and the donor weight it chooses.

    python -m mergekit_sigmoid_diff sweep recipe.yml --knowledge FILE --feature FILE.jsonl
        [--both FILE.jsonl] --out DIR [--weights 0.5 0.75 1 1.25 1.5] [--lambdas ...]
        [--share 0.9] [--device cpu|cuda] [--max-memory GB] [--windows N] [--chats N]

For a ``sigmoid_diff`` recipe with one donor (base B, target T, donor I):

1. the recipe goes through the merge's own checks (:func:`.plugin.checked`, as ``inspect``);
   ``model+lora`` references are merged into the package's default LoRA cache (or
   ``--lora-merge-cache``), as ``mergekit-yaml`` and ``inspect`` do;
2. B, T and I are read once, tensor by tensor, in the recipe's dtype exactly as mergekit hands
   them to the method, and every tensor's transfer is prepared once (:mod:`.sweepload`,
   :mod:`.prepared`: the gate's fraction, the projection basis or the data-aware solve, and
   D = I − B);
3. every point is applied in memory into one working model (built once from the output's
   config) and scored (:mod:`.scoring`), never written to disk:
   - task_arithmetic ``T + λ (I − B)`` over ``--lambdas`` (default 0.25 … 1.75 in steps of
     0.125), refined around every recipe point by :func:`.frontier.refine`;
   - the recipe's own setting at each donor weight of ``--weights``: at weight w, every tensor
     equals bit for bit what ``mergekit-yaml`` writes for the recipe at w (``DIR/chosen.yml``
     for the chosen one) run on the same torch thread count (``--num-threads``: MKL's matrix
     products, hence the projection's basis and result, change with it; the element-wise gate
     does not);
4. scores: the knowledge (NLL per token of ``--knowledge``'s text windows), the feature (NLL of
   the assistant turns of ``--feature``'s chats, rendered with the output's chat template) and,
   with ``--both``, the "both at once" chats; each recipe point's ``gap_closed`` against the
   refined curve with its 95 % bootstrap interval over the evaluation items (:mod:`.frontier`);
5. the choice (printed with its rule): with ``--both``, the weight with the best "both" score;
   without, the least knowledge lost among the weights that reach ``--share`` (default 90 %)
   of the feature that task_arithmetic gains at λ = 1 (the gain in feature NLL: on a per-prompt
   −log P score that falls from ~12 nats, 90 % of it still leaves P ≈ 0.3; raise ``--share``
   there, or give ``--both``);
6. writes ``DIR/chosen.yml`` (the recipe at that weight), ``DIR/sweep.json`` (every row, its
   items), ``DIR/frontier.png`` (with matplotlib) and ``DIR/scores.jsonl``, the cache a rerun
   resumes from (keyed by the models' stamps, the point, the merge code and the score key).

Memory: before loading, the models' size decides whether B, T and I (prepared: T, D and the
gate's fraction) plus one float32 working copy fit ``--max-memory``.

A recipe whose donor weight is one number (or unset) gets that number replaced by each weight;
a weight that varies per tensor (a gradient or filters) is scaled by each weight instead (the
table says ``×w``), and mergekit resolves the scaled recipe per tensor, as the merge would.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import yaml

from mergekit_sigmoid_diff import frontier, scoring, sweepload
from mergekit_sigmoid_diff.errors import SigmoidDiffError

METHOD = "sigmoid_diff"
DEFAULT_WEIGHTS = (0.5, 0.75, 1.0, 1.25, 1.5)
DEFAULT_LAMBDAS = tuple(0.25 + 0.125 * i for i in range(13))  # 0.25 … 1.75
DEFAULT_SHARE = 0.9
DEFAULT_WINDOWS = 32  # knowledge windows scored (evenly spaced over the file)
DEFAULT_CHATS = 32  # feature (and both) chats scored
REFINE_TOL = 0.02
REFINE_EVALUATIONS = 8  # per recipe point
SCORES_FILE = "scores.jsonl"
SCHEMA = 1  # of the cached rows


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Axes:
    """Which probe sets are the frontier's axes (scores ``<set>_nll``), and the optional
    "both at once" set; ``inputs``: sets scored on B, T and I only (for their table)."""

    knowledge: str = "knowledge"
    feature: str = "feature"
    both: Optional[str] = None
    inputs: tuple[str, ...] = ()

    def point_sets(self) -> tuple[str, ...]:
        return (self.knowledge, self.feature) + ((self.both,) if self.both else ())

    def input_sets(self) -> tuple[str, ...]:
        return self.point_sets() + tuple(s for s in self.inputs if s not in self.point_sets())


@dataclass(frozen=True)
class SweepSettings:
    """The grid and the rule: donor ``weights``, task_arithmetic's ``lambdas`` (λ = 1 is always
    measured: the rule's reference), the feature ``share`` the rule asks for, the refinement's
    ``tol`` and budget per recipe point, the scoring ``device`` and the ``max_memory_gb`` check."""

    weights: tuple[float, ...] = DEFAULT_WEIGHTS
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    share: float = DEFAULT_SHARE
    refine_tol: float = REFINE_TOL
    refine_evaluations: int = REFINE_EVALUATIONS
    device: Optional[str] = None
    max_memory_gb: Optional[float] = None
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        if not self.weights or any(not math.isfinite(w) or w <= 0 for w in self.weights):
            raise SigmoidDiffError(f"--weights must be positive numbers (got {list(self.weights)})")
        if not self.lambdas or any(not math.isfinite(x) or x <= 0 for x in self.lambdas):
            raise SigmoidDiffError(f"--lambdas must be positive numbers (got {list(self.lambdas)})")
        if not 0 < self.share <= 1:
            raise SigmoidDiffError(f"--share must be in (0, 1] (got {self.share})")

    def grid(self) -> tuple[float, ...]:
        return tuple(sorted(set(self.lambdas) | {1.0}))


# ---------------------------------------------------------------- the recipe


def read_recipe(path: Path) -> dict[str, Any]:
    """The recipe as YAML data; one line error unless a one-donor sigmoid_diff over ``models:``
    (the full checks come later, with mergekit's)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SigmoidDiffError(f"recipe {path} not found") from None
    except yaml.YAMLError as error:
        raise SigmoidDiffError(f"recipe {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SigmoidDiffError(f"recipe {path} is not a mergekit recipe (a YAML mapping)")
    if data.get("merge_method") != METHOD:
        raise SigmoidDiffError(f"sweep reads {METHOD} recipes with one donor; {path} has merge_method: {data.get('merge_method')}")
    if data.get("slices") or data.get("modules") or not isinstance(data.get("models"), list):
        raise SigmoidDiffError(f"sweep reads recipes that list their models under models: ({path} uses slices or modules)")
    return data


def _donor_entry(recipe: Mapping[str, Any]) -> dict[str, Any]:
    donors = [m for m in recipe["models"] if (m.get("parameters") or {}).get("role", "donor") != "target"]
    return donors[0] if len(donors) == 1 else {}


def weight_spec(recipe: Mapping[str, Any]) -> Any:
    """The donor weight as the recipe sets it: its own, else the top-level one, else None (1)."""
    own = (_donor_entry(recipe).get("parameters") or {})
    if "weight" in own:
        return own["weight"]
    return (recipe.get("parameters") or {}).get("weight")


def scalar_weight(recipe: Mapping[str, Any]) -> bool:
    spec = weight_spec(recipe)
    return spec is None or (isinstance(spec, (int, float)) and not isinstance(spec, bool))


def _scaled(spec: Any, factor: float) -> Any:
    if isinstance(spec, bool):
        return spec
    if isinstance(spec, (int, float)):
        return spec * factor
    if isinstance(spec, list):
        return [_scaled(s, factor) for s in spec]
    if isinstance(spec, dict):
        return {k: (_scaled(v, factor) if k == "value" else v) for k, v in spec.items()}
    return spec


def recipe_at(recipe: Mapping[str, Any], weight: float) -> dict[str, Any]:
    """The recipe at donor weight ``weight``: a single number replaces the donor's weight (set on
    the donor, any top-level weight dropped); a per-tensor weight is scaled by ``weight``."""
    out = copy.deepcopy(dict(recipe))
    donor = _donor_entry(out)
    scalar = scalar_weight(out)
    spec = weight_spec(out)
    top = out.get("parameters") or {}
    if scalar:
        top.pop("weight", None)
        if "parameters" in out and not top:
            del out["parameters"]
        donor["parameters"] = {**(donor.get("parameters") or {}), "weight": float(weight)}
    elif "weight" in (donor.get("parameters") or {}):
        donor["parameters"]["weight"] = _scaled(spec, weight)
    else:
        top["weight"] = _scaled(spec, weight)
    return out


def weight_label(recipe: Mapping[str, Any], weight: float) -> str:
    return f"w={weight:g}" if scalar_weight(recipe) else f"w×{weight:g}"


class Sweep:
    """One recipe, its models and its evaluation; scores points (cached) and loads the
    transfer only when a point is missing from the cache."""

    def __init__(self, recipe_path: Path, out: Path, settings: SweepSettings, *, options: Any = None,
                 probe_for: Callable[[Any], scoring.Probe], axes: Axes, log: Callable[[str], None] = print,
                 quiet: bool = False):
        from mergekit.options import MergeOptions

        from mergekit_sigmoid_diff import plugin
        from mergekit_sigmoid_diff.inspection import load_recipe

        self.recipe_path = Path(recipe_path)
        self.recipe = read_recipe(self.recipe_path)
        self.out = Path(out)
        self.settings = settings
        self.axes = axes
        self.log = log
        self.quiet = quiet
        plugin.activate()
        self.config = load_recipe(self.recipe_path)
        self.options = plugin.with_lora_cache(self.config, options if options is not None else MergeOptions(quiet=True))
        self._checked_once()
        self.tokenizer = self._tokenizer
        self.probe = probe_for(self.tokenizer)
        for name in axes.input_sets():
            if name not in self.probe.sets:
                raise SigmoidDiffError(f"sweep: the evaluation has no item set {name!r}")
        self.device = torch.device(settings.device) if settings.device else scoring.default_device()
        self.cache = ScoreCache(self.out / SCORES_FILE)
        self._transfer: Optional[sweepload.Transfer] = None
        self.timing = {"load": 0.0, "apply": 0.0, "score": 0.0}

    # -- checks, before any tensor is read

    def _checked_once(self) -> None:
        """The merge's checks, the one-donor rule, the memory estimate, the models' folders and
        stamps and the output tokenizer (no tensor is read; LoRA adapters are merged)."""
        from mergekit_sigmoid_diff import plugin, preflight, statistics

        with plugin.checked(self.config, self.options) as ok:
            self.options = ok.options
            transfer = ok.transfer
            if len(transfer.donors) != 1:
                raise SigmoidDiffError(
                    f"sweep takes one donor; recipe {self.recipe_path} has {len(transfer.donors)} "
                    f"({', '.join(str(d) for d in transfer.donors)})")
            self._planned = {w: preflight.planned_merges(self._config_at(w), ok.options)
                             for w in (self.settings.weights if not scalar_weight(self.recipe) else ())}
            self.planned = preflight.planned_merges(self.config, ok.options)
            self.out_config = self._out_config(ok.options)
            self._tokenizer = self._output_tokenizer(ok)
            references = {"B": self.config.base_model, "T": transfer.target, "I": transfer.donors[0]}
        self._check_memory()
        with plugin.lora_notices_silenced():  # mergekit's LoRA merge (see plugin.MERGEKIT_LORA_WARNING)
            folders = {k: sweepload.folder(r, self.options) for k, r in references.items()}
        self.models = sweepload.Models(references["B"], references["T"], references["I"], folders,
                             {k: statistics.model_stamp(f) for k, f in folders.items()})

    def _config_at(self, weight: float):
        from mergekit.config import MergeConfiguration

        return MergeConfiguration.model_validate(recipe_at(self.recipe, weight))

    def _out_config(self, options: Any):
        from mergekit import merge as mergekit_merge
        from mergekit.architecture import get_architecture_info

        arch_info = get_architecture_info(self.config, options)
        # the plugin's wrapper: the target's config (RoPE from inherit_rope), as the merge writes it
        return mergekit_merge._model_out_config(self.config, arch_info, trust_remote_code=options.trust_remote_code)

    def _output_tokenizer(self, ok: Any):
        from transformers import AutoTokenizer

        step = ok.tokenizer_step
        if step.kind == "write":
            return step.tokenizer
        if step.kind == "mergekit":  # mergekit copies the base's tokenizer
            return AutoTokenizer.from_pretrained(sweepload.folder(self.config.base_model, ok.options),
                                                 trust_remote_code=ok.options.trust_remote_code)
        if step.kind == "built":
            raise SigmoidDiffError(f"sweep: recipe {self.recipe_path} has mergekit build the output tokenizer "
                                   "(tokenizer / tokenizer_source), which sweep does not score; remove it to sweep")
        raise SigmoidDiffError(f"sweep: the output of {self.recipe_path} has no tokenizer to render the chats with")

    def _check_memory(self) -> None:
        numel = sum(p.numel() for p in sweepload.working_model(self.out_config).parameters())
        dtype = sweepload.dtype_of(self.config.dtype) or torch.float32
        need = sweepload.model_memory(numel, dtype)
        self.memory_estimate = need
        limit = self.settings.max_memory_gb
        if limit is not None and need > limit * 1e9:
            raise SigmoidDiffError(
                f"sweep: recipe {self.recipe_path} needs about {need / 1e9:.1f} GB ({numel / 1e6:.0f} M parameters: "
                f"B, T and I in {str(dtype).removeprefix('torch.')} plus a float32 working copy), more than --max-memory {limit:g} GB")

    # -- the transfer, loaded on first need

    @property
    def transfer(self) -> sweepload.Transfer:
        if self._transfer is None:
            start = time.perf_counter()
            self._transfer = self._load()
            self.timing["load"] += time.perf_counter() - start
        return self._transfer

    def release(self) -> None:
        """Drop the loaded models (a later point loads them again)."""
        self._transfer = None

    def _load(self) -> sweepload.Transfer:
        weights = {w: self._planned.get(w) for w in self.settings.weights}
        return sweepload.load(self.config, self.options, self.planned, weights, self.out_config, self.tokenizer,
                              self.device, self.quiet)

    # -- points

    def key(self, kind: str, value: Optional[float], sets: Sequence[str]) -> str:
        from mergekit_sigmoid_diff.codekey import code_key, merge_key, package_sources

        probe = self.probe.only(*sets)
        parts: dict[str, Any] = {"schema": SCHEMA, "kind": kind, "sets": list(sets), "scoring": scoring.score_key(probe)}
        if kind == "input":
            parts["stamp"] = self.models.stamps[value]
        else:
            parts["stamps"] = self.models.stamps
            parts["dtype"] = [self.config.dtype, self.config.out_dtype]
            parts["code"] = [merge_key(), code_key(*package_sources("sweepload"))]  # the math, and how the sweep reaches it
            parts["point"] = [value, recipe_at(self.recipe, value) if kind == "recipe" else None]
            if kind == "recipe":  # task_arithmetic's points do not read the statistics
                parts["statistics"] = _statistics_stamps(self.recipe)
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def score(self, kind: str, value: Any, name: str) -> dict[str, Any]:
        """A point's row (cached): ``input`` (value "B", "T" or "I": scored from its folder),
        ``task_arithmetic`` (λ) or ``recipe`` (donor weight)."""
        sets = self.axes.input_sets() if kind == "input" else self.axes.point_sets()
        key = self.key(kind, value, sets)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        lambda_eff = None
        if kind == "input":
            start = time.perf_counter()
            model = scoring.load_model(self.models.folders[value], self.device)
            self.timing["load"] += time.perf_counter() - start
        else:
            transfer = self.transfer
            start = time.perf_counter()
            lambda_eff = transfer.apply(kind, value)
            self.timing["apply"] += time.perf_counter() - start
            model = transfer.model
        start = time.perf_counter()
        scores = scoring.score(model, self.probe, sets)
        self.timing["score"] += time.perf_counter() - start
        row = {"key": key, "name": name, "kind": kind, "value": value,
               "lambda_eff": value if kind == "task_arithmetic" else lambda_eff, **scores}
        self.cache.put(row)
        return row

    def point(self, row: Mapping[str, Any], lam: float) -> frontier.Point:
        return frontier.Point(lam, row[f"{self.axes.feature}_nll"], row[f"{self.axes.knowledge}_nll"])

    def items(self, row: Mapping[str, Any]) -> frontier.Items:
        return frontier.Items(row["items"][f"{self.axes.feature}_nll"], row["items"][f"{self.axes.knowledge}_nll"])

    def run(self, progress: bool = True) -> "Result":
        """Score B, T, I, the λ grid and the weights; refine around each weight; choose."""
        from tqdm import tqdm

        grid = self.settings.grid()
        plan = [("input", k, label) for k, label in (("B", "B (base)"), ("T", "T (target)"), ("I", "I (donor)"))]
        plan += [("task_arithmetic", lam, f"task_arithmetic λ={lam:g}") for lam in grid]
        plan += [("recipe", w, f"recipe {weight_label(self.recipe, w)}") for w in self.settings.weights]
        rows: dict[tuple, dict] = {}
        with tqdm(total=len(plan), desc="sweep", unit="point", disable=not progress or self.quiet, file=sys.stderr) as bar:
            for kind, value, name in plan:
                bar.set_postfix_str(name)
                rows[kind, value] = self.score(kind, value, name)
                bar.update()
        target = rows["input", "T"]
        curve = frontier.Curve.of(self.point(target, 0.0), [self.point(rows["task_arithmetic", lam], lam) for lam in grid])
        added: list[float] = []

        def measure(lam: float) -> frontier.Point:
            rows["task_arithmetic", lam] = self.score("task_arithmetic", lam, f"task_arithmetic λ={lam:g}")
            added.append(lam)
            return self.point(rows["task_arithmetic", lam], lam)

        with tqdm(total=len(self.settings.weights), desc="refine λ", unit="weight",
                  disable=not progress or self.quiet, file=sys.stderr) as bar:
            for w in self.settings.weights:
                merged = self.point(rows["recipe", w], w)
                refined = frontier.refine(measure, curve, merged.feature, merged.knowledge, tol=self.settings.refine_tol,
                                          max_evaluations=self.settings.refine_evaluations, max_lambda=max(grid))
                curve = refined.curve
                bar.update()
        return Result(self, rows, curve, sorted(set(added)))


STATISTICS_KEYS = ("target_statistics", "donor_statistics")


def _statistics_stamps(recipe: Mapping[str, Any]) -> list:
    """Size and mtime of the statistics files a data-aware recipe names (part of its points' keys)."""
    parameters = recipe.get("parameters") or {}
    return statistics_stamps({k: v for k, v in parameters.items() if k in STATISTICS_KEYS and isinstance(v, str)})


def statistics_stamps(files: Mapping[str, Any]) -> list:
    """[[parameter, size, mtime_ns], ...] of the statistics files by parameter name (those that
    exist, in :data:`STATISTICS_KEYS` order): what a score keyed by them depends on."""
    out = []
    for key in STATISTICS_KEYS:
        value = files.get(key)
        if value is not None and Path(value).is_file():
            status = Path(value).stat()
            out.append([key, status.st_size, status.st_mtime_ns])
    return out


class ScoreCache:
    """Rows by key in a JSON-lines file (appended; the last row of a key wins)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by an interrupted run
                if isinstance(row, dict) and "key" in row:
                    self.rows[row["key"]] = row

    def get(self, key: str) -> Optional[dict]:
        return self.rows.get(key)

    def put(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        self.rows[row["key"]] = row


# ---------------------------------------------------------------- result, rule, report


@dataclass
class Result:
    sweep: Sweep
    rows: dict[tuple, dict]
    curve: frontier.Curve
    refined: list[float]

    def __post_init__(self) -> None:
        s = self.sweep
        curve_rows = {lam: self.rows["task_arithmetic", lam] for lam in {p.lam for p in self.curve.points[1:]}}
        target_items = s.items(self.rows["input", "T"])
        sweep_items = [(lam, s.items(r)) for lam, r in sorted(curve_rows.items())]
        self.gaps: dict[float, frontier.Gap] = {}
        self.intervals: dict[float, frontier.Bootstrap] = {}
        for w in s.settings.weights:
            row = self.rows["recipe", w]
            point = s.point(row, w)
            self.gaps[w] = frontier.gap(self.curve, point.feature, point.knowledge)
            if s.settings.bootstrap:
                self.intervals[w] = frontier.bootstrap_gap(target_items, sweep_items, s.items(row),
                                                           resamples=s.settings.bootstrap)
        self.chosen, self.rule = choose(s, self.rows)

    def table_rows(self) -> list[dict[str, Any]]:
        s = self.sweep
        lams = sorted({p.lam for p in self.curve.points[1:]})
        ordered = [self.rows["input", k] for k in ("B", "T", "I")]
        ordered += [self.rows["task_arithmetic", lam] for lam in lams]
        ordered += [self.rows["recipe", w] for w in s.settings.weights]
        out = []
        for row in ordered:
            record = {k: v for k, v in row.items() if k != "items"}
            if row["kind"] == "recipe":
                gap = self.gaps[row["value"]]
                boot = self.intervals.get(row["value"])
                record.update(gap_closed=gap.value, gap_exact=gap.exact, gap_note=gap.reason,
                              gap_ci_lo=boot.lo if boot else None, gap_ci_hi=boot.hi if boot else None,
                              gap_se=boot.se if boot else None)
            record["refined"] = row["kind"] == "task_arithmetic" and row["value"] in self.refined
            out.append(record)
        return out

    def table(self) -> str:
        axes = self.sweep.axes
        heads = ["point", "λ_eff", f"{axes.knowledge} NLL ↓", f"{axes.feature} NLL ↓"]
        if axes.both:
            heads.append(f"{axes.both} NLL ↓")
        heads += ["gap_closed", "95 % interval"]
        body = []
        for r in self.table_rows():
            cells = [r["name"] + (" (refined)" if r["refined"] else "") + (" ← chosen" if r["kind"] == "recipe" and r["value"] == self.chosen else ""),
                     "" if r.get("lambda_eff") is None else f"{r['lambda_eff']:.3f}",
                     f"{r[f'{axes.knowledge}_nll']:.4f}", f"{r[f'{axes.feature}_nll']:.4f}"]
            if axes.both:
                cells.append(f"{r[f'{axes.both}_nll']:.4f}")
            if r["kind"] == "recipe":
                cells.append(_gap_text(r["gap_closed"], r["gap_exact"], r["gap_note"]))
                cells.append("" if r["gap_ci_lo"] is None else f"[{r['gap_ci_lo']:+.2f}, {r['gap_ci_hi']:+.2f}]")
            else:
                cells += ["", ""]
            body.append(cells)
        widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(heads)]
        line = lambda c: "  ".join(c[0].ljust(widths[0]) if i == 0 else c[i].rjust(widths[i]) for i in range(len(c)))  # noqa: E731
        return "\n".join([line(heads), *(line(c) for c in body)])

    def write(self) -> dict[str, Path]:
        """chosen.yml, sweep.json and (with matplotlib) frontier.png in the sweep's folder."""
        s = self.sweep
        s.out.mkdir(parents=True, exist_ok=True)
        written = {"chosen": s.out / "chosen.yml", "json": s.out / "sweep.json"}
        header = (f"# {s.recipe_path.name} at donor weight {self.chosen:g}, chosen by "
                  f"`python -m mergekit_sigmoid_diff sweep`:\n# {self.rule}\n"
                  f"# merged with `mergekit-yaml chosen.yml OUT --num-threads {torch.get_num_threads()}` (the sweep's "
                  "thread count), its weights are the sweep's, bit for bit\n")
        written["chosen"].write_text(header + yaml.safe_dump(recipe_at(s.recipe, self.chosen), sort_keys=False), encoding="utf-8")
        document = {
            "recipe": str(s.recipe_path), "chosen_weight": self.chosen, "rule": self.rule,
            "axes": {"knowledge": s.axes.knowledge, "feature": s.axes.feature, "both": s.axes.both},
            "settings": {"weights": list(s.settings.weights), "lambdas": list(s.settings.grid()), "share": s.settings.share,
                         "refine_tol": s.settings.refine_tol},
            "items": s.probe.sizes(), "stamps": s.models.stamps, "refined_lambdas": self.refined,
            "rows": self.table_rows(),
            "item_scores": {r["name"]: r["items"] for r in self.rows.values()},
        }
        written["json"].write_text(json.dumps(document, indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
        if importlib.util.find_spec("matplotlib") is not None:
            written["figure"] = plot(self, s.out / "frontier.png")
        return written


def _gap_text(value: Optional[float], exact: bool, note: Optional[str]) -> str:
    if value is None:
        return note or "n/a"
    return f"{'≥ ' if not exact else ''}{value:+.3f}"


def choose(sweep: Sweep, rows: Mapping[tuple, dict]) -> tuple[float, str]:
    """(the chosen weight, the rule as a sentence): see the module docstring."""
    axes, weights = sweep.axes, sweep.settings.weights
    if axes.both:
        key = f"{axes.both}_nll"
        best = min(weights, key=lambda w: (rows["recipe", w][key], w))
        return best, (f"rule: the weight with the best (lowest) {axes.both} NLL, "
                      f"{rows['recipe', best][key]:.4f} at weight {best:g}")
    feature, knowledge = f"{axes.feature}_nll", f"{axes.knowledge}_nll"
    target = rows["input", "T"]
    gain = target[feature] - rows["task_arithmetic", 1.0][feature]
    share = sweep.settings.share
    reach = [w for w in weights if target[feature] - rows["recipe", w][feature] >= share * gain]
    where = (f"{100 * share:g} % of the {axes.feature} gain of task_arithmetic at λ = 1 "
             f"({axes.feature} NLL {target[feature]:.4f} → {rows['task_arithmetic', 1.0][feature]:.4f})")
    if gain > 0 and reach:
        best = min(reach, key=lambda w: (rows["recipe", w][knowledge], w))
        return best, (f"rule: the lowest {axes.knowledge} NLL ({rows['recipe', best][knowledge]:.4f}: the least knowledge "
                      f"lost) among the weights that reach {where}")
    best = min(weights, key=lambda w: (rows["recipe", w][feature], w))
    why = "no weight reaches" if gain > 0 else "task_arithmetic at λ = 1 gains no feature, so no weight can reach"
    return best, f"rule: {why} {where}; chosen: the strongest {axes.feature} ({rows['recipe', best][feature]:.4f})"


def plot(result: Result, path: Path) -> Path:
    """task_arithmetic's refined curve (T as λ = 0) and the recipe's weights on the frontier's
    axes (feature loss against knowledge loss), the chosen weight marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s, axes = result.sweep, result.sweep.axes
    fig = Figure(figsize=(7.5, 5.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [p.feature for p in result.curve.points]
    ys = [p.knowledge for p in result.curve.points]
    ax.plot(xs, ys, "o-", color="tab:gray", markersize=3, label="task_arithmetic T + λ(I − B), λ = 0 (T) …")
    for p in result.curve.points:
        if p.lam in (0.0, 0.5, 1.0, 1.5) or p.lam == max(q.lam for q in result.curve.points):
            ax.annotate(f"λ={p.lam:g}", (p.feature, p.knowledge), fontsize=7, color="tab:gray", xytext=(4, -9),
                        textcoords="offset points")
    wx = [s.point(result.rows["recipe", w], w).feature for w in s.settings.weights]
    wy = [s.point(result.rows["recipe", w], w).knowledge for w in s.settings.weights]
    ax.plot(wx, wy, "s--", color="tab:blue", markersize=5, label=f"{s.recipe_path.name} over donor weights")
    for w, x, y in zip(s.settings.weights, wx, wy):
        ax.annotate(weight_label(s.recipe, w), (x, y), fontsize=7, color="tab:blue", xytext=(4, 4), textcoords="offset points")
    chosen = s.point(result.rows["recipe", result.chosen], result.chosen)
    ax.plot([chosen.feature], [chosen.knowledge], "*", color="tab:red", markersize=15, label=f"chosen: {weight_label(s.recipe, result.chosen)}")
    every = xs + wx
    if min(every) > 0 and max(every) / min(every) > 100:  # a feature NLL that falls by decades
        ax.set_xscale("log")
    ax.set_xlabel(f"{axes.feature} NLL (donor's feature, ↓)")
    ax.set_ylabel(f"{axes.knowledge} NLL (target's knowledge, ↓)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"sweep of {s.recipe_path.name}: the frontier on your models and text", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


# ---------------------------------------------------------------- the command


def file_probe(knowledge: Path, feature: Path, both: Optional[Path], windows: int, chats: int,
               tokens: int = scoring.SEQ_LEN) -> Callable[[Any], scoring.Probe]:
    """The probe of the command's files, built with the output's tokenizer."""
    text = scoring.read_text(knowledge)
    chat_files = {"feature": scoring.read_chats(feature), **({"both": scoring.read_chats(both)} if both else {})}

    def build(tokenizer) -> scoring.Probe:
        found = scoring.text_windows(tokenizer, text, tokens, windows)
        if not found:
            raise SigmoidDiffError(f"{knowledge} holds fewer than {tokens} tokens: no knowledge window to score")
        sets = {"knowledge": scoring.windows_set(found)}
        for name, (chats_, where) in chat_files.items():
            sets[name] = scoring.chat_items(tokenizer, scoring.spread(chats_, chats), scoring.spread(where, chats))
        return scoring.Probe(sets, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)

    return build


def run(recipe: Path, knowledge: Path, feature: Path, out: Path, *, both: Optional[Path] = None,
        settings: SweepSettings = SweepSettings(), windows: int = DEFAULT_WINDOWS, chats: int = DEFAULT_CHATS,
        options: Any = None, quiet: bool = False) -> Result:
    """The command, callable: check, sweep, print the table and the rule, write the files."""
    began = time.perf_counter()
    probe_for = file_probe(knowledge, feature, both, windows, chats)
    sweep = Sweep(recipe, out, settings, options=options, probe_for=probe_for,
                  axes=Axes(both="both" if both else None), quiet=quiet)
    result = sweep.run()
    written = result.write()
    total = time.perf_counter() - began
    print(result.table())
    print(f"\n{result.rule}")
    print(f"chosen: donor weight {result.chosen:g} → {written['chosen']}  (merge it with: mergekit-yaml "
          f"{written['chosen']} OUT --num-threads {torch.get_num_threads()}: the projection's bits depend on the thread count)")
    if "figure" in written:
        print(f"figure: {written['figure']}")
    else:
        print("figure skipped: matplotlib is not installed (pip install 'mergekit-sigmoid-diff[plot]')")
    t = sweep.timing
    print(f"{total:.0f} s: scoring {t['score']:.0f} s, loading {t['load']:.0f} s, applying points {t['apply']:.0f} s "
          f"(items: {', '.join(f'{k} {v}' for k, v in sweep.probe.sizes().items())}; scores cached in {sweep.cache.path})")
    return result


SWEEP_HELP = __doc__.split("\n\n")[0]


def main(argv: Sequence[str]) -> None:
    from mergekit_sigmoid_diff.errors import reported

    parser = argparse.ArgumentParser(prog="python -m mergekit_sigmoid_diff sweep", description=SWEEP_HELP)
    parser.add_argument("recipe", type=Path, help="a sigmoid_diff recipe with one donor")
    parser.add_argument("--knowledge", type=Path, required=True, help="plain text of the target's domain, held out from its training")
    parser.add_argument("--feature", type=Path, required=True, help='chats showing the donor\'s behaviour: JSON lines {"messages": [...]}')
    parser.add_argument("--both", type=Path, default=None, help="chats asking the target's knowledge in the donor's format (optional)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (chosen.yml, sweep.json, frontier.png, the score cache)")
    parser.add_argument("--weights", type=float, nargs="+", default=list(DEFAULT_WEIGHTS), help="donor weights to try")
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDAS), help="task_arithmetic's λ grid (refined)")
    parser.add_argument("--share", type=float, default=DEFAULT_SHARE, help="without --both: the share of task_arithmetic's feature gain at λ=1 a weight must reach")
    parser.add_argument("--device", default=None, help="where to score: cuda (the default when present) or cpu")
    parser.add_argument("--max-memory", type=float, default=None, metavar="GB", help="refuse before loading when the sweep needs more")
    parser.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help="knowledge windows scored (64 tokens each)")
    parser.add_argument("--chats", type=int, default=DEFAULT_CHATS, help="feature (and both) chats scored")
    parser.add_argument("--lora-merge-cache", default=None, help="where model+lora references are merged (default: the package's cache)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(list(argv))
    with reported():
        from mergekit.options import MergeOptions

        settings = SweepSettings(weights=tuple(args.weights), lambdas=tuple(args.lambdas), share=args.share,
                                 device=args.device, max_memory_gb=args.max_memory)
        run(args.recipe, args.knowledge, args.feature, args.out, both=args.both, settings=settings, windows=args.windows,
            chats=args.chats, options=MergeOptions(quiet=True, lora_merge_cache=args.lora_merge_cache), quiet=args.quiet)


__all__ = ["Axes", "DEFAULT_LAMBDAS", "DEFAULT_WEIGHTS", "Result", "Sweep", "SweepSettings", "choose",
           "file_probe", "main", "read_recipe", "recipe_at", "run"]
