"""A circuit breaker per registry URL: pure state transitions (wall-clock times passed in), and
``RegistryBreaker``, which runs them over the calibration file and sends the half-open probe.

closed ──failure──▶ open (skip the registry until ``open_until``; the back-off doubles per failure)
open ──back-off over──▶ half-open: one process claims the probe (one attempt), the others keep skipping
half-open ──success──▶ closed; ──failure──▶ open with a longer back-off

The state lives in the calibration file (``kvagent.costs.calibration``), shared by the machine's processes,
so times are wall-clock seconds; ``sanitize`` bounds them when the clock went backwards.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol, TypeVar

from ..errors import RegistryError, RegistrySkippedError, RegistryUnavailableError

T = TypeVar("T")
log = logging.getLogger("kvagent.calibration")  # the calibration file's logger, as before the breaker moved

PROBE_LOOKUP_DEADLINE_S = 1.0  # a half-open breaker's probe waits at most this long
PROBE_WAIT_S = 0.25  # ...and the read that sent it at most this long: the probe goes on without it


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


def on_failure(
    state: BreakerState | None, now: float, policy: BreakerPolicy, error: str = ""
) -> BreakerState:
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
    """The start of the reason a read gives for skipping the registry: "registry skipped: failing since … (n
    failures"."""
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


class _Calibration(Protocol):
    """What the breaker reads and writes of the calibration file (``calibration.file.CalibrationFile``)."""

    @property
    def clock(self) -> Callable[[], float]: ...

    def read(self) -> dict[str, Any]: ...

    def update(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]: ...


class _Costs(Protocol):
    """What the breaker asks of the cost model (``calibration.CostModel``, which builds it): named here so
    that the breaker imports nothing of the calibration, which imports the breaker."""

    @property
    def calibration(self) -> _Calibration: ...

    @property
    def breaker(self) -> BreakerPolicy: ...

    def lookup_deadline(self, n_tokens: int, url: str | None = None) -> float: ...

    def record_lookup(self, url: str, seconds: float, ok: bool, error: str = "") -> None: ...


class RegistryBreaker:
    """Runs the breaker of each registry URL over ``cost``'s calibration file (shared by the machine's
    processes): skips a failing registry, lets one process probe it after the back-off, and bounds the
    probe so a read never waits on a stalled registry for longer than ``PROBE_WAIT_S``."""

    def __init__(self, cost: _Costs) -> None:
        self.cost = cost
        self._probing: set[str] = set()  # URLs whose half-open probe this process claimed

    def probing(self, url: str) -> bool:
        return url.rstrip("/") in self._probing

    def done_probing(self, url: str) -> None:
        self._probing.discard(url.rstrip("/"))

    def record_failure(self, url: str, error: str = "") -> None:
        """The registry at ``url`` failed (unreachable, timed out, 5xx): open or extend its breaker."""
        url = url.rstrip("/")
        now = self.cost.calibration.clock()
        self.done_probing(url)

        def change(data: dict[str, Any]) -> None:
            raw = data["breakers"].get(url)
            state = sanitize(BreakerState.from_json(raw), now, self.cost.breaker) if raw else None
            data["breakers"][url] = on_failure(state, now, self.cost.breaker, error).to_json()

        data = self.cost.calibration.update(change)
        skip = float(data["breakers"][url]["open_until"]) - now
        log.warning("registry %s failed (%s); skipping it for %.0f s", url, error or "error", skip)

    def skip_reason(self, url: str) -> str | None:
        """Why ``url`` must be skipped now ("registry skipped: failing since …"), or None to go ahead.

        After the back-off, the first process to ask claims the one probe; the others keep skipping.
        """
        url = url.rstrip("/")
        now = self.cost.calibration.clock()
        raw = self.cost.calibration.read()["breakers"].get(url)
        stored = BreakerState.from_json(raw) if raw else None
        state = sanitize(stored, now, self.cost.breaker) if stored else None
        first = verdict(state, now)
        if state == stored and (not first.allow or not first.probe):
            return first.reason
        outcome: list[str | None] = [None]

        def claim(data: dict[str, Any]) -> None:  # also persists times a backwards clock had to bound
            raw_now = data["breakers"].get(url)
            if raw_now is None:
                return  # closed meanwhile
            current = sanitize(BreakerState.from_json(raw_now), now, self.cost.breaker)
            v = verdict(current, now)
            if v.allow:
                current = claim_probe(current, now, self.cost.breaker)
            else:
                outcome[0] = v.reason
            data["breakers"][url] = current.to_json()

        self.cost.calibration.update(claim)
        if outcome[0] is None:
            self._probing.add(url)
        return outcome[0]

    def guarded(self, url: str, n_tokens: int, call: Callable[[float], T]) -> T:
        """Run ``call(deadline_s)`` (the registry metadata requests for ``n_tokens``) under ``url``'s breaker.

        Raises RegistrySkippedError (with "registry skipped: failing since …") while the breaker is open.
        A RegistryUnavailableError (unreachable, timed out, 5xx) opens or extends it and is re-raised; any
        answer (a 404, even a 401) counts as the registry working and measures its round trip. The half-open
        probe is waited for at most ``PROBE_WAIT_S``; past that it is skipped like an open breaker, while the
        probe finishes in the background and closes or re-opens the breaker for the next reads.
        """
        why = self.skip_reason(url)
        if why is not None:
            raise RegistrySkippedError(why)
        deadline = self.cost.lookup_deadline(n_tokens, url)
        if url.rstrip("/") not in self._probing:
            return self._timed(url, call, deadline)
        # the half-open probe: it runs aside and the read waits for it only briefly, so a registry that still
        # stalls costs this read PROBE_WAIT_S, not the probe's deadline; a recovered one answers well within
        # it
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def probe() -> None:
            try:
                outcome["result"] = self._timed(url, call, deadline)
            except BaseException as exc:  # handed to the read if it still waits; recorded by _timed
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=probe, daemon=True, name="kvagent-registry-probe").start()
        if not done.wait(PROBE_WAIT_S):
            raw = self.cost.calibration.read()["breakers"].get(url.rstrip("/"))
            head = skipped(BreakerState.from_json(raw)) if raw else "registry skipped: failing"
            raise RegistrySkippedError(
                f"{head}; its probe got no answer in {PROBE_WAIT_S:g} s and goes on in the background)"
            )
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]  # type: ignore[no-any-return]

    def _timed(self, url: str, call: Callable[[float], T], deadline: float) -> T:
        """``call(deadline)``, its round trip recorded; an unavailable registry opens or extends its
        breaker."""
        t0 = time.perf_counter()
        try:
            result = call(deadline)
        except RegistryUnavailableError as exc:
            self.cost.record_lookup(
                url, time.perf_counter() - t0, ok=False, error=f"{type(exc).__name__}: {exc}"
            )
            raise RegistryUnavailableError(f"{exc} (lookup deadline {deadline:.2f} s)") from exc
        except RegistryError:
            self.cost.record_lookup(url, time.perf_counter() - t0, ok=True)
            raise
        self.cost.record_lookup(url, time.perf_counter() - t0, ok=True)
        return result
