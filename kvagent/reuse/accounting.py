"""What a resolver's reads did and cost: its counters, and its predictions checked against real costs.

``ReadCounters`` counts hits, prefills, publishes and failures (thread-safe). ``ReadCosts`` feeds the
cost model (``kvagent.costs.calibration``) from real reads: local loads, prefills and chat continuations, each
in
the background so that a read never waits for a file write, and records each read's outcome against what
the model predicted for its path (``kvagent.costs.stages``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ..costs import policy as pol
from ..costs import stages as stg

if TYPE_CHECKING:
    from ..costs.calibration import CostModel
    from ..tiers.registry import RegistryTier
    from .info import CacheInfo

COUNTERS = (
    "memory_hits", "local_hits", "prefix_hits", "prefills", "tokens_saved", "remote_hits", "remote_generates",
    "publishes", "registry_failures", "poisoned",
)
LOAD_RECORD_INTERVAL_S = 30.0  # local loads are calibrated at most this often per process
MIN_RATE_TOKENS = 32  # a prefill shorter than this says little about the rate
FETCH_ONLY = "fetch-only"  # the outcome path of a fetch whose uncovered tail the caller's engine ran


class ReadCounters(dict[str, int]):
    """The resolver's counters by name (a plain dict to read), added to under a lock."""

    def __init__(self) -> None:
        super().__init__(dict.fromkeys(COUNTERS, 0))
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self[name] += n


class ReadCosts:
    """Predictions checked against costs for one resolver (``cost`` None: nothing is recorded)."""

    def __init__(self, cost: CostModel | None, tier: RegistryTier) -> None:
        self.cost = cost
        self.tier = tier  # whether reads are predicted, and the prefill rate measured in this process
        self._load_recorded = -1e9

    def predicts(self) -> bool:
        """Whether reads are checked against the cost model: it is calibrated and no rate is fixed by hand."""
        return self.tier.predicts()

    def local_load(self, nbytes: int, seconds: float) -> None:
        """A local-store hit read ``nbytes`` in ``seconds``: calibrate loads (at most every 30 s, in the
        background: a warm read must not pay a file write)."""
        if self.cost is not None and time.monotonic() - self._load_recorded > LOAD_RECORD_INTERVAL_S:
            self._load_recorded = time.monotonic()
            threading.Thread(target=self.cost.record_load, args=(nbytes, seconds),
                             daemon=True, name="kvagent-calibrate").start()

    def predict_prefill(self, n_new: int, past: int) -> None:
        """Note the prefill this read is about to run and its predicted seconds (unless a decision already
        did)."""
        clock = stg.current()
        if clock is None or not self.predicts():
            return
        assert self.cost is not None
        p = clock.prediction
        path = "prefix-prefill" if past else "local-prefill"
        if p is not None and p.path == path and (p.n_tokens, p.past) == (n_new, past):
            clock.prediction = replace(p, at=time.perf_counter())
            return
        clock.prediction = None
        stg.predict(path, self.cost.estimate_prefill(n_new, past).value, n_new, past)

    def record_prefill(self, n_new: int, past: int, seconds: float) -> None:
        """A read prefilled ``n_new`` tokens after ``past`` in ``seconds``: the rate and a cost sample."""
        if n_new >= MIN_RATE_TOKENS and seconds > 0:
            self.tier.prefill_tokens_per_s = n_new / seconds
            if self.cost is not None:
                self.cost.record_prefill(n_new, past, seconds)

    def record_continuation(self, forwards: Sequence[tuple[int, int, float]]) -> None:
        """See ``Resolver.record_continuation``."""
        forwards = [(int(n), int(past), float(s)) for n, past, s in forwards if n > 0 and s > 0]
        if not forwards:
            return
        n_new = sum(f[0] for f in forwards)
        past, seconds = forwards[0][1], sum(f[2] for f in forwards)
        if not past and n_new >= MIN_RATE_TOKENS:  # a whole prompt: the rate a resolver prefill would measure
            self.tier.prefill_tokens_per_s = n_new / seconds
        cost = self.cost
        if cost is None:
            return
        from ..costs.calibration import Outcome

        checked = self.predicts()
        path = "tail" if past else pol.LOCAL_PREFILL

        def record() -> None:
            if checked:  # predicted before the samples join the fit, forward by forward as they ran
                predicted = sum(cost.estimate_prefill(n, p).value for n, p, _ in forwards)
                cost.record_outcome(Outcome("chat", path, predicted, seconds, n_new, past))
            for n, p, s in forwards:
                cost.record_prefill(n, p, s)

        threading.Thread(target=record, daemon=True, name="kvagent-calibrate").start()

    def account(self, info: CacheInfo, clock: stg.StageClock, document: bool, finished: bool) -> CacheInfo:
        """``info`` with the read's stages and prediction attached; records the outcome. ``finished``: the
        read computed all its ids itself (no tail left to the caller, no remote generation); when it left a
        tail to the caller after a fetch, the fetch is checked without the tail's prefill (path
        ``fetch-only``)."""
        predicted, actual, path = 0.0, 0.0, ""
        p = clock.prediction
        if info.status == "local" and self.cost is not None and self.predicts():
            est = self.cost.estimate_load(info.bytes_read)
            predicted, actual, path = (est.value if est else 0.0), info.load_seconds, pol.LOCAL_HIT
        elif p is not None and p.done is not None and finished:
            predicted, actual, path = p.seconds, p.done - p.at, p.path
        elif p is not None and p.done is not None and p.path == pol.FETCH and info.status == "remote":
            predicted, actual, path = p.seconds - p.rest, p.done - p.at, FETCH_ONLY
        info = replace(info, stages=clock.breakdown(), predicted_seconds=predicted)
        if self.cost is not None and predicted > 0 and actual > 0:
            from ..costs.calibration import Outcome

            n = p.n_tokens if p is not None and path != pol.LOCAL_HIT else info.cached_tokens
            past = p.past if p is not None and path != pol.LOCAL_HIT else 0
            self.cost.record_outcome(
                Outcome("read" if document else "prompt", path, predicted, actual, n, past)
            )
        return info
