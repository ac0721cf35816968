"""The README's two set-up commands stay true: CI runs the test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    head = text.split("\n## ", 2)[1]  # the first section is the set-up
    return re.findall(r"```(?:bash|sh)\n(.+?)\n```", head, flags=re.S)


def test_readme_starts_with_exactly_two_setup_commands():
    cmds = _setup_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c for c in cmds), "each set-up command is one line"
    demo, tests = cmds
    assert demo.endswith("kvagent demo") and "pip install torch==2.13.0" in demo
    assert tests.endswith("python -m pytest") and "pip install torch==2.13.0" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert _setup_commands()[1] in ci.splitlines()
