"""Client of the kvagent registry HTTP API (docs/registry-api.md): the facade over its three parts.

``RegistryClient`` composes one :class:`~kvagent.client.transport.Transport` (the ``httpx.Client``, the
nodes with failover, the retry policy) and three clients over it, each in its own module:
:mod:`.artifacts` (look up, download, publish, grant), :mod:`.market` (account, prices, credits, disputes,
x402 top-ups and payouts) and :mod:`.generation` (remote generation). Responses are read strictly
(:mod:`.wire`): anything unexpected is a ``RegistryError``, never a ``KeyError`` or a half-parsed object.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import httpx

from ..artifacts import format as art
from ..artifacts.source import GiveUp, Handle
from ..engines.params import GenerationParams
from ..payments.payer import Payer
from ..payments.wallet import Wallet
from .artifacts import ArtifactClient, Download, VerifiedDownload, sign, verify_signature
from .generation import GenerationClient, GenerationStream
from .market import MarketClient
from .transport import DEFAULT_TIMEOUT, RetryPolicy, Transport
from .wire import VISIBILITIES, parse_handle

__all__ = [
    "DEFAULT_TIMEOUT", "VISIBILITIES", "Download", "GenerationStream", "RegistryClient", "VerifiedDownload",
    "parse_handle", "sign", "verify_signature",
]


class RegistryClient:
    """Talks to a registry. ``trusted_keys`` (hex ed25519 public keys) makes signatures mandatory.

    ``payer`` (a wallet within its caps) pays a download's or a hosted generation's 402 by x402 when the
    price is within the call's ``max_price``; a wallet-only agent needs no token to buy public priced
    artifacts.

    ``base_url`` may name several stateless nodes of one registry (a list, or one comma-separated
    string): a refused connection moves to the next node at once, and any other failed attempt is
    retried on the next node. A caller's ``client`` is used as it is, never changed.

    The parts are ``artifacts``, ``market`` and ``generation``; the methods here are theirs.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        token: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retries: int = 3,
        max_retry_seconds: float = 20.0,
        backoff_initial: float = 0.2,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] | None = None,
        trusted_keys: Collection[str] | None = None,
        limits: art.Limits = art.DEFAULT_LIMITS,
        payer: Payer | None = None,
    ) -> None:
        policy = RetryPolicy(retries, max_retry_seconds, backoff_initial, sleep)
        self.transport = Transport(base_url, token, timeout=timeout, client=client, retry=policy)
        self.artifacts = ArtifactClient(self.transport, trusted_keys=trusted_keys, limits=limits, payer=payer)
        self.market = MarketClient(self.transport)
        self.generation = GenerationClient(self.transport, payer=payer)

    @property
    def base_url(self) -> str:
        """The registry node that requests go to now."""
        return self.transport.base_url

    @property
    def base_urls(self) -> list[str]:
        return list(self.transport.nodes)

    @property
    def trusted_keys(self) -> frozenset[str] | None:
        return self.artifacts.trusted_keys

    @property
    def limits(self) -> art.Limits:
        return self.artifacts.limits

    @property
    def payer(self) -> Payer | None:
        return self.artifacts.payer

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def healthy(self) -> bool:
        return self.transport.healthy()

    # -- artifacts (kvagent.client.artifacts) ---------------------------------------------------
    def lookup(self, key: str, *, timeout: float | None = None) -> Handle | None:
        """See :meth:`ArtifactClient.lookup`."""
        return self.artifacts.lookup(key, timeout=timeout)

    def lookup_prefix(
        self, block_hashes: Sequence[str], *, timeout: float | None = None
    ) -> tuple[Handle, int] | None:
        """See :meth:`ArtifactClient.lookup_prefix`."""
        return self.artifacts.lookup_prefix(block_hashes, timeout=timeout)

    def download_blob(self, handle: Handle, *, max_price: int | None = None,
                      idempotency_key: str | None = None, give_up: GiveUp | None = None) -> Download:
        """See :meth:`ArtifactClient.download_blob`."""
        return self.artifacts.download_blob(
            handle, max_price=max_price, idempotency_key=idempotency_key, give_up=give_up
        )

    def download_verified(
        self, handle: Handle, expect: art.Expectation, *, max_price: int | None = None,
        idempotency_key: str | None = None, give_up: GiveUp | None = None,
    ) -> VerifiedDownload:
        """See :meth:`ArtifactClient.download_verified`."""
        return self.artifacts.download_verified(
            handle, expect, max_price=max_price, idempotency_key=idempotency_key, give_up=give_up
        )

    def download(self, handle: Handle, expect: art.Expectation, *, max_price: int | None = None,
                 idempotency_key: str | None = None) -> art.Artifact:
        """See :meth:`ArtifactClient.download`."""
        return self.artifacts.download(handle, expect, max_price=max_price, idempotency_key=idempotency_key)

    def publish(self, blob: bytes, visibility: str = "restricted", signing_key: Any = None,
                price: int | None = None) -> Handle:
        """See :meth:`ArtifactClient.publish`."""
        return self.artifacts.publish(blob, visibility, signing_key, price)

    def grant(self, key: str, principal: str) -> None:
        """See :meth:`ArtifactClient.grant`."""
        self.artifacts.grant(key, principal)

    # -- generation (kvagent.client.generation) -------------------------------------------------
    def generate_stream(self, key: str, suffix_ids: Sequence[int], params: GenerationParams, *,
                        max_price: int | None = None, idempotency_key: str | None = None) -> GenerationStream:
        """See :meth:`GenerationClient.generate_stream`."""
        return self.generation.generate_stream(
            key, suffix_ids, params, max_price=max_price, idempotency_key=idempotency_key
        )

    # -- market (kvagent.client.market) ---------------------------------------------------------
    def account(self) -> dict[str, Any]:
        """See :meth:`MarketClient.account`."""
        return self.market.account()

    def account_balance(self) -> int:
        return self.market.account_balance()

    def statement(self) -> dict[str, Any]:
        """See :meth:`MarketClient.statement`."""
        return self.market.statement()

    def credit(self, principal: str, amount: int, memo: str = "", *, create: bool = False,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """See :meth:`MarketClient.credit`."""
        return self.market.credit(principal, amount, memo, create=create, idempotency_key=idempotency_key)

    def adjust(self, principal: str, amount: int, reason: str, *, allow_negative: bool = False,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """See :meth:`MarketClient.adjust`."""
        return self.market.adjust(
            principal, amount, reason, allow_negative=allow_negative, idempotency_key=idempotency_key
        )

    def price(self, key: str) -> dict[str, Any]:
        """See :meth:`MarketClient.price`."""
        return self.market.price(key)

    def set_price(self, key: str, price: int) -> int:
        """See :meth:`MarketClient.set_price`."""
        return self.market.set_price(key, price)

    def dispute(self, key: str, receipt: str, *, layer: int | None = None, position: int | None = None,
                difference: float | None = None, detail: str = "") -> dict[str, Any]:
        """See :meth:`MarketClient.dispute`."""
        return self.market.dispute(
            key, receipt, layer=layer, position=position, difference=difference, detail=detail
        )

    def topup(self, amount: int, wallet: Wallet) -> dict[str, Any]:
        """See :meth:`MarketClient.topup`."""
        return self.market.topup(amount, wallet)

    def withdraw(self, amount: int, to: str, *, principal: str | None = None,
                 idempotency_key: str | None = None) -> dict[str, Any]:
        """See :meth:`MarketClient.withdraw`."""
        return self.market.withdraw(amount, to, principal=principal, idempotency_key=idempotency_key)

    def chain_audit(self) -> dict[str, Any]:
        """See :meth:`MarketClient.chain_audit`."""
        return self.market.chain_audit()
