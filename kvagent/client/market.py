"""The market API of a registry: our account, prices, admin credits and adjustments, disputes, and the
x402 top-ups, payouts and chain audit (docs/market.md). Amounts are integer micro-units.

A call that moves money carries one ``Idempotency-Key`` over all its attempts, so a retry never moves it
twice; a top-up and a payout are sent once (repeat a payout with the same key to learn its outcome).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import httpx

from ..errors import RegistryProtocolError
from ..kvcache.identity import validate_key
from ..payments.caps import SpendCaps
from ..payments.http import settlement
from ..payments.payer import Payer
from ..payments.terms import PAYMENT_REQUIRED_HEADER, PAYMENT_SIGNATURE_HEADER, decode_header
from ..payments.wallet import Wallet
from .transport import Transport
from .wire import error_for, int_field, json_object

# a payout waits for its chain transfer, an audit reads the chain: slower than the registry's own answers
_CHAIN_TIMEOUT = httpx.Timeout(300.0)
_TOPUP_OFFER_TIMEOUT, _TOPUP_PAID_TIMEOUT = httpx.Timeout(60.0), httpx.Timeout(120.0)


class MarketClient:
    """Accounts and money on a registry."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def _call(self, method: str, url: str, what: str, ok: tuple[int, ...] = (200,), **kw: Any
              ) -> Mapping[str, Any]:
        """``method url`` under the retry policy: its JSON object answer."""
        return self._t.retrying(lambda: self._once(method, url, what, ok, **kw))

    def _once(self, method: str, url: str, what: str, ok: tuple[int, ...] = (200,), **kw: Any
              ) -> Mapping[str, Any]:
        resp = self._t.request(method, url, what, **kw)
        if resp.status_code not in ok:
            raise error_for(resp, what)
        return json_object(resp, what)

    def account(self) -> dict[str, Any]:
        """``{"principal", "balance", "currency"}`` of our account (balance in integer micro-units)."""
        body = self._call("GET", "/v1/account", "account")
        int_field(body, "balance", "account")
        return dict(body)

    def account_balance(self) -> int:
        """Our balance in integer micro-units."""
        return int_field(self._call("GET", "/v1/account", "account"), "balance", "account")

    def statement(self) -> dict[str, Any]:
        """Our purchases and sales per artifact (loads, amounts, royalties, refunds), credits and balance."""
        body = self._call("GET", "/v1/account/statement", "statement")
        int_field(body, "balance", "statement")
        return dict(body)

    def credit(self, principal: str, amount: int, memo: str = "", *, create: bool = False,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """Admin only: credit ``principal`` with ``amount`` micro-units. Retried under one Idempotency-Key
        (``idempotency_key``, or a fresh one per call), so a retry never credits twice; a replay answers
        ``"replayed": true`` and ``"credited": 0``. ``create`` credits a principal no token names yet."""
        body: dict[str, Any] = {"principal": principal, "amount": int(amount), "memo": memo}
        if create:
            body["create"] = True
        return self._admin_money("/v1/account/credit", "credit", body, idempotency_key)

    def adjust(self, principal: str, amount: int, reason: str, *, allow_negative: bool = False,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """Admin only: correct ``principal``'s balance by ``amount`` (negative debits) with a mandatory
        ``reason``; a debit below zero is refused (409) unless ``allow_negative`` records a debt. Retried
        under one Idempotency-Key like :meth:`credit`."""
        body = {"principal": principal, "amount": int(amount), "reason": reason,
                "allow_negative": allow_negative}
        return self._admin_money("/v1/account/adjust", "adjustment", body, idempotency_key)

    def _admin_money(self, url: str, what: str, body: dict[str, Any],
                     idempotency_key: str | None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        answer = self._call("POST", url, what, json=body, headers=headers)
        int_field(answer, "balance", what)
        return dict(answer)

    def price(self, key: str) -> dict[str, Any]:
        """``{"key", "price", "currency", "balance"}``: what one load of ``key`` costs us."""
        validate_key(key)
        body = self._call("GET", f"/v1/artifacts/{key}/price", "price")
        int_field(body, "price", "price")
        return dict(body)

    def set_price(self, key: str, price: int) -> int:
        """Set the price per load of an artifact we own (micro-units; 0 makes it free)."""
        validate_key(key)
        body = self._call("PUT", f"/v1/artifacts/{key}/price", "set price", json={"price": int(price)})
        return int_field(body, "price", "set price")

    def dispute(self, key: str, receipt: str, *, layer: int | None = None, position: int | None = None,
                difference: float | None = None, detail: str = "") -> dict[str, Any]:
        """Dispute a purchase whose verification failed; the answer says ``refunded``, ``rejected`` or
        ``open``."""
        validate_key(key)
        body = {"receipt": receipt, "layer": layer, "position": position, "difference": difference,
                "detail": detail[:500]}
        # 201: a new dispute; 200: the receipt's dispute filed before, as it stands
        return dict(self._call("POST", f"/v1/artifacts/{key}/disputes", "dispute", json=body, ok=(200, 201)))

    # -- x402: money in and out on chain ------------------------------------------------------
    def topup(self, amount: int, wallet: Wallet) -> dict[str, Any]:
        """Add ``amount`` micro-units to our balance, paid by x402 from ``wallet``: the registry's 402 names
        the asset, and the wallet pays at most ``amount`` in it. Sent once (PaymentDeclined when nothing
        fits); the answer: ``{"principal", "deposited", "receipt", "transaction", "network", "balance",
        "currency"}``."""
        body = {"amount": int(amount)}
        url, what = "/v1/account/topup", "top-up"
        offer = self._t.request("POST", url, what, json=body, timeout=_TOPUP_OFFER_TIMEOUT)
        if offer.status_code == 200:
            return dict(json_object(offer, what))
        if offer.status_code != 402 or PAYMENT_REQUIRED_HEADER not in offer.headers:
            raise error_for(offer, what)
        accepts = decode_header(offer.headers[PAYMENT_REQUIRED_HEADER]).get("accepts")
        if not isinstance(accepts, list) or not all(_names_asset(a) for a in accepts):
            raise RegistryProtocolError("registry top-up 402 names no network and asset to pay in")
        payer = Payer(wallet, SpendCaps(max_price_per_load=int(amount)),
                      allowed_assets=[(a["network"], a["asset"]) for a in accepts])
        payment = payer.pay(offer.headers[PAYMENT_REQUIRED_HEADER])
        resp = self._t.request("POST", url, what, json=body, timeout=_TOPUP_PAID_TIMEOUT,
                               headers={PAYMENT_SIGNATURE_HEADER: payment.header})
        if settlement(resp) is None:
            payer.unsettled(payment)
        if resp.status_code != 200:
            raise error_for(resp, what)
        return dict(json_object(resp, what))

    def withdraw(self, amount: int, to: str, *, principal: str | None = None,
                 idempotency_key: str | None = None) -> dict[str, Any]:
        """Pay ``amount`` micro-units of our balance (an admin: ``principal``'s) out on chain to address
        ``to``, from the host's wallet. Sent once under its Idempotency-Key (a fresh one unless given): the
        same key again pays nothing more and answers the payout as it stands (``"replayed": true``)."""
        body: dict[str, Any] = {"amount": int(amount), "to": to}
        if principal:
            body["principal"] = principal
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return dict(self._once("POST", "/v1/account/withdraw", "withdrawal", json=body, headers=headers,
                               timeout=_CHAIN_TIMEOUT))

    def chain_audit(self) -> dict[str, Any]:
        """Admin only: the ledger's x402 deposits and withdrawals against the chain's transfers
        (``{"deposits", "deposited", "confirmed", "withdrawn", "withdrawn_confirmed", "missing", "ok"}``)."""
        return dict(self._call("GET", "/v1/market/x402-audit", "chain audit", timeout=_CHAIN_TIMEOUT))


def _names_asset(offer: Any) -> bool:
    """An x402 offer that names the network and asset it is paid in."""
    return isinstance(offer, Mapping) and isinstance(offer.get("network"), str) and isinstance(
        offer.get("asset"), str)
