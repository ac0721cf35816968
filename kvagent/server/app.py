"""The FastAPI application of the registry (routes, auth, errors, metrics, access log)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..engine import GenerationParams
from ..errors import (
    ArtifactError,
    ArtifactTooLargeError,
    ConfigError,
    EngineError,
    InvalidKeyError,
    KVAgentError,
    RegistryError,
)
from ..identity import validate_key
from .auth import Principal, TokenTable, valid_principal_name
from .blobs import BlobDir
from .meta import VISIBILITIES, ArtifactRow, LedgerEntry, MetaStore, can_see, open_meta
from .publish import Validated, parse_signature, validate_upload
from .settings import MAX_JSON_BODY, MAX_PREFIX_HASHES, Settings

log = logging.getLogger("kvagent.server")
access_log = logging.getLogger("kvagent.server.access")

_READ_CHUNK = 1 << 20


class ApiError(RegistryError):
    """An HTTP error answer: status, machine code and human detail."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def _not_found(key: str) -> ApiError:
    return ApiError(404, "not_found", f"no artifact {key[:16]}… is visible to you")


# -- request bodies ------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrefixRequest(_Body):
    block_hashes: list[str] = Field(max_length=MAX_PREFIX_HASHES)


class GenerateRequest(_Body):
    suffix_ids: list[StrictInt] = Field(min_length=1, max_length=1 << 16)
    max_new_tokens: StrictInt = 64
    temperature: StrictFloat | StrictInt = 0.0
    top_k: StrictInt = 0
    top_p: StrictFloat | StrictInt = 1.0
    seed: StrictInt | None = None
    stop_token_ids: list[StrictInt] = Field(default_factory=list, max_length=1024)


class GrantRequest(_Body):
    principal: str


# -- metrics --------------------------------------------------------------------------------
class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.lookups = Counter("kvagent_lookups_total", "Artifact lookups", ["kind", "result"], registry=r)
        self.publishes = Counter("kvagent_publishes_total", "Publish attempts", ["result"], registry=r)
        self.bytes_served = Counter("kvagent_bytes_served_total", "Blob bytes sent", registry=r)
        self.generates = Counter("kvagent_generate_total", "Generate calls", ["result"], registry=r)
        self.tokens = Counter("kvagent_generated_tokens_total", "Tokens generated", registry=r)
        self.latency = Histogram(
            "kvagent_request_seconds", "Request latency (to the end of the body)", ["method", "route"], registry=r
        )


# -- server state ---------------------------------------------------------------------------
@dataclass
class State:
    settings: Settings
    tokens: TokenTable
    meta: MetaStore
    blobs: BlobDir
    metrics: Metrics
    host: Any = None  # ModelHost | None

    def principal(self, request: Request) -> Principal:
        p = self.tokens.resolve(request.headers.get("authorization"))
        if p is None:
            raise ApiError(401, "unauthorized", "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
        request.state.principal = p.name
        return p

    def visible(self, key: str, principal: Principal) -> ArtifactRow:
        validate_key(key)
        row = self.meta.get(key)
        if row is None or not can_see(self.meta, row, principal.name):
            raise _not_found(key)
        return row

    def owned(self, key: str, principal: Principal) -> ArtifactRow:
        row = self.visible(key, principal)
        if row.owner != principal.name:
            raise ApiError(403, "forbidden", "only the artifact's owner may do this")
        return row


def handle(row: ArtifactRow) -> dict[str, Any]:
    return {
        "key": row.key,
        "header": json.loads(row.header_json),
        "size": row.size,
        "visibility": row.visibility,
        "owner": row.owner,
        "blob_url": f"/v1/artifacts/{row.key}/blob",
        "signature": json.loads(row.signature_json) if row.signature_json else None,
    }


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


_KVAGENT_STATUS: list[tuple[type[KVAgentError], int, str]] = [
    (ApiError, 0, ""),
    (ArtifactTooLargeError, 413, "too_large"),
    (ArtifactError, 422, "invalid_artifact"),
    (InvalidKeyError, 422, "invalid_key"),
    (EngineError, 422, "invalid_generation"),
    (ConfigError, 422, "invalid_request"),
]


def _kvagent_response(exc: KVAgentError) -> JSONResponse:
    if isinstance(exc, ApiError):
        return _error(exc.status, exc.code, exc.detail, exc.headers)
    for cls, status, code in _KVAGENT_STATUS:
        if isinstance(exc, cls):
            return _error(status, code, str(exc)[:1000])
    log.error("unmapped kvagent error: %s", exc)
    return _error(500, "internal", "internal server error")


def _validation_detail(exc: Any) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)[:1000] or "invalid request"


async def read_json(request: Request, model: type[BaseModel]) -> Any:
    """Read a JSON body of at most MAX_JSON_BODY bytes into ``model`` (413 / 422 on failure)."""
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_JSON_BODY:
            raise ApiError(413, "too_large", f"request body exceeds {MAX_JSON_BODY} bytes")
        chunks.append(chunk)
    try:
        return model.model_validate_json(b"".join(chunks))
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", _validation_detail(exc)) from exc


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
    if not dash or not (first.isdigit() or last.isdigit()) or (first and not first.isdigit()) or (last and not last.isdigit()):
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
                    },
                    separators=(",", ":"),
                )
            )


# -- the app ----------------------------------------------------------------------------------
def build_state(settings: Settings) -> State:
    """Open the data dir and database, clean up after crashes, and load the model (if any)."""
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    tokens = TokenTable.from_file(settings.token_file)
    meta = open_meta(data_dir, settings.postgres_dsn)
    blobs = BlobDir(data_dir / "blobs")
    stale = blobs.clean_temp()
    if stale:
        log.info("removed %d stale upload temp file(s)", stale)
    blobs.reconcile(meta.blob_names())
    host = None
    if settings.model:
        from ..config import Config
        from .host import ModelHost, load_server_model

        models_dir = Path(settings.models_dir) if settings.models_dir else Config.resolve().models_dir
        host = ModelHost(load_server_model(settings.model, models_dir), settings.kv_cache_items)
        log.info("serving model %s (fingerprint %s…)", settings.model, host.fingerprint[:16])
    return State(settings, tokens, meta, blobs, Metrics(), host)


def create_app(settings: Settings) -> FastAPI:
    """The registry app for ``settings`` (opens its data dir and loads its model now)."""
    st = build_state(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        st.meta.close()
        log.info("registry stopped")

    app = FastAPI(title="kvagent registry", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.kv = st
    app.add_middleware(AccessLog, metrics=st.metrics)

    @app.exception_handler(KVAgentError)
    async def _on_kvagent(_: Request, exc: KVAgentError) -> JSONResponse:
        return _kvagent_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid_request", _validation_detail(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail)[:200], getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal", "internal server error")

    # -- operations ---------------------------------------------------------------------------
    @app.get("/v1/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "model_fingerprint": st.host.fingerprint if st.host else None}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- lookup -------------------------------------------------------------------------------
    @app.get("/v1/artifacts/{key}")
    def get_artifact(key: str, request: Request) -> dict[str, Any]:
        p = st.principal(request)
        try:
            row = st.visible(key, p)
        except ApiError:
            st.metrics.lookups.labels("key", "miss").inc()
            raise
        st.metrics.lookups.labels("key", "hit").inc()
        return handle(row)

    @app.post("/v1/lookup/prefix")
    async def lookup_prefix(request: Request) -> dict[str, Any]:
        p = st.principal(request)
        body: PrefixRequest = await read_json(request, PrefixRequest)
        for h in body.block_hashes:
            validate_key(h)
        found = await run_in_threadpool(st.meta.longest_prefix, body.block_hashes, p.name)
        row = await run_in_threadpool(st.meta.get, found[0]) if found else None
        if found is None or row is None:
            st.metrics.lookups.labels("prefix", "miss").inc()
            raise ApiError(404, "not_found", "no visible artifact shares a prefix block with these hashes")
        st.metrics.lookups.labels("prefix", "hit").inc()
        return {"key": found[0], "blocks": found[1], "handle": handle(row)}

    # -- publish ------------------------------------------------------------------------------
    @app.put("/v1/artifacts/{key}")
    async def publish(key: str, request: Request) -> JSONResponse:
        p = st.principal(request)
        if not p.publish:
            raise ApiError(403, "forbidden", f"principal {p.name!r} may not publish")
        validate_key(key)
        visibility = request.headers.get("x-kvagent-visibility", "restricted").strip().lower()
        if visibility not in VISIBILITIES:
            raise ApiError(422, "invalid_request", "X-KVAgent-Visibility must be 'public' or 'restricted'")
        signature = parse_signature(request.headers.get("x-kvagent-signature"))
        limit = st.settings.max_artifact_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            st.metrics.publishes.labels("too_large").inc()
            raise ApiError(413, "too_large", f"artifact exceeds the {limit}-byte limit")
        existing = await run_in_threadpool(st.meta.get, key)
        # refuse early only when the caller can see the row: for a restricted key it may not see, the answer
        # must not differ from a missing key's until it has uploaded a valid artifact for that very key
        if existing is not None and existing.owner != p.name and can_see(st.meta, existing, p.name):
            st.metrics.publishes.labels("conflict").inc()
            raise ApiError(409, "conflict", "this key is already published by another principal")
        tmp = st.blobs.new_temp()
        try:
            size = 0
            with open(tmp, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        st.metrics.publishes.labels("too_large").inc()
                        raise ApiError(413, "too_large", f"artifact exceeds the {limit}-byte limit")
                    f.write(chunk)
            try:
                v = await run_in_threadpool(validate_upload, tmp, key, signature, st.settings.block_size)
            except KVAgentError:
                st.metrics.publishes.labels("invalid").inc()
                raise
            status, row = await run_in_threadpool(_commit, st, tmp, key, p, visibility, v)
        except ClientDisconnect:
            log.info("client disconnected during upload of %s…", key[:16])
            return _error(400, "incomplete", "upload was interrupted")
        finally:
            tmp.unlink(missing_ok=True)
        st.metrics.publishes.labels("created" if status == 201 else "identical").inc()
        return JSONResponse(handle(row), status_code=status)

    # -- download -----------------------------------------------------------------------------
    @app.get("/v1/artifacts/{key}/blob")
    def download(key: str, request: Request) -> Response:
        p = st.principal(request)
        row = st.visible(key, p)
        path = st.blobs.path(row.blob)
        try:
            f = open(path, "rb")  # an open file survives a concurrent delete
        except FileNotFoundError as exc:
            raise _not_found(key) from exc
        try:
            span = parse_range(request.headers.get("range"), row.size)
        except RangeNotSatisfiable:
            f.close()
            return _error(416, "range_not_satisfiable", f"artifact is {row.size} bytes",
                          {"Content-Range": f"bytes */{row.size}"})
        start, end = span if span else (0, row.size - 1)
        length = end - start + 1
        headers = {
            "Accept-Ranges": "bytes",
            "Content-Length": str(length),
            "X-KVAgent-Payload-Sha256": json.loads(row.header_json)["payload_sha256"],
        }
        if span:
            headers["Content-Range"] = f"bytes {start}-{end}/{row.size}"
        st.meta.record(LedgerEntry(p.name, key, row.owner, length, "download", 0, time.time()))

        def body() -> Iterator[bytes]:
            with f:
                f.seek(start)
                left = length
                while left > 0:
                    chunk = f.read(min(_READ_CHUNK, left))
                    if not chunk:
                        return
                    left -= len(chunk)
                    st.metrics.bytes_served.inc(len(chunk))
                    yield chunk

        return StreamingResponse(body(), status_code=206 if span else 200, headers=headers,
                                 media_type="application/octet-stream")

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

    # -- ownership ----------------------------------------------------------------------------
    @app.post("/v1/artifacts/{key}/entitlements")
    async def grant(key: str, request: Request) -> dict[str, Any]:
        p = st.principal(request)
        row = await run_in_threadpool(st.owned, key, p)
        body: GrantRequest = await read_json(request, GrantRequest)
        if not valid_principal_name(body.principal):
            raise ApiError(422, "invalid_request", "principal must match [A-Za-z0-9_.@:-]{1,128}")
        await run_in_threadpool(st.meta.grant, row.key, body.principal)
        return {"key": row.key, "principal": body.principal, "granted": True}

    @app.delete("/v1/artifacts/{key}", status_code=204)
    def delete(key: str, request: Request) -> Response:
        p = st.principal(request)
        st.owned(key, p)
        row = st.meta.delete(key)
        if row is not None:
            st.blobs.remove(row.blob)
            if st.host is not None:
                st.host.forget(key)
        return Response(status_code=204)

    @app.get("/v1/ledger")
    def ledger(request: Request, role: str = "owner", key: str | None = None, limit: int = 100) -> dict[str, Any]:
        p = st.principal(request)
        if role not in ("owner", "consumer"):
            raise ApiError(422, "invalid_request", "role must be 'owner' or 'consumer'")
        if key is not None:
            validate_key(key)
        if not 1 <= limit <= 1000:
            raise ApiError(422, "invalid_request", "limit must be in 1..1000")
        rows = st.meta.ledger(p.name, role=role, key=key, limit=limit)
        return {"entries": [
            {"principal": e.principal, "key": e.key, "owner": e.owner, "bytes": e.bytes, "mode": e.mode,
             "tokens": e.tokens, "ts": e.ts}
            for e in rows
        ]}

    return app


def _commit(st: State, tmp: Path, key: str, p: Principal, visibility: str, v: Validated) -> tuple[int, ArtifactRow]:
    """Publish a validated temp file: rename into place, then insert the row (201), or reuse (200) / refuse (409)."""
    digest = v.header.payload_sha256

    def settle(existing: ArtifactRow) -> tuple[int, ArtifactRow]:
        if existing.owner != p.name:
            raise ApiError(409, "conflict", "this key is already published by another principal")
        if existing.payload_sha256 != digest:
            raise ApiError(409, "conflict", "this key is already published with a different payload; delete it first")
        return 200, existing

    existing = st.meta.get(key)
    if existing is not None:
        return settle(existing)
    name = st.blobs.publish(tmp, key)
    row = ArtifactRow(
        key=key, owner=p.name, visibility=visibility, size=v.size, payload_sha256=digest,
        header_json=json.dumps(v.header.to_json(), sort_keys=True),
        signature_json=json.dumps(v.signature.to_json()) if v.signature else None,
        blob=name, created_at=time.time(),
    )
    try:
        existing = st.meta.insert(row, v.block_hashes)
    except BaseException:
        st.blobs.remove(name)
        raise
    if existing is not None:  # lost a race with a concurrent publish of the same key
        st.blobs.remove(name)
        return settle(existing)
    return 201, row
