"""Session-scoped tiny models shared by the tests (built once, in temporary folders)."""

from __future__ import annotations

import pytest
import torch
from mergekit.io.lazy_tensor_loader import LazyTensorLoader

from mergekit_sigmoid_diff.tiny import build_triple


@pytest.fixture(scope="session")
def triple(tmp_path_factory):
    """base, target (heavy-tailed drift) and one donor, float32, absolute paths."""
    return build_triple(tmp_path_factory.mktemp("triple"), seed=0, donors=1)


@pytest.fixture(scope="session")
def triple2(tmp_path_factory):
    """base, target and two donors, float32."""
    return build_triple(tmp_path_factory.mktemp("triple2"), seed=10, donors=2)


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail the test if any tensor data is read."""

    def refuse(self, key, *args, **kwargs):
        raise AssertionError(f"tensor {key} was read before the error")

    monkeypatch.setattr(LazyTensorLoader, "get_tensor", refuse)


@pytest.fixture
def two_threads():
    """torch on 2 intra-op threads for the test, the count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
