"""The x402 sequence of a priced request, for the charging hooks of kvagent.server.market_routes to call.

A request without ``PAYMENT-SIGNATURE`` is charged to its balance as today; refused, its 402 carries
``PAYMENT-REQUIRED`` (:func:`refusal`) beside the JSON quote. A request with one is paid by :func:`pay`:

1. checked against this request's own price here (nothing moves when it is refused: 402);
2. settled on chain *before* anything is served, the facilitator verifying it as it settles (a payment that
   does not settle serves nothing: 402, or 503 when the facilitator cannot be asked);
3. recorded: the deposit and the purchase in one database transaction. Should the purchase fail after the
   money settled, the deposit is still recorded on its own (idempotent per settlement), so the payer keeps the
   money as a balance it can spend, see in its statement or be refunded: nothing is lost either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..costs import market as mk
from ..errors import PaymentError, PaymentInvalid
from ..payments.terms import PAYMENT_REQUIRED_HEADER, PAYMENT_RESPONSE_HEADER, wallet_principal
from .deposits import record_deposit
from .http import ApiError
from .ledger import Ledger, Receipt
from .x402 import Settlement, Verified, X402Gateway

log = logging.getLogger("kvagent.server")

#: ``charge(cursor, principal)``: the purchase, posted in the deposit's database transaction.
Charge = Callable[[Any, str], "Receipt | None"]


@dataclass(frozen=True)
class Paid:
    """A settled payment, its deposit and the purchase it paid for (``None`` when free)."""

    verified: Verified
    settlement: Settlement
    deposit: Receipt
    purchase: Receipt | None

    def headers(self) -> dict[str, str]:
        """``PAYMENT-RESPONSE``: the settlement transaction, for the buyer."""
        return {PAYMENT_RESPONSE_HEADER: self.settlement.header()}


def refusal(err: ApiError, gw: X402Gateway | None, quote: mk.Quote, url: str, error: str = "") -> ApiError:
    """Today's 402 ``err`` (its JSON quote unchanged) with the x402 requirements of paying ``quote.price``;
    as it was when x402 is off, or when the buyer's own maximum refused the price."""
    if gw is None or quote.reason == "price_above_max" or quote.price <= 0:
        return err
    headers = {**(err.headers or {}), PAYMENT_REQUIRED_HEADER: gw.required_header(
        quote.price, url, f"{quote.key[:16]}… at {quote.price} {quote.currency}", error)}
    return ApiError(err.status, err.code, err.detail, headers=headers, extra=err.extra, param=err.param)


def pay(gw: X402Gateway, ledger: Ledger, header: str, amount: int, principal: str | None,
        charge: Charge) -> Paid:
    """Verify, settle and record the payment in ``header`` of ``amount`` for ``principal`` (the bearer's, or
    ``None`` for the paying wallet's own); ``charge`` posts the purchase in the same database transaction.

    Raises :class:`PaymentInvalid` or :class:`SettlementFailed` (402; reason ``facilitator_unavailable``:
    503), nothing moved, nothing to serve; or whatever ``charge`` raises after the settlement, with the
    deposit recorded."""
    v = gw.check(header, amount)
    s = gw.settle(v)  # the facilitator verifies as it settles: one round trip fewer than verify, then settle
    who = principal or wallet_principal(s.payer)
    try:
        with ledger.meta.transaction() as cur:
            dep = record_deposit(ledger, cur, who, s.amount, s.network, s.transaction)
            rec = charge(cur, who)
    except BaseException:
        with ledger.meta.transaction() as cur:  # the money arrived: it stays the payer's, never lost
            record_deposit(ledger, cur, who, s.amount, s.network, s.transaction)
        log.warning("x402 payment %s settled, its purchase failed: kept as %s's balance", s.transaction, who)
        raise
    return Paid(v, s, dep, rec)


def api_error(exc: PaymentError, gw: X402Gateway, amount: int, url: str) -> ApiError:
    """The answer to a payment that did not go through: 503 when the facilitator could not be asked (retry
    later, the authorisation is unused), else 402 with fresh requirements and the reason."""
    if exc.reason == "facilitator_unavailable":
        return ApiError(503, "payment_unavailable", str(exc), headers={"Retry-After": "5"})
    code = "payment_invalid" if isinstance(exc, PaymentInvalid) else "payment_not_settled"
    return ApiError(402, code, str(exc), extra={"reason": exc.reason},
                    headers={PAYMENT_REQUIRED_HEADER: gw.required_header(amount, url, error=exc.reason)})
