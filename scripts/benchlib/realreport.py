"""The real-weight suite's report: which rows count, then the frontier rule per case and seed,
then per family.

Which rows count (:class:`Today`, :func:`select`): a row is shown only when its scoring key, its
merge code (for a merge: :func:`mergekit_sigmoid_diff.codekey.merge_key` for ``sigmoid_diff``,
mergekit's version for mergekit's methods) and the stamps of the models it used (B, T and I of
its own case and seed) equal today's, the stamps computed now from the trained models present.
Any other row is stale: never shown, counted in the header ("stale, not shown, rerun").

For each (case, seed) the task_arithmetic rows trace the curve (:mod:`mergekit_sigmoid_diff.frontier`),
at whatever λ they were measured (a grid, plus any refinement points: rows of that family, or
the ``extra`` points given to :func:`annotate`); each other merge gets ``ta_knowledge``
(task_arithmetic's knowledge loss at its feature), ``gap_closed`` with ``gap_exact`` (False: a
lower bound) and ``gap_note`` (why it is n/a, or "no interval"), ``gap_se``/``gap_ci_lo``/
``gap_ci_hi`` (paired bootstrap over the evaluation items, :func:`frontier.bootstrap_gaps`, where
the rows carry per-item scores), ``ta_feature`` and, where the case has one, ``both_gap`` (the
same rule with the "both at once" score as the knowledge axis; no interval). A family (one
setting at several weights) is taken at the weight with the highest mean ``gap_closed`` over
seeds; its verdict is :func:`frontier.verdict` over the seeds, intervals included.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from benchlib import real
from mergekit_sigmoid_diff import frontier, mainjob

INPUTS = ("B (base)", "T (target)", "I (donor)")
NO_INTERVAL = "no interval"
BOOTSTRAP = {"resamples": 1000, "seed": 0, "level": 0.95}


# ---------------------------------------------------------------- which rows count


@dataclass(frozen=True)
class Today:
    """What a row must carry to be shown: today's scoring key, merge code per method and the
    stamps of each (case, seed)'s models ({"B": …, "T": …, "I": …}) as they are on disk now."""

    scoring_key: str
    merge_codes: Mapping[str, str]  # merge_method → code key; other methods: default_merge_code
    default_merge_code: str
    stamps: Mapping[tuple[str, int], Mapping[str, str]] = field(default_factory=dict)

    def merge_code(self, recipe: Optional[Mapping[str, Any]]) -> Optional[str]:
        """The code a merge with this recipe depends on (None for an input model)."""
        if recipe is None:
            return None
        return self.merge_codes.get(recipe["merge_method"], self.default_merge_code)

    def stale(self, row: Mapping[str, Any]) -> Optional[str]:
        """Why ``row`` is not today's (None when it is)."""
        stamps = self.stamps.get((row.get("case"), row.get("seed")))
        if stamps is None:
            return "its models are not present"
        if row.get("scoring_key") != self.scoring_key:
            return "other scoring code"
        if row.get("stamps") != dict(stamps):
            return "other models"
        if row.get("merge_code") != self.merge_code(row.get("recipe")):
            return "other merge code"
        return None


def select(rows: Iterable[dict[str, Any]], today: Today, cases: Iterable[str], seeds: Iterable[int],
           names: Iterable[str]) -> tuple[list[dict[str, Any]], Counter]:
    """(the newest current row per case, seed and model; why each missing one is stale).

    Only rows of ``cases`` × ``seeds`` whose model is in ``names`` (or an input) are considered;
    a (case, seed, model) with no current row but stale ones counts once, under the newest
    stale row's reason."""
    cases, seeds, names = set(cases), set(seeds), set(names) | set(INPUTS)
    current: dict[tuple, dict[str, Any]] = {}
    stale: dict[tuple, str] = {}
    for row in rows:  # in file order: the newest last
        if row.get("case") not in cases or row.get("seed") not in seeds or row.get("model") not in names:
            continue
        slot = row["case"], row["seed"], row["model"]
        why = today.stale(row)
        if why is None:
            current[slot] = row
        else:
            stale[slot] = why
    return list(current.values()), Counter(why for slot, why in stale.items() if slot not in current)


# ---------------------------------------------------------------- the frontier per case and seed


def _point(row: Mapping[str, Any], lam: float, feature: str, knowledge: str) -> frontier.Point:
    return frontier.Point(lam, row[feature], row[knowledge])


def _items(row: Mapping[str, Any], feature: str, knowledge: str) -> Optional[frontier.Items]:
    items = row.get("items") or {}
    if feature not in items or knowledge not in items:
        return None
    return frontier.Items(items[feature], items[knowledge])


def _sweep(rows: list[dict[str, Any]], extra: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """task_arithmetic's rows and extra points, one per λ (a row before an extra point)."""
    out: dict[float, Mapping[str, Any]] = {}
    for r in [*(r for r in rows if r["family"] == "task_arithmetic"), *extra]:
        out.setdefault(float(r["lambda_eff"]), r)
    return [out[lam] for lam in sorted(out)]


def _curve(target: Optional[Mapping[str, Any]], sweep: list[Mapping[str, Any]], feature: str,
           knowledge: str) -> Optional[frontier.Curve]:
    if target is None or len(sweep) < 2:
        return None
    return frontier.Curve.of(_point(target, 0.0, feature, knowledge),
                             [_point(r, r["lambda_eff"], feature, knowledge) for r in sweep])


def _intervals(target, sweep, merges, feature, knowledge, bootstrap) -> dict[str, frontier.Bootstrap]:
    """Bootstrap figures per merge row name, for the merges with items (when the curve has them)."""
    curve_items = [_items(r, feature, knowledge) for r in (target, *sweep)]
    if any(i is None for i in curve_items):
        return {}
    merge_items = {r["model"]: i for r in merges if (i := _items(r, feature, knowledge)) is not None}
    if not merge_items:
        return {}
    pairs = [(float(r["lambda_eff"]), i) for r, i in zip(sweep, curve_items[1:])]
    return frontier.bootstrap_gaps(curve_items[0], pairs, merge_items, **bootstrap)


def annotate(rows: list[dict[str, Any]], extra: Optional[Mapping[tuple[str, int], Iterable[Mapping[str, Any]]]] = None,
             bootstrap: Optional[Mapping[str, Any]] = None) -> list[dict[str, Any]]:
    """Every row with its case's axes and, for merges, the frontier figures. ``extra`` maps
    (case, seed) to further task_arithmetic points (dicts like its rows: ``lambda_eff``, the
    scores, optionally ``items``) that join the curve without being listed."""
    bootstrap = {**BOOTSTRAP, **(bootstrap or {})}
    by: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by[row["case"], row["seed"]].append(row)
    out = []
    for (case, seed), mine in sorted(by.items()):
        feature, knowledge, both = real.AXES[case]
        target = next((r for r in mine if r["model"] == "T (target)"), None)
        sweep = _sweep(mine, (extra or {}).get((case, seed), ()))
        curve = _curve(target, sweep, feature, knowledge)
        both_curve = _curve(target, sweep, feature, both) if both else None
        merges = [r for r in mine if r["family"] not in ("input", "task_arithmetic")]
        intervals = _intervals(target, sweep, merges, feature, knowledge, bootstrap) if curve is not None else {}
        for row in mine:
            row = {k: v for k, v in row.items() if k not in ("key", "items")}
            row.update(feature=row[feature], knowledge=row[knowledge], feature_score=feature, knowledge_score=knowledge)
            if curve is not None and row["family"] not in ("input", "task_arithmetic"):
                found = frontier.gap(curve, row["feature"], row["knowledge"])
                row["ta_knowledge"] = frontier.knowledge_at(curve, row["feature"])
                row["gap_closed"], row["gap_exact"] = found.value, found.exact
                row.update(_interval_fields(found, intervals.get(row["model"])))
                row["ta_feature"] = frontier.feature_at(curve, row["knowledge"])
                if both_curve is not None:
                    row["both_gap"], row["both_exact"] = frontier.gap_bound(both_curve, row["feature"], row[both])
            out.append(row)
    return out


def _interval_fields(found: frontier.Gap, boot: Optional[frontier.Bootstrap]) -> dict[str, Any]:
    fields: dict[str, Any] = {"gap_se": None, "gap_ci_lo": None, "gap_ci_hi": None, "gap_note": found.reason}
    if found.value is None:
        return fields
    if boot is None:
        return {**fields, "gap_note": NO_INTERVAL}
    if boot.lo is None:
        return {**fields, "gap_note": f"interval undetermined: {boot.undefined} of {boot.resamples} resamples n/a"}
    return {**fields, "gap_se": boot.se, "gap_ci_lo": boot.lo, "gap_ci_hi": boot.hi}


def _seed_gap(row: Mapping[str, Any]) -> frontier.SeedGap:
    value, exact = row.get("gap_closed"), row.get("gap_exact", True)
    if value is not None and (row.get("gap_note") or "").startswith("interval undetermined"):
        return frontier.SeedGap(value, exact, lo=-math.inf, hi=math.inf)  # the noise decides nothing
    return frontier.SeedGap(value, exact, row.get("gap_se"), row.get("gap_ci_lo"), row.get("gap_ci_hi"))


def families(rows: list[dict[str, Any]], seeds: list[int]) -> list[dict[str, Any]]:
    """Per case and family: the best weight by mean gap_closed, its per-seed values and verdict."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        merged = [r for r in rows if r["case"] == case and r["family"] not in ("input", "task_arithmetic")]
        for family in dict.fromkeys(r["family"] for r in merged):
            candidates = []
            for name in dict.fromkeys(r["model"] for r in merged if r["family"] == family):
                per_seed = {r["seed"]: r for r in merged if r["model"] == name}
                if set(per_seed) != set(seeds):
                    continue  # not every seed scored yet
                gaps = [per_seed[s].get("gap_closed") for s in seeds]
                defined = [g for g in gaps if g is not None]
                mean = frontier.mean_sd(defined)[0] if defined else float("-inf")
                candidates.append((len(defined) == len(gaps), mean, name, per_seed))
            if not candidates:
                continue
            _, _, name, per_seed = max(candidates, key=lambda c: (c[0], c[1]))
            chosen = [per_seed[s] for s in seeds]
            gaps = [r.get("gap_closed") for r in chosen]
            both = [r.get("both_gap") for r in chosen]
            defined = [g for g in gaps if g is not None]
            mean, sd = frontier.mean_sd(defined) if defined else (None, None)
            both_defined = [g for g in both if g is not None]
            out.append({
                "case": case, "family": family, "best": name, "weights_tried": len(candidates),
                "gap_closed": gaps, "exact": [r.get("gap_exact", True) for r in chosen],
                "ci": [[r.get("gap_ci_lo"), r.get("gap_ci_hi")] for r in chosen], "se": [r.get("gap_se") for r in chosen],
                "notes": [r.get("gap_note") for r in chosen],
                "mean": mean, "sd": sd, "verdict": frontier.verdict([_seed_gap(r) for r in chosen]),
                "both_gap": both, "both_mean": frontier.mean_sd(both_defined)[0] if both_defined else None,
                "both_verdict": frontier.verdict(list(zip(both, [r.get("both_exact", True) for r in chosen])))
                if any(b is not None for b in both) else "n/a",
                "lambda_eff": frontier.mean_sd([r["lambda_eff"] for r in chosen])[0],
            })
    return out


# ---------------------------------------------------------------- the report


def _f(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _gap_cell(value, exact, lo, hi, note) -> str:
    if value is None:
        return note or "—"
    text = f"{'' if exact else '≥'}{value:+.2f}"
    return text + (f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None else "")


def glance(summary: list[dict[str, Any]]) -> list[str]:
    """One table: every family (at its best weight) × case, mean gap_closed ± sd and the verdict."""
    cases = list(dict.fromkeys(s["case"] for s in summary))
    by = {(s["family"], s["case"]): s for s in summary}
    families_ = sorted(dict.fromkeys(s["family"] for s in summary),
                       key=lambda f: -sum((by[f, c]["mean"] or 0) for c in cases if (f, c) in by))
    lines = ["## At a glance: gap_closed, mean ± sd over seeds (verdict), each setting at its best weight", "",
             "| setting | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
    for family in families_:
        cells = []
        for case in cases:
            s = by.get((family, case))
            if s is None or s["mean"] is None:
                cells.append("—")
                continue
            bound = "" if all(s["exact"]) else "≥"
            cells.append(f"{bound}{s['mean']:+.2f} ± {s['sd']:.2f} ({s['verdict']}; w={s['best'].rsplit('w=', 1)[-1]})")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return lines


def header(meta: Mapping[str, Any]) -> list[str]:
    """Where the rows come from: the code keys, the commands, the cold cost, what was refused."""
    commands = meta.get("commands") or {}
    lines = [f"Every row shown was computed by today's code and models: merge code `{meta.get('merge_key')}` "
             f"(sigmoid_diff; mergekit's methods: mergekit {meta.get('mergekit')}), scoring `{meta.get('scoring_key')}`, "
             "and the stamps of each case and seed's B, T and I as they are on disk.", "",
             "Produced by " + ("; ".join(f"`{c}` ({n} rows)" for c, n in commands.items()) or "no command") + ".", "",
             f"Cold cost: {meta.get('cold_seconds', 0):.0f} s of merging and scoring (the rows' recorded seconds, "
             f"each input model counted once) + {meta.get('training_seconds', 0):.0f} s of training "
             f"({meta.get('trained_models', 0)} models with a recorded time).", ""]
    stale = meta.get("stale") or {}
    if stale:
        reasons = ", ".join(f"{n} {why}" for why, n in stale.items())
        lines += [f"**{sum(stale.values())} rows stale, not shown, rerun** ({reasons}): `{meta.get('rerun', '')}`.", ""]
    missing = meta.get("missing_models") or []
    if missing:
        lines += ["Not shown, models not present: " + ", ".join(f"{c} seed {s}" for c, s in missing) + ".", ""]
    return lines


def markdown(rows: list[dict[str, Any]], summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    seeds = meta["seeds"]
    boot = meta.get("bootstrap", BOOTSTRAP)
    lines = [f"# Real-weight quality suite (SmolLM2-135M-Instruct, seeds {seeds})", "", *header(meta),
             "`gap_closed` = share of task_arithmetic's knowledge loss avoided at the same feature strength "
             "(> 0: beyond the λ-frontier; ≥: the merge's feature is stronger than any λ reaches, so the value is a lower bound read at "
             "task_arithmetic's strongest-feature point). "
             f"n/a: nothing to close = task_arithmetic loses less than {frontier.KNOWLEDGE_FLOOR} nats there. "
             f"[lo, hi] = {100 * boot['level']:.0f} % paired bootstrap interval over the evaluation items "
             f"({boot['resamples']} resamples; \"{NO_INTERVAL}\": the row has no per-item scores). "
             "Verdict: **beats** = every seed's interval above 0 and the mean over seeds above 2 × (seeds' spread + evaluation noise), "
             "in its monotone form (mergekit_sigmoid_diff/frontier.py); **beats ≥** = the same read on lower bounds; "
             "**loses** = the mirror image (never on bounds); otherwise undecided. `both` = the same rule on the \"both at once\" score "
             "(the target's knowledge asked in the donor's format). Each family at its best weight.", ""]
    lines += glance(summary) + [""]
    for case in dict.fromkeys(s["case"] for s in summary):
        feature, knowledge, both = meta["axes"][case]
        lines += [f"## {case}: {meta['cases'][case]}", "", f"feature = `{feature}`, knowledge = `{knowledge}`"
                  + (f", both = `{both}`" if both else "") + " (all nats/token, lower is better)", "",
                  "| family | best weight | λ_eff | gap_closed per seed [interval] | mean ± sd | verdict | both: mean | both verdict |",
                  "|---|---|---:|---|---|---|---:|---|"]
        for s in sorted((s for s in summary if s["case"] == case), key=lambda s: -(s["mean"] if s["mean"] is not None else -9)):
            per = " / ".join(_gap_cell(g, e, lo, hi, n) for g, e, (lo, hi), n in zip(s["gap_closed"], s["exact"], s["ci"], s["notes"]))
            ms = "—" if s["mean"] is None else f"{s['mean']:+.3f} ± {s['sd']:.3f}"
            bm = "—" if s["both_mean"] is None else f"{s['both_mean']:+.3f}"
            lines.append(f"| {s['family']} | {s['best']} | {s['lambda_eff']:.3f} | {per} | {ms} | **{s['verdict']}** | {bm} | {s['both_verdict']} |")
        lines += [""]
        inputs = [r for r in rows if r["case"] == case and r["model"] in INPUTS]
        lines += ["Inputs per seed (general English = held-out Apache-2.0 text, the realism check; chat = NLL of B's own replies):", "",
                  "| seed | model | feature | knowledge | both | general English | chat NLL | P(ANSWER:) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['seed']} | {r['model']} | {r['feature']:.3f} | {r['knowledge']:.3f} | {_f(r.get('both_nll'))} | "
                  f"{_f(r.get('general_nll'))} | {_f(r.get('chat_nll'))} | {_f(r.get('feature_prob'))} |"
                  for r in sorted(inputs, key=lambda r: (r["seed"], INPUTS.index(r["model"])))]
        lines += [""]
    lines += ["## Every merge, per case and seed", "",
              "| case | seed | merge | λ_eff | feature | knowledge | TA knowledge at that feature | gap_closed [interval] | TA feature at that knowledge | both | P(ANSWER:) |",
              "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if r["family"] == "input":
            continue
        lam = "" if r.get("lambda_eff") is None else f"{r['lambda_eff']:.3f}"
        both = meta["axes"][r["case"]][2]
        cell = "" if r["family"] == "task_arithmetic" else _gap_cell(
            r.get("gap_closed"), r.get("gap_exact", True), r.get("gap_ci_lo"), r.get("gap_ci_hi"), r.get("gap_note"))
        if r.get("gap_note") == NO_INTERVAL:
            cell += " (no interval)"
        lines.append(f"| {r['case']} | {r['seed']} | {r['model']} | {lam} | {r['feature']:.4f} | {r['knowledge']:.4f} | "
                     f"{_f(r.get('ta_knowledge'), 4)} | {cell} | {_f(r.get('ta_feature'), 4)} | "
                     f"{'' if not both else _f(r.get(both), 4)} | {_f(r.get('feature_prob'), 3)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], summary: list[dict[str, Any]], path: Path, highlight: str | None = None) -> None:
    """One panel per case: task_arithmetic's λ-curve (mean over seeds, at the λ every seed has)
    and each family's best setting (mean over seeds, the ``highlight`` family as a large star);
    knowledge loss against feature loss, both lower-is-better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(s["case"] for s in summary))
    fig, axes = plt.subplots(1, len(cases), figsize=(5.2 * len(cases), 4.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def mean_of(name: str, case: str, key: str) -> float:
        values = [r[key] for r in rows if r["case"] == case and r["model"] == name]
        return sum(values) / len(values)

    for ax, case in zip(axes[0], cases):
        mine = [r for r in rows if r["case"] == case]
        seeds = {r["seed"] for r in mine}
        grid = {}  # λ rows every seed has (a refinement point of one seed is not a curve point of the mean)
        for r in mine:
            if r["family"] == "task_arithmetic":
                grid.setdefault(r["model"], (r["lambda_eff"], set()))[1].add(r["seed"])
        sweep = sorted((lam, name) for name, (lam, have) in grid.items() if have == seeds)
        names = ["T (target)"] + [n for _, n in sweep]
        ax.plot([mean_of(n, case, "feature") for n in names], [mean_of(n, case, "knowledge") for n in names], "o-",
                color="tab:gray", markersize=3,
                label=f"task_arithmetic, λ = 0 (T) … {sweep[-1][0]:g}" if sweep else "T")
        for n, s in enumerate(s for s in summary if s["case"] == case):
            star = s["family"] == highlight
            ax.plot(mean_of(s["best"], case, "feature"), mean_of(s["best"], case, "knowledge"), "*" if star else "D",
                    color=colours[n % len(colours)], markersize=13 if star else 5, linestyle="none",
                    label=f"{s['best']} (gap {s['mean']:+.2f})" if s["mean"] is not None else s["best"])
        feature, knowledge, _ = real.AXES[case]
        xs = [r["feature"] for r in mine]
        if min(xs) > 0 and max(xs) / min(xs) > 20:  # −log P(ANSWER:) spans 1e-3 … 13: log scale
            ax.set_xscale("log")
        ax.set_xlabel(f"{feature} (donor's feature, ↓)")
        ax.set_ylabel(f"{knowledge} (target's knowledge, ↓)")
        ax.set_title(case, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5.5, loc="best")
    fig.suptitle("SmolLM2-135M: every setting against task_arithmetic's λ-frontier (below-left of the curve = beyond it)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(rows: list[dict[str, Any]], plan, out: Path, meta: dict[str, Any],
           extra: Optional[Mapping[tuple[str, int], Iterable[Mapping[str, Any]]]] = None) -> list[Path]:
    """Write benchmark_real.json (meta, summary, rows without their per-item scores),
    benchmark_real.md and frontier.png (when matplotlib is there) to ``out``."""
    order = {name: i for i, (_, _, name, _) in enumerate(plan)}
    rows = sorted(annotate(rows, extra, meta.get("bootstrap")),
                  key=lambda r: (r["case"], r["seed"], INPUTS.index(r["model"]) if r["model"] in INPUTS else 9,
                                 order.get(r["model"], 999), r.get("lambda_eff") or 0))
    summary = families(rows, meta["seeds"])
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "benchmark_real.json", out / "benchmark_real.md"]
    written[0].write_text(json.dumps({**meta, "summary": summary, "rows": rows}, indent=1, ensure_ascii=False) + "\n")
    written[1].write_text(markdown(rows, summary, meta))
    if not mainjob.plot_available():
        return written
    if summary:
        plot(rows, summary, out / "frontier.png", meta.get("recommended_family"))
        written.append(out / "frontier.png")
    return written
