"""Where a read's seconds go: a per-thread stage clock that the resolver fills (``CacheInfo.stages``).

``measuring()`` starts a clock for the read running on this thread; ``stage(name)`` times a block into it (a
no-op when no read is being measured, e.g. a deferred save on another thread); ``predict(...)`` notes what the
cost model expected the chosen path to cost, and when it chose it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace

#: the stages of a read, in the order they happen
STAGES = ("lookup", "wait", "probe", "download", "verification", "store_write", "resume")


@dataclass(frozen=True)
class Prediction:
    """What the cost model expected the chosen path to cost."""

    path: str  # "fetch-and-resume" | "local-prefill" | "prefix-prefill"
    seconds: float
    n_tokens: int
    past: int
    at: float  # perf_counter() when the path was chosen: its actual cost runs from here...
    done: float | None = None  # ...to here, when the KV is complete (before it is saved for later reads)
    #: of ``seconds``, the prefill of the tokens the path leaves after what it reuses (a fetch's uncovered
    # rest): when the read leaves them to the caller's engine, the rest of the prediction is checked alone
    rest: float = 0.0


class StageClock:
    """Seconds per stage of one read."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.prediction: Prediction | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        if seconds > 0:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def breakdown(self) -> dict[str, float]:
        """The stages that took time, in ``STAGES`` order (others after them)."""
        order = {s: i for i, s in enumerate(STAGES)}
        return dict(sorted(self.seconds.items(), key=lambda kv: order.get(kv[0], len(order))))


_local = threading.local()


@contextmanager
def measuring() -> Iterator[StageClock]:
    """A clock for the read on this thread (the previous one, if any, comes back afterwards)."""
    clock, previous = StageClock(), getattr(_local, "clock", None)
    _local.clock = clock
    try:
        yield clock
    finally:
        _local.clock = previous


def current() -> StageClock | None:
    return getattr(_local, "clock", None)


def stage(name: str) -> AbstractContextManager[None]:
    """Time a block into the current read's ``name`` stage (nothing when no read is measured)."""
    clock = current()
    return clock.stage(name) if clock is not None else nullcontext()


def add(name: str, seconds: float) -> None:
    clock = current()
    if clock is not None:
        clock.add(name, seconds)


def predict(path: str, seconds: float, n_tokens: int, past: int, rest: float = 0.0) -> None:
    """Note the path the current read takes (from now on) and its predicted seconds (replacing an earlier
    one); ``rest``: the part of them that prefills what the path leaves uncovered."""
    clock = current()
    if clock is not None:
        clock.prediction = Prediction(path, seconds, n_tokens, past, time.perf_counter(), rest=rest)


def path_done() -> None:
    """The current read's KV is complete: its path's actual cost ends here."""
    clock = current()
    if clock is not None and clock.prediction is not None and clock.prediction.done is None:
        clock.prediction = replace(clock.prediction, done=time.perf_counter())
