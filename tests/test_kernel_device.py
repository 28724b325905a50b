"""Where the kernel computes and how much memory it takes.

- The result lives on the inputs' device, for every ``normalize`` option: run on "cpu"
  explicitly, and on "cuda" when torch sees one (skipped otherwise).
- Memory is bounded: beyond its inputs the kernel holds the output plus chunk-sized
  scratch, never a full-size float32 copy of the tensor (measured as the peak RSS growth
  of a fresh process; the earlier un-chunked kernel grew it by about four float32 copies).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from mergekit_sigmoid_diff import kernel
from mergekit_sigmoid_diff.kernel import GateSettings, sigmoid_diff
from mergekit_sigmoid_diff.normalization import NORMALIZATIONS, SAMPLE_SIZE
from tests.reference import applied_fraction as reference_fraction
from tests.reference import published_formula

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
    ),
]


# by default 2 CPU chunks and a few rows more (three chunks, the last one short), far above the sample size
CHUNKED_ROWS = 2 * kernel.CHUNK // 128 + 5


def inputs(device: str, rows: int = CHUNKED_ROWS) -> list[torch.Tensor]:
    """bf16 base, heavy-tailed target and two donors, by default big enough to be chunked and sampled."""
    generator = torch.Generator().manual_seed(11)
    shape = (rows, 128)
    base = torch.randn(shape, generator=generator)
    target = base + 0.01 * torch.randn(shape, generator=generator) ** 3
    donors = [base + 0.01 * torch.randn(shape, generator=generator) for _ in range(2)]
    return [t.bfloat16().to(device) for t in (base, target, *donors)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_the_result_follows_the_inputs_device(device, normalize, monkeypatch):
    if device != "cpu":  # the device's chunk (2**24) at the CPU's size, so the same inputs are chunked there too
        monkeypatch.setattr(kernel, "DEVICE_CHUNK", kernel.CHUNK)
    base, target, *donors = inputs(device)
    chunks = -(-target.numel() // kernel.CHUNK)
    assert chunks == 3 and target.numel() > SAMPLE_SIZE  # chunked (the last chunk short) and sampled
    loops = []
    real = kernel._each_chunk

    def spy(count, *args):
        loops.append(count)
        return real(count, *args)

    monkeypatch.setattr(kernel, "_each_chunk", spy)
    out = sigmoid_diff(base, target, donors, [0.5, 1.0], GateSettings(normalize=normalize), out_dtype=torch.bfloat16)
    assert loops == [chunks, chunks]  # both passes (the drift's range, then the gate) ran chunk by chunk
    assert out.device.type == device and out.dtype == torch.bfloat16 and out.shape == target.shape
    if normalize == "minmax":  # the independent float64 formula, on any device
        reference = published_formula(*(t.cpu() for t in (base, target)), [d.cpu() for d in donors], [0.5, 1.0])
        torch.testing.assert_close(out.cpu().double(), reference, rtol=2**-7, atol=1e-6)
    elif device != "cpu":  # the robust options: the same numbers as the CPU kernel, to rounding
        reference = sigmoid_diff(
            *(t.cpu() for t in (base, target)), [d.cpu() for d in donors], [0.5, 1.0],
            GateSettings(normalize=normalize), out_dtype=torch.bfloat16,
        )
        torch.testing.assert_close(out.cpu(), reference, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", ["quantile", "rank"])
def test_the_robust_options_give_the_defined_fraction_on_the_device(device, normalize):
    """Values, not only device and dtype: the fraction each element got, read back from a
    float32 output as (out − T) / D, against the definition computed in float64
    (tests/reference.py). SAMPLE_SIZE elements: the kernel's statistics are exact there (a
    larger tensor's sampled statistics are checked in test_kernel_normalize.py)."""
    base, target, *donors = inputs(device, rows=SAMPLE_SIZE // 128)
    out = sigmoid_diff(base, target, donors, [0.5, 1.0], GateSettings(normalize=normalize, quantile=0.9), out_dtype=torch.float32)
    assert out.device.type == device
    b, t, *i = (x.cpu().double() for x in (base, target, *donors))
    diff = 0.5 * (i[0] - b) + 1.0 * (i[1] - b)
    usable = diff.abs() > 1e-3  # where the fraction can be read back precisely
    got = ((out.cpu().double() - t) / diff)[usable]
    want = reference_fraction((t - b).abs(), normalize, quantile=0.9)[usable]
    error = (got - want).abs()
    assert error.max() < 1e-4, error.max().item()
    assert want.std() > 0.05  # the gate varies across elements, so matching it means something


MEMORY_PROBE = textwrap.dedent(
    """
    import resource, torch
    from mergekit_sigmoid_diff.kernel import GateSettings, sigmoid_diff
    from mergekit_sigmoid_diff.normalization import NORMALIZATIONS
    torch.set_num_threads(1)
    n = 1 << 22
    # bf16 straight away: no float32 temporary raises the peak before the measurement
    base, target, donor = (torch.randn(n, dtype=torch.bfloat16) for _ in range(3))
    for normalize in NORMALIZATIONS:  # first calls map code pages and caches: not per-tensor memory
        small = base[: 1 << 18]
        sigmoid_diff(small, target[: 1 << 18], [donor[: 1 << 18]], [1.0], GateSettings(normalize=normalize), out_dtype=torch.bfloat16)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for normalize in NORMALIZATIONS:  # the peak over all three: freed outputs are reused
        out = sigmoid_diff(base, target, [donor], [1.0], GateSettings(normalize=normalize), out_dtype=torch.bfloat16)
        del out
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    """
)


def test_peak_memory_is_the_output_plus_chunk_scratch():
    n = 1 << 22
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, timeout=300, check=True)
    growth = int(done.stdout.split()[-1])
    output, float32_copy = 2 * n, 4 * n
    # the output, plus well under half of one float32 copy of the tensor for scratch
    assert growth < output + float32_copy / 2, f"peak RSS grew by {growth / 2**20:.0f} MiB"
