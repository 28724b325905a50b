"""The output folder: never overwritten, checked before any tensor is read, and never left
looking like a finished model after a failure, a full disk or an interrupt."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors
import safetensors.torch

from mergekit_sigmoid_diff import staging
from mergekit_sigmoid_diff.errors import SigmoidDiffError
from tests.support import MERGEKIT_YAML, assert_left_nothing, looks_finished, merge_in_process, one_donor_recipe, write_recipe


def recipe(triple) -> dict:
    return one_donor_recipe(triple)


# --- OUT is taken or unwritable: refused before anything is read ------------------------


def test_existing_non_empty_output_is_refused_and_untouched(triple, tmp_path, no_tensor_reads):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # e.g. an earlier merge the user keeps
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SigmoidDiffError, match=rf"^output folder {out} already exists and is not empty"):
        merge_in_process(recipe(triple), out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
    assert (out / "config.json").read_text() == "{}" and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_that_is_a_file_is_refused(triple, tmp_path, no_tensor_reads):
    out = tmp_path / "out"
    out.write_text("not a folder")
    with pytest.raises(SigmoidDiffError, match=rf"^output {out} exists and is not a folder$"):
        merge_in_process(recipe(triple), out)
    assert out.read_text() == "not a folder"


def test_empty_existing_output_folder_is_used(triple, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    merge_in_process(recipe(triple), out)
    assert looks_finished(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


def test_model_card_names_the_output_not_the_staging_folder(triple, tmp_path):
    out = tmp_path / "my-merge"
    merge_in_process(recipe(triple), out)
    card = (out / "README.md").read_text()
    assert "# my-merge" in card
    assert staging.STAGING_SUFFIX not in card


def _assert_refused(triple, parent: Path) -> None:
    out = parent / f"sigmoid-diff-out-{os.getpid()}"
    with pytest.raises(SigmoidDiffError, match=rf"^cannot write the output {out}: {parent} is not writable \("):
        merge_in_process(recipe(triple), out)
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_output_in_a_read_only_folder_is_refused_before_reading(triple, tmp_path, no_tensor_reads):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _assert_refused(triple, locked)
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_output_on_a_filesystem_refusing_folders_is_refused_before_reading(triple, no_tensor_reads):
    """sysfs refuses new folders, also to root: an unwritable place on any Linux."""
    _assert_refused(triple, Path("/sys"))


# --- failures while writing: nothing at OUT, staging folder removed -----------------------


def _failing_save_file(monkeypatch, error: BaseException, after: int) -> None:
    """safetensors' writer, as mergekit calls it, that writes ``after`` shards then fails."""
    real = safetensors.torch.save_file
    calls = []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > after:
            Path(filename).write_bytes(b"\0" * 100)  # a torn file, as a full disk leaves
            raise error
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
    ids=["OSError", "SafetensorError"],
)
def test_full_disk_is_one_line_naming_output_and_errno(triple, tmp_path, monkeypatch, error):
    out = tmp_path / "out"
    _failing_save_file(monkeypatch, error, after=2)
    with pytest.raises(SigmoidDiffError, match=rf"^writing the merged model for {out} failed: .*\(errno 28, ENOSPC\)"):
        merge_in_process(recipe(triple), out, out_shard_size=1000)
    assert_left_nothing(out)


def test_other_errors_pass_through_and_leave_nothing(triple, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _failing_save_file(monkeypatch, RuntimeError("writer broke"), after=1)
    with pytest.raises(RuntimeError, match="writer broke"):
        merge_in_process(recipe(triple), out, out_shard_size=1000)
    assert_left_nothing(out)


def _signal_after_two_shards(monkeypatch, signum: int) -> list:
    """safetensors' writer that signals this process once two shards are on disk."""
    real = safetensors.torch.save_file
    shards: list = []

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        shards.append(filename)
        if len(shards) == 2:
            os.kill(os.getpid(), signum)  # handled at the next bytecode boundary
            time.sleep(5)  # the handler cuts this short

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return shards


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test, the previous one restored
    after: a process started in the background (``pytest &``, nohup, some CI runners) inherits
    SIGINT as ignored, and Python then installs no handler, so Ctrl-C would do nothing."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_midway_leaves_nothing(triple, tmp_path, monkeypatch, ctrl_c_raises):
    out = tmp_path / "out"
    shards = _signal_after_two_shards(monkeypatch, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        merge_in_process(recipe(triple), out, out_shard_size=1000)
    assert len(shards) == 2
    assert_left_nothing(out)


def test_sigterm_midway_leaves_nothing_and_restores_the_handler(triple, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shards = _signal_after_two_shards(monkeypatch, signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SigmoidDiffError, match=rf"^merge interrupted by SIGTERM: .*nothing was written to {out}$"):
        merge_in_process(recipe(triple), out, out_shard_size=1000)
    assert len(shards) == 2
    assert signal.getsignal(signal.SIGTERM) is before
    assert_left_nothing(out)


def test_output_created_during_the_merge_is_not_overwritten(triple, tmp_path, monkeypatch):
    """Someone else fills OUT while we merge: keep their files, keep our finished merge."""
    out = tmp_path / "out"
    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        out.mkdir(exist_ok=True)
        (out / "theirs.txt").write_text("theirs")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    stage = staging.staging_folder(out)
    with pytest.raises(SigmoidDiffError, match=rf"^the merge finished but could not be moved to {out} .*; it is complete in {stage}$"):
        merge_in_process(recipe(triple), out)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert looks_finished(stage)


# --- the real command line ---------------------------------------------------------------


def _cli_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.mark.slow
def test_cli_file_size_limit_is_a_clean_write_error(triple, tmp_path):
    """A real failing write: RLIMIT_FSIZE makes the kernel refuse the shard (EFBIG)."""
    out = tmp_path / "out"
    limit = (Path(triple["base"]) / "model.safetensors").stat().st_size // 2

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [MERGEKIT_YAML, str(write_recipe(tmp_path / "r.yml", recipe(triple))), str(out)],
        capture_output=True, text=True, env=_cli_env(), timeout=600, preexec_fn=limit_file_size,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        f"Error: writing the merged model for {out} failed: File too large (errno 27, EFBIG); "
        f"removed the incomplete output, nothing was written to {out}"
    ], result.stderr[-2000:]
    assert_left_nothing(out)


# mergekit-yaml with a writer slowed down after each shard, and a file touched once the
# first shard is on disk: the test signals the process mid-write.
SLOW_MERGEKIT_YAML = """
import os, sys, time
from mergekit.io import tensor_writer
write_shard = tensor_writer.TensorWriter._write_shard_task
def slow_write_shard(self, *args, **kwargs):
    write_shard(self, *args, **kwargs)
    open(os.environ["SHARD_WRITTEN"], "a").close()
    time.sleep(0.5)
tensor_writer.TensorWriter._write_shard_task = slow_write_shard
from mergekit.scripts.run_yaml import main
sys.argv[0] = "mergekit-yaml"
main()
"""


@pytest.mark.slow
def test_cli_sigterm_midway_leaves_nothing(triple, tmp_path):
    """SIGTERM to a real mergekit-yaml with shards on disk (Ctrl-C: the in-process test)."""
    out = tmp_path / "out"
    marker = tmp_path / "shard-written"
    recipe_file = write_recipe(tmp_path / "r.yml", recipe(triple))
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGEKIT_YAML, str(recipe_file), str(out), "--out-shard-size", "1K"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**_cli_env(), "SHARD_WRITTEN": str(marker)},
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "no shard was written"
        stage = staging.staging_folder(out, process.pid)
        assert any(stage.glob("*.safetensors")), "the merge should be midway, with shards on disk"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0
    assert "Traceback" not in stderr
    assert "Error: merge interrupted by SIGTERM" in stderr, stderr[-2000:]
    assert_left_nothing(out)
