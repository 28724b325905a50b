"""Score caches are keyed by the code that produced the scores (codekey.code_key)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchlib import quality
from mergekit_sigmoid_diff import codekey, kernel


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
    before = quality.score_code(), quality.merge_code()
    _edited(monkeypatch, source)
    after = quality.score_code(), quality.merge_code()
    assert after[1] != before[1]  # every merge row is computed afresh
    assert (after[0] != before[0]) == scores_change  # references only when their scoring changed
