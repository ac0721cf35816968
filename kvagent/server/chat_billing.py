"""The bill of one chat/completion request: the Idempotency-Key's replay, the pre-charge once the prompt's
cache use is known, settling (or refunding) it when the answer is done, the receipt headers, and keeping
the answer for a repeat of its key. The ledger work runs off the event loop (kvagent.server.market_routes
holds the charging rules); the decisions of what to charge are the plain functions below."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..reuse.info import CacheInfo
from . import market_routes
from .auth import Principal
from .http import ApiError, finish
from .ledger import Receipt
from .state import State

log = logging.getLogger("kvagent.server")


def precharge_cached(cached_tokens: int, x402_host: bool) -> int:
    """The prompt tokens a pre-charge bills as read from a cached KV (the rest as prefilled)."""
    if x402_host:
        # a 402's x402 requirements are priced before the buyer is known (anonymous, or a bearer whose
        # cache may change before it pays) and the paid request's after (the wallet's own private cache):
        # the pre-charge counts no prompt token as cached, so the amount signed for is the amount checked;
        # settling gives the cache's discount back
        return 0
    return cached_tokens


def royalty_origin(info: CacheInfo | None) -> str | None:
    """The published artifact whose royalty the pre-charge adds: the one the prompt resumed from, when it
    came from this server's registry (None otherwise)."""
    if info is not None and info.source == "registry" and info.origin:
        return info.origin
    return None


class ChatBill:
    """What one request pays: nothing on a free host (no receipt), else a pre-charge for the whole prompt and
    ``max_new_tokens``, settled to what was used."""

    def __init__(self, st: State, principal: Principal, request: Request, digest: str, n_prompt: int,
                 max_new_tokens: int) -> None:
        self.st, self.principal, self.request = st, principal, request
        self.digest = digest  # the request's, which its Idempotency-Key is bound to (with the route)
        self.n_prompt, self.max_new_tokens = n_prompt, max_new_tokens
        self.receipt: Receipt | None = None  # the market's pre-charge (None when hosting is free)
        self.given_back = 0  # what settling the pre-charge returned (unused output tokens, found cache)
        self.charged_cached = 0  # the prompt tokens the pre-charge billed as cached

    async def replay(self) -> Response | None:
        """Before the engine runs: None for a new (or no) Idempotency-Key; the stored answer of the same
        request (charged 0); else the key's refusal (409 already served or refunded, 422 another request)."""
        return await run_in_threadpool(market_routes.replay, self.st, self.principal, self.request,
                                       self.request.url.path, self.digest)

    async def charge(self, info: CacheInfo | None) -> None:
        """Pre-charge the request once its cache use is known (host token prices, plus the royalty of a
        published artifact it resumed from); a refusal is a 402 with a quote, before anything is served."""
        row = None
        origin = royalty_origin(info)
        if origin is not None:
            try:
                row = await run_in_threadpool(self.st.visible, origin, self.principal)
            except ApiError:
                row = None
        cached = precharge_cached(info.cached_tokens if info else 0, self.st.x402 is not None)
        self.charged_cached = cached
        self.receipt = await run_in_threadpool(
            market_routes.charge_chat, self.st, self.principal, self.request, self.n_prompt, cached,
            self.max_new_tokens, self.request.url.path, self.digest, row)

    async def settle(self, cached_tokens: int, n_generated: int) -> None:
        """Give back what the answer did not use (its output tokens, and the prompt tokens found cached
        beyond the pre-charge's: an engine that resolved the prompt itself reported them by now); runs to
        the end even when the client went away."""
        def settle() -> None:
            self.given_back = market_routes.settle_chat(
                self.st, self.receipt, self.n_prompt, self.charged_cached, cached_tokens,
                self.max_new_tokens, n_generated)

        await finish(settle)

    async def refund(self, why: str) -> None:
        """Reverse the pre-charge of a request that answers nothing (a replay's was never charged here)."""
        if self.receipt is not None and not self.receipt.replayed:
            await finish(self.st.market.refund, self.receipt.receipt, why)
        self.receipt = None

    def headers(self) -> dict[str, str]:
        """The receipt (and what the request moved: before settling, the whole pre-charge) and an x402
        payment's ``PAYMENT-RESPONSE``."""
        return {**market_routes.receipt_headers(self.receipt, self.given_back),
                **market_routes.payment_headers(self.request)}

    async def keep(self, answer: bytes, answer_id: str) -> None:
        """Keep a whole answer for a repeat of its Idempotency-Key; a failure is logged (the answer is paid
        for and still given; a repeat is refused with 409, never served)."""
        try:
            await finish(market_routes.keep_answer, self.st, self.receipt, self.request, answer)
        except Exception:
            log.warning("could not keep the answer of %s for its Idempotency-Key", answer_id, exc_info=True)

