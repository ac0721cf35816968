"""Provider-side generation: continue from a published artifact's KV on this server's model (NDJSON
stream)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt
from starlette.concurrency import run_in_threadpool

from ..costs import market as mk
from ..engines import Finish, Token
from ..engines.params import GenerationParams
from ..errors import KVAgentError
from . import market_routes
from .chat import load_secret, principal_namespace
from .events import thread_events
from .http import ApiError, finish, read_json
from .meta import LedgerEntry
from .state import State

log = logging.getLogger("kvagent.server")

#: The route an Idempotency-Key of a hosted generation is bound to (with the artifact and the body).
GENERATE_ROUTE = "/v1/artifacts/{key}/generate"


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    suffix_ids: list[StrictInt] = Field(min_length=1, max_length=1 << 16)
    max_new_tokens: StrictInt = 64
    temperature: StrictFloat | StrictInt = 0.0
    top_k: StrictInt = 0
    top_p: StrictFloat | StrictInt = 1.0
    seed: StrictInt | None = None
    stop_token_ids: list[StrictInt] = Field(default_factory=list, max_length=1024)



def routes(st: State) -> APIRouter:
    """The provider-side generate route over ``st``."""
    app = APIRouter()
    secret = load_secret(st.settings.data_dir) if st.host is not None else b""

    # -- generate -----------------------------------------------------------------------------
    @app.post("/v1/artifacts/{key}/generate")
    async def generate(key: str, request: Request) -> Response:
        p = st.buyer(request)  # with x402 on, a wallet pays by PAYMENT-SIGNATURE without a token
        row = await run_in_threadpool(st.visible, key, p)
        if st.host is None:
            raise ApiError(501, "no_model", "this registry runs no model; download the KV instead")
        req: GenerateRequest = await read_json(request, GenerateRequest)
        params = GenerationParams(
            max_new_tokens=req.max_new_tokens, temperature=float(req.temperature), top_k=req.top_k,
            top_p=float(req.top_p), seed=req.seed, stop_token_ids=tuple(req.stop_token_ids),
        )
        if json.loads(row.header_json)["model_fingerprint"] != st.host.fingerprint:
            st.metrics.generates.labels("wrong_model").inc()
            raise ApiError(
                409, "wrong_model", "the artifact was computed by another model than this server runs"
            )
        # the Idempotency-Key is bound to the artifact and the whole request; a key seen before is refused
        # here (409 already served or refunded, 422 reused), before any engine work and with nothing charged
        digest = mk.request_digest(GENERATE_ROUTE, row.key, req.model_dump())
        replayed = await run_in_threadpool(
            market_routes.replay, st, p, request, market_routes.generate_scope(row), digest)
        if replayed is not None:
            return replayed
        lease = await run_in_threadpool(st.quotas.acquire, p.name, p.limits)  # or 429 too_many_generates
        try:
            kv = await run_in_threadpool(st.host.kv_for, key, row.blob, st.blobs.read_bytes)
            n_in, n_max = len(req.suffix_ids), req.max_new_tokens
            # or 402, or the key's refusal if a duplicate claimed it meanwhile
            rec = await run_in_threadpool(
                market_routes.charge_generate, st, p, row, request, n_in, n_max, digest)
        except BaseException:
            await run_in_threadpool(st.quotas.release, lease)
            raise
        host = st.host
        ns = principal_namespace(secret, p)
        events = thread_events(
            lambda sink, cancel: host.generate(kv, req.suffix_ids, params, sink, cancel, namespace=ns),
            "kvagent-gen",
        )
        first = await events.__anext__()
        if isinstance(first, Finish) and first.reason == "error":
            await events.aclose()
            st.metrics.generates.labels("error").inc()
            await run_in_threadpool(st.quotas.release, lease)
            if rec is not None and not rec.replayed:
                await run_in_threadpool(
                    st.market.refund, rec.receipt, "generation failed before its first token"
                )
            exc = first.error
            raise exc if isinstance(exc, KVAgentError) else ApiError(500, "internal", "generation failed")
        st.metrics.generates.labels("ok").inc()

        async def lines() -> AsyncIterator[bytes]:
            ev, n = first, 0
            try:
                while True:
                    if isinstance(ev, Token):
                        n += 1
                        yield b'{"token":%d}\n' % ev.token_id
                    elif ev.reason != "error":
                        st.metrics.observe_finish("generate", ev.usage)
                        done = {"done": True, "finish_reason": ev.reason, "generated": n}
                        yield json.dumps(done).encode() + b"\n"
                        return
                    else:
                        log.warning("generation for %s… failed mid-stream: %s", key[:16], ev.error)
                        yield (
                            json.dumps({"error": "generation_failed", "detail": "generation failed"}).encode()
                            + b"\n"
                        )
                        return
                    ev = await events.__anext__()
            finally:  # runs to the end even when the client went away and this task is cancelled
                await events.aclose()
                st.metrics.tokens.inc(n)
                await finish(
                    _close,
                    lease,
                    LedgerEntry(p.name, key, row.owner, row.size, "generate", n, time.time()),
                    rec,
                    n,
                )

        def _close(lease: str | None, entry: LedgerEntry, rec: Any, n: int) -> None:
            try:
                st.quotas.release(lease)
                st.meta.record(entry)
            finally:
                market_routes.settle_generate(st, rec, row, n_in, n_max, n)

        return StreamingResponse(lines(), media_type="application/x-ndjson",
                                 headers={**market_routes.receipt_headers(rec),
                                          **market_routes.payment_headers(request)})

    return app
