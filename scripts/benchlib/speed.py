"""Speed and memory of ``sigmoid_diff`` against ``task_arithmetic`` (issue 5).

- :func:`build_synthetic_triple` writes a Llama-shaped base/target/donor triple of random
  bf16 weights straight to safetensors (no model object is built), cached by shape.
- :func:`run_merge` runs the real ``mergekit-yaml`` in a subprocess and reads its wall
  time, CPU time and peak RSS (``ru_maxrss`` of that one child, via ``os.wait4``).
- :func:`compare_merges` alternates the methods over several pairs; the ratios
  ``variant / task_arithmetic`` are taken within each pair, then their median; with
  ``conditions=("quiet", "load")`` each pair also runs every method beside a
  :class:`BackgroundLoad` (another torch process doing matmuls on the same cores).
- :func:`kernel_timings` times one output tensor through ``mergekit``'s ``merge_tensors``
  for each method (what the merge does per tensor, without the file I/O).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import yaml
from mergekit_sigmoid_diff.commands import mergekit_command

MERGEKIT_YAML = mergekit_command("mergekit-yaml")
SHARD_BYTES = 1 << 29  # 512 MiB per safetensors shard while building
TASK_ARITHMETIC = "task_arithmetic"


@dataclass(frozen=True)
class LlamaShape:
    """The architecture of a synthetic model; the default has about 0.6B parameters."""

    layers: int = 20
    hidden: int = 1536
    intermediate: int = 4096
    vocab: int = 32000
    heads: int = 12
    kv_heads: int = 4

    @property
    def key(self) -> str:
        return f"llama-L{self.layers}-H{self.hidden}-I{self.intermediate}-V{self.vocab}-A{self.heads}-K{self.kv_heads}"

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face Llama tensor names and shapes, untied embeddings."""
        kv = self.hidden // self.heads * self.kv_heads
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, self.hidden)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes.update(
                {
                    p + "self_attn.q_proj.weight": (self.hidden, self.hidden),
                    p + "self_attn.k_proj.weight": (kv, self.hidden),
                    p + "self_attn.v_proj.weight": (kv, self.hidden),
                    p + "self_attn.o_proj.weight": (self.hidden, self.hidden),
                    p + "mlp.gate_proj.weight": (self.intermediate, self.hidden),
                    p + "mlp.up_proj.weight": (self.intermediate, self.hidden),
                    p + "mlp.down_proj.weight": (self.hidden, self.intermediate),
                    p + "input_layernorm.weight": (self.hidden,),
                    p + "post_attention_layernorm.weight": (self.hidden,),
                }
            )
        shapes["model.norm.weight"] = (self.hidden,)
        shapes["lm_head.weight"] = (self.vocab, self.hidden)
        return shapes

    def parameters(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.tensor_shapes().values())

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            dtype="bfloat16",
            architectures=["LlamaForCausalLM"],
        )


DRIFTS = ("heavy-tailed", "low-rank", "power-law")
POWER_LAW_NOISE = 0.1  # share of ‖T − B‖² in Gaussian noise for ``--drift power-law``


def _low_rank_drift(shape: tuple[int, int], generator: torch.Generator, noise: float = 0.0) -> torch.Tensor:
    """G₁ diag(s) G₂ᵀ with Gaussian factors and s_i² = 1 / (i + 1): half of the energy lies in
    about the top √min(m, n) directions, as in a fine-tune's update (a decaying spectrum),
    plus Gaussian noise holding ``noise`` of the squared norm (``power-law``: 10 %, so that
    about 46 of 2048 directions hold half the energy), scaled to an RMS of 0.001."""
    m, n = shape
    k = min(m, n)
    scale = torch.arange(1, k + 1, dtype=torch.float32).rsqrt_()
    left = torch.randn(m, k, generator=generator).mul_(scale)
    drift = left @ torch.randn(k, n, generator=generator)
    if noise > 0:
        drift.mul_((1 - noise) ** 0.5 / drift.square().mean().sqrt())
        drift.add_(torch.randn(m, n, generator=generator), alpha=noise**0.5)
    return drift.mul_(0.001 / drift.square().mean().sqrt())


def _synthetic_weights(name: str, shape: tuple[int, ...], seed: int, drift_kind: str = "heavy-tailed") -> tuple[torch.Tensor, ...]:
    """(B, T, I) in bf16: B ~ N(0, 0.02²) (norms 1 + that), I = B + N(0, 0.001²), and
    T = B + (0.002 / 3)·t₂ with t₂ Student-t with 2 d.o.f. (``heavy-tailed``: median
    |drift| ≈ 0.0005, a few elements far larger; full rank, the hardest case for a truncated
    SVD), or for 2-D weights a decaying spectrum (``low-rank``, :func:`_low_rank_drift`), or
    that spectrum plus 10 % noise energy (``power-law``)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator).mul_(0.02)
    if name.endswith("norm.weight"):
        base.add_(1.0)
    if drift_kind in ("low-rank", "power-law") and len(shape) == 2:
        drift = _low_rank_drift(shape, generator, POWER_LAW_NOISE if drift_kind == "power-law" else 0.0)
    else:
        drift = torch.randn(shape, generator=generator)
        drift.div_(torch.rand(shape, generator=generator).clamp_min_(1e-12).log_().neg_().sqrt_()).mul_(0.002 / 3)
    target = (base + drift).bfloat16()
    del drift
    donor = torch.randn(shape, generator=generator).mul_(0.001).add_(base).bfloat16()
    return base.bfloat16(), target, donor


def build_synthetic_triple(cache: Path, shape: LlamaShape, seed: int = 0, drift: str = "heavy-tailed") -> dict[str, Path]:
    """Base, target and donor folders under ``cache/<shape key>`` (built once, then reused).

    A folder counts as built only once its ``COMPLETE`` marker exists, so an interrupted
    build is redone rather than half-used.
    """
    from safetensors.torch import save_file

    from mergekit_sigmoid_diff.tiny import tiny_tokenizer

    suffix = "" if drift == "heavy-tailed" else f"-{drift}"  # the heavy-tailed triples keep their old cache name
    root = Path(cache).absolute() / f"{shape.key}-seed{seed}{suffix}"
    paths = {role: root / role for role in ("base", "target", "donor")}
    if (root / "COMPLETE").exists():
        return paths
    shutil.rmtree(root, ignore_errors=True)
    tokenizer = tiny_tokenizer()
    for path in paths.values():
        path.mkdir(parents=True)
        shape.config().save_pretrained(path)
        tokenizer.save_pretrained(path)

    shards: dict[str, dict[str, torch.Tensor]] = {role: {} for role in paths}
    weight_maps: dict[str, dict[str, str]] = {role: {} for role in paths}
    counter = {"shard": 0, "bytes": 0, "total": 0}

    def flush() -> None:
        counter["shard"] += 1
        file = f"model-{counter['shard']:05d}.safetensors"
        for role, tensors in shards.items():
            save_file(tensors, str(paths[role] / file), metadata={"format": "pt"})
            weight_maps[role].update({name: file for name in tensors})
            tensors.clear()
        counter["bytes"] = 0

    for index, (name, tensor_shape) in enumerate(shape.tensor_shapes().items()):
        for role, tensor in zip(paths, _synthetic_weights(name, tensor_shape, seed * 100_003 + index, drift)):
            shards[role][name] = tensor
        size = 2 * int(torch.Size(tensor_shape).numel())
        counter["bytes"] += size
        counter["total"] += size
        if counter["bytes"] >= SHARD_BYTES:
            flush()
    if counter["bytes"]:
        flush()
    for role, path in paths.items():
        index_json = {"metadata": {"total_size": counter["total"]}, "weight_map": weight_maps[role]}
        (path / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=1))
    (root / "COMPLETE").write_text(json.dumps(asdict(shape)))
    return paths


def recipe(method: str, triple: dict[str, Path], dtype: str = "bfloat16", **parameters: Any) -> dict[str, Any]:
    """out = T + (I − B) by ``task_arithmetic`` (weights 1, 1) or the gated ``sigmoid_diff``."""
    target, donor = str(triple["target"]), str(triple["donor"])
    if method == TASK_ARITHMETIC:
        models = [{"model": target, "parameters": {"weight": 1.0}}, {"model": donor, "parameters": {"weight": 1.0}}]
    else:
        models = [{"model": target, "parameters": {"role": "target"}}, {"model": donor, "parameters": {"weight": 1.0}}]
    out: dict[str, Any] = {"merge_method": method, "base_model": str(triple["base"]), "models": models}
    if parameters:
        out["parameters"] = parameters
    out.update(dtype=dtype, out_dtype=dtype)
    return out


@dataclass
class Run:
    """One ``mergekit-yaml`` process: seconds of wall and CPU time, peak RSS in bytes."""

    label: str
    wall: float
    cpu: float
    peak_rss: int


def run_merge(label: str, merge_recipe: dict[str, Any], workdir: Path, threads: int, extra: Sequence[str] = ()) -> Run:
    """Run ``mergekit-yaml`` on ``merge_recipe`` into ``workdir/out`` (replaced) and measure it.

    ``threads`` > 0 passes ``--num-threads`` and ``OMP_NUM_THREADS``; 0 leaves torch's default
    (what a plain ``mergekit-yaml`` does: one thread per core)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    recipe_path, out, log = workdir / "recipe.yml", workdir / "out", workdir / "mergekit.log"
    shutil.rmtree(out, ignore_errors=True)
    recipe_path.write_text(yaml.safe_dump(merge_recipe, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    command = [MERGEKIT_YAML, str(recipe_path), str(out), *extra]
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
        command += ["--num-threads", str(threads)]
    with open(log, "wb") as stream:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env)
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be a max over all children).
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed for {label}: {log.read_text()[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return Run(label, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)


@dataclass
class Comparison:
    """Runs per variant label, in pair order; ``task_arithmetic`` is the reference."""

    runs: dict[str, list[Run]] = field(default_factory=dict)

    def ratios(self, label: str, metric: str) -> list[float]:
        return [getattr(a, metric) / getattr(b, metric) for a, b in zip(self.runs[label], self.runs[TASK_ARITHMETIC])]

    def summary(self) -> dict[str, dict[str, float]]:
        """label -> median wall/CPU seconds, peak RSS bytes and the median ratios."""
        out = {}
        for label, runs in self.runs.items():
            row = {
                "wall_s": statistics.median(r.wall for r in runs),
                "cpu_s": statistics.median(r.cpu for r in runs),
                "peak_rss": statistics.median(r.peak_rss for r in runs),
            }
            if label != TASK_ARITHMETIC:
                row.update({f"{m}_ratio": self.median_ratio(label, m) for m in ("wall", "peak_rss", "cpu")})
            out[label] = row
        return out

    def median_ratio(self, label: str, metric: str) -> float:
        return statistics.median(self.ratios(label, metric))

    def table(self) -> str:
        width = max(len(label) for label in self.runs)
        rows = [
            f"{'method':{width}s} {'wall s (median)':>16s} {'peak RSS GB':>12s} {'CPU s':>8s}"
            f" {'wall ratio':>11s} {'RSS ratio':>10s} {'CPU ratio':>10s}"
        ]
        for label, runs in self.runs.items():
            wall = statistics.median(r.wall for r in runs)
            rss = statistics.median(r.peak_rss for r in runs) / 1e9
            cpu = statistics.median(r.cpu for r in runs)
            ratios = (
                "" if label == TASK_ARITHMETIC else
                f" {self.median_ratio(label, 'wall'):11.3f} {self.median_ratio(label, 'peak_rss'):10.3f}"
                f" {self.median_ratio(label, 'cpu'):10.3f}"
            )
            rows.append(f"{label:{width}s} {wall:16.1f} {rss:12.3f} {cpu:8.1f}{ratios}")
        return "\n".join(rows)


LOAD_SCRIPT = """
import torch
a, b = torch.randn(512, 512), torch.randn(512, 512)
while True:
    c = a @ b
"""


class BackgroundLoad:
    """A separate Python process doing 512 × 512 float32 matmuls in a loop on torch's default
    threads: another torch (OpenMP) program sharing the cores. Started and ended by this
    process, by the child's own PID (``Popen.terminate``, then ``kill`` if it lingers)."""

    def __init__(self, warmup: float = 2.0):
        self.warmup = warmup
        self.process: Optional[subprocess.Popen] = None

    def __enter__(self) -> "BackgroundLoad":
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        self.process = subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(self.warmup)  # past torch's import, into the loop
        if self.process.poll() is not None:
            raise RuntimeError(f"the background load exited at once (status {self.process.returncode})")
        return self

    def __exit__(self, *exc) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


CONDITIONS = ("quiet", "load")


def compare_merges(
    triple: dict[str, Path],
    variants: dict[str, dict[str, Any]],
    *,
    pairs: int,
    threads: int,
    workdir: Path,
    log: Callable[[str], None] = print,
    conditions: Sequence[str] = ("quiet",),
) -> dict[str, Comparison]:
    """Run ``task_arithmetic`` and every sigmoid_diff variant once per pair and condition,
    alternating the order (forwards in even pairs, backwards in odd ones) so drift in machine
    load hits all methods alike. ``variants`` maps a label to sigmoid_diff's top-level
    parameters. ``conditions``: ``quiet`` (nothing started by us) and/or ``load`` (a
    :class:`BackgroundLoad` runs during that round); each pair runs every condition in turn,
    so both see the same machine. Returns one :class:`Comparison` per condition."""
    plan = {TASK_ARITHMETIC: recipe(TASK_ARITHMETIC, triple)}
    plan.update({label: recipe("sigmoid_diff", triple, **params) for label, params in variants.items()})
    comparisons = {condition: Comparison({label: [] for label in plan}) for condition in conditions}
    for pair in range(pairs):
        order = list(plan) if pair % 2 == 0 else list(reversed(plan))
        for condition in conditions:
            with BackgroundLoad() if condition == "load" else contextlib.nullcontext():
                for label in order:
                    run = run_merge(label, plan[label], workdir, threads)
                    comparisons[condition].runs[label].append(run)
                    log(f"  pair {pair + 1}/{pairs} {condition:5s} {label:36s} wall {run.wall:6.1f} s  "
                        f"cpu {run.cpu:6.1f} s  peak RSS {run.peak_rss / 1e9:.3f} GB")
    return comparisons


def resolved_for(name: str, parameters: dict[str, Any], t: float = 0.5) -> dict[str, Any]:
    """Recipe parameters as one tensor would see them: the first matching ``filter`` entry,
    and a gradient (a list of numbers) at position ``t`` (0.5: a middle layer)."""
    out = {}
    for key, value in parameters.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            value = next(e["value"] for e in value if "filter" not in e or e["filter"] in name)
        if isinstance(value, list):
            position = t * (len(value) - 1)
            low = int(position)
            high = min(low + 1, len(value) - 1)
            value = value[low] + (value[high] - value[low]) * (position - low)
        out[key] = value
    return out


def kernel_timings(
    triple: dict[str, Path],
    names: Sequence[str],
    variants: dict[str, dict[str, Any]],
    *,
    repeats: int = 5,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Median wall and CPU milliseconds per tensor through ``merge_tensors``, per method.

    Each repeat runs every method once, in turn, so load changes hit them alike.
    """
    from mergekit.merge_methods.api import merge_tensors
    from safetensors import safe_open

    from mergekit_sigmoid_diff.plugin import register

    register()
    if threads > 0:
        torch.set_num_threads(threads)

    def load(role: str, name: str) -> torch.Tensor:
        index = json.loads((triple[role] / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(str(triple[role] / index[name]), framework="pt") as f:
            return f.get_tensor(name)

    results = []
    for name in names:
        base, target, donor = (load(role, name) for role in ("base", "target", "donor"))
        calls: dict[str, Callable[[], torch.Tensor]] = {
            TASK_ARITHMETIC: lambda: merge_tensors([base, target, donor], TASK_ARITHMETIC, parameters={"weight": 1.0}, base_index=0)
        }
        for label, params in variants.items():
            calls[label] = (
                lambda params=params: merge_tensors(
                    [base, target, donor], "sigmoid_diff",
                    parameters={"role": ["target", "donor"], **resolved_for(name, params)}, base_index=0,
                )
            )
        wall: dict[str, list[float]] = {label: [] for label in calls}
        cpu: dict[str, list[float]] = {label: [] for label in calls}
        for label, call in calls.items():
            call()  # warm-up: allocator, first-call overheads
        for _ in range(repeats):
            for label, call in calls.items():
                w, c = time.perf_counter(), time.process_time()
                call()
                cpu[label].append((time.process_time() - c) * 1e3)
                wall[label].append((time.perf_counter() - w) * 1e3)
        results.append(
            {
                "tensor": name,
                "shape": list(base.shape),
                "ms_wall": {label: statistics.median(v) for label, v in wall.items()},
                "ms_cpu": {label: statistics.median(v) for label, v in cpu.items()},
            }
        )
        del base, target, donor
    return results


def largest_tensor_names(shape: LlamaShape) -> list[str]:
    """The biggest tensor of each distinct shape, largest first (embedding, MLP, attention)."""
    seen: dict[tuple[int, ...], str] = {}
    for name, tensor_shape in shape.tensor_shapes().items():
        if len(tensor_shape) == 2:
            seen.setdefault(tensor_shape, name)
    ordered = sorted(seen.items(), key=lambda item: -torch.Size(item[0]).numel())
    return [name for _, name in ordered[:3]]


def machine_load() -> Optional[str]:
    """The 1-minute load average (other programs sharing the cores add noise), for the report."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        return None
    return f"load average {load1:.2f} on {os.cpu_count()} cores"


# Llama-3-8B's tensors (untied embeddings): (shape, how many)
LLAMA3_8B = {
    "embed_tokens / lm_head": ((128256, 4096), 2),
    "q_proj / o_proj": ((4096, 4096), 64),
    "k_proj / v_proj": ((1024, 4096), 64),
    "gate_proj / up_proj / down_proj": ((14336, 4096), 96),
    "norms": ((4096,), 65),
}


def big_tensor_timings(
    shape: tuple[int, int] = (4096, 14336), *, threads: int = 1, repeats: int = 3, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Seconds per tensor at an 8B MLP shape, bf16 inputs, through ``merge_tensors`` as in a
    merge: ``task_arithmetic``, ``sigmoid_diff``'s element-wise gate (the published default),
    and ``protect_subspace: input`` at energy 0.5 on a power-law drift (σ_j ∝ j^−0.5 plus 10 %
    noise energy, :func:`_low_rank_drift`) and on pure Gaussian noise (the worst case, one
    run). Medians of ``repeats`` runs, taken in turn; then an estimate for a whole Llama-3-8B
    merge from the measured per-element rates (:data:`LLAMA3_8B`)."""
    from mergekit.merge_methods.api import merge_tensors

    from mergekit_sigmoid_diff.plugin import register

    register()
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=generator).mul_(0.02)
    drifts = {"power-law": _low_rank_drift(shape, generator, POWER_LAW_NOISE),
              "pure noise": torch.randn(shape, generator=generator).mul_(0.001)}
    donor = torch.randn(shape, generator=generator).mul_(0.001).add_(base).bfloat16()
    targets = {kind: (base + drift).bfloat16() for kind, drift in drifts.items()}
    base = base.bfloat16()
    del drifts
    if threads > 0:
        torch.set_num_threads(threads)

    def call(method: str, target: torch.Tensor, **parameters) -> Callable[[], torch.Tensor]:
        if method == TASK_ARITHMETIC:
            return lambda: merge_tensors([base, target, donor], method, parameters={"weight": 1.0}, base_index=0)
        return lambda: merge_tensors([base, target, donor], method, base_index=0,
                                     parameters={"role": ["target", "donor"], **parameters})

    power = targets["power-law"]
    calls = {
        TASK_ARITHMETIC: call(TASK_ARITHMETIC, power),
        "sigmoid_diff (element-wise gate)": call("sigmoid_diff", power),
        "protect_subspace input e=0.5, power-law drift": call("sigmoid_diff", power, protect_subspace="input"),
    }
    seconds: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(repeats):
        for label, run in calls.items():
            start = time.perf_counter()
            run()
            seconds[label].append(time.perf_counter() - start)
            log(f"   {label}: {seconds[label][-1]:.2f} s")
    worst = "protect_subspace input e=0.5, pure-noise drift (worst case)"
    start = time.perf_counter()
    call("sigmoid_diff", targets["pure noise"], protect_subspace="input")()
    seconds[worst] = [time.perf_counter() - start]
    log(f"   {worst}: {seconds[worst][-1]:.2f} s")
    per_tensor = {label: statistics.median(v) for label, v in seconds.items()}
    return {"shape": list(shape), "threads": threads, "seconds": per_tensor, "runs": seconds,
            "llama3_8b_estimate_s": llama3_8b_estimate(shape, per_tensor)}


def llama3_8b_estimate(shape: tuple[int, int], per_tensor: dict[str, float]) -> dict[str, float]:
    """Compute seconds for a whole Llama-3-8B merge, scaled from one tensor's times by element
    count (the element-wise work and the sketch's products both grow with m·n at a fixed
    sketch width; the projection covers the 2-D non-vocabulary weights, the vocabulary
    tensors and norms take the gate). Compute only: reading and writing the files comes on top."""
    numel = shape[0] * shape[1]
    counts = {kind: int(torch.Size(s).numel()) * n for kind, (s, n) in LLAMA3_8B.items()}
    total = sum(counts.values())
    projected = counts["q_proj / o_proj"] + counts["k_proj / v_proj"] + counts["gate_proj / up_proj / down_proj"]
    rate = {label: seconds / numel for label, seconds in per_tensor.items()}
    gate = rate["sigmoid_diff (element-wise gate)"]
    return {
        TASK_ARITHMETIC: rate[TASK_ARITHMETIC] * total,
        "sigmoid_diff (element-wise gate)": gate * total,
        "protect_subspace input e=0.5, power-law drift":
            rate["protect_subspace input e=0.5, power-law drift"] * projected + gate * (total - projected),
        "protect_subspace input e=0.5, pure-noise drift (worst case)":
            rate["protect_subspace input e=0.5, pure-noise drift (worst case)"] * projected + gate * (total - projected),
    }
