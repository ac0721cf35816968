"""x402 against a real chain (anvil + KVUSD, .ci/chain.sh): the official SDK's client signs, its facilitator
verifies and settles on chain, and kvagent's gateway and ledger deposit sit on top.

Every test here runs the real SDK, real signatures and real transactions; nothing is mocked.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

pytest.importorskip("x402", reason="needs the x402 SDK: pip install 'kvagent[x402]'")

from eth_account import Account  # noqa: E402
from x402 import x402ClientSync, x402FacilitatorSync, x402ResourceServerSync  # noqa: E402
from x402.mechanisms.evm.exact import (  # noqa: E402
    ExactEvmFacilitatorScheme,
    ExactEvmScheme,
    ExactEvmSchemeConfig,
    ExactEvmServerScheme,
)
from x402.mechanisms.evm.exact import client as exact_client  # noqa: E402
from x402.mechanisms.evm.signers import EthAccountSigner, FacilitatorWeb3Signer  # noqa: E402
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements  # noqa: E402

from kvagent.costs import market as mk  # noqa: E402
from kvagent.errors import PaymentDeclined, PaymentError, PaymentInvalid, SettlementFailed  # noqa: E402
from kvagent.payments import SpendCaps, Wallet, X402Terms, decode_header, encode_header  # noqa: E402
from kvagent.payments.payer import Payer  # noqa: E402
from kvagent.server.deposits import CHAIN, DEPOSIT, deposited, record_deposit  # noqa: E402
from kvagent.server.ledger import Ledger  # noqa: E402
from kvagent.server.meta import SQLiteMeta  # noqa: E402
from kvagent.server.withdrawals import TokenSender, WithdrawalRefused, withdraw, withdrawn  # noqa: E402
from kvagent.server.x402 import X402Gateway  # noqa: E402
from kvagent.server.x402_audit import chain_audit  # noqa: E402
from kvagent.server.x402_facilitator import facilitator_app  # noqa: E402
from tests.test_server_postgres import pg_schema_dsn  # noqa: E402,F401  (a fixture)
from tests.x402_chain import NETWORK, Chain, chain_or_skip, serve  # noqa: E402

_buyer_index = itertools.count()
#: The last CROWD funded buyers are the concurrent buyers' (their payments carry random nonces: reusable).
CROWD = 32


@pytest.fixture(scope="module")
def chain() -> Chain:
    return chain_or_skip()


@pytest.fixture
def buyer(chain: Chain) -> Any:
    """A funded buyer account of its own per test (nonces and balances never shared between tests)."""
    i = next(_buyer_index)
    if i >= len(chain.keys["buyers"]) - CROWD:
        pytest.fail("the test chain has too few funded buyers for these tests")
    return Account.from_key(chain.keys["buyers"][i])


def host_address(chain: Chain) -> str:
    return str(Account.from_key(chain.keys["host"]).address)


def requirements(chain: Chain, amount: int, pay_to: str | None = None) -> PaymentRequirements:
    return PaymentRequirements(scheme="exact", network=NETWORK, asset=chain.token, amount=str(amount),
                               pay_to=pay_to or host_address(chain), max_timeout_seconds=120,
                               extra={"name": chain.token_name, "version": chain.token_version})


def sdk_client(account: Any, chain: Chain) -> x402ClientSync:
    c = x402ClientSync()
    c.register(NETWORK, ExactEvmScheme(EthAccountSigner(account)))
    c.set_spend_controls({"allowed_assets": [{"network": NETWORK, "asset": chain.token}]})
    return c


def sdk_server(chain: Chain) -> x402ResourceServerSync:
    fac = x402FacilitatorSync()
    signer = FacilitatorWeb3Signer(chain.keys["facilitator"], chain.rpc)
    fac.register([NETWORK], ExactEvmFacilitatorScheme(signer, ExactEvmSchemeConfig(simulate_in_settle=True)))
    server = x402ResourceServerSync(fac)
    server.register(NETWORK, ExactEvmServerScheme())
    server.initialize()
    return server


def pay(client: x402ClientSync, req: PaymentRequirements) -> PaymentPayload:
    payload = client.create_payment_payload(PaymentRequired(accepts=[req]))
    assert isinstance(payload, PaymentPayload)
    return payload


# -- the SDK's own flow on the chain ---------------------------------------------------------------------
def test_x402_sdk_exact_payments_settle_on_chain(chain: Chain, buyer: Any) -> None:
    server, client = sdk_server(chain), sdk_client(buyer, chain)
    host = host_address(chain)
    price, n = 1_500, 3
    host0, buyer0 = chain.balance(host), chain.balance(buyer.address)
    txs = set()
    for _ in range(n):
        req = requirements(chain, price)
        payload = pay(client, req)
        v = server.verify_payment(payload, req)
        assert v.is_valid, v.invalid_reason
        s = server.settle_payment(payload, req)
        assert s.success, s.error_reason
        assert s.payer == buyer.address and s.network == NETWORK
        txs.add(s.transaction)
    assert len(txs) == n
    assert chain.balance(host) - host0 == n * price
    assert buyer0 - chain.balance(buyer.address) == n * price


def test_x402_same_payload_settles_once(chain: Chain, buyer: Any) -> None:
    server, client = sdk_server(chain), sdk_client(buyer, chain)
    host, price = host_address(chain), 2_000
    req = requirements(chain, price)
    payload = pay(client, req)
    host0 = chain.balance(host)
    assert server.settle_payment(payload, req).success
    again = server.settle_payment(payload, req)
    assert not again.success
    assert not server.verify_payment(payload, req).is_valid  # the nonce is spent on chain
    assert chain.balance(host) - host0 == price


def test_x402_forged_authorisations_are_refused(chain: Chain, buyer: Any) -> None:
    server, client = sdk_server(chain), sdk_client(buyer, chain)
    host = host_address(chain)
    host0, buyer0 = chain.balance(host), chain.balance(buyer.address)
    price = 1_000
    # the amount raised after signing
    req = requirements(chain, price)
    raised = pay(client, req).model_dump(by_alias=True)
    raised["payload"]["authorization"]["value"] = str(price * 100)
    big = requirements(chain, price * 100)
    forged = PaymentPayload.model_validate({**raised, "accepted": big.model_dump(by_alias=True)})
    assert not server.verify_payment(forged, big).is_valid
    assert not server.settle_payment(forged, big).success
    # signed by another key than the payer it names
    other = Account.from_key(chain.keys["unfunded"])
    stolen = pay(sdk_client(other, chain), req).model_dump(by_alias=True)
    stolen["payload"]["authorization"]["from"] = buyer.address
    stolen_p = PaymentPayload.model_validate(stolen)
    v = server.verify_payment(stolen_p, req)
    assert not v.is_valid and v.invalid_reason and "signature" in v.invalid_reason
    assert not server.settle_payment(stolen_p, req).success
    # paid to another address than this host's
    thief = requirements(chain, price, pay_to=other.address)
    to_thief = pay(client, thief)
    assert not server.verify_payment(to_thief, req).is_valid
    assert chain.balance(host) == host0 and chain.balance(buyer.address) == buyer0


def test_x402_expired_authorisation_is_refused_by_facilitator_and_token(
    chain: Chain, buyer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, client = sdk_server(chain), sdk_client(buyer, chain)
    host, price = host_address(chain), 1_000
    req = requirements(chain, price)
    # signed correctly, but an hour ago with a two-minute window: validBefore is long past
    monkeypatch.setattr(exact_client, "time", SimpleNamespace(time=lambda: time.time() - 3600))
    expired = pay(client, req)
    monkeypatch.undo()
    host0 = chain.balance(host)
    v = server.verify_payment(expired, req)
    assert not v.is_valid and v.invalid_reason and "valid_before" in v.invalid_reason
    assert not server.settle_payment(expired, req).success
    # the token itself refuses it too (not only the facilitator's clock check)
    a = expired.payload["authorization"]
    sig = bytes.fromhex(expired.payload["signature"].removeprefix("0x"))
    call = chain.contract.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)")(
        a["from"], a["to"], int(a["value"]), int(a["validAfter"]), int(a["validBefore"]),
        bytes.fromhex(a["nonce"].removeprefix("0x")), sig)
    with pytest.raises(Exception, match="authorization is expired"):
        call.call({"from": Account.from_key(chain.keys["facilitator"]).address})
    assert chain.balance(host) == host0


def test_x402_underfunded_wallet_is_refused(chain: Chain) -> None:
    server = sdk_server(chain)
    poor = Account.from_key(chain.keys["unfunded"])
    assert chain.balance(poor.address) == 0
    req = requirements(chain, 1_000)
    payload = pay(sdk_client(poor, chain), req)
    v = server.verify_payment(payload, req)
    assert not v.is_valid and v.invalid_reason and "balance" in v.invalid_reason


# -- kvagent's gateway, payer and ledger deposit on the chain -------------------------------------------
def terms(chain: Chain) -> X402Terms:
    return X402Terms(NETWORK, chain.token, host_address(chain), chain.token_name, chain.token_version)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    meta = SQLiteMeta(tmp_path / "meta.sqlite3")
    yield Ledger(meta, mk.HostPrices(commission_bps=1_000))
    meta.close()


def test_x402_gateway_pays_settles_and_deposits_once(chain: Chain, buyer: Any, ledger: Ledger) -> None:
    gw = X402Gateway.in_process(terms(chain), chain.keys["facilitator"], chain.rpc)
    payer = Payer(Wallet(buyer.key.hex()), SpendCaps(max_price_per_load=5_000, budget=10_000),
                  allowed_assets=[(NETWORK, chain.token)])
    price, host = 3_000, host_address(chain)
    required = gw.required_header(price, "http://registry.test/v1/blobs/abc", "one load of abc")
    sdk_view = PaymentRequired.model_validate(decode_header(required))  # the SDK reads our 402 as its own
    assert sdk_view.accepts[0].amount == str(price) and sdk_view.accepts[0].extra["name"] == chain.token_name
    host0 = chain.balance(host)
    payment = payer.pay(required)
    assert payer.caps.spent == price
    v = gw.verify(payment.header, price)
    assert v.payer == buyer.address and v.principal == "x402:" + buyer.address.lower()
    s = gw.settle(v)
    assert chain.balance(host) - host0 == price
    response = decode_header(s.header())
    assert response["success"] is True and response["transaction"] == s.transaction
    # the deposit and a purchase paid from it in one database transaction; recording it again changes nothing
    ledger.set_price("k" * 64, "alice", price)
    with ledger.meta.transaction() as cur:
        rec = record_deposit(ledger, cur, v.principal, s.amount, s.network, s.transaction)
    assert not rec.replayed and ledger.balance(v.principal) == price
    assert ledger.charge_load(v.principal, "k" * 64, "alice", v.idempotency_key, price) is not None
    with ledger.meta.transaction() as cur:
        again = record_deposit(ledger, cur, v.principal, s.amount, s.network, s.transaction.upper())
    assert again.replayed and again.txn == rec.txn
    assert ledger.balance(v.principal) == 0 and deposited(ledger) == price
    assert ledger.balance("alice") == 2_700 and ledger.balance(mk.HOST) == 300
    a = ledger.audit()
    assert a.total == 0 and not a.unbalanced and a.transactions[DEPOSIT] == 1
    assert ledger.balance(CHAIN) == -price
    # the same PAYMENT-SIGNATURE again: refused at verification (its nonce is spent), nothing moves
    with pytest.raises(PaymentInvalid):
        gw.verify(payment.header, price)
    assert chain.balance(host) - host0 == price


def test_x402_gateway_takes_addresses_in_any_case(chain: Chain, buyer: Any) -> None:
    """Addresses as a config file or anvil writes them (lowercase) settle: the gateway checksums them."""
    lower = X402Terms(NETWORK, chain.token.lower(), host_address(chain).lower(), chain.token_name,
                      chain.token_version)
    gw = X402Gateway.in_process(lower, chain.keys["facilitator"], chain.rpc)
    payer = Payer(Wallet(buyer.key.hex()), allowed_assets=[(NETWORK, chain.token)])
    host0 = chain.balance(host_address(chain))
    gw.settle(gw.verify(payer.pay(gw.required_header(321, "http://registry.test/l")).header, 321))
    assert chain.balance(host_address(chain)) - host0 == 321


def test_x402_gateway_refuses_a_payment_for_other_requirements(chain: Chain, buyer: Any) -> None:
    gw = X402Gateway.in_process(terms(chain), chain.keys["facilitator"], chain.rpc)
    payer = Payer(Wallet(buyer.key.hex()), allowed_assets=[(NETWORK, chain.token)])
    cheap = payer.pay(gw.required_header(100, "http://registry.test/cheap"))
    with pytest.raises(PaymentInvalid) as e:
        gw.verify(cheap.header, 5_000)  # paid 100 for a 5,000 load
    assert e.value.reason == "requirements_mismatch"
    # a payload whose "accepted" was rewritten to the right price, but whose signed value is still 100
    obj = decode_header(cheap.header)
    obj["accepted"]["amount"] = "5000"
    with pytest.raises(PaymentInvalid) as e:
        gw.verify(encode_header(obj), 5_000)
    assert e.value.reason != "requirements_mismatch"  # the facilitator refused the signed amount
    with pytest.raises(PaymentInvalid):
        gw.verify("not base64 json", 5_000)


def test_x402_payer_never_signs_above_its_caps(chain: Chain, buyer: Any) -> None:
    gw = X402Gateway.in_process(terms(chain), chain.keys["facilitator"], chain.rpc)
    payer = Payer(Wallet(buyer.key.hex()), SpendCaps(max_price_per_load=1_000, budget=1_500),
                  allowed_assets=[(NETWORK, chain.token)])
    with pytest.raises(PaymentDeclined) as e:
        payer.pay(gw.required_header(1_001, "http://registry.test/x"))
    assert e.value.reason == "price_above_cap" and payer.caps.spent == 0
    payer.pay(gw.required_header(1_000, "http://registry.test/x"))
    with pytest.raises(PaymentDeclined) as e:
        payer.pay(gw.required_header(600, "http://registry.test/y"))
    assert e.value.reason == "budget_exhausted" and payer.caps.spent == 1_000
    # a token that was not allowed is refused by the SDK's spend controls: nothing signed, nothing reserved
    stranger = Payer(Wallet(buyer.key.hex()), SpendCaps(max_price_per_load=1_000))
    with pytest.raises(PaymentDeclined) as e:
        stranger.pay(gw.required_header(10, "http://registry.test/z"))
    assert e.value.reason == "not_allowed" and stranger.caps.spent == 0


def test_x402_facilitator_down_serves_and_moves_nothing(chain: Chain, buyer: Any, ledger: Ledger) -> None:
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    payer = Payer(Wallet(buyer.key.hex()), allowed_assets=[(NETWORK, chain.token)])
    live = X402Gateway.in_process(terms(chain), chain.keys["facilitator"], chain.rpc)
    down = X402Gateway.in_process(terms(chain), chain.keys["facilitator"], dead)  # its RPC is gone
    host0, buyer0 = chain.balance(host_address(chain)), chain.balance(buyer.address)
    payment = payer.pay(live.required_header(1_000, "http://registry.test/x"))
    with pytest.raises(PaymentError) as e:
        down.verify(payment.header, 1_000)
    assert e.value.reason == "facilitator_unavailable" and not isinstance(e.value, PaymentInvalid)
    with pytest.raises(SettlementFailed) as e:  # verified while it was up, then down at settlement
        down.settle(live.verify(payment.header, 1_000))
    assert e.value.reason == "facilitator_unavailable"
    with pytest.raises(httpx.ConnectError):  # a hosted facilitator that is down: the host cannot start x402
        X402Gateway.hosted(terms(chain), dead, timeout=2)
    assert chain.balance(host_address(chain)) == host0 and chain.balance(buyer.address) == buyer0
    assert ledger.audit().total == 0 and deposited(ledger) == 0


# -- a hosted facilitator (--x402-facilitator URL): the SDK's HTTP client against kvagent's app ------------
@contextmanager
def hosted_facilitator(chain: Chain) -> Iterator[tuple[str, Any]]:
    """The SDK's facilitator behind kvagent's HTTP app, served on a loopback port."""
    fac = x402FacilitatorSync()
    signer = FacilitatorWeb3Signer(chain.keys["facilitator"], chain.rpc)
    fac.register([NETWORK], ExactEvmFacilitatorScheme(signer, ExactEvmSchemeConfig(simulate_in_settle=True)))
    with serve(facilitator_app(fac)) as served:
        yield served


def test_x402_hosted_facilitator_settles_then_down_moves_nothing(chain: Chain, buyer: Any) -> None:
    payer = Payer(Wallet(buyer.key.hex()), allowed_assets=[(NETWORK, chain.token)])
    host = host_address(chain)
    with hosted_facilitator(chain) as (url, server):
        gw = X402Gateway.hosted(terms(chain), url)
        host0 = chain.balance(host)
        s = gw.settle(gw.verify(payer.pay(gw.required_header(2_500, "http://registry.test/a")).header, 2_500))
        assert chain.balance(host) - host0 == 2_500 and s.payer == buyer.address
        unpaid = payer.pay(gw.required_header(700, "http://registry.test/b"))
        v = gw.verify(unpaid.header, 700)
        server.should_exit = True  # the facilitator goes away between verification and settlement
    with pytest.raises(SettlementFailed) as e:
        gw.settle(v)
    assert e.value.reason == "facilitator_unavailable"
    with pytest.raises(PaymentError) as e2:
        gw.verify(unpaid.header, 700)
    assert e2.value.reason == "facilitator_unavailable"
    assert chain.balance(host) - host0 == 2_500


# -- money is conserved under concurrent wallet buyers -------------------------------------------------------
def test_x402_32_concurrent_wallet_buyers_conserve_money(chain: Chain, any_ledger: Ledger) -> None:
    n, price, key = CROWD, 1_234, "c" * 64
    buyers = [Account.from_key(k) for k in chain.keys["buyers"][-n:]]
    gw = X402Gateway.in_process(terms(chain), chain.keys["facilitator"], chain.rpc)
    led, host = any_ledger, host_address(chain)
    led.set_price(key, "alice", price)
    host0 = chain.balance(host)
    barrier, errors = threading.Barrier(n), []

    def buy(account: Any) -> None:
        try:
            payer = Payer(Wallet(account.key.hex()), SpendCaps(max_price_per_load=price),
                          allowed_assets=[(NETWORK, chain.token)])
            barrier.wait()
            v = gw.verify(payer.pay(gw.required_header(price, "http://registry.test/c")).header, price)
            s = gw.settle(v)
            with led.meta.transaction() as cur:
                record_deposit(led, cur, v.principal, s.amount, s.network, s.transaction)
            assert led.charge_load(v.principal, key, "alice", v.idempotency_key, price) is not None
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=buy, args=(b,)) for b in buyers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    received = chain.balance(host) - host0
    assert received == n * price == deposited(led)
    a = led.audit()
    assert a.total == 0 and not a.unbalanced and a.transactions[DEPOSIT] == n
    assert led.balance("alice") + led.balance(mk.HOST) == n * price
    assert all(led.balance("x402:" + b.address.lower()) == 0 for b in buyers)
    audit = chain_audit(led, chain.rpc, chain.token, host)
    assert audit.ok and audit.confirmed == n * price and audit.deposits == n


def test_x402_chain_audit_finds_a_deposit_the_chain_never_saw(chain: Chain, ledger: Ledger) -> None:
    with ledger.meta.transaction() as cur:
        never = "0x" + "99" * 32  # no such transaction
        record_deposit(ledger, cur, "x402:0x" + "12" * 20, 500, NETWORK, never)
    audit = chain_audit(ledger, chain.rpc, chain.token, host_address(chain))
    assert not audit.ok and len(audit.missing) == 1 and audit.deposited == 500 and audit.confirmed == 0


# -- publishers paid out ----------------------------------------------------------------------------------
def test_x402_publisher_withdraws_once_within_its_balance(chain: Chain, buyer: Any, any_ledger: Ledger
                                                          ) -> None:
    led, host, key = any_ledger, host_address(chain), "e" * 64
    led.set_price(key, "alice", 5_000)
    gw = X402Gateway.in_process(terms(chain), chain.keys["facilitator"], chain.rpc)
    payer = Payer(Wallet(buyer.key.hex()), allowed_assets=[(NETWORK, chain.token)])
    v = gw.verify(payer.pay(gw.required_header(5_000, "http://registry.test/e")).header, 5_000)
    s = gw.settle(v)
    with led.meta.transaction() as cur:
        record_deposit(led, cur, v.principal, s.amount, s.network, s.transaction)
    assert led.charge_load(v.principal, key, "alice", v.idempotency_key, 5_000) is not None
    assert led.balance("alice") == 4_500  # the royalty, less the 10% commission
    sender = TokenSender(chain.rpc, chain.token, chain.keys["host"])
    to = Account.create().address
    w = withdraw(led, sender, "alice", 4_000, to, "payout-1")
    assert w.status == "sent" and w.transaction and chain.balance(to) == 4_000
    again = withdraw(led, sender, "alice", 4_000, to, "payout-1")  # a retry: nothing sent twice
    assert again.receipt.replayed and again.transaction == w.transaction and chain.balance(to) == 4_000
    with pytest.raises(WithdrawalRefused):
        withdraw(led, sender, "alice", 501, to, "payout-2")
    assert led.balance("alice") == 500 and withdrawn(led) == 4_000 and chain.balance(to) == 4_000
    a = led.audit()
    assert a.total == 0 and not a.unbalanced
    audit = chain_audit(led, chain.rpc, chain.token, host)
    assert audit.ok and (audit.deposited, audit.withdrawn, audit.withdrawn_confirmed) == (5_000, 4_000, 4_000)


def test_x402_failed_payout_is_reversed_and_racing_payouts_never_overdraw(chain: Chain,
                                                                          any_ledger: Ledger) -> None:
    led = any_ledger
    led.credit("bob", 500)
    to = Account.create().address
    broke = TokenSender(chain.rpc, chain.token, chain.keys["unfunded"])  # holds gas, no KVUSD: reverts
    with pytest.raises(SettlementFailed) as e:
        withdraw(led, broke, "bob", 300, to, "p-broke")
    assert e.value.reason == "transfer_failed"
    assert led.balance("bob") == 500 and withdrawn(led) == 0 and chain.balance(to) == 0
    assert withdraw(led, broke, "bob", 300, to, "p-broke").status == "reversed"  # its retry says so
    sender = TokenSender(chain.rpc, chain.token, chain.keys["host"])
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def take(i: int) -> None:
        barrier.wait()
        try:
            outcomes.append(withdraw(led, sender, "bob", 100, to, f"p-{i}").status)
        except WithdrawalRefused:
            outcomes.append("refused")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(outcomes) == ["refused"] * 3 + ["sent"] * 5
    assert chain.balance(to) == 500 and led.balance("bob") == 0 and withdrawn(led) == 500
    assert led.audit().total == 0
