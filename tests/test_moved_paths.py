"""Every old deep import path of the re-plan still imports, warns once, and is the new module object."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import warnings

import pytest

import kvagent
from kvagent import _moved


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_old_path_is_the_new_module_and_warns(old: str) -> None:
    new = _moved.MOVED[old]
    module = importlib.import_module(new)
    saved = sys.modules.pop(old, None)
    try:
        with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
            aliased = importlib.import_module(old)
        assert aliased is module
        assert module.__name__ == new and module.__spec__ is not None and module.__spec__.name == new
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert importlib.import_module(old) is module  # once: a second import is silent
    finally:
        if saved is not None:
            sys.modules[old] = saved


def test_no_file_is_left_at_an_old_path() -> None:
    root = importlib.import_module("kvagent").__path__[0]
    for old in _moved.MOVED:
        rel = old.split(".")[1:]
        base = "/".join([root, *rel])
        assert importlib.util.find_spec(_moved.MOVED[old]) is not None
        assert not os.path.exists(base + ".py") and not os.path.exists(base + "/__init__.py"), old


def test_monkeypatch_through_either_name_changes_one_module(monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = next(iter(sorted(_moved.MOVED.items())))
    with pytest.warns(DeprecationWarning):
        sys.modules.pop(old, None)
        aliased = importlib.import_module(old)
    monkeypatch.setattr(aliased, "_replan_probe", 1, raising=False)
    assert importlib.import_module(new)._replan_probe == 1


def test_submodules_of_a_moved_package_are_not_loaded_twice() -> None:
    olds = "; ".join(f"import {old}" for old in sorted(_moved.MOVED))
    code = f"""
import sys, warnings
warnings.simplefilter("ignore")
import kvagent
{olds}
mods = {{id(m): m for m in list(sys.modules.values()) if m.__name__.startswith("kvagent")}}.values()
files = [m.__file__ for m in mods if getattr(m, "__file__", None)]
assert len(files) == len(set(files)), sorted(f for f in files if files.count(f) > 1)
"""
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(("package", "name"), sorted(
    (p, n) for p, names in _moved.MOVED_NAMES.items() for n in names))
def test_names_moved_out_of_a_package_are_still_there(package: str, name: str) -> None:
    home = _moved.MOVED_NAMES[package][name]
    with pytest.warns(DeprecationWarning, match=f"{package}.{name} moved to {home}"):
        value = getattr(importlib.import_module(package), name)
    assert value is getattr(importlib.import_module(home), name)


def test_old_module_as_an_attribute_of_its_package() -> None:
    old = next(o for o in sorted(_moved.MOVED) if o.count(".") == 1)
    sys.modules.pop(old, None)
    vars(kvagent).pop(old.split(".")[1], None)
    with pytest.warns(DeprecationWarning):
        assert getattr(kvagent, old.split(".")[1]) is importlib.import_module(_moved.MOVED[old])


def test_an_unknown_attribute_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        kvagent.no_such_name  # noqa: B018
