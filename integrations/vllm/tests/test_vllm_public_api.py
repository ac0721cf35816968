"""The vLLM integration uses kvagent's public API only: no private module, name or attribute of kvagent, and
no deep module path (every name comes from ``kvagent`` itself, in ``kvagent.__all__``)."""

from __future__ import annotations

import ast
from pathlib import Path

import kvagent

# the same guard as integrations/langchain/tests/test_public_api.py, over this package
PACKAGE = Path(__file__).resolve().parents[1] / "vllm_kvagent"


def _violations(tree: ast.AST, where: str) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kvagent":
            if any(part.startswith("_") for part in node.module.split(".")):
                out.append(f"{where}:{node.lineno}: imports from the private module {node.module!r}")
            out += [f"{where}:{node.lineno}: imports {a.name!r}, not in kvagent.__all__"
                    for a in node.names if node.module == "kvagent" and a.name not in kvagent.__all__]
            out += [f"{where}:{node.lineno}: imports the private name {a.name!r}" for a in node.names
                    if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            out += [f"{where}:{node.lineno}: imports {a.name!r}" for a in node.names
                    if a.name.startswith("kvagent.") and any(p.startswith("_") for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            # a private attribute is fine only on the integration's own objects: self._x / cls._x
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                out.append(f"{where}:{node.lineno}: reaches into private attribute {node.attr!r}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and str(node.args[1].value).startswith("_")
        ):
            out.append(f"{where}:{node.lineno}: {node.func.id}() of private attribute {node.args[1].value!r}")
    return out


def _deep_imports(tree: ast.AST, where: str) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvagent."):
            out.append(f"{where}:{node.lineno}: imports from the deep path {node.module!r}, not from kvagent")
        elif isinstance(node, ast.Import):
            out += [f"{where}:{node.lineno}: imports the deep path {a.name!r}" for a in node.names
                    if a.name.startswith("kvagent.")]
    return out


def test_integration_touches_no_private_name_of_kvagent() -> None:
    files = sorted(PACKAGE.glob("*.py"))
    assert files, PACKAGE
    problems = [v for f in files for v in _violations(ast.parse(f.read_text(), str(f)), f.name)]
    assert not problems, "\n".join(problems)


def test_the_check_catches_private_access() -> None:
    bad = ast.parse(
        "from kvagent._internal import KVAgent\nfrom kvagent import Nope\nimport kvagent._store\n"
        "agent._memory.clear()\nself.kv_agent._lock\ngetattr(agent, '_save')\nfrom kvagent.tools import _p\n"
    )
    assert len(_violations(bad, "bad.py")) == 7
    assert not _violations(
        ast.parse("from kvagent import KVAgent\nself._runner()\nagent.resolver.resolve([1])\n"), "ok"
    )


def test_integration_imports_nothing_from_deep_paths() -> None:
    files = sorted(PACKAGE.glob("*.py"))
    problems = [v for f in files for v in _deep_imports(ast.parse(f.read_text(), str(f)), f.name)]
    assert not problems, "\n".join(problems)


def test_the_check_catches_deep_imports() -> None:
    bad = ast.parse("from kvagent.chat.tools import ToolCall\nimport kvagent.config\n"
                    "def f():\n    from kvagent.client.registry import RegistryClient\n")
    assert len(_deep_imports(bad, "bad.py")) == 3
    assert not _deep_imports(ast.parse("from kvagent import ToolCall\nimport kvagent\n"), "ok")
