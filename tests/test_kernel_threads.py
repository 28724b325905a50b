"""The element-wise kernel's thread handling and chunk bounds (kernel.single_threaded,
kernel._each_chunk, CHUNK, DEVICE_CHUNK): the chunk loop runs on as many threads as torch's
intra-op count, each with torch on one thread, every chunk exactly once, and gives the count
back whatever happens inside; the device path is chunked too. The arithmetic itself is held to
the float64 reference in test_kernel*.py; here only the bookkeeping around it."""

from __future__ import annotations

import threading

import pytest
import torch

from mergekit_sigmoid_diff import kernel
from tests.reference import published_formula


def _triple(shape=(300, 500), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=dtype)
    return base, base + 0.1 * torch.randn(shape, generator=g, dtype=dtype), base + 0.1 * torch.randn(shape, generator=g, dtype=dtype)


def test_the_chunk_loop_runs_on_one_thread_and_restores_the_count(two_threads, monkeypatch):
    seen = []
    real = kernel._gate_chunks

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel, "_gate_chunks", spy)
    base, target, donor = _triple(dtype=torch.float64)
    out = kernel.sigmoid_diff(base, target, [donor], [1.0])
    assert seen == [1]
    assert torch.get_num_threads() == 2
    torch.testing.assert_close(out, published_formula(base, target, [donor], [1.0]), rtol=0, atol=1e-12)


def test_chunks_are_shared_by_as_many_threads_as_torch_has_each_torch_single_threaded(two_threads, monkeypatch):
    monkeypatch.setattr(kernel, "CHUNK", 4096)  # 37 chunks
    seen: list[tuple[int, int, int, int]] = []  # (loop, chunk index, thread, torch threads)
    met = threading.Barrier(2, timeout=20)  # each thread's first chunk waits for the other thread
    first = set()
    real = kernel._each_chunk

    loops = []

    def spy(count, work, scratch, workers, *rest):
        assert workers == 2
        loops.append(count)
        loop = len(loops)

        def traced(index, own):
            me = threading.get_ident()
            if me not in first:
                first.add(me)
                met.wait()  # two distinct threads must take chunks, or this times out
            seen.append((loop, index, me, torch.get_num_threads()))
            work(index, own)

        met.reset()
        first.clear()
        return real(count, traced, scratch, workers, *rest)

    monkeypatch.setattr(kernel, "_each_chunk", spy)
    base, target, donor = _triple(shape=(300, 500), dtype=torch.float64)
    out = kernel.sigmoid_diff(base, target, [donor], [1.0], check_finite=True)
    torch.testing.assert_close(out, published_formula(base, target, [donor], [1.0]), rtol=0, atol=1e-12)
    chunks = -(-300 * 500 // 4096)
    assert loops == [chunks, chunks]  # pass 1 (min and max of |T − B|) and pass 2
    for loop in (1, 2):
        assert sorted(i for n, i, _, _ in seen if n == loop) == list(range(chunks))  # each chunk once
        assert len({thread for n, _, thread, _ in seen if n == loop}) == 2
    assert {threads for *_, threads in seen} == {1}
    assert torch.get_num_threads() == 2


def test_an_error_in_a_helper_thread_reaches_the_caller_and_stops_the_loop(two_threads):
    helper_started = threading.Event()
    done: list[int] = []

    def work(index, own):
        if threading.current_thread() is threading.main_thread():
            helper_started.wait(timeout=20)  # the helper takes a chunk before the main thread goes on
            done.append(index)
            return
        helper_started.set()
        raise RuntimeError(f"chunk {index} failed")

    with pytest.raises(RuntimeError, match="failed"):
        kernel._each_chunk(1000, work, lambda: None, 2)
    assert helper_started.is_set()
    assert len(done) < 999  # the main thread stopped taking chunks once the helper failed
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("mode", ["inference", "no_grad"])
@pytest.mark.parametrize("protect", ["none", "input"])
def test_helper_threads_keep_the_callers_grad_and_inference_mode(mode, protect, two_threads, monkeypatch):
    # torch's grad and inference modes are per thread: a helper outside the caller's mode
    # fails on inference tensors, or on parameters (out= ops under autograd)
    monkeypatch.setattr(kernel, "CHUNK", 1024)  # many chunks for both threads
    base, target, donor = _triple(shape=(300, 500))
    settings = kernel.GateSettings(protect_subspace=protect)
    want = kernel.sigmoid_diff(base, target, [donor], [1.0], settings, out_dtype=torch.bfloat16)
    for _ in range(5):  # which thread takes which chunk varies from run to run
        if mode == "inference":
            with torch.inference_mode():
                b, t, d = base.clone(), target.clone(), donor.clone()  # inference tensors
                got = kernel.sigmoid_diff(b, t, [d], [1.0], settings, out_dtype=torch.bfloat16, check_finite=True)
        else:
            b, t, d = (torch.nn.Parameter(x.clone()) for x in (base, target, donor))
            with torch.no_grad():
                got = kernel.sigmoid_diff(b, t, [d], [1.0], settings, out_dtype=torch.bfloat16, check_finite=True)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("protect", ["none", "input"])
def test_transposed_inputs_give_the_contiguous_result(protect, two_threads):
    base, target, donor = _triple(shape=(300, 500))
    settings = kernel.GateSettings(protect_subspace=protect)
    want = kernel.sigmoid_diff(base.T.contiguous(), target.T.contiguous(), [donor.T.contiguous()], [1.0], settings,
                               out_dtype=torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16):
        b, t, d = (x.to(dtype).T for x in (base, target, donor))  # non-contiguous views
        got = kernel.sigmoid_diff(b, t, [d], [1.0], settings, out_dtype=torch.bfloat16)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert got.shape == (500, 300) and torch.isfinite(got.float()).all()


def test_the_thread_count_comes_back_after_an_error(two_threads):
    base, target, donor = _triple()
    donor[3, 4] = float("nan")
    with pytest.raises(kernel.NonFiniteError):
        kernel.sigmoid_diff(base, target, [donor], [1.0], check_finite=True)
    assert torch.get_num_threads() == 2


def test_nested_uses_restore_once_and_threads_keep_their_own_counts(two_threads):
    with kernel.single_threaded():
        assert torch.get_num_threads() == 1
        with kernel.single_threaded():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1  # the inner exit does not restore early
    assert torch.get_num_threads() == 2
    with kernel.single_threaded(active=False):
        assert torch.get_num_threads() == 2

    # torch's count is per thread (OpenMP): a worker's kernel leaves the others' counts alone
    inside, release, seen = threading.Barrier(2), threading.Event(), {}

    def worker():
        torch.set_num_threads(2)
        with kernel.single_threaded():
            seen["inside"] = torch.get_num_threads()
            inside.wait()
            release.wait()
        seen["after"] = torch.get_num_threads()

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait()
    assert torch.get_num_threads() == 2
    with kernel.single_threaded():
        assert torch.get_num_threads() == 1  # this thread's own state, not the worker's depth
    assert torch.get_num_threads() == 2
    release.set()
    thread.join()
    assert seen == {"inside": 1, "after": 2}


def test_chunk_sizes_and_their_scratch_bound():
    # the documented bounds: 5 buffers of CHUNK float32 on CPU (2.5 MiB), of DEVICE_CHUNK off it (320 MiB)
    assert 5 * kernel.CHUNK * 4 == 5 * 2**19
    assert 5 * kernel.DEVICE_CHUNK * 4 == 320 * 2**20
    assert kernel.DEVICE_CHUNK < 128256 * 4096  # an 8B embedding is chunked on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_is_chunked_and_exact(monkeypatch):
    monkeypatch.setattr(kernel, "DEVICE_CHUNK", 4096)  # many chunks on a small tensor
    base, target, donor = _triple(dtype=torch.float64)
    out = kernel.sigmoid_diff(base.cuda(), target.cuda(), [donor.cuda()], [1.0], check_finite=True)
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), published_formula(base, target, [donor], [1.0]), rtol=0, atol=1e-12)
