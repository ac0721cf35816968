"""Predictions checked against what they cost: ``Outcome`` records, their errors, and the log that keeps them.

``OutcomeLog`` tells its observers of every outcome at once and writes them to the calibration file from a
background writer (batched, at most one write per ``OUTCOME_FLUSH_S``), so a warm read never waits for a
file write.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .contents import MAX_OUTCOMES, OUTCOME_KINDS

if TYPE_CHECKING:
    from .file import CalibrationFile

log = logging.getLogger("kvagent.calibration")

OUTCOME_FLUSH_S = 1.0  # outcomes are written to the file at most this often (in the background)


@dataclass(frozen=True)
class Outcome:
    """One read, prompt or chat: the path it took, what the model predicted for it and what it cost."""

    kind: str  # "read" | "prompt" | "chat"
    path: str  # "local-hit" | "fetch-and-resume" | "local-prefill" | "prefix-prefill" | "tail"
    predicted_s: float
    actual_s: float
    n_tokens: int = 0  # tokens the path computed or loaded
    past: int = 0  # tokens already cached before them

    @property
    def ratio(self) -> float:
        """Actual over predicted seconds (1.0: exact; 2.0: twice as slow as predicted)."""
        return self.actual_s / self.predicted_s


#: percentiles of actual/predicted that ``describe_ratios`` reports
PERCENTILES = (5, 10, 25, 50, 75, 90, 95)


def describe_ratios(ratios: Sequence[float]) -> dict[str, Any]:
    """The distribution of actual/predicted ratios: count, share within 2x (and slower / faster than that),
    nearest-rank percentiles (``p05_ratio`` ... ``p95_ratio``, ``median_ratio``) and the worst (furthest from
    1 in either direction)."""
    if not ratios:
        return {"count": 0}
    q = sorted(ratios)
    pick = lambda f: q[min(len(q) - 1, int(f * len(q)))]  # noqa: E731
    out: dict[str, Any] = {
        "count": len(q), "within_2x": sum(1 for r in q if 0.5 <= r <= 2.0) / len(q),
        "slower_than_2x": sum(1 for r in q if r > 2.0) / len(q),
        "faster_than_2x": sum(1 for r in q if r < 0.5) / len(q),
        "median_ratio": statistics.median(q),
    }
    out.update({f"p{p:02d}_ratio": pick(p / 100) for p in PERCENTILES if p != 50})
    out["worst_ratio"] = max(q, key=lambda r: abs(math.log(r)))
    return out


def prediction_errors(outcomes: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """The distribution of actual/predicted over stored outcome rows (``describe_ratios``): overall, per path
    and per ``kind/path``."""
    rows = [o for o in outcomes if o[5] > 0 and o[6] > 0]
    out = describe_ratios([o[6] / o[5] for o in rows])
    out["by_path"] = {path: describe_ratios([o[6] / o[5] for o in rows if o[2] == path])
                      for path in sorted({o[2] for o in rows})}
    out["by_kind_path"] = {kp: describe_ratios([o[6] / o[5] for o in rows if f"{o[1]}/{o[2]}" == kp])
                           for kp in sorted({f"{o[1]}/{o[2]}" for o in rows})}
    return out


class OutcomeLog:
    """One cost model's outcomes: observers hear of each at once, the file gets them in the background."""

    def __init__(self, calibration: CalibrationFile) -> None:
        self.calibration = calibration
        #: called with every ``Outcome`` as it is recorded (the server feeds its Prometheus histogram)
        self.observers: list[Callable[[Outcome], None]] = []
        self._outcomes: list[list[Any]] = []
        self._outcome_lock = threading.Lock()
        self._writer: threading.Thread | None = None

    def record(self, outcome: Outcome) -> None:
        """Tell the observers of ``outcome`` and queue it for the file (see ``CostModel.record_outcome``)."""
        if not (outcome.predicted_s > 0 and outcome.actual_s > 0 and outcome.kind in OUTCOME_KINDS):
            return
        for observe in list(self.observers):
            try:
                observe(outcome)
            except Exception:  # an observer (metrics) never fails a read
                log.exception("an outcome observer failed")
        row = [self.calibration.clock(), outcome.kind, outcome.path, outcome.n_tokens, outcome.past,
               outcome.predicted_s, outcome.actual_s]
        with self._outcome_lock:
            self._outcomes.append(row)
            del self._outcomes[:-MAX_OUTCOMES]
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_outcomes, daemon=True, name="kvagent-outcomes"
                )
                self._writer.start()

    def _write_outcomes(self) -> None:
        while True:
            time.sleep(OUTCOME_FLUSH_S)
            self.flush()
            with self._outcome_lock:
                if not self._outcomes:
                    self._writer = None
                    return

    def flush(self) -> None:
        """Write the outcomes recorded so far to the calibration file."""
        with self._outcome_lock:
            rows, self._outcomes = self._outcomes, []
        if rows:
            def change(data: dict[str, Any]) -> None:
                data["outcomes"] = (data["outcomes"] + rows)[-MAX_OUTCOMES:]

            self.calibration.update(change)
