"""The quality benchmark runner: train (or reuse) each seed's models, merge with real
mergekit, score every merge, and cache every score by a hash of what produced it: the
settings, and the source of the code (:func:`score_code`, and for a merge also
:func:`mergekit_sigmoid_diff.codekey.merge_key` and λ_eff's module), so a rerun after a change
to the scoring or the kernel computes afresh.

For each seed and donor: score the references (base, target, donor, ceiling), then
each variant of :mod:`~benchlib.recipes`. A sigmoid-family merge
also records its effective λ,

    λ_eff = ⟨out − T, I − B⟩ / ⟨I − B, I − B⟩        (sums over all tensors)

and gets a ``task_arithmetic`` twin at that λ, so the gate's own value can be told
from a mere change of scale. Merges run through ``mergekit.merge.run_merge`` in this
process (the same code ``mergekit-yaml`` runs, recipes validated by
``MergeConfiguration``) or, with ``backend="subprocess"``, through ``mergekit-yaml`` itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from safetensors.torch import load_file

from benchlib import recipes as r
from benchlib import scoring, training
from benchlib import world as w
from mergekit_sigmoid_diff import measure
from mergekit_sigmoid_diff.codekey import code_key, merge_key
from mergekit_sigmoid_diff.commands import mergekit_command
from mergekit_sigmoid_diff.measure import effective_lambda

REFERENCES = ("base", "target", "donor", "ceiling")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def run_merge(recipe: dict[str, Any], out: Path, seed: int, backend: str = "inprocess") -> None:
    """Merge ``recipe`` into ``out`` with mergekit (``--random-seed seed``)."""
    if backend == "subprocess":
        recipe_path = out.with_suffix(".yml")
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        exe = mergekit_command("mergekit-yaml")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [exe, str(recipe_path), str(out), "--random-seed", str(seed), "--no-write-model-card", "--quiet"],
            capture_output=True, text=True, env=env,
        )
        if done.returncode:
            raise RuntimeError(f"mergekit-yaml failed for {recipe['merge_method']}: {done.stderr.strip()[-400:]}")
        return
    from mergekit_sigmoid_diff import register

    register()
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(random_seed=seed, quiet=True, write_model_card=False, copy_tokenizer=False)
    mergekit_run_merge(MergeConfiguration.model_validate(recipe), str(out), options)


def row_key(*parts: Any) -> str:
    """16 hex digits identifying a cached row: a hash of everything that produced it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Schema of a cached row; bump it when the row's layout changes.
SCHEMA = 1


def score_code() -> str:
    """The code a reference's score depends on: the world, the models' training and loading,
    the scoring (a change to any of them gives new keys, so old scores are not reused)."""
    return code_key(w, training, scoring, schema=SCHEMA)


def merge_row_code() -> tuple[str, str, str]:
    """What a merge's row depends on beyond its recipe (part of the row's key): the scores'
    code (:func:`score_code`), the merge's (:func:`~mergekit_sigmoid_diff.codekey.merge_key`)
    and λ_eff's (``measure.py``)."""
    return score_code(), merge_key(), code_key(measure)


class ScoreCache:
    """Append-only JSON-lines file of scored rows, keyed by a config hash (resumable runs)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["key"]] = row

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def put(self, row: dict[str, Any]) -> None:
        self.rows[row["key"]] = row
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def run(
    cache_dir: Path,
    seeds: list[int],
    donors: tuple[str, ...],
    schedule: training.Schedule,
    variants: list[r.Variant],
    backend: str = "inprocess",
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every row (one per seed × donor × reference or merge), scored or read from the cache."""
    from tqdm import tqdm

    cache_dir = Path(cache_dir).absolute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    scores = ScoreCache(cache_dir / "scores.jsonl")
    schedule_id = asdict(schedule)
    ref_code, recipe_code = score_code(), merge_row_code()
    rows: list[dict[str, Any]] = []
    per_seed = len(donors) * (len(REFERENCES) + len(variants) + sum(v.matched for v in variants))
    bar = tqdm(total=len(seeds) * per_seed, desc="quality benchmark", disable=not progress, unit="score")
    for seed in seeds:
        paths = training.build_family(cache_dir, seed, schedule, donors, log=log)
        world = w.make_world(seed)
        probes = scoring.make_probes(world, schedule.seq_len)
        for donor in donors:
            config = schedule.config(long=donor == "long")
            refs = {"base": paths["base"], "target": paths["target"], "donor": paths[donor], "ceiling": paths[f"{donor}_ceiling"]}

            def scored(label: str, kind: str, key: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
                row = scores.get(key)
                if row is None:
                    row = {"key": key, "seed": seed, "donor": donor, "label": label, "kind": kind, **make()}
                    scores.put(row)
                rows.append(row)
                bar.update()
                return row

            for name in REFERENCES:
                key = row_key("ref", name, seed, donor, schedule_id, ref_code)
                scored(name, "reference", key, lambda: {"scores": scoring.score(training.load_model(refs[name], config), probes, donor)})

            def merged(variant: r.Variant, label: str, kind: str) -> dict[str, Any]:
                recipe = r.recipe(variant, refs["base"], refs["target"], refs["donor"])
                key = row_key("merge", recipe, seed, donor, schedule_id, backend, recipe_code)

                def make() -> dict[str, Any]:
                    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
                        out = Path(tmp) / "merged"
                        run_merge(recipe, out, seed, backend)
                        lam = effective_lambda(out, refs["target"], refs["donor"], refs["base"])
                        result = scoring.score(training.load_model(out, config), probes, donor)
                    return {"method": variant.method, "recipe": recipe, "lambda_eff": lam, "scores": result}

                return scored(label, kind, key, make)

            for variant in variants:
                row = merged(variant, variant.label, "merge")
                if variant.matched:
                    twin = r.task_arithmetic(row["lambda_eff"], f"task_arithmetic @ λ_eff of {variant.label}")
                    merged(twin, twin.label, "matched")
    bar.close()
    return rows
