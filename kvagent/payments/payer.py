"""Pay a 402 answer's x402 requirements from a wallet, within the buyer's caps (the SDK's ``x402ClientSync``).

A payment is reserved against the budget before it is signed and released if it is never settled, so caps
hold across threads; the SDK's own spend controls are set from the same caps as a second check.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, PaymentDeclined
from . import sdk
from .caps import SpendCaps
from .terms import decode_header, encode_header
from .wallet import Wallet


@dataclass(frozen=True)
class Payment:
    """A signed payment: the ``PAYMENT-SIGNATURE`` header value, what it pays and to whom."""

    header: str
    amount: int
    network: str
    asset: str
    pay_to: str


class Payer:
    """Signs x402 ``exact`` payments on EVM networks from ``wallet``, within ``caps``.

    ``allowed_assets`` lists (CAIP-2 network, token address) pairs beyond the SDK's default assets (USDC),
    e.g. a test chain's token."""

    def __init__(self, wallet: Wallet, caps: SpendCaps | None = None,
                 allowed_assets: Sequence[tuple[str, str]] = ()):
        x402 = sdk.require("x402")
        exact = sdk.require("x402.mechanisms.evm.exact")
        self.wallet = wallet
        self.caps = caps or SpendCaps()
        self.allowed_assets = tuple(allowed_assets)
        self._client = x402.x402ClientSync()
        self._client.register("eip155:*", exact.ExactEvmScheme(wallet.signer()))
        self._lock = threading.Lock()

    def pay(self, payment_required_header: str, limit: int | None = None) -> Payment:
        """Sign a payment for a ``PAYMENT-REQUIRED`` header; :class:`PaymentDeclined` (nothing signed, nothing
        reserved) when no offer fits the caps (or ``limit``, the caller's own cap for this one) or none is
        payable."""
        schemas = sdk.require("x402.schemas")
        try:
            pr = schemas.PaymentRequired.model_validate(decode_header(payment_required_header))
        except (ConfigError, ValueError) as exc:
            raise PaymentDeclined(f"unreadable PAYMENT-REQUIRED header: {exc}", "malformed") from exc
        offers = [r for r in pr.accepts if r.scheme == "exact" and r.amount.isdigit()]
        if not offers:
            raise PaymentDeclined("no exact-scheme offer in the 402 answer", "no_offer")
        offer = min(offers, key=lambda r: int(r.amount))
        amount = int(offer.amount)
        if limit is not None and amount > limit:
            raise PaymentDeclined(f"{amount} is above this load's limit of {limit}", "price_above_cap")
        why = self.caps.reserve(amount)
        if why:
            raise PaymentDeclined(f"{amount} is above this agent's {why.replace('_', ' ')}", why)
        try:
            with self._lock:
                # the caps were checked by the reservation: the SDK admits exactly the reserved amount
                self._client.set_spend_controls(_with_room(self.caps, amount, self.allowed_assets))
                pr_one = pr.model_copy(update={"accepts": [offer]})
                payload = self._client.create_payment_payload(pr_one)
        except Exception as exc:
            self.caps.release(amount)
            if type(exc).__name__ == "NoMatchingRequirementsError":
                raise PaymentDeclined(str(exc), "not_allowed") from exc
            raise
        wire = payload.model_dump(by_alias=True, exclude_none=True)
        return Payment(encode_header(wire), amount, str(offer.network), offer.asset, offer.pay_to)

    def unsettled(self, payment: Payment) -> None:
        """Give ``payment``'s amount back to the budget: the host did not settle it (refused or failed)."""
        self.caps.release(payment.amount)


def _with_room(caps: SpendCaps, amount: int, allowed: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Spend controls admitting exactly the reserved ``amount`` (the reservation checked the caps)."""
    room = SpendCaps(max_price_per_load=amount)
    return room.spend_controls(allowed)
