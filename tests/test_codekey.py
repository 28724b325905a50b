"""Cached results are keyed by what produced them (mergekit_sigmoid_diff.codekey): one key for
what a merge depends on, one for what a score depends on, one for whether an adapter changed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchlib import quality
from mergekit_sigmoid_diff import codekey, kernel
from mergekit_sigmoid_diff.errors import SigmoidDiffError


def test_code_key_follows_the_contents_the_schema_and_nothing_else(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    key = codekey.code_key(a, b)
    assert key == codekey.code_key(a, b) and len(key) == 16
    assert codekey.code_key(a, b, schema=2) != key
    a.write_text("x = 2\n")  # one character
    assert codekey.code_key(a, b) != key
    a.write_text("x = 1\n")
    assert codekey.code_key(a, b) == key  # the contents, not the time of the file
    assert codekey.code_key(kernel) == codekey.code_key(Path(kernel.__file__))
    with pytest.raises(FileNotFoundError):
        codekey.code_key(tmp_path / "missing.py")


MODULES = (*codekey.MERGE_MODULES, "scoring", "measure", "mainjob")


@pytest.fixture
def package(tmp_path, monkeypatch) -> Path:
    """A stand-in package folder holding one small file per module, the keys pointed at it."""
    for name in MODULES:
        (tmp_path / f"{name}.py").write_text(f"# {name}\n")
    monkeypatch.setattr(codekey, "PACKAGE_DIR", tmp_path)
    return tmp_path


@pytest.mark.parametrize("module", MODULES)
def test_the_merge_key_follows_the_merge_math_and_the_score_key_the_scoring(package, module):
    data = package / "heldout.json"
    data.write_text("[1, 2]")
    before = codekey.merge_key(), codekey.score_key(data)
    (package / f"{module}.py").write_text("# edited\n")
    after = codekey.merge_key(), codekey.score_key(data)
    assert (after[0] != before[0]) == (module in codekey.MERGE_MODULES)
    assert (after[1] != before[1]) == (module == "scoring")


def test_the_score_key_follows_the_evaluation_data(package):
    first, second = package / "a.json", package / "b.json"
    first.write_text("[1]")
    second.write_text("[2]")
    key = codekey.score_key(first, second)
    assert codekey.score_key(second, first) != key  # the order of the sets is part of it
    second.write_text("[3]")
    assert codekey.score_key(first, second) != key
    with pytest.raises(FileNotFoundError):
        codekey.score_key(package / "missing.json")


def test_every_merge_module_is_hashed_and_a_missing_one_is_an_error(package):
    assert [p.name for p in codekey.merge_sources()] == [f"{n}.py" for n in codekey.MERGE_MODULES]
    key = codekey.merge_key()
    (package / "datasolve.py").write_text("# edited\n")
    assert codekey.merge_key() != key
    (package / "prepared.py").unlink()
    with pytest.raises(FileNotFoundError):
        codekey.merge_key()


def test_the_real_package_has_a_merge_key():
    assert codekey.merge_sources()[0] == Path(kernel.__file__).resolve()
    assert len(codekey.merge_key()) == 16


def test_the_adapter_key_follows_the_adapters_bytes_not_its_path_or_time(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}')
    (adapter / "adapter_model.safetensors").write_bytes(b"weights-1")
    (adapter / "README.md").write_text("notes")
    key = codekey.adapter_key(adapter)
    os.utime(adapter / "adapter_model.safetensors", (1, 1))  # a touch, or a copy with a new time
    (adapter / "README.md").write_text("other notes")  # not read by a merge
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (copy / name).write_bytes((adapter / name).read_bytes())
    assert codekey.adapter_key(adapter) == key == codekey.adapter_key(copy)
    (adapter / "adapter_model.safetensors").write_bytes(b"weights-2")  # retrained: same size, new bytes
    assert codekey.adapter_key(adapter) != key
    (adapter / "adapter_model.safetensors").write_bytes(b"weights-1")
    (adapter / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 32}')  # the scaling alone
    assert codekey.adapter_key(adapter) != key
    with pytest.raises(SigmoidDiffError, match=f"^{tmp_path / 'empty'} holds no LoRA adapter weights"):
        (tmp_path / "empty").mkdir()
        codekey.adapter_key(tmp_path / "empty")


def _edited(monkeypatch, name: str) -> None:
    """Make every read of the file ``name`` see one more line, as after an edit."""
    read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        return read(self) + (b"# edited\n" if self.name == name else b"")

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


@pytest.mark.parametrize(
    "source, scores_change",
    [("kernel.py", False), ("normalization.py", False), ("measure.py", False), ("scoring.py", True), ("world.py", True)],
)
def test_the_quality_benchmark_keys_change_with_the_kernel_and_the_scoring(monkeypatch, source, scores_change):
    before = quality.score_code(), quality.merge_row_code()
    _edited(monkeypatch, source)
    after = quality.score_code(), quality.merge_row_code()
    assert after[1] != before[1]  # every merge row is computed afresh
    assert (after[0] != before[0]) == scores_change  # references only when their scoring changed


def test_the_score_key_takes_data_already_in_memory(package):
    digest = b"tokenised items, hashed by the probe"
    key = codekey.score_key(digest)
    assert codekey.score_key(digest) == key and codekey.score_key(digest + b"!") != key
    (package / "scoring.py").write_text("# edited\n")
    assert codekey.score_key(digest) != key
