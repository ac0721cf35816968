"""``Refits``: the prefill fit of a stream of samples, refitted only when the samples have moved enough.

A host records a sample per forward and asks for an estimate per request; a fit of 64 samples costs about
0.3 s of pure-Python CPU (``fit_model``'s robust subsets), which every request paid while holding the GIL the
engine needs. A fit of fewer than ``CHEAP_SAMPLES`` samples (milliseconds) is redone on every change, so a
machine's first reads learn at once. A larger one is reused while fewer than a quarter of its samples changed
(new to it, or aged out since) and it is younger than ``REFIT_AFTER_S``, and in any case until
``CPU_SHARE`` of the time since it was made would pay for the next (at most ~5% of a core on refits).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .fitting import Fit, prefill_fit

REFIT_AFTER_S = 10.0
CHEAP_SAMPLES = 16
CPU_SHARE = 0.05


class Refits:
    """Thread-safe: one refit at a time; meanwhile, other threads take the previous fit."""

    def __init__(self, fit: Callable[[Sequence[Sequence[Any]]], Fit | None] = prefill_fit,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fit = fit
        self._clock = clock
        self._lock = threading.Lock()
        # stream -> (the samples fitted, the fit, when it was made, what it cost)
        self._last: dict[str, tuple[frozenset[tuple[Any, ...]], Fit | None, float, float]] = {}

    def fit(self, stream: str, samples: Sequence[Sequence[Any]]) -> Fit | None:
        """The fit of ``samples`` (``stream`` names whose they are), or a recent fit of most of them."""
        key = tuple(tuple(s) for s in samples)
        now = frozenset(key)
        last = self._last.get(stream)
        if last is not None:
            fitted, fit, at, cost = last
            changed = len(now ^ fitted)
            if changed == 0:
                return fit
            if len(fitted) >= CHEAP_SAMPLES and key:
                age = self._clock() - at
                if age * CPU_SHARE < cost or (4 * changed < len(key) and age < REFIT_AFTER_S):
                    return fit
            if not self._lock.acquire(blocking=False):  # another thread is refitting: this one is recent
                return fit
        else:
            self._lock.acquire()
        try:
            t0 = self._clock()
            fit = self._fit(key)
            t1 = self._clock()
            self._last[stream] = (now, fit, t1, t1 - t0)
            return fit
        finally:
            self._lock.release()
