"""Market routes (accounts, statements, credits, prices, disputes) and the charging hooks of the paid routes.

``charge_download``, ``charge_generate`` and ``charge_chat`` are called by the blob-download, generate and
OpenAI routes before anything is served: a refused charge is a 402 with a machine-readable quote and nothing
is sent. An ``Idempotency-Key`` is bound to its request (kvagent.server.ledger): a generation's routes ask
:func:`replay` before they run the engine, so a repeated key replays the stored answer or is refused (409,
``idempotency_key_already_served`` / ``idempotency_key_refunded``; 422 ``idempotency_key_reused`` for another
request), never generated or charged again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from starlette.concurrency import run_in_threadpool

from ..costs import market as mk
from ..errors import AlreadyServed, ConfigError, IdempotencyError, PaymentError
from ..kvcache.identity import validate_key
from ..payments.terms import PAYMENT_SIGNATURE_HEADER
from . import x402_flow
from .auth import Principal, valid_principal_name
from .http import ApiError, not_found, read_json
from .ledger import Ledger, Receipt
from .meta import ArtifactRow
from .state import State
from .x402 import claimed

log = logging.getLogger("kvagent.server")

RECEIPT_HEADER = "X-KVAgent-Receipt"
CHARGED_HEADER = "X-KVAgent-Charged"
REPLAYED_HEADER = "X-KVAgent-Replayed"
MAX_PRICE_HEADER = "x-kvagent-max-price"
IDEMPOTENCY_HEADER = "idempotency-key"
PRICE_HEADER = "x-kvagent-price"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreditRequest(_Body):
    principal: str
    amount: StrictInt
    memo: str = Field(default="", max_length=mk.MAX_MEMO)
    create: StrictBool = False  # credit a principal no token names yet (its token is issued later)


class AdjustRequest(_Body):
    principal: str
    amount: StrictInt  # signed: negative debits, positive credits
    reason: str = Field(min_length=1, max_length=mk.MAX_REASON)
    allow_negative: StrictBool = False  # a debit may leave a debt (e.g. a chargeback of money already spent)


class PriceRequest(_Body):
    price: StrictInt


class DisputeRequest(_Body):
    receipt: str = Field(min_length=1, max_length=mk.MAX_RECEIPT_ID)
    layer: StrictInt | None = None
    position: StrictInt | None = None
    difference: StrictFloat | StrictInt | None = None
    detail: str = Field(default="", max_length=mk.MAX_DISPUTE_DETAIL)


def _max_price(request: Request) -> int | None:
    raw = request.headers.get(MAX_PRICE_HEADER)
    if raw is None:
        return None
    try:
        return mk.amount(raw, "X-KVAgent-Max-Price")
    except ConfigError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from exc


def _payment_required(exc: mk.PaymentRefused, st: State | None = None, request: Request | None = None
                      ) -> ApiError:
    """Today's 402 with its JSON quote; with x402 on, the ``PAYMENT-REQUIRED`` requirements beside it."""
    q = exc.quote
    what = ("the price is above your X-KVAgent-Max-Price" if q.reason == "price_above_max"
            else "your balance is below the price")
    err = ApiError(402, "payment_required", f"{what}: {q.price} {q.currency}, balance {q.balance}",
                   extra={"quote": q.to_json()})
    if st is None or request is None or st.x402 is None:
        return err
    return x402_flow.refusal(err, st.x402, q, str(request.url))


def _wallet_only(request: Request) -> bool:
    """Whether the buyer has no bearer token (its principal is the wallet it signs with, or anonymous)."""
    return bool(getattr(request.state, "x402_wallet", False))


def _signature(st: State, request: Request) -> str | None:
    """The request's ``PAYMENT-SIGNATURE`` when this host takes x402 (else None: it is ignored)."""
    return request.headers.get(PAYMENT_SIGNATURE_HEADER) if st.x402 is not None else None


def _no_payment(st: State, p: Principal, request: Request, quote: mk.Quote) -> ApiError:
    """A wallet buyer's request that pays nothing: 402 with the requirements when there is a price, 401 when
    there is none (what is free here is for token holders)."""
    if quote.price > 0 and st.x402 is not None:
        return _payment_required(mk.PaymentRefused(quote), st, request)
    return ApiError(401, "unauthorized", "missing or invalid bearer token (a wallet buys priced artifacts "
                    "only)", {"WWW-Authenticate": "Bearer"})


def paid_digest(digest: str, sig: str | None) -> str:
    """A request's digest, bound to the exact ``PAYMENT-SIGNATURE`` that pays it: another header with the
    same payment key (a forgery reusing a nonce) is another request, never served the first's answer."""
    if sig is None:
        return digest
    return mk.request_digest("x402", digest, hashlib.sha256(sig.encode()).hexdigest())


def _idempotency(st: State, request: Request) -> str | None:
    """The key a paid request is known by: its payment's (one authorisation, one purchase), else its
    ``Idempotency-Key``."""
    sig = _signature(st, request)
    if sig is None:
        return request.headers.get(IDEMPOTENCY_HEADER)
    try:
        return claimed(sig)[1]
    except PaymentError as exc:
        raise ApiError(400, "payment_invalid", str(exc), extra={"reason": exc.reason}) from exc


def _pay(st: State, p: Principal, request: Request, sig: str, amount: int,
         owner_key: tuple[str, str, str, str], charge: x402_flow.Charge
         ) -> tuple[Receipt | None, dict[str, str]]:
    """Pay ``amount`` by the x402 payment ``sig`` and post the purchase (``charge``) with its deposit in one
    database transaction; (receipt, headers). A payment already made and recorded (the same header again)
    answers the first receipt, ``replayed``, settling nothing (``owner_key``: the idempotency owner, scope
    digest and kind ``charge`` claims). Refusals: 402 (invalid, not settled: nothing served or charged), 503
    (facilitator down), the idempotency refusals, or the quote's 402 when the purchase failed after the
    money settled (it stays on the payer's balance)."""
    gw = st.x402
    assert gw is not None
    url = str(request.url)
    owner, scope, digest, kind = owner_key

    def prior() -> Receipt | None:
        try:
            return st.market.prior(owner, claimed(sig)[1], scope, digest, kind)  # type: ignore[no-any-return]
        except IdempotencyError as exc:
            raise idempotency_refused(exc) from exc

    try:
        gw.check(sig, amount)
    except PaymentError as exc:
        raise x402_flow.api_error(exc, gw, amount, url) from exc
    first = prior()
    if first is not None:
        return first, {}
    try:
        paid = x402_flow.pay(gw, st.market, sig, amount, None if _wallet_only(request) else p.name, charge)
    except PaymentError as exc:
        won = prior() if exc.reason != "facilitator_unavailable" else None  # a twin of it settled first
        if won is not None:
            return won, {}
        raise x402_flow.api_error(exc, gw, amount, url) from exc
    except mk.PaymentRefused as exc:
        raise _payment_required(exc, st, request) from exc
    except IdempotencyError as exc:
        raise idempotency_refused(exc) from exc
    log.info("x402 payment of %d (%s) settled in %s", amount, paid.deposit.receipt,
             paid.settlement.transaction)
    request.state.x402_headers = paid.headers()
    return paid.purchase, paid.headers()


def payment_headers(request: Request) -> dict[str, str]:
    """``PAYMENT-RESPONSE`` of a request paid by x402 (empty otherwise)."""
    return dict(getattr(request.state, "x402_headers", {}) or {})


def idempotency_refused(exc: IdempotencyError) -> ApiError:
    """The answer to a key that cannot serve this request: its status and code, and the receipt that holds
    the key (OpenAI-shaped on the OpenAI routes)."""
    return ApiError(exc.status, exc.code, str(exc), extra={"receipt": exc.receipt})


def publish_price(st: State, key: str, p: Principal, request: Request) -> None:
    """Apply a publish's ``X-KVAgent-Price`` header before the artifact becomes visible."""
    raw = request.headers.get(PRICE_HEADER)
    if raw is None:
        return
    try:
        st.market.set_price(key, p.name, mk.amount(raw, "X-KVAgent-Price"))
    except ConfigError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from exc


def receipt_headers(rec: Receipt | None, given_back: int = 0) -> dict[str, str]:
    """Headers of a paid answer: the receipt id and what this request moved from the buyer (nothing for a
    free one). A replay (the same Idempotency-Key again) names the first purchase's receipt and charged 0;
    ``given_back`` is what a settled prepayment returned before the headers were sent."""
    if rec is None:
        return {}
    charged = 0 if rec.replayed else rec.amount - given_back
    out = {RECEIPT_HEADER: rec.receipt, CHARGED_HEADER: str(charged), "X-KVAgent-Currency": rec.currency}
    if rec.replayed:
        out[REPLAYED_HEADER] = "1"
    return out


def priced(st: State, handle: dict[str, Any], row: ArtifactRow) -> dict[str, Any]:
    """A lookup's handle with the artifact's price per load and the currency, so a buyer can decide first."""
    return {**handle, "price": st.market.price(row.key, row.owner), "currency": st.market.currency}


def charge_download(st: State, p: Principal, row: ArtifactRow, request: Request) -> dict[str, str]:
    """Charge one load of ``row`` to ``p`` (idempotent per ``Idempotency-Key``), or have it paid by the
    request's x402 ``PAYMENT-SIGNATURE`` (idempotent per payment); the receipt headers to send."""
    sig = _signature(st, request)
    if sig is not None or _wallet_only(request):
        price = st.market.quote_load(p.name, row.key, row.owner)
        quote = mk.Quote(row.key, price, st.market.currency, 0, "insufficient_balance")
        if sig is None or price == 0:
            if _wallet_only(request):
                raise _no_payment(st, p, request, quote)
        else:
            scope = f"{mk.SALE}:{row.key}"
            digest = paid_digest(mk.request_digest(scope, row.key, None), sig)
            idem = _idempotency(st, request)

            def charge(cur: Any, who: str) -> Receipt | None:
                return st.market.charge_load(who, row.key, row.owner, idem, None, request=digest, cur=cur)

            rec, headers = _pay(st, p, request, sig, price, (p.name, scope, digest, mk.SALE), charge)
            return {**receipt_headers(rec), **headers}
    try:
        rec = st.market.charge_load(p.name, row.key, row.owner, request.headers.get(IDEMPOTENCY_HEADER),
                                    _max_price(request))
    except mk.PaymentRefused as exc:
        raise _payment_required(exc, st, request) from exc
    except IdempotencyError as exc:
        raise idempotency_refused(exc) from exc
    return receipt_headers(rec)


def generate_scope(row: ArtifactRow) -> str:
    """What a hosted generation's Idempotency-Key is claimed for (the artifact it continues)."""
    return f"{mk.GENERATE}:{row.key}"


def replay(st: State, p: Principal, request: Request, scope: str, digest: str) -> Response | None:
    """Before any engine work: ``None`` when the request's Idempotency-Key (if any) is new; the stored answer
    of the first request, replayed with its receipt and charged 0, when the same request comes again and its
    answer was kept; else the key's refusal (409 already served / refunded, 422 reused by another request).
    """
    try:
        st.market.prior(p.name, _idempotency(st, request), scope,
                        paid_digest(digest, _signature(st, request)), mk.GENERATE)
    except AlreadyServed as exc:
        if exc.answer is None or exc.receipt is None:
            raise idempotency_refused(exc) from exc
        headers = {RECEIPT_HEADER: exc.receipt, CHARGED_HEADER: "0", "X-KVAgent-Currency": st.market.currency,
                   REPLAYED_HEADER: "1"}
        return Response(exc.answer, media_type="application/json", headers=headers)
    except IdempotencyError as exc:
        raise idempotency_refused(exc) from exc
    except ConfigError as exc:  # a key over the length limit
        raise ApiError(422, "invalid_request", str(exc)) from exc
    return None


def keep_answer(st: State, rec: Receipt | None, request: Request, answer: bytes) -> None:
    """Store the final answer of a paid request that sent an Idempotency-Key, for :func:`replay`."""
    if rec is not None and not rec.replayed and _idempotency(st, request) is not None:
        st.market.keep_answer(rec.txn, answer.decode())


def charge_generate(st: State, p: Principal, row: ArtifactRow, request: Request, input_tokens: int,
                    max_output_tokens: int, digest: str) -> Receipt | None:
    """Pre-charge a hosted generation for ``max_output_tokens``; settle with :func:`settle_generate`.
    ``digest`` is the request's (its Idempotency-Key is bound to it)."""
    cached = int(json.loads(row.header_json).get("token_count", 0))
    return _charge_generation(st, p, request, row.key, row.owner, input_tokens, cached, max_output_tokens,
                              generate_scope(row), digest)


def _charge_generation(st: State, p: Principal, request: Request, key: str, owner: str, input_tokens: int,
                       cached: int, max_output_tokens: int, scope: str, digest: str) -> Receipt | None:
    """The pre-charge of a generation or chat completion, from the balance or paid by x402 (``exact`` for the
    whole pre-charge; what settling gives back stays on the payer's balance)."""
    sig = _signature(st, request)
    if sig is not None or _wallet_only(request):
        total = st.market.quote_generate(p.name, key, owner, input_tokens, cached, max_output_tokens)
        quote = mk.Quote(key, total, st.market.currency, 0, "insufficient_balance")
        if sig is None or total == 0:
            if _wallet_only(request):
                raise _no_payment(st, p, request, quote)
        else:
            pdigest = paid_digest(digest, sig)
            idem = _idempotency(st, request)

            def charge(cur: Any, who: str) -> Receipt | None:
                return st.market.charge_generate(  # type: ignore[no-any-return]
                    who, key, owner, idem, None, input_tokens, cached, max_output_tokens, request=pdigest,
                    scope=scope, cur=cur)

            rec, _ = _pay(st, p, request, sig, total, (p.name, scope, pdigest, mk.GENERATE), charge)
            if rec is not None and rec.replayed:  # (never: the replay check before the engine refused it)
                raise idempotency_refused(AlreadyServed("this payment's generation was already served",
                                                        rec.receipt))
            return rec
    try:
        return st.market.charge_generate(  # type: ignore[no-any-return]
            p.name, key, owner, request.headers.get(IDEMPOTENCY_HEADER), _max_price(request),
            input_tokens, cached, max_output_tokens, request=digest, scope=scope)
    except mk.PaymentRefused as exc:
        raise _payment_required(exc, st, request) from exc
    except IdempotencyError as exc:
        raise idempotency_refused(exc) from exc


def settle_generate(
    st: State,
    rec: Receipt | None,
    row: ArtifactRow,
    input_tokens: int,
    max_output_tokens: int,
    used_output_tokens: int,
) -> int:
    """Give back the unused output tokens of a pre-charged generation; returns the amount given back."""
    if rec is None:
        return 0
    cached = int(json.loads(row.header_json).get("token_count", 0))
    back = st.market.settle_generate(rec, input_tokens, cached, max_output_tokens, used_output_tokens)
    return -back.amount if back is not None else 0


#: The statement line of hosted chat that reused no published artifact (nobody is owed a royalty).
HOSTED_CHAT = "hosted-chat"


def charge_chat(st: State, p: Principal, request: Request, prompt_tokens: int, cached_tokens: int,
                max_output_tokens: int, scope: str, digest: str,
                row: ArtifactRow | None = None) -> Receipt | None:
    """Pre-charge a chat completion: host token prices (``prompt_tokens - cached_tokens`` prefilled,
    ``cached_tokens`` read from the KV), plus the royalty of ``row`` when it resumed from a published artifact
    (``cached_tokens`` then counts the tokens that artifact supplied). Settle with :func:`settle_chat` when
    the answer is done; 402 (nothing served) when refused. The Idempotency-Key is claimed for ``scope`` (the
    route) and ``digest`` (the whole request), whichever cache the prompt resumed from."""
    key, owner = (row.key, row.owner) if row is not None else (HOSTED_CHAT, mk.HOST)
    try:
        return _charge_generation(st, p, request, key, owner, prompt_tokens - cached_tokens, cached_tokens,
                                  max_output_tokens, scope, digest)
    except IdempotencyError as exc:
        raise idempotency_refused(exc) from exc


def settle_chat(st: State, rec: Receipt | None, prompt_tokens: int, charged_cached: int, cached_tokens: int,
                max_output_tokens: int, used_output_tokens: int) -> int:
    """Give back what a pre-charged chat completion did not use: its unused output tokens, and the prompt
    tokens the engine found cached beyond the ``charged_cached`` the pre-charge counted (an engine that
    resolves the prompt itself reports them with its Finish); returns the amount given back."""
    if rec is None:
        return 0
    back = st.market.settle_generate(
        rec, prompt_tokens - charged_cached, charged_cached, max_output_tokens, used_output_tokens,
        used_input_tokens=prompt_tokens - cached_tokens, used_cached_tokens=cached_tokens)
    return -back.amount if back is not None else 0


def routes(st: State) -> APIRouter:
    """Account, statement, credit, price, dispute and audit routes over ``st.market``."""
    app = APIRouter()
    ledger: Ledger = st.market

    def admin(request: Request) -> Principal:
        p = st.principal(request)
        if not p.admin:
            raise ApiError(403, "forbidden", "only an admin principal may do this")
        return p

    @app.get("/v1/account")
    def account(request: Request) -> dict[str, Any]:
        p = st.principal(request)
        return {"principal": p.name, "balance": ledger.balance(p.name), "currency": ledger.currency}

    @app.get("/v1/account/statement")
    def statement(request: Request) -> dict[str, Any]:
        name = st.account_holder(request)  # a token's principal, or a wallet that signed for it (x402)
        return {**ledger.statement(name).to_json(), "balance": ledger.balance(name),
                "currency": ledger.currency}

    @app.get("/v1/account/disputes")
    def my_disputes(request: Request) -> dict[str, Any]:
        p = st.principal(request)
        return {"disputes": [d.to_json() for d in ledger.disputes(p.name)]}

    def known(name: str, create: bool = False, held_money: bool = False) -> None:
        """Refuse money for a principal no token names (it would land where nobody can use it), unless
        ``create`` says so or the principal already holds an account (its token may be gone since)."""
        if not valid_principal_name(name):  # also keeps the system accounts (#host, #mint, ...) out of reach
            raise ApiError(422, "invalid_request", "principal must match [A-Za-z0-9_.@:-]{1,128}",
                           param="principal")
        if not create and not held_money and not st.tokens.known_principal(name):
            raise ApiError(422, "unknown_principal", f"no token names principal {name!r}: issue its token "
                           "first, or send \"create\": true to credit it anyway", param="principal")

    @app.post("/v1/account/credit")
    async def credit(request: Request) -> JSONResponse:
        p = admin(request)
        body: CreditRequest = await read_json(request, CreditRequest)
        known(body.principal, create=body.create)
        try:
            rec = await run_in_threadpool(lambda: ledger.credit(
                body.principal, body.amount, body.memo or f"by {p.name}", idem=_idempotency_key(request),
                by=p.name))
        except IdempotencyError as exc:
            raise idempotency_refused(exc) from exc
        if not rec.replayed:
            log.info("credit of %d %s to %s by %s (%s)", body.amount, ledger.currency, body.principal, p.name,
                     rec.receipt)
        return _money_answer(rec, {"principal": body.principal, "credited": 0 if rec.replayed else rec.amount,
                                   "receipt": rec.receipt, "balance": ledger.balance(body.principal),
                                   "currency": ledger.currency})

    @app.post("/v1/account/adjust")
    async def adjust(request: Request) -> JSONResponse:
        p = admin(request)
        body: AdjustRequest = await read_json(request, AdjustRequest)
        known(body.principal, held_money=await run_in_threadpool(ledger.has_account, body.principal))
        try:
            rec = await run_in_threadpool(lambda: ledger.adjust(
                body.principal, body.amount, body.reason, idem=_idempotency_key(request), by=p.name,
                allow_negative=body.allow_negative))
        except mk.AdjustmentRefused as exc:
            raise ApiError(409, "insufficient_balance", str(exc),
                           extra={"balance": exc.balance, "currency": ledger.currency}) from exc
        except IdempotencyError as exc:
            raise idempotency_refused(exc) from exc
        if not rec.replayed:
            log.info("adjustment of %d %s to %s by %s (%s): %s", rec.amount, ledger.currency, body.principal,
                     p.name, rec.receipt, body.reason)
        return _money_answer(rec, {"principal": body.principal, "adjusted": 0 if rec.replayed else rec.amount,
                                   "reason": body.reason, "receipt": rec.receipt,
                                   "balance": ledger.balance(body.principal), "currency": ledger.currency})

    @app.get("/v1/market/audit")
    def audit(request: Request) -> dict[str, Any]:
        admin(request)
        a = ledger.audit()
        return {**a.__dict__, "currency": ledger.currency}

    @app.get("/v1/artifacts/{key}/price")
    def get_price(key: str, request: Request) -> dict[str, Any]:
        p = st.principal(request)
        row = st.visible(key, p)
        return {"key": row.key, "price": ledger.price(row.key, row.owner), "currency": ledger.currency,
                "balance": ledger.balance(p.name)}

    @app.put("/v1/artifacts/{key}/price")
    async def put_price(key: str, request: Request) -> dict[str, Any]:
        p = st.principal(request)
        row = await run_in_threadpool(st.owned, key, p)
        body: PriceRequest = await read_json(request, PriceRequest)
        price = await run_in_threadpool(ledger.set_price, row.key, p.name, body.price)
        return {"key": row.key, "price": price, "currency": ledger.currency}

    @app.post("/v1/artifacts/{key}/disputes")
    async def dispute(key: str, request: Request) -> JSONResponse:
        p = st.principal(request)
        validate_key(key)
        body: DisputeRequest = await read_json(request, DisputeRequest)
        bought = await run_in_threadpool(ledger.purchase, body.receipt, p.name)
        if bought is None or bought[1] != key:
            raise not_found(key)  # no purchase of this key with this receipt by this principal
        row = await run_in_threadpool(_record, st, key, bought[2])
        if row is None:
            raise not_found(key)  # the publisher has deleted it since
        evidence = {"layer": body.layer, "position": body.position, "difference": body.difference,
                    "detail": body.detail}
        did, new = await run_in_threadpool(ledger.file_dispute, body.receipt, p.name, key, evidence)
        if not new:  # one dispute per receipt: the first, as it stands (its evidence; this one's is not kept)
            first = await run_in_threadpool(ledger.dispute, did)
            return JSONResponse(first.to_json(), headers={REPLAYED_HEADER: "1"})
        d = await run_in_threadpool(_adjudicate, st, row, did)
        log.info("dispute %d on %s… by %s: %s (%s)", did, key[:16], p.name, d.status, d.outcome)
        return JSONResponse(d.to_json(), status_code=201)

    return app


def _idempotency_key(request: Request) -> str | None:
    return request.headers.get(IDEMPOTENCY_HEADER)


def _money_answer(rec: Receipt, body: dict[str, Any]) -> JSONResponse:
    """An admin money answer; a replay (the same Idempotency-Key again) says so and reports nothing moved."""
    if rec.replayed:
        return JSONResponse({**body, "replayed": True}, headers={REPLAYED_HEADER: "1"})
    return JSONResponse({**body, "replayed": False})


def _record(st: State, key: str, owner: str) -> ArtifactRow | None:
    """``owner``'s record of ``key``: the key's first row, or that owner's copy (kvagent.server.records)."""
    row = st.meta.get(key)
    if row is not None and row.owner == owner:
        return row
    return st.copies.get(key, owner) if st.copies is not None else None


def _adjudicate(st: State, row: ArtifactRow, dispute_id: int) -> Any:
    """Re-verify a disputed artifact on this host's model; refund and quarantine if it fails the check."""
    ledger: Ledger = st.market
    if ledger.is_quarantined(row.key, row.owner):
        return ledger.resolve_dispute(dispute_id, True, "artifact already proven poisoned and quarantined")
    host = st.model_host
    if host is None:
        return ledger.record_open(dispute_id, "this host runs no model: recorded for the operator")
    if json.loads(row.header_json)["model_fingerprint"] != host.fingerprint:
        return ledger.record_open(
            dispute_id, "computed by another model than this host runs: recorded for the operator"
        )
    from ..tiers.verification import verify_kv

    kv = host.kv_for(row.key, row.blob, st.blobs.read_bytes)
    with host.lock:
        report = verify_kv(host.engine, kv, st.settings.dispute_verify)
    if report.ok:
        return ledger.resolve_dispute(dispute_id, False, f"host re-verified ({report.mode}): {report.reason}")
    d = ledger.resolve_dispute(dispute_id, True, f"host re-verified ({report.mode}): {report.reason}")
    host.forget(row.key)
    return d
