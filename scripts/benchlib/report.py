"""Summarise scored rows: the frontier rule per method, mean ± spread, paired Δs, table and plot.

The verdict is the project's one test of "better" (:mod:`mergekit_sigmoid_diff.frontier`): per
donor and seed, every task_arithmetic row (the λ grid and the λ_eff twins) traces the curve of
knowledge against feature, with both as losses here (1 − accuracy), T as λ = 0; each other merge
gets ``gap_closed``, the share of task_arithmetic's knowledge loss it avoids at its own feature
strength (a lower bound where its feature is stronger than any λ reaches). Spread is the sample standard deviation over seeds (0 with one seed). The paired
comparisons (Δ = V − C per seed on feature, knowledge and the combined score) stay as detail.

This benchmark (64-wide Llamas) is the fast regression check and a weak proxy: its chat feature
barely transfers, and a 64-dimensional space distorts any subspace method. Real weights decide
(``scripts/benchmark_real.py``).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchlib import scoring
from mergekit_sigmoid_diff import frontier

MATCHED_PREFIX = "task_arithmetic @ λ_eff of "
SWEEP_PREFIX = "task_arithmetic λ="
LINES_PREFIX = "LiNeS "  # task_arithmetic with a layer gradient on the donor weight
# the other baselines every sigmoid-family merge is compared with, by label prefix
BASELINE_PREFIXES = ("ties", "dare_linear", "della", "breadcrumbs")
LOWER_IS_BETTER = scoring.LOWER_IS_BETTER


def _stat(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per donor: stats per label, the best task_arithmetic λ, and paired comparisons."""
    by: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by[row["donor"]][row["label"]].append(row)
    out: dict[str, Any] = {}
    for donor, labels in by.items():
        feature, combined = scoring.FEATURE[donor], scoring.COMBINED[donor]
        stats = {}
        for label, group in labels.items():
            metrics = {m: _stat([g["scores"][m] for g in group]) for m in group[0]["scores"]}
            if "lambda_eff" in group[0]:
                metrics["lambda_eff"] = _stat([g["lambda_eff"] for g in group])
            stats[label] = {"kind": group[0]["kind"], "method": group[0].get("method", label), "metrics": metrics}
        sign = -1.0 if combined in LOWER_IS_BETTER else 1.0

        def best_of(prefix: str):
            group = [label for label in stats if label.startswith(prefix)]
            return max(group, key=lambda label: sign * stats[label]["metrics"][combined]["mean"]) if group else None

        best = best_of(SWEEP_PREFIX)
        baselines = [best_of(LINES_PREFIX)] + [next((l for l in stats if l.startswith(p)), None) for p in BASELINE_PREFIXES]
        comparisons = []
        for label, entry in stats.items():
            if entry["kind"] != "merge" or not (MATCHED_PREFIX + label) in labels:
                continue
            for against in (MATCHED_PREFIX + label, best, *baselines):
                if against is None:
                    continue
                comparisons.append(_paired(labels[label], labels[against], label, against, feature, combined))
        out[donor] = {
            "feature": feature,
            "knowledge": scoring.KNOWLEDGE,
            "combined": combined,
            "best_task_arithmetic": best,
            "best_lines": best_of(LINES_PREFIX),
            "stats": stats,
            "comparisons": comparisons,
        }
    return out


def _paired(rows_v, rows_c, label_v, label_c, feature, combined) -> dict[str, Any]:
    sign = -1.0 if combined in LOWER_IS_BETTER else 1.0
    by_seed = {r["seed"]: r["scores"] for r in rows_c}
    deltas = {feature: [], scoring.KNOWLEDGE: [], combined: []}
    for row in rows_v:
        if row["seed"] not in by_seed:
            continue
        c = by_seed[row["seed"]]
        d = {m: row["scores"][m] - c[m] for m in deltas}
        for m in deltas:
            deltas[m].append(d[m])
    return {
        "method": label_v,
        "against": label_c,
        "seeds": len(deltas[combined]),
        "delta": {m: _stat(v) for m, v in deltas.items() if v},
        "combined_wins": sum(sign * x > 0 for x in deltas[combined]),
        "combined_losses": sum(sign * x < 0 for x in deltas[combined]),
    }


def _fmt(metric: dict[str, float], digits: int = 3) -> str:
    return f"{metric['mean']:.{digits}f} ± {metric['std']:.{digits}f}"


def _comparator(against: str) -> str:
    """The kind of comparator a comparison is against (its label without the donor's λ)."""
    if against.startswith(MATCHED_PREFIX):
        return "same λ_eff"
    if against.startswith(SWEEP_PREFIX):
        return "best λ"
    if against.startswith(LINES_PREFIX):
        return "best LiNeS"
    return against.split(" ")[0]


def _loss(scores: dict[str, float], metric: str) -> float:
    return scores[metric] if metric in LOWER_IS_BETTER else 1.0 - scores[metric]


def _lam(row: dict[str, Any]) -> float | None:
    if row.get("method", row["label"].split(" ")[0]) != "task_arithmetic" and not row["label"].startswith(SWEEP_PREFIX):
        return None
    if row.get("lambda_eff") is not None:
        return row["lambda_eff"]
    return float(row["label"].removeprefix(SWEEP_PREFIX))


def frontier_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[float | None]]]:
    """donor → merge label → gap_closed per seed (seed order), by the frontier rule."""
    by: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by[row["donor"], row["seed"]].append(row)
    out: dict[str, dict[str, dict[int, float | None]]] = defaultdict(lambda: defaultdict(dict))
    for (donor, seed), mine in sorted(by.items()):
        feature = scoring.FEATURE[donor]
        point = lambda r, lam: frontier.Point(lam, _loss(r["scores"], feature), _loss(r["scores"], scoring.KNOWLEDGE))  # noqa: E731
        target = next(r for r in mine if r["label"] == "target")
        sweep = [point(r, _lam(r)) for r in mine if r["kind"] != "reference" and _lam(r)]
        if len(sweep) < 2:
            continue
        curve = frontier.Curve.of(point(target, 0.0), sweep)
        for r in mine:
            if r["kind"] == "merge" and _lam(r) is None:
                p = point(r, 0.0)
                out[donor][r["label"]][seed] = frontier.gap_bound(curve, p.feature, p.knowledge)[0]
    seeds = sorted({s for _, s in by})
    return {d: {label: [v.get(s) for s in seeds] for label, v in labels.items()} for d, labels in out.items()}


def frontier_markdown(rows: list[dict[str, Any]]) -> list[str]:
    table = frontier_rows(rows)
    if not table:
        return []
    donors = list(table)
    lines = ["## The frontier rule: gap_closed per donor (mean over seeds; verdict)", "",
             "Share of task_arithmetic's knowledge loss (1 − `raw_acc_new`) avoided at the merge's own feature strength "
             "(1 − feature accuracy); task_arithmetic's curve = its λ grid and λ_eff twins, T as λ = 0. "
             "**beats** = > 0 on every seed and mean > 2 × standard error; — = outside task_arithmetic's measured range "
             "on some seed (no extrapolation), or no loss to close.", "",
             "| method | " + " | ".join(donors) + " |", "|---|" + "---|" * len(donors)]
    labels = list(dict.fromkeys(label for d in donors for label in table[d]))
    for label in labels:
        cells = []
        for d in donors:
            gaps = table[d].get(label)
            defined = [g for g in gaps or [] if g is not None]
            if not gaps or len(defined) < len(gaps):
                cells.append("—" if not defined else f"{frontier.mean_sd(defined)[0]:+.2f} ({len(defined)}/{len(gaps)} seeds)")
                continue
            cells.append(f"{frontier.mean_sd(defined)[0]:+.2f} ({frontier.verdict(gaps)})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(summary: dict[str, Any], rows: list[dict[str, Any]], title: str = "Quality benchmark") -> str:
    lines = [f"# {title}", ""] + frontier_markdown(rows)
    for donor, s in summary.items():
        f, k, c = s["feature"], s["knowledge"], s["combined"]
        extra = ["chat_acc"] if donor == "chat" else []
        n = max(e["metrics"][k]["n"] for e in s["stats"].values())
        lines += [f"## Donor: {donor} ({n} seeds; mean ± sd over seeds)", ""]
        head = ["method", "λ_eff", f"feature: {f}", f"knowledge: {k}", f"both: {c}", *extra, "base_nll"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, e in s["stats"].items():
            m = e["metrics"]
            lam = _fmt(m["lambda_eff"], 2) if "lambda_eff" in m else "—"
            name = f"*{label}*" if e["kind"] == "reference" else label
            cells = [name, lam, _fmt(m[f]), _fmt(m[k]), _fmt(m[c]), *(_fmt(m[x]) for x in extra), _fmt(m["base_nll"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Best task_arithmetic λ by `{c}`: **{s['best_task_arithmetic']}**; best LiNeS: **{s.get('best_lines')}**", ""]
        if s["comparisons"]:
            lines += [
                "Paired by seed (Δ = method − comparator; detail only: the verdict is the frontier rule above):",
                "",
                f"| method | against | Δ {f} | Δ {k} | Δ {c} | {c} wins/losses |",
                "|---|---|---|---|---|---|",
            ]
            for cmp in s["comparisons"]:
                d = cmp["delta"]
                against = "same λ_eff" if cmp["against"].startswith(MATCHED_PREFIX) else cmp["against"]
                lines.append(
                    f"| {cmp['method']} | {against} | {_fmt(d[f])} | {_fmt(d[k])} | {_fmt(d[c])} | "
                    f"{cmp['combined_wins']}/{cmp['combined_losses']} of {cmp['seeds']} |"
                )
            lines.append("")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    """Donor feature (y) vs target knowledge (x), one point per method, error bars = sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    donors = list(summary)
    fig, axes = plt.subplots(1, len(donors), figsize=(5.2 * len(donors), 4.6), squeeze=False)
    styles = {
        "reference": dict(marker="*", color="black", ms=11),
        "sigmoid_diff": dict(marker="o", color="tab:red", ms=6),
        "varm": dict(marker="P", color="tab:orange", ms=7),
        "matched": dict(marker="x", color="tab:purple", ms=6),
        "task_arithmetic": dict(marker="s", color="tab:blue", ms=5),
        "other": dict(marker="D", color="tab:green", ms=5),
    }
    for ax, donor in zip(axes[0], donors):
        s = summary[donor]
        f, k = s["feature"], s["knowledge"]
        sweep_x, sweep_y = [], []
        seen = set()
        for label, e in s["stats"].items():
            m = e["metrics"]
            if e["kind"] == "reference":
                family = "reference"
            elif e["kind"] == "matched":
                family = "matched"
            elif e["method"] in ("sigmoid_diff", "varm"):
                family = e["method"]
            elif e["method"] == "task_arithmetic":
                family = "task_arithmetic"
                sweep_x.append(m[k]["mean"])
                sweep_y.append(m[f]["mean"])
            else:
                family = "other"
            ax.errorbar(
                m[k]["mean"], m[f]["mean"], xerr=m[k]["std"], yerr=m[f]["std"], ls="none", elinewidth=0.4,
                alpha=0.75, label=None if family in seen else family, **styles[family],
            )
            seen.add(family)
            if family in ("reference", "other", "task_arithmetic", "varm") or label == "sigmoid_diff (defaults)":
                short = label.replace("sigmoid_diff ", "sd ").replace("task_arithmetic ", "TA ").split(" d=")[0]
                ax.annotate(short, (m[k]["mean"], m[f]["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if sweep_x:
            ax.plot(sweep_x, sweep_y, color="tab:blue", lw=0.8, alpha=0.6)
        ax.set_xlabel(f"target knowledge: {k}")
        ax.set_ylabel(f"donor feature: {f}")
        ax.set_title(f"donor: {donor}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def rounded(value: Any, digits: int = 4) -> Any:
    """``value`` with every float rounded (keeps results.json small and diff-friendly)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def write(rows: list[dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """results.json (rows without recipes + summary), results.md, quality.png under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    slim = [{k: v for k, v in row.items() if k not in ("recipe", "key")} for row in rows]
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md", "png": out_dir / "quality.png"}
    gaps = frontier_rows(rows)
    paths["json"].write_text(json.dumps(rounded({"meta": meta, "summary": summary, "frontier_gap_closed": gaps, "rows": slim}), indent=1))
    paths["md"].write_text(markdown(summary, rows) + "\n" + "\n".join(f"- {n}" for n in meta.get("notes", [])) + "\n")
    plot(summary, paths["png"])
    return paths
