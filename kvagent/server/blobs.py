"""The blob directory: uploads stream into ``tmp/``, are fsynced, then renamed into ``<key[:2]>/``.

Each published file gets a fresh name (``<key>-<nonce>``) recorded in the metadata row, so a rename
never replaces bytes that a committed row points to. Files that no row references (a crash between
rename and commit, or a lost race) are removed by :meth:`BlobDir.reconcile` at startup.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("kvagent.server")

TMP_SUFFIX = ".part"


class BlobDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def new_temp(self) -> Path:
        return self.tmp / f"{secrets.token_hex(12)}{TMP_SUFFIX}"

    def path(self, name: str) -> Path:
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad blob name {name!r}")
        return self.root / name[:2] / name

    def publish(self, temp: Path, key: str) -> str:
        """fsync ``temp`` and atomically rename it into place; returns the blob name."""
        name = f"{key}-{secrets.token_hex(8)}"
        dest = self.path(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, dest)
        _fsync_dir(dest.parent)
        return name

    def remove(self, name: str) -> None:
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            pass

    def clean_temp(self) -> int:
        """Delete every temp file (none can be live at startup); returns how many."""
        n = 0
        for p in self.tmp.iterdir():
            p.unlink(missing_ok=True)
            n += 1
        return n

    def reconcile(self, referenced: Iterable[str]) -> int:
        """Delete published files that no metadata row references; returns how many."""
        keep = set(referenced)
        n = 0
        for sub in self.root.iterdir():
            if not sub.is_dir() or sub == self.tmp:
                continue
            for p in sub.iterdir():
                if p.name not in keep:
                    p.unlink(missing_ok=True)
                    n += 1
        if n:
            log.info("removed %d unreferenced blob(s)", n)
        return n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
