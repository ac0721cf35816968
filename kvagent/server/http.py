"""HTTP plumbing shared by every route module: the error answer, bounded JSON bodies, byte ranges, the access
log."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from ..errors import (
    ArtifactError,
    ArtifactTooLargeError,
    ConfigError,
    EngineError,
    IdempotencyError,
    InvalidKeyError,
    KVAgentError,
    RegistryError,
)
from .metrics import Metrics
from .settings import MAX_JSON_BODY

log = logging.getLogger("kvagent.server")
access_log = logging.getLogger("kvagent.server.access")


class ApiError(RegistryError):
    """An HTTP error answer: status, machine code and human detail."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None, param: str | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers
        self.extra = extra  # more fields of the JSON answer (e.g. a 402's quote)
        self.param = param  # the request field at fault (OpenAI-shaped answers)


def not_found(key: str) -> ApiError:
    return ApiError(404, "not_found", f"no artifact {key[:16]}… is visible to you")


def authorization_of(scope: Any) -> str | None:
    """The ``Authorization`` header of an ASGI request scope (for middleware that runs before routing)."""
    return next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None)


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


_KVAGENT_STATUS: list[tuple[type[KVAgentError], int, str]] = [
    (ApiError, 0, ""),
    (ArtifactTooLargeError, 413, "too_large"),
    (ArtifactError, 422, "invalid_artifact"),
    (InvalidKeyError, 422, "invalid_key"),
    (EngineError, 422, "invalid_generation"),
    (ConfigError, 422, "invalid_request"),
]


#: Paths answered in OpenAI's error shape, so OpenAI clients raise their usual exceptions.
OPENAI_PATHS = ("/v1/chat/", "/v1/completions", "/v1/models")
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
                 403: "permission_error", 404: "invalid_request_error", 409: "invalid_request_error",
                 413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PATHS)


def openai_error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                          param: str | None = None, extra: dict[str, Any] | None = None) -> JSONResponse:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    err = {
        "message": message,
        "type": _OPENAI_TYPES.get(status, "server_error"),
        "param": param,
        "code": code,
    }
    return JSONResponse({"error": {**(extra or {}), **err}}, status_code=status, headers=headers)


def openai_response(exc: KVAgentError) -> JSONResponse:
    """``exc`` as an OpenAI-shaped error answer (the kvagent status and code mapping, OpenAI's body)."""
    if isinstance(exc, ApiError):
        code = "invalid_api_key" if exc.status == 401 else exc.code
        return openai_error_response(exc.status, code, exc.detail, exc.headers, exc.param, exc.extra)
    plain = kvagent_response(exc)
    body = json.loads(bytes(plain.body))
    return openai_error_response(plain.status_code, body.get("error", "server_error"), body.get("detail", ""))


def kvagent_response(exc: KVAgentError) -> JSONResponse:
    if isinstance(exc, ApiError):
        if exc.extra:
            body = {**exc.extra, "error": exc.code, "detail": exc.detail}
            return JSONResponse(body, status_code=exc.status, headers=exc.headers)
        return error_response(exc.status, exc.code, exc.detail, exc.headers)
    if isinstance(exc, IdempotencyError):  # (the market routes answer it as an ApiError, receipt included)
        return error_response(exc.status, exc.code, str(exc)[:1000])
    for cls, status, code in _KVAGENT_STATUS:
        if isinstance(exc, cls):
            return error_response(status, code, str(exc)[:1000])
    log.error("unmapped kvagent error: %s", exc)
    return error_response(500, "internal", "internal server error")


def validation_detail(exc: Any) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)[:1000] or "invalid request"


async def read_body(request: Request, limit: int, code: str = "too_large") -> bytes:
    """The request body, refused with 413 ``code`` as soon as it passes ``limit`` bytes."""
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, code, f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, model: type[BaseModel]) -> Any:
    """Read a JSON body of at most MAX_JSON_BODY bytes into ``model`` (413 / 422 on failure)."""
    body = await read_body(request, MAX_JSON_BODY)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", validation_detail(exc)) from exc


class RangeNotSatisfiable(Exception):
    pass


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte span of a single ``Range: bytes=a-b | a- | -n`` header, or None for the whole file.

    Raises RangeNotSatisfiable for a malformed, multi-part or out-of-bounds byte range.
    """
    if value is None:
        return None
    unit, _, spec = value.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        raise RangeNotSatisfiable(value)
    first, dash, last = spec.strip().partition("-")
    if (
        not dash
        or not (first.isdigit() or last.isdigit())
        or (first and not first.isdigit())
        or (last and not last.isdigit())
    ):
        raise RangeNotSatisfiable(value)
    if not first:
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(value)
        return max(0, size - n), size - 1
    a = int(first)
    b = int(last) if last else size - 1
    if a >= size or b < a:
        raise RangeNotSatisfiable(value)
    return a, min(b, size - 1)



# -- access log / latency middleware ----------------------------------------------------------
class AccessLog:
    """Pure ASGI middleware: one JSON access-log line and one latency observation per request."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status, sent = 500, 0

        async def send_wrapper(message: Any) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            dt = time.perf_counter() - t0
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.latency.labels(scope["method"], route).observe(dt)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    json.dumps(
                        {
                            "ts": round(time.time(), 3),
                            "method": scope["method"],
                            "path": scope["path"][:200],
                            "route": route,
                            "status": status,
                            "bytes": sent,
                            "ms": round(dt * 1000, 2),
                            "principal": (scope.get("state") or {}).get("principal"),
                            "token_id": (scope.get("state") or {}).get("token_id"),  # never the token
                        },
                        separators=(",", ":"),
                    )
                )


async def finish(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` in a worker thread to completion, even when the calling task is being cancelled.

    For the clean-up of a streamed answer (releasing a quota lease, metering, settling a charge): when the
    client disconnects, Starlette cancels the stream's task, and a plain ``await`` in its ``finally`` would
    be cancelled too, losing the clean-up. The shielded work goes on; the cancellation still propagates.
    """
    await asyncio.shield(asyncio.ensure_future(run_in_threadpool(fn, *args)))
