"""``kvagent.testing``: the public-API checks the integrations run over their packages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kvagent.testing import deep_imports, private_access, public_api_problems


def test_the_check_catches_private_access() -> None:
    bad = ast.parse(
        "from kvagent._internal import KVAgent\nfrom kvagent import Nope\nimport kvagent._store\n"
        "agent._memory.clear()\nself.kv_agent._lock\ngetattr(agent, '_save')\nfrom kvagent.tools import _p\n"
    )
    assert len(private_access(bad, "bad.py")) == 7
    assert not private_access(
        ast.parse("from kvagent import KVAgent\nself._runner()\nagent.resolver.resolve([1])\n"), "ok"
    )


def test_the_check_catches_deep_imports() -> None:
    bad = ast.parse("from kvagent.chat.tools import ToolCall\nimport kvagent.config\n"
                    "def f():\n    from kvagent.client.registry import RegistryClient\n")
    assert len(deep_imports(bad, "bad.py")) == 3
    assert not deep_imports(ast.parse("from kvagent import ToolCall\nimport kvagent\n"), "ok")


def test_a_package_is_checked_module_by_module(tmp_path: Path) -> None:
    (tmp_path / "good.py").write_text("from kvagent import KVAgent\n")
    assert public_api_problems(tmp_path) == []
    (tmp_path / "bad.py").write_text("from kvagent.config import Config\nx = agent._memory\n")
    assert public_api_problems(tmp_path) == [
        "bad.py:2: reaches into private attribute '_memory'",
        "bad.py:1: imports from the deep path 'kvagent.config', not from kvagent",
    ]
    with pytest.raises(ValueError, match="no Python modules"):
        public_api_problems(tmp_path / "missing")
