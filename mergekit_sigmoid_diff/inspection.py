"""``inspect``: what a sigmoid_diff recipe would do to each tensor, without merging.

mergekit plans the recipe as for a merge (so every parameter is resolved by mergekit
itself: gradients over layers with t = layer/(layers − 1) per slice, filters, precedence),
then its executor streams the inputs one tensor at a time through lazy safetensors reads;
no whole model is ever held in memory and nothing is written but the report.

Per output tensor, with base B, target T, donors I_j with weights w_j, and the parameters
mergekit resolved for that tensor:

    D                    = Σ_j w_j (I_j − B)      the donor diff the gate scales
    mode                 = plain | elementwise | subspace   (:meth:`kernel.GateSettings.mode`)
    f                    = 1 − ratio              :func:`kernel.applied_fraction_` of |T − B|
                                                  (f = 1 everywhere when ``gate: false``)
    applied_fraction     = mean(f)                share of each element's diff that goes in
                                                  (subspace: = weighted_fraction)
    weighted_fraction    = Σ f·D² / Σ D²          the same, weighted by the diff's energy; for
                                                  one donor, w · this is the tensor's λ_eff
                                                  = ⟨out − T, I − B⟩ / ⟨I − B, I − B⟩
                           (subspace: ‖D'‖² / ‖D‖², D' the projected diff: an orthogonal
                           projection P has ⟨PD, D⟩ = ‖PD‖²)
    removed_share        = 1 − ‖D'‖² / ‖D‖²       subspace only: the share of the diff's energy
                                                  the projection removes; protected_rank = r
    kept_share           = ‖Δ‖² / ‖D‖²            ``protect_subspace: data`` only: the share of the
                                                  donor's diff the tensor keeps, Δ the solve's change
                                                  (:mod:`.datasolve`; 1 for tensors taking the plain
                                                  diff); applied and weighted fraction = kept_share
    survival             = ‖Δ X_I‖ / ‖D X_I‖      data only: the donor's effect on its own inputs
                                                  that survives (the merge's guard, per tensor)
    data_form            = solve | tokens | plain  data only: the closed form, the embedding's
                                                  token-count form, or the plain diff (no statistics)
    target_drift_mean/max = mean / max of |T − B| (weight units)
    donor_diff_mean/max  = mean / max of |D|      (weight units)
    donor_energy         = Σ D²                   (weight units²)

Aggregates (per layer × tensor kind, and per kind over the whole model) are element-
weighted means (Σ numel·value / Σ numel), maxima of maxima, and for weighted_fraction,
removed_share and kept_share the energy-weighted mean (Σ donor_energy·value / Σ donor_energy).
The kinds are q, k, v, o, gate, up, down, input_norm, post_norm per layer and embed, final_norm, lm_head for the
whole model; other tensors take their module's name. Quantities here are unitless except
the |T − B| and |D| scales.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from mergekit_sigmoid_diff import datamerge, datasolve, kernel
from mergekit_sigmoid_diff.datamerge import layer_index
from mergekit_sigmoid_diff.errors import SigmoidDiffError, reported
from mergekit_sigmoid_diff.kernel import GateSettings

METHOD = "sigmoid_diff"

# module name in the checkpoint -> short kind label (Llama/Mistral/Qwen naming)
KIND_LABELS = {
    "embed_tokens": "embed",
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "input_layernorm": "input_norm",
    "post_attention_layernorm": "post_norm",
    "lm_head": "lm_head",
}
KIND_ORDER = ("q", "k", "v", "o", "gate", "up", "down", "input_norm", "post_norm", "embed", "final_norm", "lm_head")
MODEL_ROW = "model"  # heatmap/table row of the tensors outside the layers


def tensor_kind(name: str) -> str:
    """Short label of a tensor's role: ``model.layers.0.self_attn.q_proj.weight`` → ``q``."""
    parts = name.split(".")
    module = parts[-2] if len(parts) > 1 and parts[-1] in ("weight", "bias") else parts[-1]
    if module == "norm" and layer_index(name) is None:
        label = "final_norm"
    else:
        label = KIND_LABELS.get(module, module)
    return f"{label}.bias" if parts[-1] == "bias" else label


@dataclass
class TensorReport:
    """One output tensor; the fields are defined in the module docstring."""

    name: str
    layer: Optional[int]
    kind: str
    numel: int
    mode: str
    parameters: dict[str, Any]
    weights: dict[str, float]
    applied_fraction: float
    weighted_fraction: Optional[float]  # None when D = 0
    target_drift_mean: float
    target_drift_max: float
    donor_diff_mean: float
    donor_diff_max: float
    donor_energy: float
    removed_share: Optional[float] = None  # subspace mode only
    protected_rank: Optional[int] = None
    # D = 0 exactly: the donors did not change this tensor, so the gate has nothing to damp
    # and applied_fraction says nothing about the transfer; left out of every average
    donor_unchanged: bool = False
    kept_share: Optional[float] = None  # protect_subspace: data only
    survival: Optional[float] = None
    data_form: Optional[str] = None


def tensor_report(
    name: str,
    base: torch.Tensor,
    target: torch.Tensor,
    donors: Sequence[torch.Tensor],
    weights: Sequence[float],
    settings: GateSettings,
    *,
    vocabulary: bool = False,
    parameters: Optional[dict[str, Any]] = None,
    donor_names: Sequence[str] = (),
) -> TensorReport:
    """Statistics of one tensor under ``settings``, as a merge would treat it.

    Arithmetic in the kernel's compute dtype (float32, float64 if any input is), as in a merge.
    Memory beyond the inputs: two full-size buffers (D, and |T − B| turned into f in place)
    plus one transient diff per donor (the subspace mode: D, T − B and the basis).
    """
    dtype = kernel.compute_dtype(base, target, *donors)
    mode = settings.mode(target.dim(), vocabulary)
    diff = kernel.donor_diff(base, donors, weights, dtype)
    total_energy = torch.linalg.vector_norm(diff).item() ** 2
    magnitude = diff.abs()
    diff_mean, diff_max = magnitude.mean().item(), magnitude.max().item()
    del magnitude
    drift = torch.sub(target.to(dtype), base.to(dtype)).abs_()
    drift_mean, drift_max = drift.mean().item(), drift.max().item()
    removed = rank = kept_share = survival = data_form = None
    if mode == "data":
        del drift
        kept_share, survival, data_form = _data_report(name, diff, tuple(target.shape), parameters or {})
        kept = kept_share if total_energy > 0 else None
        applied = 1.0 if kept is None else kept
    elif mode == "subspace":
        del drift
        _, basis, removed = kernel.protected_diff(base, target, donors, weights, settings, diff=diff)
        rank = basis.rank
        kept = 1.0 - removed if total_energy > 0 else None
        applied = 1.0 if kept is None else kept
        if kept is None:
            removed = None
    else:
        fraction = kernel.applied_fraction_(drift, settings) if mode == "elementwise" else drift.fill_(1.0)
        applied = fraction.mean().item()
        kept_energy = fraction.mul_(diff).mul_(diff).sum().item()  # f·D², in place
        kept = kept_energy / total_energy if total_energy > 0 else None
    return TensorReport(
        name=name,
        layer=layer_index(name),
        kind=tensor_kind(name),
        numel=diff.numel(),
        mode=mode,
        parameters={k: v for k, v in (parameters or {}).items() if k not in ("role", "weight")},
        weights=dict(zip(donor_names or [str(j) for j in range(len(donors))], weights)),
        applied_fraction=applied,
        weighted_fraction=kept,
        target_drift_mean=drift_mean,
        target_drift_max=drift_max,
        donor_diff_mean=diff_mean,
        donor_diff_max=diff_max,
        donor_energy=total_energy,
        removed_share=removed,
        protected_rank=rank,
        donor_unchanged=diff_max == 0.0,
        kept_share=kept_share,
        survival=survival,
        data_form=data_form,
    )


def _data_report(name: str, diff: torch.Tensor, shape: tuple, parameters: dict[str, Any]) -> tuple:
    """(kept_share, survival, data_form) of one tensor under ``protect_subspace: data``, the
    solve read from the recipe's statistics files as the merge reads it."""
    files = [datamerge.open_statistics(parameters.get(p) or "", p) for p in (datamerge.TARGET_STATISTICS, datamerge.DONOR_STATISTICS)]
    solve = datamerge.prepared_for(name, shape, *files, datasolve.DataSettings.from_parameters(parameters))
    if solve is None:
        return 1.0, None, "plain"
    delta = solve.delta(diff)
    total = float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2
    share = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2 / total if total > 0 else None
    form = "tokens" if solve.keep is not None else "solve"
    return share, datasolve.survival(diff, delta, solve.donor_gram), form


def load_recipe(path: Path):
    """Read and validate a mergekit recipe; every failure is one :class:`SigmoidDiffError` line."""
    import yaml
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SigmoidDiffError(f"recipe {path} not found") from None
    except yaml.YAMLError as error:
        raise SigmoidDiffError(f"recipe {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    try:
        config = MergeConfiguration.model_validate(data)
    except (ValidationError, RuntimeError, ValueError) as error:
        reason = error.errors()[0]["msg"] if isinstance(error, ValidationError) else str(error)
        raise SigmoidDiffError(f"recipe {path} is not a mergekit recipe: {reason}") from None
    if config.merge_method != METHOD:
        raise SigmoidDiffError(
            f"inspect reads {METHOD} recipes; {path} has merge_method: {config.merge_method}"
        )
    return config


def _report(merge: Any, tensors: dict) -> Optional[TensorReport]:
    """One planned merge step (mergekit's ``ExecuteMergeMethodTask``) as a :class:`TensorReport`,
    from the tensors mergekit gathers for it (:func:`.plan.each_step`, as ``sweep`` reads a step);
    None for an optional tensor absent from some model, or an integer buffer."""
    from mergekit_sigmoid_diff.plan import step_roles

    name = merge.output_weight.name
    base, target, donors = step_roles(merge)
    needed = [base, target, *(m for m, _ in donors)]
    if any(m not in tensors for m in needed) or not tensors[base].is_floating_point():
        return None
    # mergekit's own merge step, as the merge runs it (dtype, method, non-finite
    # inputs and overflow checks): inspect fails exactly where the merge would
    merge.execute(tensors=tensors)
    parameters = dict(merge.parameters.items())
    return tensor_report(
        name,
        tensors[base],
        tensors[target],
        [tensors[m] for m, _ in donors],
        [w for _, w in donors],
        GateSettings.from_parameters(parameters),
        vocabulary=merge.output_weight.vocabulary_axis is not None,
        parameters=parameters,
        donor_names=[str(m) for m, _ in donors],
    )


def inspect_recipe(recipe: Path, options: Any = None, *, quiet: bool = False) -> tuple[list[TensorReport], list[str]]:
    """Plan ``recipe`` with mergekit and report every output tensor, streaming the inputs.

    ``options`` are mergekit's ``MergeOptions`` (default: mergekit's defaults, ``quiet`` as
    given); the ones that change what is valid (``--allow-crimes``,
    ``--unsafe-truncate-embeddings``, ``--lora-merge-cache``, ...) act as in the merge.
    Before any tensor is read the recipe goes through :func:`.plugin.checked`, the merge's
    own checks. Returns the reports in mergekit's output order and the names of the
    tensors skipped (optional tensors missing from a model; integer buffers).
    """
    from mergekit.options import MergeOptions

    from mergekit_sigmoid_diff import plugin, preflight
    from mergekit_sigmoid_diff.plan import each_step

    plugin.activate()
    config = load_recipe(recipe)
    options = options if options is not None else MergeOptions(quiet=quiet)
    with plugin.checked(config, options) as ok:
        planned = preflight.planned_merges(config, ok.options)
        results = each_step(planned, _report, quiet=ok.options.quiet, desc="Inspecting tensors")
    ordered = [(step.output_weight.name, results[step.output_weight.name]) for step in planned]
    return [r for _, r in ordered if r is not None], [name for name, r in ordered if r is None]


@dataclass
class _Cell:
    numel: int = 0
    changed_numel: int = 0  # the elements of the tensors with D ≠ 0
    fraction_sum: float = 0.0  # Σ numel · applied_fraction over the tensors with D ≠ 0
    drift_sum: float = 0.0
    diff_sum: float = 0.0
    drift_max: float = 0.0
    diff_max: float = 0.0
    energy: float = 0.0
    kept_energy: float = 0.0  # Σ donor_energy · weighted_fraction
    projected_energy: float = 0.0  # Σ donor_energy over the projected tensors
    removed_energy: float = 0.0  # Σ donor_energy · removed_share
    data_energy: float = 0.0  # Σ donor_energy over the tensors with a kept_share (protect_subspace: data)
    data_kept_energy: float = 0.0  # Σ donor_energy · kept_share
    tensors: int = 0
    unchanged: int = 0  # tensors with D = 0

    def add(self, r: TensorReport) -> None:
        self.numel += r.numel
        self.tensors += 1
        if r.donor_unchanged:
            self.unchanged += 1
        else:
            self.changed_numel += r.numel
            self.fraction_sum += r.numel * r.applied_fraction
        self.drift_sum += r.numel * r.target_drift_mean
        self.diff_sum += r.numel * r.donor_diff_mean
        self.drift_max = max(self.drift_max, r.target_drift_max)
        self.diff_max = max(self.diff_max, r.donor_diff_max)
        if r.weighted_fraction is not None:
            self.energy += r.donor_energy
            self.kept_energy += r.donor_energy * r.weighted_fraction
        if r.removed_share is not None:
            self.projected_energy += r.donor_energy
            self.removed_energy += r.donor_energy * r.removed_share
        if r.kept_share is not None:
            self.data_energy += r.donor_energy
            self.data_kept_energy += r.donor_energy * r.kept_share

    @property
    def removed_share(self) -> Optional[float]:
        return self.removed_energy / self.projected_energy if self.projected_energy > 0 else None

    @property
    def kept_share(self) -> Optional[float]:
        return self.data_kept_energy / self.data_energy if self.data_energy > 0 else None

    @property
    def applied_fraction(self) -> Optional[float]:
        """Element-weighted mean over the tensors the donors changed (None: all have D = 0)."""
        return self.fraction_sum / self.changed_numel if self.changed_numel else None


def summarize(reports: Sequence[TensorReport]) -> dict[str, Any]:
    """The layer × kind grid and the per-kind table (element-weighted means)."""
    present = {r.kind for r in reports}
    kinds = [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))
    layers = sorted({r.layer for r in reports if r.layer is not None})
    rows = [str(i) for i in layers] + ([MODEL_ROW] if any(r.layer is None for r in reports) else [])
    cells: dict[tuple[str, str], _Cell] = {}
    by_kind: dict[str, _Cell] = {}
    for r in reports:
        row = MODEL_ROW if r.layer is None else str(r.layer)
        cells.setdefault((row, r.kind), _Cell()).add(r)
        by_kind.setdefault(r.kind, _Cell()).add(r)
    grid = [[cells[(row, k)].applied_fraction if (row, k) in cells else None for k in kinds] for row in rows]
    # True where the cell's tensors exist and the donors changed none of them (D = 0)
    unchanged_grid = [
        [(row, k) in cells and cells[(row, k)].changed_numel == 0 for k in kinds] for row in rows
    ]
    removed_grid = [[cells[(row, k)].removed_share if (row, k) in cells else None for k in kinds] for row in rows]
    kept_grid = [[cells[(row, k)].kept_share if (row, k) in cells else None for k in kinds] for row in rows]
    table = {
        k: {
            "tensors": c.tensors,
            "donor_unchanged": c.unchanged,
            "numel": c.numel,
            "applied_fraction": c.applied_fraction,
            "weighted_fraction": c.kept_energy / c.energy if c.energy > 0 else None,
            "target_drift_mean": c.drift_sum / c.numel,
            "target_drift_max": c.drift_max,
            "donor_diff_mean": c.diff_sum / c.numel,
            "donor_diff_max": c.diff_max,
            "removed_share": c.removed_share,
            "kept_share": c.kept_share,
        }
        for k, c in ((k, by_kind[k]) for k in kinds)
    }
    total = _Cell()
    for r in reports:
        total.add(r)
    return {
        "rows": rows,
        "kinds": kinds,
        "applied_fraction_grid": grid,
        "donor_unchanged_grid": unchanged_grid,
        # None everywhere unless the recipe sets protect_subspace
        "removed_share_grid": removed_grid if any(v is not None for row in removed_grid for v in row) else None,
        # None everywhere unless the recipe sets protect_subspace: data
        "kept_share_grid": kept_grid if any(v is not None for row in kept_grid for v in row) else None,
        "by_kind": table,
        "applied_fraction_overall": total.applied_fraction,
        "donor_unchanged_tensors": total.unchanged,
    }


UNCHANGED = "D=0"  # table mark of a cell whose tensors the donors did not change


def _grid_lines(title: str, rows: Sequence[str], kinds: Sequence[str], grid, unchanged=None) -> list[str]:
    width = max(6, *(len(k) for k in kinds)) + 1
    lines = [title, "layer".ljust(7) + "".join(k.rjust(width) for k in kinds)]
    for i, (row, values) in enumerate(zip(rows, grid)):
        marks = [
            UNCHANGED if unchanged is not None and unchanged[i][j] else "-" if v is None else f"{v:.3f}"
            for j, v in enumerate(values)
        ]
        lines.append(row.ljust(7) + "".join(m.rjust(width) for m in marks))
    return lines


def format_tables(summary: dict[str, Any]) -> str:
    """The grids (rows: layers, then ``model``) and the per-kind table as plain text."""
    kinds, rows = summary["kinds"], summary["rows"]
    lines = _grid_lines(
        "applied fraction 1 − ratio (mean over elements; projected tensors: ‖D'‖² / ‖D‖²; "
        f"{UNCHANGED}: the donors did not change these tensors, left out of every average)",
        rows,
        kinds,
        summary["applied_fraction_grid"],
        summary["donor_unchanged_grid"],
    )
    if summary.get("removed_share_grid") is not None:
        lines += [""] + _grid_lines(
            "share of ‖D‖² the subspace projection removes (protect_subspace; '-': not projected)",
            rows,
            kinds,
            summary["removed_share_grid"],
        )
    if summary.get("kept_share_grid") is not None:
        lines += [""] + _grid_lines(
            "share of the donor's diff kept, ‖Δ‖² / ‖D‖² (protect_subspace: data; 1: the plain diff, "
            "no statistics; '-': not under data)",
            rows,
            kinds,
            summary["kept_share_grid"],
        )
    lines += [
        "",
        "per tensor kind: applied = mean(1 − ratio); weighted = Σ(1 − ratio)·D² / Σ D² "
        "(= λ_eff / w for one donor)",
        "|T−B| = drift of the target, |D| = |Σ w (I−B)| = the donor diff",
    ]
    header = ("kind", "tensors", UNCHANGED, "applied", "weighted", "removed", "mean|T-B|", "max|T-B|", "mean|D|", "max|D|")
    lines.append(header[0].ljust(14) + "".join(h.rjust(11) for h in header[1:]))
    for kind, s in summary["by_kind"].items():
        values = (
            f"{s['tensors']}",
            f"{s['donor_unchanged']}",
            "-" if s["applied_fraction"] is None else f"{s['applied_fraction']:.4f}",
            "-" if s["weighted_fraction"] is None else f"{s['weighted_fraction']:.4f}",
            "-" if s["removed_share"] is None else f"{s['removed_share']:.4f}",
            *(f"{s[key]:.3e}" for key in ("target_drift_mean", "target_drift_max", "donor_diff_mean", "donor_diff_max")),
        )
        lines.append(kind.ljust(14) + "".join(v.rjust(11) for v in values))
    overall = summary["applied_fraction_overall"]
    lines.append(
        "\noverall applied fraction: "
        + ("- (the donors changed no tensor)" if overall is None else f"{overall:.4f}")
        + f" over the tensors the donors changed; {summary['donor_unchanged_tensors']} tensor(s) with D = 0 left out"
    )
    return "\n".join(lines)


def colour_range(values: Sequence[Optional[float]]) -> tuple[float, float]:
    """The heatmap's colour scale: the smallest and largest value present (so that the
    differences that exist are visible, however small), widened to at least 0.01 and kept
    inside [0, 1]; (0, 1) when there is no value."""
    present = [v for v in values if v is not None]
    if not present:
        return 0.0, 1.0
    lo, hi = min(present), max(present)
    if hi - lo < 0.01:
        middle = min(max((lo + hi) / 2, 0.005), 0.995)
        lo, hi = middle - 0.005, middle + 0.005
    return lo, hi


def write_heatmap(summary: dict[str, Any], path: Path, title: str = "") -> Path:
    """Layers × tensor kind image of the applied fraction (grey: no such tensor; white,
    marked D=0: the donors did not change those tensors). The colour scale spans the values
    present (:func:`colour_range`), not [0, 1].

    Uses matplotlib's object API with the Agg canvas: no display, no global backend change.
    """
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, kinds = summary["rows"], summary["kinds"]
    values = np.array(
        [[np.nan if v is None else v for v in row] for row in summary["applied_fraction_grid"]], dtype=float
    )
    unchanged = np.array(summary["donor_unchanged_grid"], dtype=bool)
    vmin, vmax = colour_range([v for row in summary["applied_fraction_grid"] for v in row])
    fig = Figure(figsize=(2.2 + 0.62 * len(kinds), 1.9 + 0.26 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    if unchanged.any():  # white cells over the grey of "no tensor"
        ax.imshow(np.ma.masked_where(~unchanged, np.ones(unchanged.shape)), cmap=matplotlib.colors.ListedColormap(["white"]), aspect="auto")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=7 if len(rows) > 24 else 8)
    ax.set_ylabel("layer")
    middle = (vmin + vmax) / 2
    if len(rows) * len(kinds) <= 400:  # label the cells while they are big enough to read
        for i, j in zip(*np.nonzero(~np.isnan(values))):
            v = values[i, j]
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=6, color="white" if v < middle else "black")
        for i, j in zip(*np.nonzero(unchanged)):
            ax.text(j, i, UNCHANGED, ha="center", va="center", fontsize=6, color="black")
    fig.colorbar(image, ax=ax, label=f"applied fraction 1 − ratio (scale {vmin:.3f}–{vmax:.3f}; {UNCHANGED}: donor unchanged)")
    ax.set_title(title or "sigmoid_diff: mean applied fraction per tensor", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def write_json(
    recipe: Path, reports: Sequence[TensorReport], skipped: Sequence[str], summary: dict[str, Any], path: Path
) -> Path:
    """Everything: definitions, summary, one record per tensor (NaN-free JSON)."""
    doc = {
        "recipe": str(recipe),
        "merge_method": METHOD,
        "definitions": {
            "applied_fraction": "mean over the tensor of 1 - ratio (kernel.applied_fraction_ of |T-B|)",
            "weighted_fraction": "sum(f*D^2)/sum(D^2), D = sum_j w_j (I_j - B); w*this = lambda_eff for one donor",
            "removed_share": "protect_subspace only: 1 - |D'|^2/|D|^2, the share of the diff's energy projected out",
            "kept_share": "protect_subspace: data only: |Delta|^2/|D|^2, the share of the donor's diff the tensor keeps "
            "(1 where no statistics apply: the plain diff)",
            "survival": "protect_subspace: data only: |Delta X_I|/|D X_I| = sqrt(tr(Delta G_I Delta^T)/tr(D G_I D^T)), "
            "the donor's effect on its own inputs that survives",
            "data_form": "protect_subspace: data only: solve (closed form), tokens (embedding counts) or plain",
            "target_drift_mean/max": "mean/max of |T-B|",
            "donor_diff_mean/max": "mean/max of |D|",
            "donor_unchanged": "D = 0 exactly: the donors did not change the tensor; left out of every "
            "applied/weighted average (donor_unchanged_grid marks cells holding only such tensors)",
            "aggregates": "element-weighted means over the tensors with D != 0; maxima of maxima",
        },
        **summary,
        "tensors": [asdict(r) for r in reports],
        "skipped": list(skipped),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, allow_nan=False))
    return path


def run(recipe: Path, out: Path, options: Any = None, *, quiet: bool = False) -> dict[str, Any]:
    """Inspect, print the tables, write ``inspect.json`` (and ``inspect-heatmap.png`` when
    matplotlib is installed) to ``out``."""
    reports, skipped = inspect_recipe(recipe, options, quiet=quiet)
    if not reports:
        raise SigmoidDiffError(f"inspect: recipe {recipe} planned no floating-point tensor to inspect")
    summary = summarize(reports)
    print(format_tables(summary))
    written = [write_json(recipe, reports, skipped, summary, Path(out) / "inspect.json")]
    if importlib.util.find_spec("matplotlib") is None:  # the optional plot extra
        print("\nno heatmap: matplotlib is not installed (pip install 'mergekit-sigmoid-diff[plot]')")
    else:
        written.append(write_heatmap(summary, Path(out) / "inspect-heatmap.png", title=f"{Path(recipe).name}: applied fraction"))
    print(f"\nwrote {' and '.join(str(p) for p in written)}")
    return summary


def _command():
    """The ``inspect`` command: a recipe, ``--out``, and every ``mergekit-yaml`` option
    (mergekit's own ``add_merge_options``), so a recipe is judged with the options it is
    merged with. Built on first use: importing this module must not import mergekit."""
    import click
    from mergekit.options import PrettyPrintHelp, add_merge_options

    @click.command("inspect", cls=PrettyPrintHelp, help=INSPECT_HELP)
    @click.argument("recipe", type=click.Path(path_type=Path))
    @click.option("--out", type=click.Path(path_type=Path), default=None, help="output folder (default: ./<recipe name>-inspect)")
    @add_merge_options
    def command(merge_options, recipe: Path, out: Optional[Path]) -> None:
        merge_options.apply_global_options()
        with reported():
            run(recipe, out or Path.cwd() / f"{recipe.stem}-inspect", merge_options)

    return command


INSPECT_HELP = (
    "Report, per layer and tensor kind, how much of the donor diff a sigmoid_diff recipe "
    "applies, without merging (streams the models tensor by tensor). Takes the options of "
    "mergekit-yaml; those that change what is valid (--allow-crimes, --unsafe-truncate-embeddings, "
    "--lora-merge-cache, ...) act as in the merge."
)


def main(argv: Sequence[str]) -> None:
    try:
        _command().main(args=list(argv), prog_name="python -m mergekit_sigmoid_diff inspect")
    except SystemExit as done:  # click exits even on success; return then, as before
        if done.code not in (0, None):
            raise


__all__ = ["TensorReport", "inspect_recipe", "main", "run", "summarize", "tensor_kind", "tensor_report"]
