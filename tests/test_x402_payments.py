"""x402 without a chain: the host's terms and headers as the SDK reads them, a wallet's key never shown, the
buyer's caps (and the SDK's spend controls made from them), the ledger's deposit on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import os
import pickle
import threading
from pathlib import Path

import pytest

pytest.importorskip("x402", reason="needs the x402 SDK: pip install 'kvagent[x402]'")

from x402.http.utils import decode_payment_required_header, encode_payment_signature_header  # noqa: E402
from x402.schemas import PaymentPayload, PaymentRequired  # noqa: E402

from kvagent.errors import ConfigError, PaymentDeclined  # noqa: E402
from kvagent.payments import (  # noqa: E402
    SpendCaps,
    Wallet,
    X402Terms,
    decode_header,
    encode_header,
    load_wallet,
    payment_required,
    wallet_principal,
)
from kvagent.payments.caps import usd  # noqa: E402
from kvagent.payments.payer import Payer  # noqa: E402
from kvagent.server.deposits import CHAIN, DEPOSIT, deposited, record_deposit  # noqa: E402
from kvagent.server.ledger import Ledger  # noqa: E402
from tests.test_server_postgres import pg_schema_dsn  # noqa: E402,F401  (a fixture)

KEY = "0x" + "11" * 32  # a throwaway key: never holds anything
TOKEN = "0x" + "ab" * 20
HOST = "0x" + "cd" * 20
NETWORK = "eip155:31337"
TX = "0x" + "ee" * 32


def terms() -> X402Terms:
    return X402Terms(NETWORK, TOKEN, HOST, "KVUSD", "1")


def test_x402_terms_refuse_what_no_chain_accepts() -> None:
    with pytest.raises(ConfigError):
        X402Terms("base", TOKEN, HOST, "USD Coin", "2")  # not CAIP-2
    with pytest.raises(ConfigError):
        X402Terms(NETWORK, "0x1234", HOST, "USD Coin", "2")
    with pytest.raises(ConfigError):
        X402Terms(NETWORK, TOKEN, HOST, "", "2")  # the buyer cannot sign without the EIP-712 domain
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ConfigError):
            payment_required(terms(), bad, "http://h/x")  # type: ignore[arg-type]


def test_x402_payment_required_is_what_the_sdk_reads() -> None:
    header = encode_header(payment_required(terms(), 1_500, "http://h/v1/blobs/k", "one load"))
    pr = decode_payment_required_header(header)
    assert isinstance(pr, PaymentRequired) and pr.x402_version == 2
    (req,) = pr.accepts
    assert (req.scheme, req.network, req.asset) == ("exact", NETWORK, TOKEN)
    assert (req.amount, req.pay_to) == ("1500", HOST)
    assert req.extra == {"name": "KVUSD", "version": "1"}
    assert pr.resource is not None and pr.resource.url == "http://h/v1/blobs/k"


def test_x402_headers_round_trip_and_refuse_garbage() -> None:
    payload = PaymentPayload.model_validate({"x402Version": 2, "payload": {"signature": "0x00"},
                                             "accepted": payment_required(terms(), 5, "http://h/")["accepts"][0]})
    assert decode_header(encode_payment_signature_header(payload))["accepted"]["amount"] == "5"
    for bad in ("", "%%%", encode_header({"a": 1})[:-2] + "!!", "W10=", "x" * 20_000):  # W10= is "[]"
        with pytest.raises(ConfigError):
            decode_header(bad)


def test_x402_wallet_principal_is_one_per_wallet() -> None:
    a = "0x" + "Ab" * 20
    assert wallet_principal(a) == wallet_principal(a.lower()) == "x402:" + a.lower()
    with pytest.raises(ConfigError):
        wallet_principal("0xnope")


def test_x402_wallet_key_is_never_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("KVAGENT_WALLET_KEY", KEY)
    w = load_wallet()
    caplog.set_level(logging.DEBUG)
    logging.getLogger("kvagent").info("paying from %s (%r)", w, w)
    secret = KEY[2:]
    assert secret not in repr(w) and secret not in str(w) and secret not in caplog.text
    assert w.address in repr(w)
    with pytest.raises(TypeError):
        pickle.dumps(w)
    f = tmp_path / "wallet.key"
    f.write_text(KEY + "\n")
    os.chmod(f, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_wallet(f)
    os.chmod(f, 0o600)
    assert load_wallet(f).address == w.address
    monkeypatch.delenv("KVAGENT_WALLET_KEY")
    with pytest.raises(ConfigError, match="KVAGENT_WALLET_KEY"):
        load_wallet()
    with pytest.raises(ConfigError) as e:
        Wallet("0x" + "zz" * 32)
    assert "zz" not in str(e.value)


def test_x402_caps_hold_across_threads() -> None:
    caps = SpendCaps(max_price_per_load=100, budget=1_000)
    refusals: list[str | None] = []
    lock = threading.Lock()
    barrier = threading.Barrier(32)

    def buy() -> None:
        barrier.wait()
        why = caps.reserve(100)
        with lock:
            refusals.append(why)

    threads = [threading.Thread(target=buy) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert refusals.count(None) == 10 and refusals.count("budget_exhausted") == 22
    assert caps.spent == 1_000 and caps.reserve(1) == "budget_exhausted"
    caps.release(100)
    assert caps.refusal(101) == "price_above_cap" and caps.reserve(100) is None


def test_x402_spend_controls_map_the_caps_exactly() -> None:
    assert usd(1_500) == "$0.001500" and usd(2_000_001) == "$2.000001"
    c = SpendCaps(max_price_per_load=700, budget=500).spend_controls([(NETWORK, TOKEN)])
    assert c == {"max_amount_per_payment": "$0.000500",
                 "allowed_assets": [{"network": NETWORK, "asset": TOKEN, "max_amount_per_payment": "500"}]}
    assert SpendCaps().spend_controls() == {"max_amount_per_payment": False}


def test_x402_payer_declines_without_signing() -> None:
    header = encode_header(payment_required(terms(), 1_001, "http://h/x"))
    payer = Payer(Wallet(KEY), SpendCaps(max_price_per_load=1_000), allowed_assets=[(NETWORK, TOKEN)])
    with pytest.raises(PaymentDeclined) as e:
        payer.pay(header)
    assert e.value.reason == "price_above_cap" and payer.caps.spent == 0
    ok = payer.pay(encode_header(payment_required(terms(), 1_000, "http://h/x")))
    signed = decode_header(ok.header)
    assert signed["payload"]["authorization"]["value"] == "1000" and signed["accepted"]["payTo"] == HOST
    assert payer.caps.spent == 1_000
    payer.unsettled(ok)
    assert payer.caps.spent == 0
    with pytest.raises(PaymentDeclined) as e:
        payer.pay("garbage")
    assert e.value.reason == "malformed"


# -- the ledger's deposit ----------------------------------------------------------------------------------
def test_x402_deposit_is_posted_once_and_balances(any_ledger: Ledger) -> None:
    ledger = any_ledger
    buyer = wallet_principal("0x" + "12" * 20)
    with ledger.meta.transaction() as cur:
        first = record_deposit(ledger, cur, buyer, 4_000, NETWORK, TX)
    with ledger.meta.transaction() as cur:
        again = record_deposit(ledger, cur, buyer, 4_000, NETWORK, TX.upper().replace("0X", "0x"))
    assert not first.replayed and again.replayed and again.receipt == first.receipt
    assert ledger.balance(buyer) == 4_000 and ledger.balance(CHAIN) == -4_000 and deposited(ledger) == 4_000
    with ledger.meta.transaction() as cur, pytest.raises(ValueError, match="another principal"):
        record_deposit(ledger, cur, wallet_principal("0x" + "34" * 20), 4_000, NETWORK, TX)
    a = ledger.audit()
    assert a.total == 0 and not a.unbalanced and a.transactions == {DEPOSIT: 1}


def test_x402_deposit_rolls_back_with_its_purchase(any_ledger: Ledger) -> None:
    ledger = any_ledger
    """The deposit is written in the caller's transaction: if what it pays for fails, it was never there."""
    buyer = wallet_principal("0x" + "56" * 20)
    with pytest.raises(RuntimeError), ledger.meta.transaction() as cur:
        record_deposit(ledger, cur, buyer, 900, NETWORK, TX)
        raise RuntimeError("the purchase failed")
    assert ledger.balance(buyer) == 0 and deposited(ledger) == 0
    with ledger.meta.transaction() as cur:  # and the settlement can still be recorded afterwards
        assert not record_deposit(ledger, cur, buyer, 900, NETWORK, TX).replayed
    assert ledger.balance(buyer) == 900
