"""The persisted calibration file: where it is, atomic writes, a file lock for read-modify-write.

Read without a lock (writes are atomic: temp file + ``os.replace``); changed read-modify-write under a
file lock. A corrupt or foreign file is ignored with a warning and rebuilt on the next write.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .contents import DEFAULT_MAX_AGE_S, CorruptCalibration, clean_until, empty

log = logging.getLogger("kvagent.calibration")

_Sig = tuple[int, int, int]  # a file's (mtime_ns, size, inode)


def default_path(cache_dir: str | os.PathLike[str], path: str | os.PathLike[str] | None = None) -> Path:
    """``path``, else ``KVAGENT_CALIBRATION``, else ``<cache_dir>/calibration.json``."""
    chosen = path or os.environ.get("KVAGENT_CALIBRATION") or Path(cache_dir) / "calibration.json"
    return Path(chosen).expanduser()


class CalibrationFile:
    """The machine's calibration file: atomic writes, a file lock for read-modify-write, a bounded age.

    ``read`` keeps its cleaned contents until the file changes or an entry ages out, so that an estimate on
    a warm read neither parses nor cleans the file (its outcomes alone are 512 rows); what this process
    writes (``update``) it keeps cleaned at once, from the writer's thread.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        lock_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.max_age_s = max_age_s
        self.lock_timeout = lock_timeout
        self.clock = clock
        self._cache: tuple[_Sig, Any] | None = None
        #: (file signature, cleaned at, valid until, contents): what ``read`` returns while it holds
        self._cleaned: tuple[_Sig, float, float, dict[str, Any]] | None = None
        self._warned: set[_Sig] = set()

    def _stat(self) -> _Sig | None:
        """The file's signature (it changes with every write: a write replaces the file), None when absent."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _parse(self) -> tuple[_Sig, Any] | None:
        """The file's signature and JSON (cached by signature), None when absent."""
        sig = self._stat()
        if sig is None:
            return None
        if self._cache is not None and self._cache[0] == sig:
            return self._cache
        try:
            raw: Any = json.loads(self.path.read_bytes())
        except (OSError, ValueError, RecursionError) as exc:
            raw = CorruptCalibration(f"unreadable JSON: {exc}")
        self._cache = (sig, raw)
        return self._cache

    def read(self) -> dict[str, Any]:
        """The current, aged contents; an empty calibration when the file is absent, corrupt or foreign.

        The same dict is returned until the file changes or an entry in it ages out: callers never change it
        (``update`` changes contents of its own)."""
        parsed = self._parse()
        if parsed is None:
            return empty()
        now = self.clock()
        kept = self._cleaned
        if kept is not None and kept[0] == parsed[0] and kept[1] <= now < kept[2]:
            return kept[3]
        found = self._clean(parsed, now)
        if found is None:
            return empty()
        self._cleaned = (parsed[0], now, found[1], found[0])
        return found[0]

    def _clean(self, parsed: tuple[_Sig, Any], now: float) -> tuple[dict[str, Any], float] | None:
        """``clean_until`` of ``parsed``'s contents (new dicts and lists throughout), or None (warned once)
        when it is not a calibration file this version trusts."""
        sig, raw = parsed
        try:
            if isinstance(raw, CorruptCalibration):
                raise raw
            return clean_until(raw, now, self.max_age_s)
        except CorruptCalibration as exc:
            if sig not in self._warned:
                self._warned.add(sig)
                log.warning("ignoring calibration file %s (%s); it will be rebuilt from new measurements",
                            self.path, exc)
            return None

    def update(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Apply ``change`` to the contents under the file lock and write them back atomically.

        What a reader would parse and clean after the write is done here, from the writer's thread (the
        outcomes' background writer, for reads): a warm read after this process's own write finds it done."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path) + ".lock", timeout=self.lock_timeout):
                self._cache = None
                parsed = self._parse()
                found = self._clean(parsed, self.clock()) if parsed is not None else None
                data = found[0] if found is not None else empty()
                change(data)
                data["updated"] = self.clock()
                text = self._write(data)
                sig = self._stat()  # still under the lock: the file is the one just written
                if sig is not None:
                    now, written = self.clock(), (sig, json.loads(text))
                    self._cache = written
                    kept = self._clean(written, now)
                    if kept is not None:
                        self._cleaned = (sig, now, kept[1], kept[0])
                return data
        except (OSError, Timeout) as exc:
            log.warning("could not update calibration file %s (measurements of this process are lost): %s",
                        self.path, exc)
            data = copy.deepcopy(self.read())
            change(data)
            return data

    def _write(self, data: dict[str, Any]) -> str:
        """Write ``data`` atomically; returns the JSON written."""
        text = json.dumps(data, separators=(",", ":"))  # no fsync: losing a sample to a crash is harmless
        fd, tmp = tempfile.mkstemp(prefix=".calibration-", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return text
