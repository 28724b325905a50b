"""Plain ``mergekit-yaml`` sees the method after ``pip install``; nothing else notices."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import mergekit_sigmoid_diff
from mergekit_sigmoid_diff import register
from tests.support import one_donor_recipe, run_mergekit_yaml

REPO = Path(mergekit_sigmoid_diff.__file__).resolve().parent.parent
PTH_LINE = (REPO / "mergekit_sigmoid_diff" / "mergekit_sigmoid_diff_hook.pth").read_text()


def python(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300
    )


def test_unrelated_programs_import_neither_torch_nor_mergekit():
    result = python("-c", "import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in "
                    "('torch', 'mergekit', 'transformers', 'mergekit_sigmoid_diff')))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['mergekit_sigmoid_diff', 'mergekit_sigmoid_diff._hook']"
    assert result.stderr == ""


def test_hook_registers_on_first_import_of_mergekit():
    result = python("-c", "from mergekit import merge_methods; print(merge_methods.get('sigmoid_diff').spec.name)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sigmoid_diff"


def test_register_is_idempotent():
    from mergekit.merge_methods import registered_methods

    register()
    register()
    assert [m.spec.name for m in registered_methods()].count("sigmoid_diff") == 1


def test_a_failing_plugin_only_warns():
    code = (
        "import mergekit_sigmoid_diff._hook as h; h._CALLBACKS['mergekit.merge_methods.registry'] = 'no_such';"
        "import mergekit.merge_methods as m; print(len(m.registered_methods()))"
    )
    result = python("-c", code)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 0
    assert "could not plug into mergekit.merge_methods.registry" in result.stderr


def test_pth_line_is_silent_when_the_package_is_gone(tmp_path):
    # python -S: no site-packages, so the package cannot be imported
    result = subprocess.run([sys.executable, "-S", "-c", PTH_LINE], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""


@pytest.mark.slow
def test_wrapper_works_where_the_hook_cannot(triple, tmp_path):
    """With ``python -S`` no .pth runs: plain mergekit fails, the wrapper merges."""
    import mergekit

    env = {"PYTHONPATH": os.pathsep.join([str(Path(mergekit.__file__).parent.parent), str(REPO)])}
    recipe = one_donor_recipe(triple)
    plain = run_mergekit_yaml(
        recipe, tmp_path / "plain", command=[sys.executable, "-S", "-m", "mergekit.scripts.run_yaml"], env=env
    )
    wrapped = run_mergekit_yaml(
        recipe, tmp_path / "wrapped", command=[sys.executable, "-S", "-m", "mergekit_sigmoid_diff", "merge"], env=env
    )
    assert plain.returncode != 0 and "Unimplemented merge method sigmoid_diff" in plain.stderr
    assert wrapped.returncode == 0, wrapped.stderr[-3000:]
    assert (tmp_path / "wrapped" / "config.json").exists()


@pytest.mark.slow
def test_wheel_installs_the_hook_at_the_site_packages_root(tmp_path):
    pytest.importorskip("hatchling", reason="the test extra installs hatchling")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("mergekit_sigmoid_diff_hook.pth").decode() == PTH_LINE
        assert "mergekit_sigmoid_diff/_hook.py" in archive.namelist()
