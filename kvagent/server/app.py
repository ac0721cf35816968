"""The FastAPI application: assembles the state, middleware, error handlers and the route modules.

Routes live in their own modules (``registry_routes``, ``generate_routes``, ...), each exposing
``routes(st) -> APIRouter``; this module only wires them together.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, KVAgentError
from . import admin_routes, generate_routes, market_routes, openai_routes, registry_routes, x402_routes
from .fast_lookup import FastLookup
from .http import (
    AccessLog,
    error_response,
    is_openai_path,
    kvagent_response,
    openai_error_response,
    openai_response,
    validation_detail,
)
from .quotas import RateLimit
from .settings import SETTINGS_ENV, Settings, from_env
from .state import State, build_state

log = logging.getLogger("kvagent.server")


def create_app(settings: Settings) -> FastAPI:
    """The registry app for ``settings`` (opens its data dir and loads its model now)."""
    st = build_state(settings)
    if st.host is not None:
        st.metrics.watch(st.host.batch)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # everything loaded so far (libraries, the model, the app) lives as long as the process: keep it out
        # of
        # the collector's full passes, which would otherwise walk it all and stall every request in flight
        gc.collect()
        gc.freeze()
        yield
        if st.host is not None:
            st.host.close()
        st.meta.close()
        log.info("registry stopped")

    app = FastAPI(title="kvagent registry", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.kv = st
    app.add_middleware(FastLookup, st=st)  # innermost: rate limits and the access log still apply
    app.add_middleware(RateLimit, lookup=st.tokens.lookup, quotas=st.quotas,  # inner: 429s are logged too
                       cached=None if st.meta.inline_reads else st.tokens.is_cached)
    app.add_middleware(AccessLog, metrics=st.metrics)

    @app.exception_handler(KVAgentError)
    async def _on_kvagent(request: Request, exc: KVAgentError) -> JSONResponse:
        return openai_response(exc) if is_openai_path(request.url.path) else kvagent_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if is_openai_path(request.url.path):
            return openai_error_response(400, "invalid_request_error", validation_detail(exc))
        return error_response(422, "invalid_request", validation_detail(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        if is_openai_path(request.url.path):
            return openai_error_response(
                exc.status_code, code, str(exc.detail)[:200], getattr(exc, "headers", None)
            )
        return error_response(exc.status_code, code, str(exc.detail)[:200], getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        if is_openai_path(request.url.path):
            return openai_error_response(500, "server_error", "internal server error")
        return error_response(500, "internal", "internal server error")

    @app.get("/v1/healthz")
    async def healthz() -> JSONResponse:  # no I/O: answers without waiting for the worker thread pool
        status, body = health(st.host)
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(registry_routes.routes(st))
    app.include_router(generate_routes.routes(st))
    app.include_router(openai_routes.routes(st))
    app.include_router(market_routes.routes(st))
    app.include_router(x402_routes.routes(st))
    app.include_router(admin_routes.routes(st))
    return app


def health(host: Any) -> tuple[int, dict[str, Any]]:
    """``/v1/healthz``'s status and body: 503 once the host's engine can no longer generate (a vLLM engine
    core that died), so a load balancer takes the node out instead of sending it requests that all fail."""
    from ..engines import engine_failure

    body: dict[str, Any] = {"ok": True, "model_fingerprint": host.fingerprint if host else None}
    failure = engine_failure(host.batch) if host is not None else None
    if failure:
        return 503, {**body, "ok": False, "error": failure}
    return 200, body


def create_app_from_env() -> FastAPI:
    """The app for the settings in ``KVAGENT_SERVER_SETTINGS`` (the factory ``--workers`` processes run)."""
    value = os.environ.get(SETTINGS_ENV)
    if not value:
        raise ConfigError(f"{SETTINGS_ENV} is not set; start workers with `kvagent serve --workers N`")
    return create_app(from_env(value))


__all__ = ["State", "create_app", "create_app_from_env"]
