"""A circuit breaker per registry URL: pure state transitions, no I/O, wall-clock times passed in.

closed ──failure──▶ open (skip the registry until ``open_until``; the back-off doubles per failure)
open ──back-off over──▶ half-open: one process claims the probe (one attempt), the others keep skipping
half-open ──success──▶ closed; ──failure──▶ open with a longer back-off

The state lives in the calibration file (``kvagent.calibration``), shared by the machine's processes,
so times are wall-clock seconds; ``sanitize`` bounds them when the clock went backwards.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class BreakerPolicy:
    """Back-off after ``n`` consecutive failures: ``min(max_s, base_s * factor ** (n - 1))``."""

    base_s: float = 10.0
    factor: float = 2.0
    max_s: float = 600.0
    probe_s: float = 30.0  # how long a claimed probe keeps other processes out

    def backoff(self, failures: int) -> float:
        return min(self.max_s, self.base_s * self.factor ** max(0, failures - 1))


@dataclass(frozen=True)
class BreakerState:
    failing_since: float
    failures: int
    open_until: float
    probe_until: float = 0.0  # a probe was claimed and runs until then
    last_error: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> BreakerState:
        """Parse a stored state; raises ValueError on anything malformed."""
        if not isinstance(obj, dict):
            raise ValueError("breaker state must be an object")
        try:
            state = cls(
                failing_since=float(obj["failing_since"]), failures=int(obj["failures"]),
                open_until=float(obj["open_until"]), probe_until=float(obj.get("probe_until", 0.0)),
                last_error=str(obj.get("last_error", ""))[:300],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed breaker state: {exc}") from exc
        if state.failures < 1:
            raise ValueError("breaker state without failures")
        return state


@dataclass(frozen=True)
class Verdict:
    allow: bool  # make the request
    probe: bool  # it is the half-open probe (the caller should claim it and keep it short)
    reason: str | None  # why the registry is skipped (None when allowed)


def on_failure(state: BreakerState | None, now: float, policy: BreakerPolicy, error: str = "") -> BreakerState:
    failures = 1 if state is None else state.failures + 1
    since = now if state is None else state.failing_since
    return BreakerState(since, failures, now + policy.backoff(failures), 0.0, error[:300])


def verdict(state: BreakerState | None, now: float) -> Verdict:
    """Whether a request may go to the registry now."""
    if state is None:
        return Verdict(True, False, None)
    head = skipped(state)
    if now < state.open_until:
        return Verdict(False, False, f"{head}, next probe in {state.open_until - now:.0f} s)")
    if now < state.probe_until:
        return Verdict(False, False, f"{head}, another process is probing it)")
    return Verdict(True, True, None)


def skipped(state: BreakerState) -> str:
    """The start of the reason a read gives for skipping the registry: "registry skipped: failing since … (n failures"."""
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(state.failing_since))
    return f"registry skipped: failing since {since} ({state.failures} failure{'s' * (state.failures > 1)}"


def claim_probe(state: BreakerState, now: float, policy: BreakerPolicy) -> BreakerState:
    return replace(state, probe_until=now + policy.probe_s)


def sanitize(state: BreakerState, now: float, policy: BreakerPolicy) -> BreakerState:
    """Bound times a backwards clock would push into the future (else a registry could stay skipped)."""
    return replace(
        state,
        failing_since=min(state.failing_since, now),
        open_until=min(state.open_until, now + policy.backoff(state.failures)),
        probe_until=min(state.probe_until, now + policy.probe_s),
    )
