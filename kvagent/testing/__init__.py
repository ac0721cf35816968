"""Checks for packages built on kvagent (its integrations among them): that they use its public API only.

``public_api_problems(package_dir)`` lists every place in a package's modules that imports a private module
or name of kvagent, a name outside ``kvagent.__all__``, or a deep module path (``kvagent.x.y`` instead of
``kvagent``), or reaches into a private attribute of an object it does not own. An integration's test suite
asserts that the list is empty, so a deep or private import fails its build instead of breaking on the next
release of kvagent.
"""

from __future__ import annotations

import ast
from pathlib import Path

__all__ = ["deep_imports", "private_access", "public_api_problems"]


def private_access(tree: ast.AST, where: str) -> list[str]:
    """Imports of kvagent's private modules or names, names outside ``kvagent.__all__``, and private
    attributes reached on anything but ``self`` / ``cls`` (or through ``getattr``/``setattr``)."""
    import kvagent

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
            # a private attribute is fine only on the package's own objects: self._x / cls._x
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


def deep_imports(tree: ast.AST, where: str) -> list[str]:
    """Imports from a module below ``kvagent`` (every public name is importable from ``kvagent`` itself)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvagent."):
            out.append(f"{where}:{node.lineno}: imports from the deep path {node.module!r}, not from kvagent")
        elif isinstance(node, ast.Import):
            out += [f"{where}:{node.lineno}: imports the deep path {a.name!r}" for a in node.names
                    if a.name.startswith("kvagent.")]
    return out


def public_api_problems(package_dir: Path) -> list[str]:
    """Every private access and deep import in the ``*.py`` modules of ``package_dir`` (a ValueError if it
    holds none: a wrong path must not pass as a clean package)."""
    files = sorted(Path(package_dir).glob("*.py"))
    if not files:
        raise ValueError(f"no Python modules in {package_dir}")
    out = []
    for f in files:
        tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
        out += private_access(tree, f.name) + deep_imports(tree, f.name)
    return out
