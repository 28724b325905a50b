"""torch's intra-op thread count around a block of work (pure torch).

Every torch op on more than 32 768 elements (``at::internal::GRAIN_SIZE``) is an OpenMP
parallel region that waits for its slowest thread; when another process holds a core, that
wait, not the arithmetic, sets the time of code that makes many such regions (the
element-wise kernel's chunk loop, a QR's Householder steps). Such code runs inside
:func:`single_threaded`. A few large matrix products per tensor do not stall that way, and
run on the caller's count (measured in :mod:`mergekit_sigmoid_diff.subspace`).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["single_threaded"]

_thread_state = threading.local()  # per thread: nesting depth and the count to restore


@contextmanager
def single_threaded(active: bool = True) -> Iterator[None]:
    """Run the body with torch's intra-op threads set to 1, then restore the count.

    torch's count is per calling thread under its OpenMP backend (``omp_set_num_threads``
    sets the caller's own setting), so the state here is per thread too: nested uses
    restore once, at the outermost exit, and other threads keep their own counts.
    Setting the count costs < 1 µs. ``active=False`` does nothing (accelerator inputs).
    torch also keeps one process-wide count that a thread reads on its first torch op: a thread
    started elsewhere while a block runs starts on 1 thread and keeps it (the merge runs no
    such threads of its own).
    """
    if not active:
        yield
        return
    depth = getattr(_thread_state, "depth", 0)
    if depth == 0:
        _thread_state.saved = torch.get_num_threads()
        if _thread_state.saved > 1:
            torch.set_num_threads(1)
    _thread_state.depth = depth + 1
    try:
        yield
    finally:
        _thread_state.depth -= 1
        if _thread_state.depth == 0 and _thread_state.saved > 1:
            torch.set_num_threads(_thread_state.saved)
