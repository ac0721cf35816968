"""Provider-side generation: continue from a published artifact's KV on this server's model (NDJSON stream)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt
from starlette.concurrency import run_in_threadpool

from ..engine import GenerationParams
from ..errors import KVAgentError
from .http import ApiError, read_json
from .meta import LedgerEntry
from .state import State

log = logging.getLogger("kvagent.server")


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

    # -- generate -----------------------------------------------------------------------------
    @app.post("/v1/artifacts/{key}/generate")
    async def generate(key: str, request: Request) -> Response:
        p = st.principal(request)
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
            raise ApiError(409, "wrong_model", "the artifact was computed by another model than this server runs")
        kv = await run_in_threadpool(st.host.kv_for, key, st.blobs.path(row.blob))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(ev: tuple[Any, ...]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        threading.Thread(
            target=st.host.run, args=(kv, req.suffix_ids, params, emit, cancelled), daemon=True, name="kvagent-gen"
        ).start()
        first = await queue.get()
        if first[0] == "error":
            st.metrics.generates.labels("error").inc()
            raise first[1] if isinstance(first[1], KVAgentError) else ApiError(500, "internal", "generation failed")
        st.metrics.generates.labels("ok").inc()

        async def lines() -> AsyncIterator[bytes]:
            ev, n = first, 0
            try:
                while True:
                    if ev[0] == "token":
                        n += 1
                        yield b'{"token":%d}\n' % ev[1]
                    elif ev[0] == "done":
                        yield json.dumps({"done": True, "finish_reason": ev[1], "generated": ev[2]}).encode() + b"\n"
                        return
                    else:
                        log.warning("generation for %s… failed mid-stream: %s", key[:16], ev[1])
                        yield json.dumps({"error": "generation_failed", "detail": "generation failed"}).encode() + b"\n"
                        return
                    ev = await queue.get()
            finally:
                cancelled.set()
                st.metrics.tokens.inc(n)
                await run_in_threadpool(
                    st.meta.record, LedgerEntry(p.name, key, row.owner, row.size, "generate", n, time.time())
                )

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return app
