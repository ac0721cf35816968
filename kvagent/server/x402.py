"""x402 on the host: the ``PAYMENT-REQUIRED`` header of a 402, and verifying and settling a
``PAYMENT-SIGNATURE`` through a facilitator (the SDK's, in process, paying gas from its own key;
or a hosted one at ``--x402-facilitator URL``), with the ``PAYMENT-RESPONSE`` header of a settled payment.

The requirements a payment is verified against are always this host's own, built from the price of the
request at hand, never the ``accepted`` copy the buyer sends: a payment for another amount, payee, token or
network is refused before the facilitator is asked. Money is never served before :meth:`X402Gateway.settle`
returns (settle-before-serve): a payment that does not settle serves nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, NoReturn

from ..errors import ConfigError, PaymentError, PaymentInvalid, SettlementFailed
from ..payments import sdk
from ..payments.terms import (
    X402Terms,
    decode_header,
    encode_header,
    payment_required,
    requirements,
    wallet_principal,
)

log = logging.getLogger("kvagent.server")

#: Facilitator answers that say it could not check the payment (its chain RPC failed), not that the payment is
#: bad: the request is answered 503 (nothing served, nothing charged); the buyer's authorisation stays unused.
UNAVAILABLE = frozenset({"invalid_exact_evm_failed_to_verify_signature",
                         "invalid_exact_evm_failed_to_get_asset_info"})


@dataclass(frozen=True)
class Verified:
    """A payment the facilitator verified for ``amount``: who pays, and the key a retry of it is known by."""

    payload: Any  # x402.schemas.PaymentPayload
    requirements: Any  # x402.schemas.PaymentRequirements (this host's)
    payer: str
    amount: int
    nonce: str

    @property
    def principal(self) -> str:
        """The ledger principal of the paying wallet."""
        return wallet_principal(self.payer)

    @property
    def idempotency_key(self) -> str:
        """One authorisation, one key: the same ``PAYMENT-SIGNATURE`` sent twice names the same purchase."""
        return f"x402:{self.requirements.network}:{self.nonce}"


@dataclass(frozen=True)
class Settlement:
    """A payment settled on chain: its transaction, payer, network and amount (token units = micro-units)."""

    transaction: str
    payer: str
    network: str
    amount: int
    response: Any  # x402.schemas.SettleResponse

    def header(self) -> str:
        """The ``PAYMENT-RESPONSE`` header value."""
        return encode_header(self.response.model_dump(by_alias=True, exclude_none=True))


class X402Gateway:
    """Payment requirements, verification and settlement for one host's :class:`X402Terms`."""

    def __init__(self, terms: X402Terms, facilitator: Any):
        x402 = sdk.require("x402")
        exact = sdk.require("x402.mechanisms.evm.exact")
        checksum = sdk.require("eth_utils").to_checksum_address  # the SDK's facilitator needs checksums
        self.terms = replace(terms, asset=checksum(terms.asset), pay_to=checksum(terms.pay_to))
        self._schemas = sdk.require("x402.schemas")
        self._server = x402.x402ResourceServerSync(facilitator)
        self._server.register(terms.network, exact.ExactEvmServerScheme())
        self._server.initialize()
        self.inflight = InFlight()

    @classmethod
    def in_process(cls, terms: X402Terms, facilitator_key: str, rpc_url: str) -> X402Gateway:
        """A gateway whose facilitator runs here: it verifies against ``rpc_url`` and settles by sending the
        transfer from ``facilitator_key``'s account (it pays the gas; the token goes to ``terms.pay_to``)."""
        x402 = sdk.require("x402")
        exact = sdk.require("x402.mechanisms.evm.exact")
        signers = sdk.require("x402.mechanisms.evm.signers")
        fac = x402.x402FacilitatorSync()
        fac.register([terms.network], exact.ExactEvmFacilitatorScheme(
            signers.FacilitatorWeb3Signer(facilitator_key, rpc_url),
            exact.ExactEvmSchemeConfig(simulate_in_settle=True)))
        return cls(terms, fac)

    @classmethod
    def hosted(cls, terms: X402Terms, url: str, timeout: float = 30.0) -> X402Gateway:
        """A gateway that asks the facilitator at ``url`` (``/supported``, ``/verify``, ``/settle``)."""
        http = sdk.require("x402.http")
        return cls(terms, http.HTTPFacilitatorClientSync(http.FacilitatorConfig(url=url, timeout=timeout)))

    # -- the 402 ----------------------------------------------------------------------------------------
    def required_header(self, amount: int, url: str, description: str = "", error: str = "") -> str:
        """The ``PAYMENT-REQUIRED`` header value of a 402 for ``url`` at ``amount``."""
        return encode_header(payment_required(self.terms, amount, url, description, error))

    # -- a paid request ---------------------------------------------------------------------------------
    def check(self, header: str, amount: int) -> Verified:
        """Read a ``PAYMENT-SIGNATURE`` and check, here, that it pays exactly ``amount`` to this host in its
        token on its network (:class:`PaymentInvalid` otherwise). The facilitator has not seen it yet: the
        payer it names is a claim until :meth:`verify` or :meth:`settle`."""
        ours = self._schemas.PaymentRequirements.model_validate(requirements(self.terms, amount))
        try:
            obj = decode_header(header)
            payload = self._schemas.PaymentPayload.model_validate(obj)
        except (ConfigError, ValueError) as exc:
            raise PaymentInvalid(f"unreadable PAYMENT-SIGNATURE header: {exc}", "malformed") from exc
        if obj.get("x402Version") != 2:
            raise PaymentInvalid("only x402 version 2 payments are accepted", "unsupported_version")
        if not _same_offer(payload.accepted, ours):
            raise PaymentInvalid("the payment is for other requirements than this request's",
                                 "requirements_mismatch")
        auth = payload.payload.get("authorization") if isinstance(payload.payload, dict) else None
        if not isinstance(auth, dict) or not isinstance(auth.get("from"), str):
            raise PaymentInvalid("the payment carries no EIP-3009 authorisation", "malformed")
        return Verified(payload, ours, auth["from"], amount, str(auth.get("nonce", "")))

    def verify(self, header: str, amount: int) -> Verified:
        """:meth:`check`, then have the facilitator verify the payment (signature, validity window, unused
        nonce, the payer's balance). :class:`PaymentInvalid` when it does not; :class:`PaymentError` (reason
        ``facilitator_unavailable``) when it cannot be asked. (Settling verifies too: a host that settles
        before serving need not call this first.)"""
        v = self.check(header, amount)
        res = _ask(lambda: self._server.verify_payment(v.payload, v.requirements), "verify", PaymentError)
        if not res.is_valid:
            _refuse(res.invalid_reason, "check the payment", PaymentError,
                    PaymentInvalid(f"payment refused: {res.invalid_reason}", res.invalid_reason or "invalid"))
        return replace(v, payer=str(res.payer or v.payer))

    def settle(self, v: Verified) -> Settlement:
        """Settle a verified payment on chain; :class:`SettlementFailed` (nothing moved) when it does not."""
        res = _ask(lambda: self._server.settle_payment(v.payload, v.requirements), "settle", SettlementFailed)
        if not res.success or not res.transaction:
            why = res.error_reason
            _refuse(why, "settle", SettlementFailed,
                    SettlementFailed(f"payment not settled: {why}", why or "failed"))
        return Settlement(res.transaction, str(res.payer or v.payer), str(res.network), v.amount, res)


class InFlight:
    """The payments this process is settling, by payment key: the same ``PAYMENT-SIGNATURE`` arriving again
    meanwhile waits for the first to finish (then finds its purchase) instead of losing the settlement race
    and being refused. Twins on two processes still settle once (the chain refuses the nonce again); the
    loser is answered 402 and finds the purchase when it asks again."""

    def __init__(self, wait_s: float = 60.0):
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self._wait_s = wait_s

    @contextmanager
    def once(self, key: str) -> Iterator[None]:
        """Run the body alone for ``key`` in this process (a later arrival waits for the first's end)."""
        while True:
            with self._lock:
                ev = self._events.get(key)
                if ev is None:
                    ev = self._events[key] = threading.Event()
                    break
            ev.wait(self._wait_s)
        try:
            yield
        finally:
            with self._lock:
                self._events.pop(key, None)
            ev.set()


def _ask(call: Callable[[], Any], step: str, error: type[PaymentError]) -> Any:
    """The facilitator's answer to ``call`` (its ``step``: verify or settle); ``error`` with reason
    ``facilitator_unavailable`` when it cannot be asked."""
    try:
        return call()
    except Exception as exc:
        log.warning("x402 facilitator unavailable at %s: %s", step, type(exc).__name__)
        raise error(f"the payment facilitator could not be asked: {type(exc).__name__}",
                    "facilitator_unavailable") from exc


def _refuse(reason: str | None, what: str, error: type[PaymentError], refusal: PaymentError) -> NoReturn:
    """Raise for a negative answer: ``error`` (``facilitator_unavailable``) when ``reason`` says the
    facilitator could not ``what`` (its chain RPC failed), else ``refusal``."""
    if reason in UNAVAILABLE:
        raise error(f"the payment facilitator could not {what}: {reason}", "facilitator_unavailable")
    raise refusal


def _same_offer(accepted: Any, ours: Any) -> bool:
    """Whether the buyer signed for exactly this host's requirements (addresses in any case)."""
    return (accepted.scheme == ours.scheme and accepted.network == ours.network
            and accepted.asset.lower() == ours.asset.lower() and accepted.amount == ours.amount
            and accepted.pay_to.lower() == ours.pay_to.lower())


def claimed(header: str) -> tuple[str, str]:
    """(payer address, payment key) that a ``PAYMENT-SIGNATURE`` claims, read without checking it: whose
    wallet a request without a bearer token speaks for, and the key a repeat of the payment is known by
    (:attr:`Verified.idempotency_key`). Settling proves the payer; :class:`PaymentInvalid` when unreadable."""
    try:
        obj = decode_header(header)
    except ConfigError as exc:
        raise PaymentInvalid(f"unreadable PAYMENT-SIGNATURE header: {exc}", "malformed") from exc
    payload, accepted = obj.get("payload"), obj.get("accepted")
    auth = payload.get("authorization") if isinstance(payload, dict) else None
    if not isinstance(auth, dict) or not isinstance(accepted, dict):
        raise PaymentInvalid("the payment carries no EIP-3009 authorisation", "malformed")
    payer, nonce, network = auth.get("from"), auth.get("nonce"), accepted.get("network")
    if not all(isinstance(x, str) and x for x in (payer, nonce, network)):
        raise PaymentInvalid("the payment's authorisation names no payer, nonce or network", "malformed")
    try:
        wallet_principal(str(payer))
    except ConfigError as exc:
        raise PaymentInvalid(str(exc), "malformed") from exc
    return str(payer), f"x402:{network}:{nonce}"
