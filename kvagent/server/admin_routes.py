"""Admin API: bearer tokens issued, listed, rotated and revoked at run time (admin principals only).

    POST   /v1/admin/tokens                 {"principal", "publish", "admin", "expires_at" | "expires_in",
                                             "limits"}
                                            -> 201 {"token": <plaintext, shown this once>, "id", "prefix", …}
    GET    /v1/admin/tokens[?principal=P&all=true]  -> {"tokens": [...]} (never a token or its digest)
    POST   /v1/admin/tokens/{id}/rotate     -> 201 a new token like it; the old one is revoked
    DELETE /v1/admin/tokens/{id}            -> {"revoked": [...]}
    DELETE /v1/admin/tokens?principal=P     -> {"revoked": [...]} every active token of P (any name)

Changes go to the database: this node sees them at once, every other node within its token cache's TTL.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from ..errors import ConfigError
from .auth import Principal
from .http import ApiError, read_json
from .quotas import Limits
from .state import State
from .token_store import TokenStore


class IssueRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    principal: str
    publish: bool = False
    admin: bool = False
    expires_at: float | None = None  # unix seconds
    expires_in: float | None = None  # seconds from now (instead of expires_at)
    limits: dict[str, Any] | None = None  # as in the token file


def routes(st: State) -> APIRouter:
    app = APIRouter()
    store: TokenStore | None = st.token_store

    def admin(request: Request) -> tuple[Principal, TokenStore]:
        p = st.principal(request)
        if not p.admin:
            raise ApiError(403, "forbidden", "only an admin principal may manage tokens")
        if store is None:
            raise ApiError(404, "not_found", "this server keeps no tokens in its database")
        return p, store

    @app.post("/v1/admin/tokens")
    async def issue(request: Request) -> JSONResponse:
        p, s = admin(request)
        body: IssueRequest = await read_json(request, IssueRequest)
        if body.expires_at is not None and body.expires_in is not None:
            raise ConfigError("give expires_at or expires_in, not both")
        if body.expires_in is not None and body.expires_in <= 0:
            raise ConfigError("expires_in must be positive")
        expires = body.expires_at if body.expires_in is None else time.time() + body.expires_in
        limits = Limits.from_mapping(body.limits, "limits")
        issued = await run_in_threadpool(s.issue, body.principal, publish=body.publish, admin=body.admin,
                                         limits=limits, expires_at=expires, created_by=p.name)
        st.tokens.forget()
        return JSONResponse(issued.to_json(), status_code=201, headers={"Cache-Control": "no-store"})

    @app.get("/v1/admin/tokens")
    def list_tokens(request: Request, principal: str | None = None, all: bool = False) -> dict[str, Any]:
        _, s = admin(request)
        return {"tokens": [r.to_json() for r in s.list_tokens(principal, include_inactive=all)]}

    @app.post("/v1/admin/tokens/{tid}/rotate")
    def rotate(tid: str, request: Request) -> JSONResponse:
        p, s = admin(request)
        issued = s.rotate(tid, by=p.name)
        if issued is None:
            raise ApiError(404, "not_found", f"no active token {tid[:40]}")
        st.tokens.forget()
        return JSONResponse({**issued.to_json(), "replaces": tid}, status_code=201,
                            headers={"Cache-Control": "no-store"})

    @app.delete("/v1/admin/tokens/{tid}")
    def revoke_one(tid: str, request: Request) -> dict[str, Any]:
        p, s = admin(request)
        if not tid.startswith("tok_"):
            raise ApiError(422, "invalid_request", "a token id starts with tok_; revoke a principal's tokens "
                                                   "with DELETE /v1/admin/tokens?principal=NAME")
        gone = s.revoke_id(tid, by=p.name)
        st.tokens.forget()
        old = s.get(tid)
        return _revoked(gone, tid, [old] if old else [])

    @app.delete("/v1/admin/tokens")
    def revoke_principal(request: Request, principal: str) -> dict[str, Any]:
        p, s = admin(request)
        gone = s.revoke_principal(principal, by=p.name)  # any name: one that starts with tok_ too
        st.tokens.forget()
        return _revoked(gone, principal, s.list_tokens(principal, include_inactive=True))

    def _revoked(gone: list[Any], target: str, matching: list[Any]) -> dict[str, Any]:
        if not gone and not any(r.status() == "revoked" for r in matching):
            raise ApiError(404, "not_found", f"no token of {target[:130]}")
        return {"revoked": [r.to_json() for r in gone]}

    return app
