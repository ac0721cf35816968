"""The integration uses kvagent's public API only: no private module, name or attribute of kvagent, and no deep
module path (every name comes from ``kvagent`` itself, in ``kvagent.__all__``). The checks are
``kvagent.testing``'s (tested in kvagent's own suite, tests/test_testing.py)."""

from __future__ import annotations

from pathlib import Path

from kvagent.testing import public_api_problems

PACKAGE = Path(__file__).resolve().parents[1] / "langchain_kvagent"


def test_integration_uses_only_kvagents_public_api() -> None:
    problems = public_api_problems(PACKAGE)
    assert not problems, "\n".join(problems)
