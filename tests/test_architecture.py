"""The house plan holds (docs/architecture.md): the import contracts in pyproject.toml are kept, and the only
import cycles are the ones the plan lists as not yet removed.

A new upward import (a lower layer importing a higher one), an import of the server from below it, torch in a
shared record, or a new cycle between siblings fails here instead of waiting for a review.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grimp
import pytest
from importlinter import api
from importlinter.application import use_cases

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def _contract(contract_id: str) -> dict[str, Any]:
    options = api.read_configuration(str(PYPROJECT))["contracts_options"]
    return next(c for c in options if c["id"] == contract_id)


def _lint(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[bool, str]:
    kept = use_cases.lint_imports(config_filename=str(config), no_logo=True, cache_dir=None)
    return kept, capsys.readouterr().out


def test_every_import_contract_is_kept(capsys: pytest.CaptureFixture[str]) -> None:
    names = {c["name"] for c in api.read_configuration(str(PYPROJECT))["contracts_options"]}
    assert names >= {
        "kvagent reads top to bottom: each layer imports only the layers below it",
        "Nothing below the server imports it",
        "Shared records are leaves: no torch, no HTTP, nothing above them",
        "No import cycles between siblings, at any depth",
    }
    kept, out = _lint(PYPROJECT, capsys)
    assert kept, out


def test_the_contracts_can_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same layers upside down are broken, and so is the acyclic contract over a package whose siblings
    import each other: the contracts are not ones that cannot fail."""
    layers = _contract("layers")
    upside_down = "\n".join([
        "[tool.importlinter]", 'root_package = "kvagent"',
        "[[tool.importlinter.contracts]]", 'id = "up"', 'name = "upside down"', 'type = "layers"',
        'containers = ["kvagent"]', f"layers = {list(reversed(layers['layers']))!r}",
    ])
    (tmp_path / "pyproject.toml").write_text(upside_down)
    kept, out = _lint(tmp_path / "pyproject.toml", capsys)
    assert not kept and "upside down BROKEN" in out, out
    package = tmp_path / "src" / "cyclic_kv"
    for sub, code in [("", ""), ("a", "from ..b import x\n\ny = x\n"),
                      ("b", "x = 1\n\n\ndef f():\n    from ..a import y\n\n    return y\n")]:
        (package / sub).mkdir(parents=True, exist_ok=True)
        (package / sub / "__init__.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    cycles = "\n".join([
        "[tool.importlinter]", 'root_package = "cyclic_kv"',
        "[[tool.importlinter.contracts]]", 'id = "cycles"', 'name = "cycles"', 'type = "acyclic_siblings"',
        'ancestors = ["cyclic_kv"]',
    ])
    (tmp_path / "cycles.toml").write_text(cycles)
    kept, out = _lint(tmp_path / "cycles.toml", capsys)
    assert not kept and "cycles BROKEN" in out, out


def test_no_import_is_exempt_from_the_contracts() -> None:
    """Nothing is left on the plan's list of imports not yet removed: no upward import (the engines once
    named the runtime for their plug-in context) and no cycle is let through."""
    for contract in api.read_configuration(str(PYPROJECT))["contracts_options"]:
        assert not contract.get("ignore_imports"), (contract["id"], contract.get("ignore_imports"))


def test_the_engines_never_import_the_runtime_or_what_is_above_it() -> None:
    """The engines layer (and everything below it) reaches neither the runtime nor the facades above it, not
    even for a type annotation."""
    graph = grimp.build_graph("kvagent")
    above = {"kvagent.runtime", "kvagent.plugins", "kvagent.agent", "kvagent.chat"}
    for module in sorted(m for m in graph.modules if m.startswith("kvagent.engines")):
        for imported in graph.find_modules_directly_imported_by(module):
            assert not any(imported == a or imported.startswith(a + ".") for a in above), (module, imported)


def test_the_only_module_cycles_are_the_listed_ones() -> None:
    """Module-level strongly connected components, with the imports the acyclic contract ignores removed:
    none left (a cycle inside one package, which the sibling contract does not see, fails here)."""
    acyclic = _contract("acyclic")
    ignored = [s.split(" -> ") for s in acyclic.get("ignore_imports", [])]
    graph = grimp.build_graph("kvagent")
    for importer, imported in ignored:
        assert graph.direct_import_exists(importer=importer, imported=imported), (
            f"{importer} -> {imported} is gone: take it off the ignored imports in pyproject.toml")
        graph.remove_import(importer=importer, imported=imported)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    cycles = [c for c in _strongly_connected(edges) if len(c) > 1]
    assert not cycles, cycles


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == node:
                        break
                out.append(sorted(component))
    return out
