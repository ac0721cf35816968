"""x402 account routes: a token holder tops up its balance by x402 (``POST /v1/account/topup``); a publisher
(or an admin for one) is paid out on chain from the host's wallet (``POST /v1/account/withdraw``); an admin
compares the ledger's deposits and withdrawals with the chain (``GET /v1/market/x402-audit``). The priced
routes' x402 is in kvagent.server.market_routes' charging hooks; a wallet's signed statement in its
``/v1/account/statement`` (kvagent.payments.signin)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictInt
from starlette.concurrency import run_in_threadpool

from ..costs import market as mk
from ..errors import ConfigError, IdempotencyError, PaymentError, SettlementFailed
from ..payments.terms import PAYMENT_REQUIRED_HEADER, PAYMENT_SIGNATURE_HEADER
from . import x402_flow
from .auth import Principal, valid_principal_name
from .http import ApiError, read_json
from .market_routes import IDEMPOTENCY_HEADER, REPLAYED_HEADER, idempotency_refused
from .state import State
from .x402 import X402Gateway

log = logging.getLogger("kvagent.server")


class TopupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: StrictInt


class WithdrawRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: StrictInt
    to: str
    principal: str | None = None  # an admin pays out another principal's balance


def routes(st: State) -> APIRouter:
    """The top-up, withdrawal and chain-audit routes (404 ``x402_disabled`` on a host without x402)."""
    app = APIRouter()
    ledger = st.market

    def gateway() -> X402Gateway:
        if st.x402 is None:
            raise ApiError(404, "x402_disabled", "this host takes no x402 payments (no --x402-* options)")
        return st.x402

    @app.post("/v1/account/topup")
    async def topup(request: Request) -> JSONResponse:
        p = st.principal(request)
        gw = gateway()
        body: TopupRequest = await read_json(request, TopupRequest)
        try:
            amount = mk.amount(body.amount, "top-up", allow_zero=False)
        except ConfigError as exc:
            raise ApiError(422, "invalid_request", str(exc), param="amount") from exc
        url, sig = str(request.url), request.headers.get(PAYMENT_SIGNATURE_HEADER)
        if sig is None:
            raise ApiError(402, "payment_required", f"pay {amount} {ledger.currency} by x402 to top up",
                           extra={"amount": amount, "currency": ledger.currency},
                           headers={PAYMENT_REQUIRED_HEADER: gw.required_header(
                               amount, url, f"top-up of {p.name} by {amount} {ledger.currency}")})
        try:  # settled, then deposited to the bearer's principal (nothing else to post)
            paid = await run_in_threadpool(x402_flow.pay, gw, ledger, sig, amount, p.name,
                                           lambda cur, who: None)
        except PaymentError as exc:
            raise x402_flow.api_error(exc, gw, amount, url) from exc
        log.info("top-up of %d %s by %s settled in %s (%s)", amount, ledger.currency, p.name,
                 paid.settlement.transaction, paid.deposit.receipt)
        return JSONResponse({"principal": p.name, "deposited": amount, "receipt": paid.deposit.receipt,
                             "transaction": paid.settlement.transaction, "network": paid.settlement.network,
                             "balance": ledger.balance(p.name), "currency": ledger.currency},
                            headers=paid.headers())

    @app.post("/v1/account/withdraw")
    async def withdraw(request: Request) -> JSONResponse:
        from .withdrawals import WithdrawalRefused
        from .withdrawals import withdraw as pay_out

        p = st.principal(request)
        gateway()
        body: WithdrawRequest = await read_json(request, WithdrawRequest)
        who = _payee(p, body.principal)
        sender = st.x402_host.payouts if st.x402_host is not None else None
        if sender is None:
            raise ApiError(501, "payouts_unavailable", "this host keeps no wallet key to pay out from "
                           "(--x402-wallet and --x402-rpc)")
        idem = request.headers.get(IDEMPOTENCY_HEADER)
        if idem is None:
            raise ApiError(422, "invalid_request", "a withdrawal needs an Idempotency-Key header (a retry "
                           "with the same key pays out once)")
        try:
            w = await run_in_threadpool(pay_out, ledger, sender, who, body.amount, body.to, idem)
        except WithdrawalRefused as exc:
            raise ApiError(409, "insufficient_balance", str(exc),
                           extra={"balance": exc.balance, "currency": ledger.currency}) from exc
        except SettlementFailed as exc:
            raise ApiError(502, "transfer_failed", str(exc), extra={"reason": exc.reason}) from exc
        except IdempotencyError as exc:
            raise idempotency_refused(exc) from exc
        except ConfigError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from exc
        out = {"principal": who, "amount": w.receipt.amount, "to": body.to, "status": w.status,
               "transaction": w.transaction, "receipt": w.receipt.receipt, "replayed": w.receipt.replayed,
               "balance": ledger.balance(who), "currency": ledger.currency}
        return JSONResponse(out, headers={REPLAYED_HEADER: "1"} if w.receipt.replayed else {})

    @app.get("/v1/market/x402-audit")
    def chain_audit(request: Request) -> dict[str, Any]:
        from .x402_audit import chain_audit as audit_chain

        p = st.principal(request)
        if not p.admin:
            raise ApiError(403, "forbidden", "only an admin principal may do this")
        gw = gateway()
        rpc = st.x402_host.rpc if st.x402_host is not None else None
        if rpc is None:
            raise ApiError(501, "no_rpc", "the chain audit needs --x402-rpc")
        a = audit_chain(ledger, rpc, gw.terms.asset, gw.terms.pay_to)
        return {**a.__dict__, "ok": a.ok, "currency": ledger.currency}

    return app


def _payee(p: Principal, named: str | None) -> str:
    """Whose balance a withdrawal pays out: the caller's own, or (an admin's call) the principal named."""
    if named is None or named == p.name:
        return p.name
    if not p.admin:
        raise ApiError(403, "forbidden", "only an admin may pay out another principal's balance")
    if not valid_principal_name(named):
        raise ApiError(422, "invalid_request", "principal must match [A-Za-z0-9_.@:-]{1,128}",
                       param="principal")
    return named
