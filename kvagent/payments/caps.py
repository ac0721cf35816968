"""A buyer's spend caps: the most it pays for one load, and a budget for all of them (thread-safe)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass
class SpendCaps:
    """``max_price_per_load`` and ``budget`` in token units (= micro-units); ``None`` means no cap/budget."""

    max_price_per_load: int | None = None
    budget: int | None = None
    spent: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        for what, v in (("max_price_per_load", self.max_price_per_load), ("budget", self.budget)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ConfigError(f"{what} must be a non-negative integer of micro-units, got {v!r}")

    def remaining(self) -> int | None:
        with self._lock:
            return None if self.budget is None else self.budget - self.spent

    def limit(self) -> int | None:
        """The most one payment may be now: the smaller of the per-load cap and the remaining budget."""
        left = self.remaining()
        caps = [c for c in (self.max_price_per_load, left) if c is not None]
        return min(caps) if caps else None

    def refusal(self, amount: int) -> str | None:
        """Why ``amount`` must not be paid (``None``: it may)."""
        if self.max_price_per_load is not None and amount > self.max_price_per_load:
            return "price_above_cap"
        left = self.remaining()
        if left is not None and amount > left:
            return "budget_exhausted"
        return None

    def reserve(self, amount: int) -> str | None:
        """Take ``amount`` from the budget if the caps allow it (atomically); the refusal otherwise."""
        if self.max_price_per_load is not None and amount > self.max_price_per_load:
            return "price_above_cap"
        with self._lock:
            if self.budget is not None and self.spent + amount > self.budget:
                return "budget_exhausted"
            self.spent += amount
        return None

    def release(self, amount: int) -> None:
        """Give back a reservation whose payment was never settled."""
        with self._lock:
            self.spent = max(0, self.spent - amount)

    def spend_controls(self, allowed_assets: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
        """The SDK's ``SpendControls`` for these caps, capped at :meth:`limit`.

        The SDK pays its default assets (USDC on the networks it knows) and refuses any other token until it
        is listed in ``allowed_assets`` as (network, asset); a listed token's cap is an atomic amount, the
        default assets' cap a dollar amount. One token unit is one micro-USD for both: both say the same."""
        cap = self.limit()
        entries: list[dict[str, Any]] = []
        for network, asset in allowed_assets:
            entry: dict[str, Any] = {"network": network, "asset": asset}
            if cap is not None:
                entry["max_amount_per_payment"] = str(cap)
            entries.append(entry)
        out: dict[str, Any] = {"max_amount_per_payment": False if cap is None else usd(cap)}
        if entries:
            out["allowed_assets"] = entries
        return out


def usd(micros: int) -> str:
    """``micros`` micro-USD as the SDK's money string (``1500`` -> ``"$0.001500"``), exactly."""
    return f"${micros // 1_000_000}.{micros % 1_000_000:06d}"
