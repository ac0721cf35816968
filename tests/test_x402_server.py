"""x402 on a real ``kvagent serve`` process against the test chain (anvil + KVUSD, ``.ci/chain.sh``): the
download's 402 carries ``PAYMENT-REQUIRED`` beside the JSON quote; a wallet with no token pays it with the
official SDK client and is served; the host's wallet receives the price on chain, the publisher's ledger
balance the royalty, the host the commission; the same ``PAYMENT-SIGNATURE`` settles once; forged, expired
and unfunded payments, and a facilitator that is down, serve and charge nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("x402", reason="needs the x402 SDK: pip install 'kvagent[x402]'")

from eth_account import Account  # noqa: E402

from kvagent.artifacts import format as art  # noqa: E402
from kvagent.client.registry import RegistryClient  # noqa: E402
from kvagent.payments import (  # noqa: E402
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    SpendCaps,
    Wallet,
    decode_header,
    encode_header,
)
from kvagent.payments.http import request_paying, settlement  # noqa: E402
from kvagent.payments.payer import Payer  # noqa: E402
from tests._kvfixtures import make_artifact, make_kv  # noqa: E402
from tests.registry_server import ServerProcess, start_server  # noqa: E402
from tests.x402_chain import NETWORK, Chain, chain_or_skip  # noqa: E402

PRICE = 5_000
PRICES = {"currency": "uUSD", "input_per_mtok": 0, "cached_input_per_mtok": 0, "output_per_mtok": 0,
          "commission_bps": 1000}
TOKENS: dict[str, dict[str, Any]] = {
    "admin-token-0001": {"principal": "operator", "admin": True},
    "alice-token-0001": {"principal": "alice", "publish": True},
    "bob-token-000001": {"principal": "bob"},
}
ALICE = {"Authorization": "Bearer alice-token-0001"}
ADMIN = {"Authorization": "Bearer admin-token-0001"}
BOB = {"Authorization": "Bearer bob-token-000001"}


@pytest.fixture(scope="module")
def chain() -> Chain:
    return chain_or_skip()


def host_address(chain: Chain) -> str:
    return str(Account.from_key(chain.keys["host"]).address)


def key_file(d: Path, name: str, key: str) -> Path:
    p = d / name
    p.write_text(key)
    p.chmod(0o600)
    return p


def x402_args(chain: Chain, d: Path, facilitator: str | None = None) -> list[str]:
    args = ["--x402-wallet", str(key_file(d, "host.key", chain.keys["host"])), "--x402-network", NETWORK,
            "--x402-asset", chain.token, "--x402-token-name", chain.token_name,
            "--x402-token-version", chain.token_version, "--x402-rpc", chain.rpc]
    if facilitator is not None:
        return [*args, "--x402-facilitator", facilitator]
    return [*args, "--x402-facilitator-key", str(key_file(d, "facilitator.key", chain.keys["facilitator"]))]


def start(chain: Chain, base: Path, facilitator: str | None = None) -> ServerProcess:
    base.mkdir(parents=True, exist_ok=True)
    (base / "prices.json").write_text(json.dumps(PRICES))
    args = ["--prices", str(base / "prices.json"), *x402_args(chain, base, facilitator)]
    return start_server(base / "data", TOKENS, extra_args=args)


@pytest.fixture(scope="module")
def server(chain: Chain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start(chain, tmp_path_factory.mktemp("x402-server"))
    try:
        yield srv
    finally:
        srv.stop()


def publish(srv: ServerProcess, seed: int, price: int = PRICE, visibility: str = "public"
            ) -> tuple[str, bytes]:
    _, blob = make_artifact(make_kv(seed=seed), publisher="alice")
    key = art.read_header(blob).key
    RegistryClient(srv.url, "alice-token-0001").publish(blob, visibility=visibility, price=price)
    return key, blob


def buyer(chain: Chain, i: int, cap: int | None = PRICE) -> Payer:
    # buyers 40.. (test_x402_chain.py and test_x402_http.py use others)
    return Payer(Wallet(str(chain.keys["buyers"][40 + i])), SpendCaps(max_price_per_load=cap),
                 allowed_assets=[(NETWORK, chain.token)])


def balance(srv: ServerProcess, headers: dict[str, str]) -> int:
    r = httpx.get(f"{srv.url}/v1/account", headers=headers)
    assert r.status_code == 200, r.text
    return int(r.json()["balance"])


def audit(srv: ServerProcess) -> dict[str, Any]:
    r = httpx.get(f"{srv.url}/v1/market/audit", headers=ADMIN)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_x402_wallet_buyer_downloads_a_public_priced_artifact(chain: Chain, server: ServerProcess) -> None:
    key, blob = publish(server, 1)
    url = f"{server.url}/v1/artifacts/{key}/blob"
    host0, alice0, fees0 = chain.balance(host_address(chain)), balance(server, ALICE), audit(server)["host"]
    p = buyer(chain, 0)
    with httpx.Client(timeout=60) as c:
        plain = c.get(url)  # no token, no payment: the quote as today, and the x402 requirements beside it
        assert plain.status_code == 402, plain.text
        assert plain.json()["quote"]["price"] == PRICE
        (offer,) = decode_header(plain.headers[PAYMENT_REQUIRED_HEADER])["accepts"]
        assert (offer["scheme"], offer["network"], offer["amount"]) == ("exact", NETWORK, str(PRICE))
        assert offer["payTo"].lower() == host_address(chain).lower()
        r, payment = request_paying(c, "GET", url, p)  # the SDK's client signs it
        assert r.status_code == 200 and r.content == blob and payment is not None
        s = settlement(r)
        assert s is not None and s["payer"] == p.wallet.address and s["transaction"]
        assert r.headers["X-KVAgent-Charged"] == str(PRICE)
        # the same PAYMENT-SIGNATURE again: the first purchase's receipt, nothing settled or charged again
        again = c.get(url, headers={PAYMENT_SIGNATURE_HEADER: payment.header})
        assert again.status_code == 200 and again.content == blob
        assert again.headers["X-KVAgent-Receipt"] == r.headers["X-KVAgent-Receipt"]
        assert again.headers["X-KVAgent-Replayed"] == "1" and again.headers["X-KVAgent-Charged"] == "0"
        assert PAYMENT_RESPONSE_HEADER not in again.headers
    assert chain.balance(host_address(chain)) - host0 == PRICE  # on chain: the price, once
    assert balance(server, ALICE) - alice0 == PRICE * 9 // 10  # the royalty
    a = audit(server)
    assert a["host"] - fees0 == PRICE // 10 and a["total"] == 0 and not a["unbalanced"]  # the commission


def test_x402_bearer_buyer_pays_by_x402_and_keeps_its_balance(chain: Chain, server: ServerProcess) -> None:
    key, blob = publish(server, 2)
    url = f"{server.url}/v1/artifacts/{key}/blob"
    bob0, host0 = balance(server, BOB), chain.balance(host_address(chain))
    with httpx.Client(timeout=60) as c:
        r, payment = request_paying(c, "GET", url, buyer(chain, 1), headers=BOB)
    assert r.status_code == 200 and r.content == blob and payment is not None and settlement(r) is not None
    assert balance(server, BOB) == bob0  # the deposit paid the purchase
    assert chain.balance(host_address(chain)) - host0 == PRICE
    lines = httpx.get(f"{server.url}/v1/account/statement", headers=BOB).json()
    assert [p["key"] for p in lines["purchases"]] == [key]


def forged(header: str, **auth: Any) -> str:
    obj = decode_header(header)
    obj["payload"]["authorization"].update(auth)
    return encode_header(obj)


def test_x402_forged_expired_and_unfunded_payments_serve_and_charge_nothing(chain: Chain,
                                                                            server: ServerProcess) -> None:
    key, blob = publish(server, 3)
    url = f"{server.url}/v1/artifacts/{key}/blob"
    host0, a0 = chain.balance(host_address(chain)), audit(server)
    p = buyer(chain, 2)
    with httpx.Client(timeout=60) as c:
        req = c.get(url).headers[PAYMENT_REQUIRED_HEADER]
        good = p.pay(req).header
        # the authorisation altered after signing: the signature no longer matches
        bad = c.get(url, headers={PAYMENT_SIGNATURE_HEADER: forged(good, value=str(PRICE * 2))})
        assert bad.status_code == 402 and bad.content != blob and PAYMENT_REQUIRED_HEADER in bad.headers
        expired = forged(good, validBefore=str(int(time.time()) - 5))
        bad = c.get(url, headers={PAYMENT_SIGNATURE_HEADER: expired})
        assert bad.status_code == 402 and bad.content != blob
        # signed by another key than the payer it names
        other = buyer(chain, 3).pay(req).header
        thief = forged(other, **{"from": p.wallet.address})
        bad = c.get(url, headers={PAYMENT_SIGNATURE_HEADER: thief})
        assert bad.status_code == 402 and bad.content != blob
        # garbage
        assert c.get(url, headers={PAYMENT_SIGNATURE_HEADER: "not base64!"}).status_code == 400
        # a wallet holding no tokens
        poor = Payer(Wallet(str(chain.keys["unfunded"])), SpendCaps(max_price_per_load=PRICE),
                     allowed_assets=[(NETWORK, chain.token)])
        bad = c.get(url, headers={PAYMENT_SIGNATURE_HEADER: poor.pay(req).header})
        assert bad.status_code == 402 and bad.content != blob
    assert chain.balance(host_address(chain)) == host0
    a = audit(server)
    assert a["transactions"] == a0["transactions"] and a["total"] == 0


def test_x402_wallet_buyer_sees_no_restricted_and_gets_no_free_artifact(chain: Chain,
                                                                         server: ServerProcess) -> None:
    secret, _ = publish(server, 4, visibility="restricted")
    free, _ = publish(server, 5, price=0)
    with httpx.Client(timeout=60) as c:
        assert c.get(f"{server.url}/v1/artifacts/{secret}/blob").status_code == 404
        assert c.get(f"{server.url}/v1/artifacts/{free}/blob").status_code == 401
        assert c.get(f"{server.url}/v1/artifacts/{free}").status_code == 200  # public: it may look


def test_x402_hosted_facilitator_pays_then_down_serves_and_charges_nothing(chain: Chain,
                                                                          tmp_path: Path) -> None:
    from tests.test_x402_chain import hosted_facilitator

    with hosted_facilitator(chain) as (fac_url, fac):
        srv = start(chain, tmp_path / "hosted", facilitator=fac_url)
        try:
            key, blob = publish(srv, 6)
            url = f"{srv.url}/v1/artifacts/{key}/blob"
            host0 = chain.balance(host_address(chain))
            with httpx.Client(timeout=60) as c:
                r, _ = request_paying(c, "GET", url, buyer(chain, 4))  # through the hosted facilitator
                assert r.status_code == 200 and r.content == blob and settlement(r) is not None
                fac.should_exit = True  # the facilitator goes down
                time.sleep(0.5)
                payment = buyer(chain, 5).pay(c.get(url).headers[PAYMENT_REQUIRED_HEADER]).header
                down = c.get(url, headers={PAYMENT_SIGNATURE_HEADER: payment})
            assert down.status_code == 503 and down.content != blob and down.headers["Retry-After"]
            assert chain.balance(host_address(chain)) - host0 == PRICE  # the first payment only
            a = audit(srv)
            assert a["total"] == 0 and a["transactions"]["deposit"] == 1 and a["transactions"]["sale"] == 1
        finally:
            srv.stop()


def test_x402_wallet_statement_by_signature_shows_its_purchases_and_deposits(chain: Chain,
                                                                              server: ServerProcess) -> None:
    from kvagent.payments.signin import WALLET_AUTH_HEADER, sign

    key, _ = publish(server, 7)
    p = buyer(chain, 6)
    wallet_key = str(chain.keys["buyers"][46])
    with httpx.Client(timeout=60) as c:
        r, _ = request_paying(c, "GET", f"{server.url}/v1/artifacts/{key}/blob", p)
        assert r.status_code == 200
        path = "/v1/account/statement"
        s = c.get(server.url + path, headers={WALLET_AUTH_HEADER: sign(wallet_key, "GET", path)})
        assert s.status_code == 200, s.text
        body = s.json()
        assert body["principal"] == "x402:" + p.wallet.address.lower() and body["balance"] == 0
        assert [(x["key"], x["amount"]) for x in body["purchases"]] == [(key, PRICE)]
        assert body["deposited"] == PRICE and body["transfers"][0]["kind"] == "deposit"
        assert r.headers["X-KVAgent-Receipt"] in {x["receipt"] for x in body["receipts"]}
        # another wallet's signature naming this address, an old one, one for another path: refused
        other = sign(str(chain.keys["buyers"][47]), "GET", path).split(":")
        forged_auth = ":".join([p.wallet.address, *other[1:]])
        for bad in (forged_auth, sign(wallet_key, "GET", path, int(time.time()) - 3600),
                    sign(wallet_key, "GET", "/v1/account")):
            assert c.get(server.url + path, headers={WALLET_AUTH_HEADER: bad}).status_code == 401
        assert c.get(server.url + path).status_code == 401


def test_x402_token_holder_tops_up_by_x402(chain: Chain, server: ServerProcess) -> None:
    url = f"{server.url}/v1/account/topup"
    bob0, host0 = balance(server, BOB), chain.balance(host_address(chain))
    with httpx.Client(timeout=60) as c:
        first = c.post(url, json={"amount": 12_345}, headers=BOB)
        assert first.status_code == 402
        (offer,) = decode_header(first.headers[PAYMENT_REQUIRED_HEADER])["accepts"]
        assert offer["amount"] == "12345"
        r, payment = request_paying(c, "POST", url, buyer(chain, 7, cap=20_000), json={"amount": 12_345},
                                    headers=BOB)
        assert r.status_code == 200, r.text
        assert r.json()["deposited"] == 12_345 and settlement(r) is not None and payment is not None
        # the same payment again moves nothing
        again = c.post(url, json={"amount": 12_345},
                       headers={**BOB, PAYMENT_SIGNATURE_HEADER: payment.header})
        assert again.status_code == 402
        assert c.post(url, json={"amount": 1}).status_code == 401  # a top-up is of a token's account
    assert balance(server, BOB) - bob0 == 12_345
    assert chain.balance(host_address(chain)) - host0 == 12_345


def test_x402_publisher_withdraws_on_chain_once_within_its_balance(chain: Chain, server: ServerProcess
                                                                   ) -> None:
    publish(server, 8)
    key, _ = publish(server, 9)
    with httpx.Client(timeout=60) as c:  # a sale, so that alice holds royalties
        sold, _ = request_paying(c, "GET", f"{server.url}/v1/artifacts/{key}/blob", buyer(chain, 8))
        assert sold.is_success
    dest = str(Account.create().address)
    have = balance(server, ALICE)
    assert have > 0
    url = f"{server.url}/v1/account/withdraw"
    with httpx.Client(timeout=60) as c:
        over = c.post(url, json={"amount": have + 1, "to": dest},
                      headers={**ALICE, "Idempotency-Key": "w-over"})
        assert over.status_code == 409 and over.json()["balance"] == have
        r = c.post(url, json={"amount": have, "to": dest}, headers={**ALICE, "Idempotency-Key": "w-1"})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "sent" and r.json()["balance"] == 0
        again = c.post(url, json={"amount": have, "to": dest}, headers={**ALICE, "Idempotency-Key": "w-1"})
        assert again.status_code == 200 and again.json()["replayed"] is True
        assert again.json()["transaction"] == r.json()["transaction"]
        # bob may not pay out alice's balance
        assert c.post(url, json={"amount": 1, "to": dest, "principal": "alice"},
                      headers={**BOB, "Idempotency-Key": "w-2"}).status_code == 403
        assert c.post(url, json={"amount": 1, "to": dest}, headers=ALICE).status_code == 422  # no key
    assert chain.balance(dest) == have  # on chain, once
    assert balance(server, ALICE) == 0
    a = audit(server)
    assert a["total"] == 0 and not a["unbalanced"] and not a["negative"]
    x = httpx.get(f"{server.url}/v1/market/x402-audit", headers=ADMIN, timeout=60).json()
    assert x["ok"] is True and not x["missing"] and x["withdrawn"] >= have
    assert x["deposited"] == x["confirmed"] == a["chain_net"] + x["withdrawn"]  # chain transfers = ledger
    assert httpx.get(f"{server.url}/v1/market/x402-audit", headers=BOB).status_code == 403


def test_x402_options_without_the_sdk_say_what_to_install(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['x402'] = None\n"
            "from kvagent.server.__main__ import main\n"
            f"sys.exit(main(['--data-dir', {str(tmp_path)!r}, '--x402-network', 'eip155:31337']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ})
    assert r.returncode == 2 and "pip install 'kvagent[x402]'" in r.stderr


def test_x402_cli_tops_up_withdraws_and_audits(chain: Chain, server: ServerProcess, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from kvagent import cli

    wallet = key_file(tmp_path, "bob.key", str(chain.keys["buyers"][52]))
    reg = ["--registry", server.url]
    host0, bob0 = chain.balance(host_address(chain)), balance(server, BOB)
    bob = [*reg, "--token", "bob-token-000001"]
    assert cli.main([*bob, "account", "topup", "2500", "--wallet", str(wallet), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["deposited"] == 2500 and out["balance"] == bob0 + 2500
    assert chain.balance(host_address(chain)) - host0 == 2500
    dest = str(Account.create().address)
    args = [*bob, "account", "withdraw", "1000", "--to", dest, "--idempotency-key", "cli-w-1", "--json"]
    assert cli.main(args) == 0 and cli.main(args) == 0  # the same key twice: paid out once
    first, again = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["status"] == "sent" and again["replayed"] is True
    assert chain.balance(dest) == 1000 and balance(server, BOB) == bob0 + 1500
    assert cli.main([*bob, "account", "withdraw", str(bob0 + 1501), "--to", dest]) != 0  # above the balance
    assert chain.balance(dest) == 1000
    capsys.readouterr()
    assert cli.main([*reg, "--token", "admin-token-0001", "account", "chain-audit", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_x402_no_token_names_a_wallet_principal(tmp_path: Path) -> None:
    """A token for ``x402:<address>`` would spend that wallet's deposits: neither the token file nor the
    token store issues one."""
    from kvagent.errors import ConfigError
    from kvagent.server.auth import read_token_file
    from kvagent.server.meta import SQLiteMeta
    from kvagent.server.token_store import TokenStore

    wallet = "x402:0x" + "ab" * 20
    f = tmp_path / "tokens.json"
    f.write_text(json.dumps({"a-wallet-token-01": {"principal": wallet}}))
    with pytest.raises(ConfigError, match="x402:"):
        read_token_file(f)
    meta = SQLiteMeta(tmp_path / "meta.sqlite3")
    try:
        with pytest.raises(ConfigError, match="x402:"):
            TokenStore(meta).issue(wallet)
    finally:
        meta.close()
