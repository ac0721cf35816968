"""What one paid call (a download, a generation) is charged, and its x402 payment from a wallet.

A call keeps its own record, so concurrent calls on one client never see each other's charges.
"""

from __future__ import annotations

import uuid

import httpx

from ..errors import PaymentError, RegistryError, RegistryPaymentRequiredError
from ..payments.http import settlement
from ..payments.payer import Payer, Payment
from ..payments.terms import PAYMENT_REQUIRED_HEADER, PAYMENT_SIGNATURE_HEADER
from .wire import error_code, error_for, quote, x402_error


def payment_headers(max_price: int | None, idempotency_key: str | None) -> dict[str, str]:
    """The headers every attempt of one paid call carries: one ``Idempotency-Key`` (a fresh one unless
    given), so a retry is charged once, and the caller's ``X-KVAgent-Max-Price``."""
    headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
    if max_price is not None:
        headers["X-KVAgent-Max-Price"] = str(int(max_price))
    return headers


class Paid:
    """What one call was charged, summed over its attempts (a replayed purchase adds nothing)."""

    def __init__(self) -> None:
        self.charge = 0
        self.receipt: str | None = None

    def note(self, resp: httpx.Response) -> None:
        """Add a paid answer's amount and keep its receipt id (``X-KVAgent-Charged`` /
        ``X-KVAgent-Receipt``)."""
        receipt = resp.headers.get("x-kvagent-receipt")
        if receipt:
            self.receipt = receipt
        charged = resp.headers.get("x-kvagent-charged", "0")
        if charged.isdigit() and resp.headers.get("x-kvagent-replayed") != "1":
            self.charge += int(charged)


class X402:
    """One paid call's x402 payment (a download, a hosted generation: ``what``): signed at most once, from
    the first 402 that carries requirements, and sent again unchanged on every later attempt (the host
    settles one signature once, so a retry never pays twice). What was settled comes back in
    ``PAYMENT-RESPONSE``."""

    def __init__(self, payer: Payer | None, limit: int | None, what: str = "download") -> None:
        self.payer, self.limit, self.what = payer, limit, what
        self.payment: Payment | None = None
        self.settled = 0  # token units (= micro-units) the host settled for this download

    def headers(self, base: dict[str, str]) -> dict[str, str]:
        return base if self.payment is None else {**base, PAYMENT_SIGNATURE_HEADER: self.payment.header}

    def payable(self, resp: httpx.Response) -> bool:
        """A 402 with x402 requirements, and a wallet that has not paid this call yet."""
        return (resp.status_code == 402 and self.payer is not None and self.payment is None
                and PAYMENT_REQUIRED_HEADER in resp.headers)

    def pay(self, resp: httpx.Response) -> None:
        """Sign a payment for a 402 (never retried: RegistryPaymentRequiredError when the caps refuse)."""
        assert self.payer is not None
        try:
            self.payment = self.payer.pay(resp.headers[PAYMENT_REQUIRED_HEADER], self.limit)
        except PaymentError as exc:
            offer = {**quote(resp), "x402": f"not paid: {exc.reason or 'declined'} ({exc})"}
            raise RegistryPaymentRequiredError(
                f"registry {self.what} needs a payment this agent refused: {exc}", offer
            ) from exc

    def charge(self, paid: Paid) -> int:
        """What the call cost (integer micro-units): the host's ``X-KVAgent-Charged`` over its attempts
        (``paid``), else what this payment settled."""
        return paid.charge if paid.charge or not self.settled else self.settled

    def served(self, resp: httpx.Response) -> None:
        if self.payment is not None and settlement(resp) is not None:
            self.settled = self.payment.amount

    def refused(self, resp: httpx.Response) -> RegistryError | None:
        """After a payment was sent: the host refused it (402) or could not settle it (503
        ``payment_unavailable``): nothing moved, the budget gets it back, and the call is not retried."""
        if self.payment is None or self.payer is None:
            return None
        code = error_code(resp)
        if resp.status_code == 402 or (resp.status_code == 503 and code.startswith("payment")):
            self.payer.unsettled(self.payment)
            why = x402_error(resp) or code or f"HTTP {resp.status_code}"
            amount, self.payment = self.payment.amount, None
            base = error_for(resp, self.what)
            offer = {**quote(resp), "x402": f"paid {amount} but not taken: {why}"}
            msg = f"{base} (x402 payment of {amount} not settled: {why})"
            return RegistryPaymentRequiredError(msg, offer)
        return None
