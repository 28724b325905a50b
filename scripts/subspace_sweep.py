#!/usr/bin/env python
"""Subspace protection sweep: which form of "drop the donor's diff in the target drift's
principal subspace" (side, energy, weight) beats task arithmetic, per donor?

In process, on state dicts (no mergekit): for each seed and donor of the quality
benchmark (``benchlib.training.FULL``, models cached under
``~/.cache/mergekit-sigmoid-diff/quality/full/seed<k>/``, trained on first use) score

- task arithmetic  out = T + λ·D, D = I − B, λ ∈ TA_LAMBDAS (the baseline);
- hard projection  out = T + w·D' with D' from :mod:`mergekit_sigmoid_diff.subspace`
  (``drift_basis(T − B, energy, side)`` + ``project_out_``) on every 2-D layer weight;
  embeddings, lm_head and norms take the plain w·D;
- one soft variant  D' = D − D V diag(g) Vᵀ, g_j = sigmoid(k (σ_j/σ_1 − m)) (input side);
- for each projection: task arithmetic at its λ_eff = ⟨out − T, D⟩ / ⟨D, D⟩ (all tensors).

Scores come from ``benchlib.scoring.score`` (same probes and metrics as the quality
benchmark) and are cached in ``<cache>/subspace_sweep_scores.jsonl``, so reruns are cheap.
Writes ``docs/quality/subspace-sweep.{md,json}``.

    python scripts/subspace_sweep.py                    # seeds 0-4, donors chat long domain
    python scripts/subspace_sweep.py --seeds 0 1 --donors chat
    python scripts/subspace_sweep.py --speed            # timing of drift_basis + project_out_ at 8B size
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergekit-sigmoid-diff" / "quality"
SWEEP_VERSION = 1
TA_LAMBDAS = (0.25, 0.5, 0.75, 1.0, 1.1, 1.25, 1.5)
SIDES = ("input", "output", "both")
ENERGIES = (0.25, 0.5, 0.75)
# 1.0-1.6 is the grid of the brief (around the prototype's w ≈ 1.2); 0.5-0.9 was added after
# the first pass found the best task-arithmetic λ at 0.5-0.75 on this benchmark
WEIGHTS = (0.5, 0.75, 0.9, 1.0, 1.2, 1.4, 1.6)
SOFT = {"steepness": 12.0, "midpoint": 0.5}
VOCAB_OR_NORM = ("embed_tokens", "lm_head", "norm")
NOTES_BEGIN, NOTES_END = "<!-- findings -->", "<!-- /findings -->"


@dataclass(frozen=True)
class Candidate:
    label: str
    kind: str  # "ta" | "hard" | "soft" | "matched"
    weight: float
    side: str | None = None
    energy: float | None = None
    params: dict[str, float] = field(default_factory=dict)

    def key(self) -> dict[str, Any]:
        return {"kind": self.kind, "weight": round(self.weight, 4), "side": self.side, "energy": self.energy, **self.params}


def ta(lam: float, label: str | None = None, kind: str = "ta") -> Candidate:
    return Candidate(label or f"task_arithmetic λ={lam:g}", kind, round(lam, 4))


def candidates() -> list[Candidate]:
    out = [ta(lam) for lam in TA_LAMBDAS]
    for side in SIDES:
        for energy in ENERGIES:
            for w in WEIGHTS:
                out.append(Candidate(f"{side} e={energy:g} w={w:g}", "hard", w, side, energy))
    for w in WEIGHTS:
        out.append(Candidate(f"soft input k={SOFT['steepness']:g} m={SOFT['midpoint']:g} w={w:g}", "soft", w, "input", None, dict(SOFT)))
    return out


# --------------------------------------------------------------------------- merging


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def projected(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and not any(s in name for s in VOCAB_OR_NORM)


def soft_project(drift: torch.Tensor, diff: torch.Tensor, steepness: float, midpoint: float) -> torch.Tensor:
    _, s, vh = torch.linalg.svd(drift.double(), full_matrices=False)
    if float(s[0]) == 0:
        return diff.clone()
    g = torch.sigmoid(steepness * (s / s[0] - midpoint))
    v = vh.T
    return (diff.double() - ((diff.double() @ v) * g) @ v.T).to(diff.dtype)


def merge(
    cand: Candidate, t: dict[str, torch.Tensor], b: dict[str, torch.Tensor], i: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], float, float]:
    """(merged state, λ_eff, share of ‖D‖² the projection removed over the projected tensors)."""
    from mergekit_sigmoid_diff import subspace

    out: dict[str, torch.Tensor] = {}
    num = den = removed = proj_den = 0.0
    for name, tt in t.items():
        d = i[name].float() - b[name].float()
        if cand.kind in ("hard", "soft") and projected(name, tt):
            drift = tt.float() - b[name].float()
            before = float(d.double().square().sum())
            if cand.kind == "hard":
                basis = subspace.drift_basis(drift, cand.energy, cand.side)
                dp = subspace.project_out_(d.clone(), basis, cand.side)
            else:
                dp = soft_project(drift, d, cand.params["steepness"], cand.params["midpoint"])
            removed += before - float(dp.double().square().sum())
            proj_den += before
        else:
            dp = d
        delta = cand.weight * dp
        out[name] = tt.float() + delta
        num += float((delta.double() * d.double()).sum())
        den += float(d.double().square().sum())
    return out, (num / den if den else float("nan")), (removed / proj_den if proj_den else 0.0)


# --------------------------------------------------------------------------- scoring


def run(cache: Path, seeds: list[int], donors: list[str], log=print) -> list[dict[str, Any]]:
    from transformers import LlamaForCausalLM

    from benchlib import scoring, training
    from benchlib import world as w
    from benchlib.quality import ScoreCache, row_key

    schedule = training.FULL
    sched_id = asdict(schedule)
    cache.mkdir(parents=True, exist_ok=True)
    store = ScoreCache(cache / "subspace_sweep_scores.jsonl")
    rows: list[dict[str, Any]] = []
    cands = candidates()
    for seed in seeds:
        started = time.perf_counter()
        paths = training.build_family(cache, seed, schedule, tuple(training.DONORS), log=log)
        log(f"seed {seed}: models ready in {time.perf_counter() - started:.0f} s")
        probes = scoring.make_probes(w.make_world(seed), schedule.seq_len)
        b, t = load_state(paths["base"]), load_state(paths["target"])
        for donor in donors:
            i = load_state(paths[donor])
            model = LlamaForCausalLM(schedule.config(long=donor == "long")).eval()
            n_new, t0 = 0, time.perf_counter()

            def scored(cand: Candidate, extra: dict[str, Any] | None = None) -> dict[str, Any]:
                nonlocal n_new
                key = row_key("subspace-sweep", SWEEP_VERSION, cand.key(), seed, donor, sched_id, scoring.VERSION)
                row = store.rows.get(key)
                if row is None:
                    state, lam, share = merge(cand, t, b, i)
                    model.load_state_dict(state, strict=False)
                    row = {
                        "key": key, "seed": seed, "donor": donor, "label": cand.label, "kind": cand.kind,
                        "side": cand.side, "energy": cand.energy, "weight": cand.weight,
                        "lambda_eff": lam, "removed_share": share,
                        "scores": scoring.score(model, probes, donor),
                    }
                    store.put(row)
                    n_new += 1
                row = {**row, **(extra or {})}
                rows.append(row)
                return row

            for ref, path in (("base", paths["base"]), ("target", paths["target"]), ("donor", paths[donor])):
                key = row_key("subspace-sweep-ref", ref, seed, donor, sched_id, scoring.VERSION)
                row = store.rows.get(key)
                if row is None:
                    model.load_state_dict(load_state(path), strict=False)
                    row = {"key": key, "seed": seed, "donor": donor, "label": f"({ref})", "kind": "reference",
                           "scores": scoring.score(model, probes, donor)}
                    store.put(row)
                rows.append(row)
            for cand in cands:
                row = scored(cand)
                if cand.kind in ("hard", "soft"):
                    twin = ta(row["lambda_eff"], f"task_arithmetic @ λ_eff of {cand.label}", kind="matched")
                    scored(twin, {"matched_to": cand.label})
            log(f"seed {seed} {donor}: {n_new} new scores in {time.perf_counter() - t0:.0f} s")
    return rows


# --------------------------------------------------------------------------- summary


def _stat(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def _cmp(v: dict[str, float], c: dict[str, float], feature: str, knowledge: str) -> tuple[int, int]:
    f, k = v[feature] - c[feature], v[knowledge] - c[knowledge]
    dom = f >= 0 and k >= 0 and (f > 0 or k > 0)
    sub = f <= 0 and k <= 0 and (f < 0 or k < 0)
    return int(dom), int(sub)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from benchlib import scoring

    out: dict[str, Any] = {}
    for donor in dict.fromkeys(r["donor"] for r in rows):
        feature, knowledge, combined = scoring.FEATURE[donor], scoring.KNOWLEDGE, scoring.COMBINED[donor]
        sign = -1.0 if combined in scoring.LOWER_IS_BETTER else 1.0
        drows = [r for r in rows if r["donor"] == donor]
        by_label: dict[str, dict[int, dict[str, Any]]] = {}
        for r in drows:
            if r["kind"] != "matched":
                by_label.setdefault(r["label"], {})[r["seed"]] = r
        matched = {(r["matched_to"], r["seed"]): r for r in drows if r["kind"] == "matched"}
        seeds = sorted({r["seed"] for r in drows})
        stats = {}
        for label, per_seed in by_label.items():
            first = next(iter(per_seed.values()))
            metrics = {m: _stat([r["scores"][m] for r in per_seed.values()]) for m in first["scores"]}
            for extra in ("lambda_eff", "removed_share"):
                if extra in first:
                    metrics[extra] = _stat([r[extra] for r in per_seed.values()])
            stats[label] = {"kind": first["kind"], "side": first.get("side"), "energy": first.get("energy"),
                            "weight": first.get("weight"), "metrics": metrics}
        sweep = [l for l, s in stats.items() if s["kind"] == "ta"]
        best = max(sweep, key=lambda l: sign * stats[l]["metrics"][combined]["mean"])
        comparisons = {}
        for label, s in stats.items():
            if s["kind"] not in ("hard", "soft"):
                continue
            res = {"vs_best": [0, 0], "vs_matched": [0, 0], "delta_best": {}, "delta_matched": {}}
            deltas_b = {m: [] for m in (feature, knowledge, combined)}
            deltas_m = {m: [] for m in (feature, knowledge, combined)}
            for seed in seeds:
                v = by_label[label].get(seed)
                c = by_label[best].get(seed)
                mt = matched.get((label, seed))
                if v is None:
                    continue
                if c is not None:
                    d, u = _cmp(v["scores"], c["scores"], feature, knowledge)
                    res["vs_best"][0] += d
                    res["vs_best"][1] += u
                    for m in deltas_b:
                        deltas_b[m].append(v["scores"][m] - c["scores"][m])
                if mt is not None:
                    d, u = _cmp(v["scores"], mt["scores"], feature, knowledge)
                    res["vs_matched"][0] += d
                    res["vs_matched"][1] += u
                    for m in deltas_m:
                        deltas_m[m].append(v["scores"][m] - mt["scores"][m])
            res["delta_best"] = {m: _stat(x) for m, x in deltas_b.items() if x}
            res["delta_matched"] = {m: _stat(x) for m, x in deltas_m.items() if x}
            res["combined_wins_best"] = sum(sign * x > 0 for x in deltas_b[combined])
            comparisons[label] = res
        n = len(seeds)
        # recommendation rule: dominates best-λ task arithmetic on ≥ 80 % of seeds, never
        # dominated by it, and not dominated by its λ_eff twin on a majority of seeds
        qualifying = [
            l for l, c in comparisons.items()
            if c["vs_best"][0] >= math.ceil(0.8 * n) and c["vs_best"][1] == 0 and c["vs_matched"][1] <= n // 2
        ]
        qualifying.sort(key=lambda l: (-comparisons[l]["vs_best"][0], -comparisons[l]["vs_matched"][0],
                                       -sign * stats[l]["metrics"][combined]["mean"]))
        ranked = sorted(comparisons, key=lambda l: (-(comparisons[l]["vs_best"][0] - comparisons[l]["vs_best"][1]),
                                                    -sign * stats[l]["metrics"][combined]["mean"]))
        out[donor] = {
            "feature": feature, "knowledge": knowledge, "combined": combined, "seeds": seeds,
            "best_task_arithmetic": best, "stats": stats, "comparisons": comparisons,
            "recommended": qualifying[0] if qualifying else None, "qualifying": qualifying, "ranked": ranked,
        }
    return out


def _fmt(m: dict[str, float], d: int = 3) -> str:
    return f"{m['mean']:.{d}f} ± {m['std']:.{d}f}"


def _table(s: dict[str, Any], labels: list[str]) -> list[str]:
    f, k, c = s["feature"], s["knowledge"], s["combined"]
    head = ["method", "λ_eff", "removed", f"feature: {f}", f"knowledge: {k}", f"both: {c}", "base_nll",
            "vs best-λ TA dom/domd", "vs λ_eff TA dom/domd", f"Δ{f} vs best", f"Δ{k} vs best"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        e = s["stats"][label]
        m = e["metrics"]
        cmp = s["comparisons"].get(label)
        lam = _fmt(m["lambda_eff"], 2) if "lambda_eff" in m and e["kind"] != "ta" else ("—" if e["kind"] == "reference" else f"{e['weight']:g}")
        rem = _fmt(m["removed_share"], 2) if "removed_share" in m and e["kind"] in ("hard", "soft") else "—"
        name = f"**{label}**" if label in (s["best_task_arithmetic"], s["recommended"]) else label
        cells = [name, lam, rem, _fmt(m[f]), _fmt(m[k]), _fmt(m[c]), _fmt(m["base_nll"])]
        if cmp:
            db = cmp["delta_best"]
            cells += [f"{cmp['vs_best'][0]}/{cmp['vs_best'][1]}", f"{cmp['vs_matched'][0]}/{cmp['vs_matched'][1]}",
                      f"{db[f]['mean']:+.3f}", f"{db[k]['mean']:+.3f}"]
        else:
            cells += ["", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# Subspace protection sweep",
        "",
        f"`{meta['command']}` — {meta['n_scores']} scores, seeds {meta['seeds']}, schedule `training.FULL`. "
        "Method: out = T + w·D′, D′ = the donor diff D = I − B with the top-r singular subspace of the "
        "target drift A = T − B removed (r covers `energy` of ‖A‖²_F; side input = right/input vectors V_r, "
        "output = left U_r, both = (I−UUᵀ)D(I−VVᵀ)); embeddings, lm_head and norms take w·D. "
        "Scores: `benchlib.scoring.score` (as the quality benchmark). Mean ± sd over seeds.",
        "",
        "Judgement: for each donor, the comparator is task arithmetic at the single λ best on the donor's "
        "combined score averaged over seeds (best-λ TA). Per seed a candidate *dominates* if it is ≥ on both "
        "the donor feature and the target knowledge and > on one; *dominated* is the reverse. The same count "
        "is made against task arithmetic at the candidate's own λ_eff on that seed (λ_eff TA). A candidate is "
        "recommended only if it dominates best-λ TA on ≥ 80 % of seeds, is never dominated by it, and is not "
        "dominated by its λ_eff twin on a majority of seeds.",
        "",
    ]
    lines += ["## Recommendation", "", "| donor (job) | recommendation | key numbers |", "|---|---|---|"]
    for donor, s in summary.items():
        f, k, c = s["feature"], s["knowledge"], s["combined"]
        best = s["stats"][s["best_task_arithmetic"]]["metrics"]
        rec = s["recommended"]
        n = len(s["seeds"])
        if rec:
            e = s["stats"][rec]
            cmp = s["comparisons"][rec]
            m = e["metrics"]
            text = f"protect_subspace: {e['side']}, protect_energy: {e['energy']}, weight: {e['weight']:g}" if e["kind"] == "hard" else rec
            nums = (f"{f} {_fmt(m[f])} vs {_fmt(best[f])}, {k} {_fmt(m[k])} vs {_fmt(best[k])}, "
                    f"{c} {_fmt(m[c])} vs {_fmt(best[c])} ({s['best_task_arithmetic']}); dominates best-λ TA {cmp['vs_best'][0]}/{n}, dominated "
                    f"{cmp['vs_best'][1]}/{n}; vs λ_eff TA {cmp['vs_matched'][0]}/{cmp['vs_matched'][1]}")
        else:
            top = s["ranked"][0]
            cmp = s["comparisons"][top]
            m = s["stats"][top]["metrics"]
            text = f"use task_arithmetic ({s['best_task_arithmetic']})"
            nums = (f"nothing qualifies; closest: {top}: {f} {_fmt(m[f])} vs {_fmt(best[f])}, {k} {_fmt(m[k])} vs "
                    f"{_fmt(best[k])}, {c} {_fmt(m[c])} vs {_fmt(best[c])}; dominates/dominated best-λ TA {cmp['vs_best'][0]}/{cmp['vs_best'][1]} of {n}, "
                    f"vs λ_eff TA {cmp['vs_matched'][0]}/{cmp['vs_matched'][1]}")
        lines.append(f"| {donor} | {text} | {nums} |")
    lines.append("")
    for donor, s in summary.items():
        refs = [l for l, e in s["stats"].items() if e["kind"] == "reference"]
        tas = [l for l, e in s["stats"].items() if e["kind"] == "ta"]
        top = s["ranked"][:8]
        lines += [f"## Donor: {donor} ({len(s['seeds'])} seeds)", "",
                  f"Best task arithmetic by `{s['combined']}`: **{s['best_task_arithmetic']}**. "
                  f"Qualifying candidates: {', '.join(s['qualifying']) or 'none'}.", "",
                  "References, the task-arithmetic sweep and the 8 candidates with the best dominance balance "
                  "vs best-λ TA (λ_eff column: the candidate's effective λ; `removed`: share of ‖D‖² removed on "
                  "the projected tensors):", ""]
        lines += _table(s, refs + tas + top)
        rest = [l for l in s["ranked"] if l not in top]
        lines += ["", "<details><summary>all other candidates</summary>", ""]
        lines += _table(s, rest)
        lines += ["", "</details>", ""]
    if meta.get("speed"):
        lines += speed_markdown(meta["speed"])
    lines += [f"- {note}" for note in meta.get("notes", [])]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- speed


DRIFTS = {
    # name: (signal rank, σ_j exponent); Gaussian noise adds 30 % of ‖A‖²
    "steep": (256, 0.7),
    "spread": (1024, 0.35),
    "noise": (0, 0.0),
}


def _drift(m: int, n: int, kind: str, seed: int) -> torch.Tensor:
    """A synthetic drift: rank-k signal with σ_j ∝ j^−p plus noise holding 30 % of ‖A‖²,
    or pure Gaussian noise (flat spectrum: the randomized finder's worst case)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, n, generator=g)
    k, p = DRIFTS[kind]
    if k == 0:
        return z
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -p
    a = (u * s) @ v.T
    del u, v
    z *= (0.3 / 0.7 * a.square().sum() / z.square().sum()).sqrt()
    return a.add_(z)


def speed(threads: tuple[int, ...] = (1, 2), m: int = 4096, n: int = 14336, energy: float = 0.5,
          exact: bool = True, log=print) -> dict[str, Any]:
    """Time drift_basis + project_out_ (side input and both) on one m × n float32 drift, vs
    the exact SVD; accuracy of the randomized basis vs the exact one."""
    from mergekit_sigmoid_diff import subspace

    results: dict[str, Any] = {"shape": [m, n], "energy": energy, "cases": []}
    for kind in DRIFTS:
        a = _drift(m, n, kind, 0)
        d = _drift(m, n, "spread", 1)
        exact_basis = None
        for nt in threads:
            torch.set_num_threads(nt)
            t0 = time.perf_counter()
            basis = subspace.drift_basis(a, energy, "both")
            t_basis = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = subspace.project_out_(d.clone(), basis, "input")
            t_in = time.perf_counter() - t0
            t0 = time.perf_counter()
            subspace.project_out_(d.clone(), basis, "both")
            t_both = time.perf_counter() - t0
            case = {"drift": kind, "threads": nt, "rank": basis.rank, "covered": basis.covered, "randomized": not basis.exact,
                    "basis_s": t_basis, "project_input_s": t_in, "project_both_s": t_both}
            if exact and exact_basis is None:
                t0 = time.perf_counter()
                u, s, vh = torch.linalg.svd(a, full_matrices=False)
                case["exact_svd_s"] = time.perf_counter() - t0
                s2 = s.double() ** 2
                r = int((torch.cumsum(s2, 0) < energy * s2.sum()).sum()) + 1
                exact_basis = subspace.Basis(u[:, :r].contiguous(), vh[:r].T.contiguous(), r, float(s2[:r].sum() / s2.sum()))
                del u, s, vh
                ref = subspace.project_out_(d.clone(), exact_basis, "input")
                removed = (d - ref).norm()
                case.update(exact_rank=r, exact_covered=exact_basis.covered,
                            covered_error=basis.covered - exact_basis.covered,
                            projection_error_rel_D=float((out - ref).norm() / d.norm()),
                            projection_error_rel_removed=float((out - ref).norm() / removed))
                del ref
            results["cases"].append(case)
            log(json.dumps(case))
            del out
    torch.set_num_threads(1)
    return results


def speed_markdown(sp: dict[str, Any]) -> list[str]:
    m, n = sp["shape"]
    lines = ["## Speed", "",
             f"One {m} × {n} float32 drift (the shape of an 8B MLP weight), energy {sp['energy']}, CPU "
             f"(`python scripts/subspace_sweep.py --speed`; {sp.get('cpu', '')}). `steep` = rank-256 signal "
             "with σ_j ∝ j^−0.7, `spread` = rank-1024 signal with σ_j ∝ j^−0.35, each plus Gaussian noise holding "
             "30 % of ‖A‖² (a fine-tuning drift has a decaying spectrum); `noise` = pure Gaussian (flat "
             "spectrum, the worst case). Donor diff: a `spread` drift of another seed. Exact = `torch.linalg.svd(A, full_matrices=False)` alone (the "
             "basis step's equivalent, timed once per drift at the first thread count).", "",
             "| drift | threads | path | rank (exact) | covered (exact) | drift_basis s | project_out_ input s | both s | exact SVD s | ‖D′−D′ₑ‖/‖D‖ | ‖D′−D′ₑ‖/‖D−D′ₑ‖ |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in sp["cases"]:
        ex = c.get("exact_rank")
        rank = f"{c['rank']} ({ex})" if ex else f"{c['rank']}"
        covered = f"{c['covered']:.4f} ({c['exact_covered']:.4f})" if ex else f"{c['covered']:.4f}"
        nan = float("nan")
        lines.append(
            f"| {c['drift']} | {c['threads']} | {'randomized' if c['randomized'] else 'exact'} | {rank} | {covered} | "
            f"{c['basis_s']:.1f} | {c['project_input_s']:.2f} | {c['project_both_s']:.2f} | "
            f"{c.get('exact_svd_s', nan):.1f} | {c.get('projection_error_rel_D', nan):.2e} | "
            f"{c.get('projection_error_rel_removed', nan):.2e} |"
        )
    lines.append("")
    return lines


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE / "full")
    parser.add_argument("--out", type=Path, default=Path("docs/quality"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--donors", nargs="+", default=["chat", "long", "domain"], choices=["chat", "long", "domain"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--speed", action="store_true", help="time drift_basis + project_out_ at 4096 × 14336 and exit")
    parser.add_argument("--speed-threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-exact", action="store_true", help="--speed without the exact-SVD reference")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_json = args.out / "subspace-sweep.json"
    if args.speed:
        sp = speed(tuple(args.speed_threads), exact=not args.no_exact)
        sp["cpu"] = _cpu()
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        (args.cache_dir / "subspace_speed.json").write_text(json.dumps(sp, indent=1))
        print("\n".join(speed_markdown(sp)))
        return
    started = time.perf_counter()
    rows = run(args.cache_dir, args.seeds, args.donors)
    summary = summarise(rows)
    speed_path = args.cache_dir / "subspace_speed.json"  # written by --speed
    meta = {
        "command": "python scripts/subspace_sweep.py" + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0, 1, 2, 3, 4] else "")
        + (f" --donors {' '.join(args.donors)}" if args.donors != ["chat", "long", "domain"] else ""),
        "seeds": args.seeds, "donors": args.donors, "n_scores": len(rows),
        "speed": json.loads(speed_path.read_text()) if speed_path.exists() else None,
        "notes": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "key"} for r in rows]
    from benchlib.report import rounded

    # one row per line keeps the file diffable and small
    body = rounded({"meta": meta, "summary": summary})
    lines = ",\n".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in rounded(slim))
    out_json.write_text(json.dumps(body, ensure_ascii=False, separators=(",", ":"))[:-1] + ',"rows":[\n' + lines + "\n]}\n")
    md_path = args.out / "subspace-sweep.md"
    md = markdown(summary, meta)
    # a hand-written findings block between NOTES_BEGIN and NOTES_END survives regeneration
    old = md_path.read_text() if md_path.exists() else ""
    if NOTES_BEGIN in old and NOTES_END in old:
        block = old[old.index(NOTES_BEGIN) : old.index(NOTES_END) + len(NOTES_END)]
        head, _, tail = md.partition("\n## Recommendation")
        md = f"{head}\n{block}\n\n## Recommendation{tail}"
    md_path.write_text(md)
    print(f"{len(rows)} rows in {time.perf_counter() - started:.0f} s; wrote {out_json} and subspace-sweep.md")
    for donor, s in summary.items():
        print(donor, "best TA:", s["best_task_arithmetic"], "recommended:", s["recommended"], "qualifying:", s["qualifying"][:5])


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
