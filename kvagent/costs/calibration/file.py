"""The persisted calibration file: where it is, atomic writes, a file lock for read-modify-write.

Read without a lock (writes are atomic: temp file + ``os.replace``); changed read-modify-write under a
file lock. A corrupt or foreign file is ignored with a warning and rebuilt on the next write.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .contents import DEFAULT_MAX_AGE_S, CorruptCalibration, clean, empty

log = logging.getLogger("kvagent.calibration")


def default_path(cache_dir: str | os.PathLike[str], path: str | os.PathLike[str] | None = None) -> Path:
    """``path``, else ``KVAGENT_CALIBRATION``, else ``<cache_dir>/calibration.json``."""
    chosen = path or os.environ.get("KVAGENT_CALIBRATION") or Path(cache_dir) / "calibration.json"
    return Path(chosen).expanduser()


class CalibrationFile:
    """The machine's calibration file: atomic writes, a file lock for read-modify-write, a bounded age."""

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
        self._cache: tuple[tuple[int, int, int], Any] | None = None
        self._warned: set[tuple[int, int, int]] = set()

    def _parse(self) -> Any:
        """The file's JSON (cached by stat), None when absent."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._cache is not None and self._cache[0] == sig:
            return self._cache[1]
        try:
            raw: Any = json.loads(self.path.read_bytes())
        except (OSError, ValueError, RecursionError) as exc:
            raw = CorruptCalibration(f"unreadable JSON: {exc}")
        self._cache = (sig, raw)
        return raw

    def read(self) -> dict[str, Any]:
        """The current, aged contents; an empty calibration when the file is absent, corrupt or foreign."""
        raw = self._parse()
        if raw is None:
            return empty()
        try:
            if isinstance(raw, CorruptCalibration):
                raise raw
            return clean(raw, self.clock(), self.max_age_s)
        except CorruptCalibration as exc:
            sig = self._cache[0] if self._cache else (0, 0, 0)
            if sig not in self._warned:
                self._warned.add(sig)
                log.warning("ignoring calibration file %s (%s); it will be rebuilt from new measurements",
                            self.path, exc)
            return empty()

    def update(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Apply ``change`` to the contents under the file lock and write them back atomically."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path) + ".lock", timeout=self.lock_timeout):
                self._cache = None
                data = self.read()
                change(data)
                data["updated"] = self.clock()
                self._write(data)
                return data
        except (OSError, Timeout) as exc:
            log.warning("could not update calibration file %s (measurements of this process are lost): %s",
                        self.path, exc)
            data = self.read()
            change(data)
            return data

    def _write(self, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".calibration-", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, separators=(",", ":"))  # no fsync: losing a sample to a crash is harmless
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
