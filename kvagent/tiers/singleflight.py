"""Single flight per key across processes: one reader prefills a missing document, the others wait.

Several agents sharing one cache directory that read the same uncached document would otherwise all
prefill it at once (a "prefill storm"). The first to take the key's file lock computes and stores the
KV; the others block on the lock, then find the artifact in the store. The wait is bounded: past it the
waiter prefills anyway and says so in the log, so a stuck or crashed holder cannot stall readers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from ..kvcache.identity import validate_key

log = logging.getLogger("kvagent.singleflight")


@dataclass
class Flight:
    """What taking the lock involved: whether another process held it, and for how long we waited."""

    waited: bool
    seconds: float
    locked: bool


@contextmanager
def single_flight(lock_dir: Path, key: str, timeout: float) -> Iterator[Flight]:
    """Hold ``key``'s lock for the body; wait at most ``timeout`` seconds for another holder."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_dir / f"{validate_key(key)}.lock"))
    t0 = time.monotonic()
    try:
        lock.acquire(timeout=0)
        flight = Flight(waited=False, seconds=0.0, locked=True)
    except Timeout:
        try:
            lock.acquire(timeout=timeout)
            flight = Flight(waited=True, seconds=time.monotonic() - t0, locked=True)
        except Timeout:
            log.warning(
                "gave up waiting %.0f s for another process computing %s…; computing it here too",
                timeout,
                key[:16],
            )
            flight = Flight(waited=True, seconds=time.monotonic() - t0, locked=False)
    try:
        yield flight
    finally:
        if flight.locked:
            lock.release()
