"""Registry routes: lookup by key and by prefix, publish, blob download, entitlements, delete, usage
ledger."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ..errors import KVAgentError
from ..kvcache.identity import validate_key
from . import market_routes, records
from .auth import Principal, valid_principal_name
from .http import ApiError, RangeNotSatisfiable, error_response, not_found, parse_range, read_json
from .meta import VISIBILITIES, ArtifactRow, LedgerEntry, can_see
from .publish import Validated, parse_signature, validate_upload
from .quotas import UploadMeter
from .settings import MAX_PREFIX_HASHES
from .state import State, handle, handle_json

log = logging.getLogger("kvagent.server")

_READ_CHUNK = 1 << 20


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrefixRequest(_Body):
    block_hashes: list[str] = Field(max_length=MAX_PREFIX_HASHES)


class GrantRequest(_Body):
    principal: str


def lookup_body(st: State, key: str, p: Principal) -> bytes:
    """The JSON answer to ``p``'s lookup of ``key``: the handle and its price (so a buyer can decide first).
    Raises a 404 ``ApiError`` for a key ``p`` cannot see; counts the lookup either way."""
    try:
        row = st.visible(key, p)
    except ApiError:
        st.metrics.lookups.labels("key", "miss").inc()
        raise
    st.metrics.lookups.labels("key", "hit").inc()
    return handle_json(row, price=st.market.price(row.key, row.owner), currency=st.market.currency)


def routes(st: State) -> APIRouter:
    """The registry's routes over ``st``."""
    app = APIRouter()

    # -- lookup -------------------------------------------------------------------------------
    @app.get("/v1/artifacts/{key}")
    async def get_artifact(key: str, request: Request) -> Response:
        # with a SQLite backend, kvagent.server.fast_lookup answers this path before FastAPI sees it
        p = st.buyer(request)  # with x402 on, a buyer without a token sees public artifacts
        body = (
            lookup_body(st, key, p)
            if st.meta.inline_reads
            else await run_in_threadpool(lookup_body, st, key, p)
        )
        return Response(body, media_type="application/json")  # no response model, no re-encoding

    @app.post("/v1/lookup/prefix")
    async def lookup_prefix(request: Request) -> dict[str, Any]:
        p = st.buyer(request)
        body: PrefixRequest = await read_json(request, PrefixRequest)
        for h in body.block_hashes:
            validate_key(h)

        def lookup() -> dict[str, Any] | None:
            found = records.longest_prefix(st.meta, st.copies, body.block_hashes, p.name)
            if found is None:
                return None
            row, blocks = found
            return {"key": row.key, "blocks": blocks, "handle": market_routes.priced(st, handle(row), row)}

        answer = lookup() if st.meta.inline_reads else await run_in_threadpool(lookup)
        if answer is None:
            st.metrics.lookups.labels("prefix", "miss").inc()
            raise ApiError(404, "not_found", "no visible artifact shares a prefix block with these hashes")
        st.metrics.lookups.labels("prefix", "hit").inc()
        return answer

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
        # asked for a missing key too (timing)
        entitled = await run_in_threadpool(st.meta.is_entitled, key, p.name)
        # refuse early only when the caller can see the row: for a restricted key it may not see, the answer
        # must not differ from a missing key's (it gets its own record once it uploads a valid artifact)
        if (
            existing is not None
            and existing.owner != p.name
            and (existing.visibility == "public" or entitled)
        ):
            st.metrics.publishes.labels("conflict").inc()
            raise ApiError(409, "conflict", "this key is already published by another principal")
        incoming = int(declared) if declared is not None and declared.isdigit() else None
        meter = await run_in_threadpool(UploadMeter, st.quotas, p.name, p.limits, incoming)  # or 429
        tmp = st.blobs.new_temp()
        try:
            size = 0
            with open(tmp, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    meter.add(len(chunk))  # 429 once the daily upload quota is spent
                    if size > limit:
                        st.metrics.publishes.labels("too_large").inc()
                        raise ApiError(413, "too_large", f"artifact exceeds the {limit}-byte limit")
                    f.write(chunk)
            try:
                v = await run_in_threadpool(validate_upload, tmp, key, signature, st.settings.block_size)
            except KVAgentError:
                st.metrics.publishes.labels("invalid").inc()
                raise
            await run_in_threadpool(market_routes.publish_price, st, key, p, request)
            status, row = await run_in_threadpool(_commit, st, tmp, key, p, visibility, v)
        except ClientDisconnect:
            log.info("client disconnected during upload of %s…", key[:16])
            return error_response(400, "incomplete", "upload was interrupted")
        finally:
            tmp.unlink(missing_ok=True)
            await run_in_threadpool(meter.charge)
        st.metrics.publishes.labels("created" if status == 201 else "identical").inc()
        return JSONResponse(handle(row), status_code=status)

    # -- download -----------------------------------------------------------------------------
    @app.get("/v1/artifacts/{key}/blob")
    def download(key: str, request: Request) -> Response:
        p = st.buyer(request)  # with x402 on, a wallet pays by PAYMENT-SIGNATURE without a token
        row = st.visible(key, p)
        url = st.blobs.presign(row.blob, st.settings.presign_expiry_s)
        if url is not None:  # the bytes bypass the app (object store / CDN); metered once, at issue time
            charged = market_routes.charge_download(st, p, row, request)
            st.meta.record(LedgerEntry(p.name, key, row.owner, row.size, "download", 0, time.time()))
            st.metrics.presigned.inc()
            st.metrics.presigned_bytes.inc(row.size)
            return Response(
                status_code=307, headers={**charged, "Location": url, "Cache-Control": "no-store"}
            )
        try:
            f = st.blobs.open_read(row.blob)  # a local open file survives a concurrent delete
        except FileNotFoundError as exc:
            raise not_found(key) from exc
        try:
            span = parse_range(request.headers.get("range"), row.size)
        except RangeNotSatisfiable:
            f.close()
            return error_response(416, "range_not_satisfiable", f"artifact is {row.size} bytes",
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
        try:
            headers.update(market_routes.charge_download(st, p, row, request))  # 402 before any byte is sent
        except BaseException:
            f.close()
            raise
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


    # -- ownership ----------------------------------------------------------------------------
    @app.post("/v1/artifacts/{key}/entitlements")
    async def grant(key: str, request: Request) -> dict[str, Any]:
        p = st.principal(request)
        row = await run_in_threadpool(st.owned, key, p)
        body: GrantRequest = await read_json(request, GrantRequest)
        if not valid_principal_name(body.principal):
            raise ApiError(422, "invalid_request", "principal must match [A-Za-z0-9_.@:-]{1,128}")
        await run_in_threadpool(records.grant_owned, st.meta, st.copies, row.key, p.name, body.principal)
        return {"key": row.key, "principal": body.principal, "granted": True}

    @app.delete("/v1/artifacts/{key}", status_code=204)
    def delete(key: str, request: Request) -> Response:
        p = st.principal(request)
        st.owned(key, p)
        row = records.delete_owned(st.meta, st.copies, key, p.name)
        if row is not None:
            st.blobs.remove(row.blob)
            if (host := st.model_host) is not None:
                host.forget(key)
        return Response(status_code=204)

    @app.get("/v1/ledger")
    def ledger(
        request: Request, role: str = "owner", key: str | None = None, limit: int = 100
    ) -> dict[str, Any]:
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


def _commit(
    st: State, tmp: Path, key: str, p: Principal, visibility: str, v: Validated
) -> tuple[int, ArtifactRow]:
    """Publish a validated temp file: rename into place, then insert the row (201), or reuse (200) / refuse
    (409)."""
    digest = v.header.payload_sha256

    def settle(existing: ArtifactRow) -> tuple[int, ArtifactRow]:
        if existing.owner != p.name:
            raise ApiError(409, "conflict", "this key is already published by another principal")
        if existing.payload_sha256 != digest:
            raise ApiError(
                409, "conflict", "this key is already published with a different payload; delete it first"
            )
        return 200, existing

    existing = st.meta.get(key)
    if existing is not None and existing.owner != p.name and not can_see(st.meta, existing, p.name):
        # no existence oracle: a key held out of the caller's sight gets the caller its own record
        return _commit_copy(st, tmp, key, p, visibility, v)
    if existing is not None:
        return settle(existing)
    st.quotas.check_storage(p.name, p.limits, v.size)  # 413 storage_quota
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
        if existing.owner != p.name and not can_see(st.meta, existing, p.name):
            return _commit_copy(st, tmp, key, p, visibility, v)
        return settle(existing)
    return 201, row


def _commit_copy(st: State, tmp: Path, key: str, p: Principal, visibility: str,
                 v: Validated) -> tuple[int, ArtifactRow]:
    """Publish the caller's own record of a key another principal holds hidden from it: 201 as if fresh,
    200 for an identical re-publish, 409 only for a different payload of the caller's own record."""
    mine = st.copies.get(key, p.name)
    if mine is None:
        st.quotas.check_storage(p.name, p.limits, v.size)  # 413 storage_quota
        name = st.blobs.publish(tmp, key)
        row = _row(key, p, visibility, v, name)
        try:
            mine = st.copies.insert(row, v.block_hashes)
        except BaseException:
            st.blobs.remove(name)
            raise
        if mine is None:
            return 201, row
        st.blobs.remove(name)  # lost a race with the caller's own concurrent publish
    if mine.payload_sha256 != v.header.payload_sha256:
        raise ApiError(
            409, "conflict", "this key is already published with a different payload; delete it first"
        )
    return 200, mine


def _row(key: str, p: Principal, visibility: str, v: Validated, blob: str) -> ArtifactRow:
    return ArtifactRow(
        key=key, owner=p.name, visibility=visibility, size=v.size, payload_sha256=v.header.payload_sha256,
        header_json=json.dumps(v.header.to_json(), sort_keys=True),
        signature_json=json.dumps(v.signature.to_json()) if v.signature else None,
        blob=blob, created_at=time.time(),
    )
