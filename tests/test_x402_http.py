"""x402 over HTTP against the chain: a priced route built from kvagent's x402 pieces exactly as the market's
charging hooks will use them (kvagent.server.x402_flow), and a buyer paying with kvagent.payments.http.

The route stands in for the artifact download until the market's charge path takes a database cursor (the
idempotency work); its purchase posts a sale in the deposit's transaction with the ledger's own primitives.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("x402", reason="needs the x402 SDK: pip install 'kvagent[x402]'")

from eth_account import Account  # noqa: E402
from fastapi import FastAPI, Request, Response  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

from kvagent.costs import market as mk  # noqa: E402
from kvagent.errors import PaymentDeclined, PaymentError  # noqa: E402
from kvagent.payments import (  # noqa: E402
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    SpendCaps,
    Wallet,
    X402Terms,
    decode_header,
)
from kvagent.payments.http import request_paying, settlement  # noqa: E402
from kvagent.payments.payer import Payer  # noqa: E402
from kvagent.server import x402_flow  # noqa: E402
from kvagent.server.deposits import deposited  # noqa: E402
from kvagent.server.http import ApiError  # noqa: E402
from kvagent.server.ledger import Ledger, Receipt  # noqa: E402
from kvagent.server.meta import SQLiteMeta  # noqa: E402
from kvagent.server.x402 import X402Gateway  # noqa: E402
from kvagent.server.x402_audit import chain_audit  # noqa: E402
from tests.x402_chain import NETWORK, Chain, chain_or_skip, serve  # noqa: E402

KEY = "d" * 64
PUBLISHER = "alice"
PRICE = 4_000
BLOB = b"the KV bytes" * 100


@pytest.fixture(scope="module")
def chain() -> Chain:
    return chain_or_skip()


def host_address(chain: Chain) -> str:
    return str(Account.from_key(chain.keys["host"]).address)


def sale(ledger: Ledger, cur: Any, buyer: str, price: int) -> Receipt:
    """One load of KEY bought by ``buyer`` in the caller's transaction (the ledger's rules and primitives)."""
    postings = mk.sale_postings(buyer, PUBLISHER, price, ledger.prices.commission_bps)
    balances = ledger._lock(cur, [p.account for p in postings])
    why = mk.refusal(price, balances[buyer], None)
    if why:
        raise mk.PaymentRefused(mk.Quote(KEY, price, ledger.currency, balances[buyer], why))
    return ledger._post(cur, mk.SALE, postings, price, buyer=buyer, key=KEY, publisher=PUBLISHER, locked=True)


def shop(gw: X402Gateway, ledger: Ledger) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(ApiError)
    def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "detail": exc.detail, **(exc.extra or {})},
                            status_code=exc.status, headers=exc.headers)

    def serve_paid(request: Request, broken: bool) -> Response:
        url = str(request.url)
        price = ledger.price(KEY, PUBLISHER)
        header = request.headers.get(PAYMENT_SIGNATURE_HEADER)
        if header is None:  # no balance here: today's 402 with its quote, and the x402 requirements beside it
            q = mk.Quote(KEY, price, ledger.currency, 0, "insufficient_balance")
            raise x402_flow.refusal(ApiError(402, "payment_required", "your balance is below the price",
                                             extra={"quote": q.to_json()}), gw, q, url)

        def charge(cur: Any, who: str) -> Receipt:
            if broken:
                raise RuntimeError("the purchase failed after the payment settled")
            return sale(ledger, cur, who, price)

        try:
            paid = x402_flow.pay(gw, ledger, header, price, None, charge)
        except PaymentError as exc:
            raise x402_flow.api_error(exc, gw, price, url) from exc
        assert paid.purchase is not None
        return Response(BLOB, headers={**paid.headers(), "X-KVAgent-Receipt": paid.purchase.receipt})

    @app.get("/blob")
    def blob(request: Request) -> Response:
        return serve_paid(request, broken=False)

    @app.get("/broken")
    def broken(request: Request) -> Response:
        return serve_paid(request, broken=True)

    return app


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    meta = SQLiteMeta(tmp_path / "meta.sqlite3")
    led = Ledger(meta, mk.HostPrices(commission_bps=1_000))
    led.set_price(KEY, PUBLISHER, PRICE)
    yield led
    meta.close()


@pytest.fixture
def shop_url(chain: Chain, ledger: Ledger) -> Iterator[str]:
    terms = X402Terms(NETWORK, chain.token, host_address(chain), chain.token_name, chain.token_version)
    gw = X402Gateway.in_process(terms, chain.keys["facilitator"], chain.rpc)
    with serve(shop(gw, ledger)) as (url, _):
        yield url


def payer(chain: Chain, key: str, cap: int | None = None) -> Payer:
    return Payer(Wallet(key), SpendCaps(max_price_per_load=cap), allowed_assets=[(NETWORK, chain.token)])


# buyers from the middle of the funded list (test_x402_chain.py uses the first ones and the last 32)
def buyer_key(chain: Chain, i: int) -> str:
    return str(chain.keys["buyers"][20 + i])


def test_x402_http_wallet_buyer_pays_once_and_is_served(chain: Chain, ledger: Ledger, shop_url: str) -> None:
    host = host_address(chain)
    host0 = chain.balance(host)
    p = payer(chain, buyer_key(chain, 0), cap=PRICE)
    with httpx.Client(timeout=30) as c:
        plain = c.get(f"{shop_url}/blob")
        assert plain.status_code == 402 and plain.json()["quote"]["price"] == PRICE  # the quote as today
        assert decode_header(plain.headers[PAYMENT_REQUIRED_HEADER])["accepts"][0]["amount"] == str(PRICE)
        r, payment = request_paying(c, "GET", f"{shop_url}/blob", p)
        assert r.status_code == 200 and r.content == BLOB and payment is not None
        s = settlement(r)
        assert s is not None and s["payer"] == p.wallet.address and s["transaction"]
        # the same PAYMENT-SIGNATURE again settles nothing more and serves nothing
        again = c.get(f"{shop_url}/blob", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
        assert again.status_code == 402 and PAYMENT_REQUIRED_HEADER in again.headers
        assert settlement(again) is None
    assert chain.balance(host) - host0 == PRICE
    wallet = "x402:" + p.wallet.address.lower()
    assert ledger.balance(wallet) == 0 and deposited(ledger) == PRICE
    assert ledger.balance(PUBLISHER) == 3_600 and ledger.balance(mk.HOST) == 400  # royalty, commission
    assert ledger.audit().total == 0 and chain_audit(ledger, chain.rpc, chain.token, host).ok
    (line,) = ledger.statement(wallet).to_json()["purchases"]
    assert (line["key"], line["loads"], line["amount"]) == (KEY, 1, PRICE)


def test_x402_http_refusals_serve_and_move_nothing(chain: Chain, ledger: Ledger, shop_url: str) -> None:
    host = host_address(chain)
    host0 = chain.balance(host)
    with httpx.Client(timeout=30) as c:
        # above the buyer's cap: never signed, never sent
        with pytest.raises(PaymentDeclined) as e:
            request_paying(c, "GET", f"{shop_url}/blob", payer(chain, buyer_key(chain, 1), cap=PRICE - 1))
        assert e.value.reason == "price_above_cap"
        # an underfunded wallet: 402 again, with the reason, and its budget given back
        poor = payer(chain, str(chain.keys["unfunded"]), cap=PRICE)
        r, payment = request_paying(c, "GET", f"{shop_url}/blob", poor)
        assert r.status_code == 402 and payment is not None and "balance" in r.json()["reason"]
        assert poor.caps.spent == 0
    assert chain.balance(host) == host0
    assert ledger.audit().total == 0 and deposited(ledger) == 0 and ledger.balance(PUBLISHER) == 0


def test_x402_http_purchase_failing_after_settlement_keeps_the_money(chain: Chain, ledger: Ledger,
                                                                     shop_url: str) -> None:
    host = host_address(chain)
    host0 = chain.balance(host)
    p = payer(chain, buyer_key(chain, 2), cap=PRICE)
    with httpx.Client(timeout=30) as c:
        r, _ = request_paying(c, "GET", f"{shop_url}/broken", p)
    assert r.status_code == 500 and r.content != BLOB
    assert chain.balance(host) - host0 == PRICE
    wallet = "x402:" + p.wallet.address.lower()
    assert ledger.balance(wallet) == PRICE and deposited(ledger) == PRICE  # kept: spendable or refundable
    assert ledger.balance(PUBLISHER) == 0 and ledger.audit().total == 0
    assert chain_audit(ledger, chain.rpc, chain.token, host).ok
