"""The suite reuses a statistics file only while today's ``calibrate`` would write the same numbers
(``benchlib.calibration.current``): files stand in for calibrate's output, so no model is needed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchlib import calibration

from mergekit_sigmoid_diff import statistics
from mergekit_sigmoid_diff.calibrate import code_version


def write(path: Path, value: float, code: str) -> None:
    metadata = {"format": statistics.FORMAT, "weights": json.dumps({"w.weight": "w"}), "tokens": "7",
                "model_stamp": "m", "code": code}
    save_file({"w.inputs": torch.full((2, 2), value)}, str(path), metadata=metadata)


class Maker:
    def __init__(self, value: float):
        self.value, self.calls = value, []

    def __call__(self, into: Path) -> None:
        self.calls.append(into)
        write(into, self.value, code_version())


def old_file(tmp_path: Path, value: float = 1.0) -> tuple[Path, int]:
    path = tmp_path / "stats.safetensors"
    write(path, value, "an-older-calibrate")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    return path, path.stat().st_mtime_ns


def test_an_absent_file_is_made_once(tmp_path):
    path, make = tmp_path / "s.safetensors", Maker(1.0)
    calibration.current(path, make, log=lambda _m: None)
    calibration.current(path, make, log=lambda _m: None)
    assert make.calls == [path]


def test_a_file_from_today_s_calibrate_is_reused_unread(tmp_path):
    path, make = tmp_path / "s.safetensors", Maker(2.0)
    write(path, 1.0, code_version())
    calibration.current(path, make, log=lambda _m: None)
    assert make.calls == [] and torch.equal(load_file(str(path))["w.inputs"], torch.full((2, 2), 1.0))


def test_an_older_file_with_the_same_numbers_is_kept_with_its_time_and_the_check_recorded(tmp_path):
    path, mtime = old_file(tmp_path, 1.0)
    make, said = Maker(1.0), []
    calibration.current(path, make, log=said.append)
    assert len(make.calls) == 1 and make.calls[0] != path and not make.calls[0].exists()
    assert path.stat().st_mtime_ns == mtime  # the data rows keyed by size and time stay valid
    assert statistics.StatisticsFile(path).metadata["code"] == "an-older-calibrate"
    assert (tmp_path / f"stats.safetensors.same-under-{code_version()}").is_file() and "kept" in said[0]
    calibration.current(path, make, log=said.append)  # checked once, not at every run
    assert len(make.calls) == 1


def test_an_older_file_with_other_numbers_is_replaced(tmp_path):
    path, mtime = old_file(tmp_path, 1.0)
    make, said = Maker(1.5), []
    calibration.current(path, make, log=said.append)
    assert path.stat().st_mtime_ns != mtime and statistics.StatisticsFile(path).metadata["code"] == code_version()
    assert list(tmp_path.iterdir()) == [path] and "replaced" in said[0]


def test_same_statistics_compares_tensors_bit_for_bit_and_metadata_but_code(tmp_path):
    a, b, c, d = (tmp_path / f"{n}.safetensors" for n in "abcd")
    write(a, 1.0, "x")
    write(b, 1.0, "y")
    write(c, 1.0 + 2 ** -20, "x")
    save_file({"w.inputs": torch.full((2, 2), 1.0)}, str(d),
              metadata={"format": statistics.FORMAT, "weights": "{}", "tokens": "8", "model_stamp": "m", "code": "x"})
    assert calibration.same_statistics(a, b)
    assert not calibration.same_statistics(a, c)
    assert not calibration.same_statistics(a, d)
