"""An HTTP request that pays a 402's x402 requirements and is sent again (the buyer's side, over httpx)."""

from __future__ import annotations

from typing import Any

import httpx

from .payer import Payer, Payment
from .terms import PAYMENT_REQUIRED_HEADER, PAYMENT_RESPONSE_HEADER, PAYMENT_SIGNATURE_HEADER, decode_header


def request_paying(client: httpx.Client, method: str, url: str, payer: Payer | None,
                   **kwargs: Any) -> tuple[httpx.Response, Payment | None]:
    """Send a request; if it is answered 402 with ``PAYMENT-REQUIRED`` and ``payer`` is given, pay within the
    payer's caps and send it once more with ``PAYMENT-SIGNATURE``. Returns the last answer and the payment
    (``None`` if none was made). :class:`kvagent.errors.PaymentDeclined` when the caps refuse (none signed).
    A payment whose answer shows no settlement is given back to the payer's budget."""
    r = client.request(method, url, **kwargs)
    if r.status_code != 402 or payer is None or PAYMENT_REQUIRED_HEADER not in r.headers:
        return r, None
    payment = payer.pay(r.headers[PAYMENT_REQUIRED_HEADER])
    headers = {**dict(kwargs.pop("headers", None) or {}), PAYMENT_SIGNATURE_HEADER: payment.header}
    r = client.request(method, url, headers=headers, **kwargs)
    if settlement(r) is None:
        payer.unsettled(payment)
    return r, payment


def settlement(r: httpx.Response) -> dict[str, Any] | None:
    """The settlement an answer's ``PAYMENT-RESPONSE`` reports (``None`` without one, or if it failed)."""
    raw = r.headers.get(PAYMENT_RESPONSE_HEADER)
    if raw is None:
        return None
    try:
        s = decode_header(raw)
    except ValueError:
        return None
    return s if s.get("success") is True else None
