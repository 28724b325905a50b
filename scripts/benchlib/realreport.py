"""The real-weight suite's report: the frontier rule applied per case and seed, then per family.

For each (case, seed) the task_arithmetic rows trace the curve (:mod:`mergekit_sigmoid_diff.frontier`);
each other merge gets ``ta_knowledge`` (task_arithmetic's knowledge loss at its feature),
``gap_closed``, ``ta_feature`` (task_arithmetic's feature loss at its knowledge) and, where the
case has one, ``both_gap`` (the same rule with the "both at once" score as the knowledge axis).
A family (one setting at several weights) is taken at the weight with the highest mean
``gap_closed`` over seeds; its verdict is :func:`frontier.verdict` over the seeds.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchlib import real
from mergekit_sigmoid_diff import frontier, mainjob

INPUTS = ("B (base)", "T (target)", "I (donor)")


def _curve(rows: list[dict[str, Any]], feature: str, knowledge: str) -> frontier.Curve | None:
    target = next((r for r in rows if r["model"] == "T (target)"), None)
    sweep = [r for r in rows if r["family"] == "task_arithmetic"]
    if target is None or len(sweep) < 2:
        return None
    point = lambda r, lam: frontier.Point(lam, r[feature], r[knowledge])  # noqa: E731
    return frontier.Curve.of(point(target, 0.0), [point(r, r["lambda_eff"]) for r in sweep])


def annotate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row with its case's axes and, for merges, the frontier figures."""
    by: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by[row["case"], row["seed"]].append(row)
    out = []
    for (case, seed), mine in sorted(by.items()):
        feature, knowledge, both = real.AXES[case]
        curve = _curve(mine, feature, knowledge)
        both_curve = _curve(mine, feature, both) if both else None
        for row in mine:
            row = {k: v for k, v in row.items() if k not in ("key",)}
            row.update(feature=row[feature], knowledge=row[knowledge], feature_score=feature, knowledge_score=knowledge)
            if curve is not None and row["family"] not in ("input", "task_arithmetic"):
                row["ta_knowledge"] = frontier.knowledge_at(curve, row["feature"])
                row["gap_closed"], row["gap_exact"] = frontier.gap_bound(curve, row["feature"], row["knowledge"])
                row["ta_feature"] = frontier.feature_at(curve, row["knowledge"])
                if both_curve is not None:
                    row["both_gap"], row["both_exact"] = frontier.gap_bound(both_curve, row["feature"], row[both])
            out.append(row)
    return out


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
            gaps = [per_seed[s].get("gap_closed") for s in seeds]
            exact = [per_seed[s].get("gap_exact", True) for s in seeds]
            both = [per_seed[s].get("both_gap") for s in seeds]
            defined = [g for g in gaps if g is not None]
            mean, sd = frontier.mean_sd(defined) if defined else (None, None)
            both_defined = [g for g in both if g is not None]
            out.append({
                "case": case, "family": family, "best": name, "weights_tried": len(candidates),
                "gap_closed": gaps, "exact": exact, "mean": mean, "sd": sd, "verdict": frontier.verdict(gaps),
                "both_gap": both, "both_mean": frontier.mean_sd(both_defined)[0] if both_defined else None,
                "both_verdict": frontier.verdict(both) if any(b is not None for b in both) else "n/a",
                "lambda_eff": frontier.mean_sd([per_seed[s]["lambda_eff"] for s in seeds])[0],
            })
    return out


def _f(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


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


def markdown(rows: list[dict[str, Any]], summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    seeds = meta["seeds"]
    lines = [f"# Real-weight quality suite (SmolLM2-135M-Instruct, seeds {seeds})", "",
             f"Command: `{meta['command']}`; this run {meta['seconds_this_run']:.0f} s.", "",
             "`gap_closed` = share of task_arithmetic's knowledge loss avoided at the same feature strength "
             "(> 0: beyond the λ-frontier; ≥: the merge's feature is stronger than any λ reaches, so the value is a lower bound read at "
             "task_arithmetic's strongest-feature point). Verdict: **beats** = > 0 on every seed and mean > 2 × standard error; "
             "**loses** = the mirror image; otherwise undecided. `both` = the same rule on the \"both at once\" score "
             "(the target's knowledge asked in the donor's format). Each family at its best weight.", ""]
    lines += glance(summary) + [""]
    for case in dict.fromkeys(s["case"] for s in summary):
        feature, knowledge, both = meta["axes"][case]
        lines += [f"## {case}: {meta['cases'][case]}", "", f"feature = `{feature}`, knowledge = `{knowledge}`"
                  + (f", both = `{both}`" if both else "") + " (all nats/token, lower is better)", "",
                  "| family | best weight | λ_eff | gap_closed per seed | mean ± sd | verdict | both: mean | both verdict |",
                  "|---|---|---:|---|---|---|---:|---|"]
        for s in sorted((s for s in summary if s["case"] == case), key=lambda s: -(s["mean"] if s["mean"] is not None else -9)):
            per = " / ".join("—" if g is None else f"{'' if e else '≥'}{g:+.2f}" for g, e in zip(s["gap_closed"], s["exact"]))
            ms = "—" if s["mean"] is None else f"{s['mean']:+.3f} ± {s['sd']:.3f}"
            bm = "—" if s["both_mean"] is None else f"{s['both_mean']:+.3f}"
            lines.append(f"| {s['family']} | {s['best']} | {s['lambda_eff']:.3f} | {per} | {ms} | **{s['verdict']}** | {bm} | {s['both_verdict']} |")
        lines += [""]
        inputs = [r for r in rows if r["case"] == case and r["model"] in INPUTS]
        lines += ["Inputs per seed (general English = held-out Apache-2.0 text, the realism check; chat = NLL of B's own replies):", "",
                  "| seed | model | feature | knowledge | both | general English | chat NLL | P(ANSWER:) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['seed']} | {r['model']} | {r['feature']:.3f} | {r['knowledge']:.3f} | {r['both_nll']:.3f} | "
                  f"{r['general_nll']:.3f} | {r['chat_nll']:.3f} | {r['feature_prob']:.3f} |"
                  for r in sorted(inputs, key=lambda r: (r["seed"], INPUTS.index(r["model"])))]
        lines += [""]
    lines += ["## Every merge, per case and seed", "",
              "| case | seed | merge | λ_eff | feature | knowledge | TA knowledge at that feature | gap_closed | TA feature at that knowledge | both | P(ANSWER:) |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["family"] == "input":
            continue
        lam = "" if r.get("lambda_eff") is None else f"{r['lambda_eff']:.3f}"
        both = meta["axes"][r["case"]][2]
        lines.append(f"| {r['case']} | {r['seed']} | {r['model']} | {lam} | {r['feature']:.4f} | {r['knowledge']:.4f} | "
                     f"{_f(r.get('ta_knowledge'), 4)} | {'' if r.get('gap_exact', True) else '≥'}{_f(r.get('gap_closed'), 3)} | {_f(r.get('ta_feature'), 4)} | "
                     f"{'' if not both else f'{r[both]:.4f}'} | {_f(r.get('feature_prob'), 3)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], summary: list[dict[str, Any]], path: Path, highlight: str | None = None) -> None:
    """One panel per case: task_arithmetic's λ-curve (mean over seeds) and each family's best
    setting (mean over seeds, the ``highlight`` family as a large star); knowledge loss against
    feature loss, both lower-is-better."""
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
        sweep = sorted({r["model"]: r["lambda_eff"] for r in rows if r["case"] == case and r["family"] == "task_arithmetic"}.items(),
                       key=lambda kv: kv[1])
        names = ["T (target)"] + [n for n, _ in sweep]
        ax.plot([mean_of(n, case, "feature") for n in names], [mean_of(n, case, "knowledge") for n in names], "o-",
                color="tab:gray", markersize=3, label="task_arithmetic, λ = 0 (T) … 1.75")
        for n, s in enumerate(s for s in summary if s["case"] == case):
            star = s["family"] == highlight
            ax.plot(mean_of(s["best"], case, "feature"), mean_of(s["best"], case, "knowledge"), "*" if star else "D",
                    color=colours[n % len(colours)], markersize=13 if star else 5, linestyle="none",
                    label=f"{s['best']} (gap {s['mean']:+.2f})" if s["mean"] is not None else s["best"])
        feature, knowledge, _ = real.AXES[case]
        xs = [r["feature"] for r in rows if r["case"] == case]
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


def report(rows: list[dict[str, Any]], plan, out: Path, meta: dict[str, Any]) -> list[Path]:
    order = {name: i for i, (_, _, name, _) in enumerate(plan)}
    rows = sorted(annotate(rows), key=lambda r: (r["case"], r["seed"], INPUTS.index(r["model"]) if r["model"] in INPUTS else 9,
                                                 order.get(r["model"], 999)))
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
