"""The lookup hot path as plain ASGI: ``GET /v1/artifacts/{key}`` without FastAPI's routing layers.

A metadata lookup is the registry's most frequent request and its cheapest: a few indexed reads of a local
SQLite file. Routed through FastAPI (routing, dependency solving, exception middleware) and a worker thread,
the framework costs several times the query. :class:`FastLookup` answers that one path itself, with the same
token check, visibility rules, price, metrics, access-log fields and error bodies as the FastAPI route in
``registry_routes`` (which still serves it when the database is not a local file, e.g. PostgreSQL, whose reads
go to worker threads). It sits inside the access log and the rate limiter, so both still apply.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from starlette.responses import Response

from ..errors import KVAgentError
from .http import authorization_of, error_response, kvagent_response
from .registry_routes import lookup_body
from .state import State

log = logging.getLogger("kvagent.server")

_PATH = re.compile(r"/v1/artifacts/([0-9a-f]{64})")


class _Route:
    """What the access log and the latency histogram read from ``scope["route"]``."""

    path = "/v1/artifacts/{key}"


_ROUTE = _Route()


class FastLookup:
    """Pure ASGI middleware answering ``GET /v1/artifacts/{64 hex}`` when the metadata reads are inline."""

    def __init__(self, app: Any, st: State) -> None:
        self.app, self.st = app, st

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        m = None
        if scope["type"] == "http" and scope["method"] == "GET" and self.st.meta.inline_reads:
            m = _PATH.fullmatch(scope["path"])
        if m is not None and self.st.x402 is not None and authorization_of(scope) is None:
            m = None  # a buyer without a token (x402): the route answers it (State.buyer)
        if m is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = _ROUTE
        response: Response
        try:
            p = self.st.authenticate(authorization_of(scope))
            state = scope.setdefault("state", {})
            state["principal"], state["token_id"] = p.name, p.token_id
            response = Response(lookup_body(self.st, m.group(1), p), media_type="application/json")
        except KVAgentError as exc:
            response = kvagent_response(exc)
        except Exception:
            log.exception("unhandled error on GET %s", scope["path"][:100])
            response = error_response(500, "internal", "internal server error")
        await response(scope, receive, send)
