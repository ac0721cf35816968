"""The server's double-entry ledger (kvagent.server.ledger) on SQLite and on PostgreSQL.

PostgreSQL cases need KVAGENT_TEST_POSTGRES_DSN (see tests/test_server_postgres.py; they fail under CI=true
without it).
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvagent.costs import market as mk
from kvagent.errors import AlreadyServed, ConfigError, IdempotencyKeyRefunded, IdempotencyKeyReused
from kvagent.server.ledger import QUARANTINED, IdempotencyConflict, Ledger
from kvagent.server.meta import ArtifactRow, MetaStore, PostgresMeta, SQLiteMeta, can_see
from kvagent.server.records import OwnerCopies
from tests.test_server_postgres import pg_schema_dsn, row  # noqa: F401  (pg_schema_dsn is a fixture)

PRICES = mk.HostPrices(input_per_mtok=5_000_000, cached_input_per_mtok=500_000, output_per_mtok=20_000_000,
                       commission_bps=1000)


@pytest.fixture(params=["sqlite", "postgres"])
def meta(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MetaStore]:
    store: MetaStore
    if request.param == "sqlite":
        store = SQLiteMeta(tmp_path / "meta.sqlite3")
    else:
        store = PostgresMeta(request.getfixturevalue("pg_schema_dsn"))
    OwnerCopies(store)  # the server's per-owner records (their tables), as build_state makes them
    yield store
    store.close()


def test_quote_credit_purchase_replay_statement(meta: MetaStore) -> None:
    led = Ledger(meta, PRICES)
    led.set_price("k1", "alice", 1000)
    with pytest.raises(mk.PaymentRefused) as e:
        led.charge_load("bob", "k1", "alice", "idem-1", None)
    assert e.value.quote.to_json() == {"key": "k1", "price": 1000, "currency": "uUSD", "balance": 0,
                                       "reason": "insufficient_balance"}
    led.credit("bob", 5000)
    with pytest.raises(mk.PaymentRefused) as e:
        led.charge_load("bob", "k1", "alice", "idem-1", 999)
    assert e.value.quote.reason == "price_above_max" and led.balance("bob") == 5000
    r1 = led.charge_load("bob", "k1", "alice", "idem-1", 1000)
    assert r1 is not None and r1.amount == 1000 and r1.receipt.startswith("rcpt_")
    r2 = led.charge_load("bob", "k1", "alice", "idem-1", 1000)
    assert r2 is not None and (r2.receipt, r2.txn, r2.replayed) == (r1.receipt, r1.txn, True)
    with pytest.raises(IdempotencyConflict):
        led.charge_load("bob", "k2", "alice", "idem-1", None)
    assert (led.balance("bob"), led.balance("alice"), led.balance(mk.HOST)) == (4000, 900, 100)
    assert led.charge_load("alice", "k1", "alice", "idem-9", None) is None  # the owner loads for free
    assert led.charge_load("bob", "free", "alice", "idem-2", None) is None  # unpriced: free, no transaction
    s = led.statement("bob").to_json()
    assert s["credits"] == 5000 and s["purchases"] == [
        {"key": "k1", "loads": 1, "amount": 1000, "royalties": 0, "refunds": 0}]
    assert led.statement("alice").to_json()["sales"] == [
        {"key": "k1", "loads": 1, "amount": 900, "royalties": 0, "refunds": 0}]
    a = led.audit()
    assert (a.total, a.unbalanced, a.negative, a.money_issued) == (0, [], {}, 5000)
    assert a.transactions == {"credit": 1, "sale": 1}


def test_each_owner_prices_its_own_record(meta: MetaStore) -> None:
    led = Ledger(meta)
    led.set_price("k", "mallory", 7)  # a publish that then lost the key to alice, or mallory's own copy
    assert led.price("k", "alice") == 0
    led.set_price("k", "alice", 50)
    assert led.set_price("k", "mallory", 1) == 1 and led.price("k", "alice") == 50  # never overwrites alice's
    assert led.price("k", "mallory") == 1


def test_generate_is_prepaid_then_settled(meta: MetaStore) -> None:
    led = Ledger(meta, PRICES)
    led.set_price("k", "alice", 300)
    led.credit("bob", 10_000)
    rec = led.charge_generate("bob", "k", "alice", "g1", None, 10, 2000, 64)
    assert rec is not None and rec.amount == 300 + 50 + 1000 + 1280
    led.settle_generate(rec, 10, 2000, 64, 4)  # only 4 of 64 output tokens were generated
    assert led.balance("bob") == 10_000 - (300 + 50 + 1000 + 80)
    assert led.balance("alice") == 270 and led.balance(mk.HOST) == 30 + 1050 + 80
    assert led.statement("alice").to_json()["sales"][0]["royalties"] == 270
    refund = led.refund(rec.receipt)
    assert refund is not None and led.refund(rec.receipt) is None  # once only
    assert (led.balance("bob"), led.balance("alice"), led.balance(mk.HOST)) == (10_000, 0, 0)
    assert led.audit().unbalanced == []


def test_hosted_chat_without_an_artifact_pays_the_host_only(meta: MetaStore) -> None:
    from kvagent.server.market_routes import HOSTED_CHAT

    led = Ledger(meta, PRICES)
    led.credit("bob", 1000)
    rec = led.charge_generate("bob", HOSTED_CHAT, mk.HOST, "c1", None, 100, 0, 10)
    assert rec is not None and rec.amount == 500 + 200
    assert (led.balance("bob"), led.balance(mk.HOST)) == (300, 700)
    assert led.statement("bob").to_json()["purchases"][0]["key"] == HOSTED_CHAT


def test_a_chat_an_engine_found_cached_is_settled_on_what_it_reused(meta: MetaStore) -> None:
    """vLLM reports its cached prompt tokens only with its Finish: the pre-charge bills the whole prompt as
    prefilled, settling gives back the difference to the cached price (and the unused output) exactly once;
    a use dearer than the pre-charge moves nothing, and the ledger stays balanced."""
    from kvagent.server.market_routes import HOSTED_CHAT

    led = Ledger(meta, PRICES)
    led.credit("bob", 10_000)
    rec = led.charge_generate("bob", HOSTED_CHAT, mk.HOST, "v1", None, 1000, 0, 10)
    assert rec is not None and rec.amount == 5000 + 200  # 1000 prompt tokens at 5, 10 output at 20
    back = led.settle_generate(rec, 1000, 0, 10, 4, used_input_tokens=200, used_cached_tokens=800)
    want = 1000 + 400 + 80  # 200 prefilled at 5, 800 cached at 0.5, 4 output at 20
    assert back is not None and -back.amount == 5200 - want
    assert (led.balance("bob"), led.balance(mk.HOST)) == (10_000 - want, want)
    rec2 = led.charge_generate("bob", HOSTED_CHAT, mk.HOST, "v2", None, 100, 0, 10)
    assert rec2 is not None
    assert led.settle_generate(rec2, 100, 0, 10, 10, used_input_tokens=100, used_cached_tokens=50) is None
    assert led.balance("bob") == 10_000 - want - rec2.amount
    audit = led.audit()
    assert audit.unbalanced == [] and audit.total == 0


def test_proven_dispute_refunds_and_quarantines(meta: MetaStore) -> None:
    led = Ledger(meta)
    r = row(1, owner="mallory", visibility="restricted")
    meta.insert(r, [])
    meta.grant(r.key, "bob")
    meta.grant(r.key, "carol")
    led.set_price(r.key, "mallory", 400)
    led.credit("bob", 1000)
    rec = led.charge_load("bob", r.key, "mallory", "i", None)
    assert rec is not None and led.purchase(rec.receipt, "bob") == (rec.txn, r.key, "mallory")
    assert led.purchase(rec.receipt, "carol") is None  # a receipt is only its buyer's
    did, new = led.file_dispute(rec.receipt, "bob", r.key, {"layer": 1, "position": 7, "difference": 3.5})
    assert new
    d = led.resolve_dispute(did, True, "re-verified: mismatch")
    assert d.status == "refunded" and d.refund_receipt is not None
    assert (led.balance("bob"), led.balance("mallory")) == (1000, 0)
    got = meta.get(r.key)
    assert got is not None and got.visibility == QUARANTINED and led.is_quarantined(r.key, "mallory")
    assert not can_see(meta, got, "carol") and not can_see(meta, got, "bob")  # nobody else is served it
    assert meta.longest_prefix([], "carol") is None
    assert [x.status for x in led.disputes("bob")] == ["refunded"]


def test_quarantine_hits_only_the_sold_record(meta: MetaStore) -> None:
    """A key published first by alice (restricted) and independently by mallory (her own copy, public): a
    proven dispute of a purchase from mallory quarantines mallory's copy and leaves alice's row alone."""
    led, copies = Ledger(meta), OwnerCopies(meta)
    first = row(2, owner="alice", visibility="restricted")
    meta.insert(first, [])
    copies.insert(
        ArtifactRow(**{**first.__dict__, "owner": "mallory", "visibility": "public", "blob": "m"}), []
    )
    copies.grant(first.key, "mallory", "carol")
    led.set_price(first.key, "mallory", 10)
    led.credit("bob", 100)
    rec = led.charge_load("bob", first.key, "mallory", "i", None)
    assert rec is not None
    led.resolve_dispute(led.file_dispute(rec.receipt, "bob", first.key, {})[0], True, "mismatch")
    copy = copies.get(first.key, "mallory")
    assert copy is not None and copy.visibility == QUARANTINED and copies.visible(first.key, "carol") is None
    assert meta.get(first.key) == first and not led.is_quarantined(first.key, "alice")


def test_two_nodes_never_overspend(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Two ledgers on separate connections (two server nodes) race 24 threads over few balances: the row
    locks keep every buyer non-negative and every charge counted (PostgreSQL only; SQLite is one node)."""
    dsn = request.getfixturevalue("pg_schema_dsn")
    nodes = [Ledger(PostgresMeta(dsn)), Ledger(PostgresMeta(dsn))]
    for i in range(3):
        nodes[0].set_price(f"k{i}", f"pub{i}", 100 + i)
    for b in range(6):
        nodes[0].credit(f"buyer{b}", 1000)
    ok: list[int] = []
    errors: list[BaseException] = []

    def buy(t: int) -> None:
        try:
            charge(t)
        except BaseException as exc:  # an assert in a thread fails nothing by itself: the test checks this
            errors.append(exc)

    def charge(t: int) -> None:
        node = nodes[t % 2]
        for j in range(8):
            try:
                rec = node.charge_load(f"buyer{t % 6}", f"k{j % 3}", f"pub{j % 3}", f"t{t}-{j}", None)
            except mk.PaymentRefused:
                continue
            assert rec is not None, f"a priced load of k{j % 3} was not charged"
            ok.append(rec.amount)

    threads = [threading.Thread(target=buy, args=(t,)) for t in range(24)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors and not any(th.is_alive() for th in threads), errors[:3]
    a = nodes[1].audit()
    assert a.negative == {} and a.unbalanced == [] and a.total == 0
    assert a.transactions.get("sale", 0) == len(ok)
    assert sum(nodes[1].balance(f"pub{i}") for i in range(3)) == sum(ok)
    for n in nodes:
        n.meta.close()


_ops = st.lists(st.one_of(
    st.tuples(st.just("credit"), st.sampled_from(["a", "b", "c"]), st.integers(1, 500)),
    st.tuples(st.just("buy"), st.sampled_from(["a", "b", "c"]), st.integers(0, 2), st.integers(0, 4)),
    st.tuples(st.just("refund"), st.integers(0, 10)),
    st.tuples(st.just("adjust"), st.sampled_from(["a", "b", "c"]), st.integers(-600, 300).filter(bool),
              st.booleans()),
), max_size=25)


@settings(max_examples=20, deadline=None)
@given(ops=_ops)
def test_sqlite_ledger_matches_the_pure_book(ops: list[tuple]) -> None:
    """The SQL ledger and kvagent.costs.market.Book agree on every balance after any sequence of
    operations."""
    prices = {0: 0, 1: 120, 2: 333}
    owners = {0: "c", 1: "a", 2: "b"}
    with tempfile.TemporaryDirectory() as d:
        meta = SQLiteMeta(Path(d) / "m.sqlite3")
        led, book = Ledger(meta, mk.HostPrices(commission_bps=700)), mk.Book(commission_bps=700)
        for k, p in prices.items():
            led.set_price(f"k{k}", owners[k], p)
        receipts: list[tuple[str, int]] = []
        for op in ops:
            if op[0] == "credit":
                led.credit(op[1], op[2])
                book.credit(op[1], op[2])
            elif op[0] == "buy":
                _, buyer, k, idem = op
                args = (buyer, f"k{k}", owners[k])
                try:
                    rec = led.charge_load(*args, f"i{idem}-{k}", None)
                except mk.PaymentRefused as e:
                    with pytest.raises(mk.PaymentRefused):
                        book.charge(buyer, owners[k], f"k{k}", prices[k], f"i{idem}-{k}")
                    assert e.quote.balance == book.balance(buyer)
                    continue
                except IdempotencyKeyRefunded:  # a refunded purchase's key never serves again (issue 34)
                    with pytest.raises(IdempotencyKeyRefunded):
                        book.charge(buyer, owners[k], f"k{k}", prices[k], f"i{idem}-{k}")
                    continue
                txn = book.charge(buyer, owners[k], f"k{k}", prices[k], f"i{idem}-{k}")
                assert (rec is None) == (txn is None)
                if rec is not None and txn is not None and not rec.replayed:
                    receipts.append((rec.receipt, txn))
            elif op[0] == "adjust":
                _, who, delta, negative = op
                try:
                    led.adjust(who, delta, "property test", allow_negative=negative)
                except mk.AdjustmentRefused:
                    with pytest.raises(mk.AdjustmentRefused):
                        book.adjust(who, delta, negative)
                    continue
                book.adjust(who, delta, negative)
            elif receipts:
                receipt, txn = receipts[op[1] % len(receipts)]
                assert (led.refund(receipt) is None) == (book.refund(txn) is None)
        for acct in ["a", "b", "c", mk.HOST, mk.MINT, mk.ADJUSTMENTS]:
            assert led.balance(acct) == book.balance(acct), acct
        assert led.audit().unbalanced == [] and led.audit().total == 0
        meta.close()


def test_admin_adjustment_is_its_own_balanced_kind(meta: MetaStore) -> None:
    """A mistaken credit undone by a debit with a reason; a debit never overdraws unless a debt is recorded;
    the statement and the audit show each adjustment, the audit with the admin who posted it."""
    led = Ledger(meta)
    led.credit("bob", 1000, "top-up")
    rec = led.adjust("bob", -300, "credited 300 too many on 2026-12-01", idem="fix-1", by="operator")
    assert rec.amount == -300 and not rec.replayed
    again = led.adjust("bob", -300, "credited 300 too many on 2026-12-01", idem="fix-1", by="operator")
    assert (again.receipt, again.replayed) == (rec.receipt, True)  # a retry posts nothing
    with pytest.raises(IdempotencyConflict):  # the same key for another amount
        led.adjust("bob", -200, "x", idem="fix-1", by="operator")
    assert (led.balance("bob"), led.balance(mk.ADJUSTMENTS)) == (700, 300)
    with pytest.raises(mk.AdjustmentRefused) as e:  # more than the balance: refused, nothing posted
        led.adjust("bob", -701, "chargeback", by="operator")
    assert e.value.balance == 700 and led.balance("bob") == 700
    for bad in (0, mk.MAX_AMOUNT + 1, -mk.MAX_AMOUNT - 1, True, 2.5):
        with pytest.raises(ConfigError):
            led.adjust("bob", bad, "why", by="operator")  # type: ignore[arg-type]
    for reason in ("", "   ", "r" * (mk.MAX_REASON + 1)):
        with pytest.raises(ConfigError, match="reason"):
            led.adjust("bob", 5, reason, by="operator")
    debt = led.adjust("bob", -900, "chargeback of money already spent", by="admin2", allow_negative=True)
    led.adjust("carol", 50, "goodwill", by="operator")
    assert (led.balance("bob"), led.balance("carol"), led.balance(mk.ADJUSTMENTS)) == (-200, 50, 1150)
    s = led.statement("bob").to_json()
    assert s["credits"] == 1000 and s["adjusted"] == -1200 and s["purchases"] == s["sales"] == []
    assert [(a["receipt"], a["amount"], a["reason"]) for a in s["adjustments"]] == [
        (rec.receipt, -300, "credited 300 too many on 2026-12-01"),
        (debt.receipt, -900, "chargeback of money already spent")]
    a = led.audit()
    assert (a.total, a.unbalanced, a.negative) == (0, [], {"bob": -200})
    assert (a.money_issued, a.adjusted) == (1000, -1150)
    assert a.transactions == {"credit": 1, "admin_adjust": 3}
    assert [(x["principal"], x["amount"], x["by"]) for x in a.adjustments] == [
        ("carol", 50, "operator"), ("bob", -900, "admin2"), ("bob", -300, "operator")]
    with pytest.raises(mk.PaymentRefused):  # a debt blocks purchases
        led.set_price("k", "alice", 1)
        led.charge_load("bob", "k", "alice", None, None)


def test_credit_is_idempotent_and_bounded(meta: MetaStore, monkeypatch: pytest.MonkeyPatch) -> None:
    led = Ledger(meta)
    first = led.credit("bob", 500, "pi_123", idem="pi_123", by="stripe-hook")
    again = led.credit("bob", 500, "pi_123", idem="pi_123", by="stripe-hook")
    assert (again.receipt, again.amount, again.replayed) == (first.receipt, 500, True)
    assert led.balance("bob") == 500 and led.audit().transactions == {"credit": 1}
    with pytest.raises(IdempotencyConflict):
        led.credit("carol", 500, idem="pi_123", by="stripe-hook")
    assert led.credit("bob", 500, idem="pi_123", by="admin2").receipt != first.receipt  # keys are per admin
    with pytest.raises(ConfigError, match="Idempotency-Key"):
        led.credit("bob", 1, idem="k" * (mk.MAX_IDEMPOTENCY_KEY + 1))
    monkeypatch.setattr(mk, "MAX_BALANCE", 3000)  # money issued stops there (10**18: no 64-bit overflow)
    led.credit("carol", 1000)
    with pytest.raises(ConfigError, match="limit"):
        led.credit("dave", 1001)  # #mint would pass -3000
    with pytest.raises(ConfigError, match="limit"):
        led.adjust("carol", 2001, "x")  # carol would pass 3000
    assert led.audit().money_issued == 2000 and led.balance("dave") == 0


def test_a_receipt_has_one_dispute(meta: MetaStore, request: pytest.FixtureRequest) -> None:
    led = Ledger(meta)
    led.set_price("k", "mallory", 10)
    led.credit("bob", 100)
    rec = led.charge_load("bob", "k", "mallory", None, None)
    assert rec is not None
    did, new = led.file_dispute(rec.receipt, "bob", "k", {"detail": "first"})
    assert new and led.file_dispute(rec.receipt, "bob", "k", {"detail": "second"}) == (did, False)
    led.record_open(did, "no model here")
    assert led.dispute(did).to_json() == {"id": did, "receipt": rec.receipt, "key": "k", "status": "open",
                                          "outcome": "no model here", "refund_receipt": None}
    # many at once, on as many connections as the store has (two nodes on PostgreSQL): still one dispute
    other = led.charge_load("bob", "k", "mallory", None, None)
    assert other is not None
    nodes = [led] if isinstance(meta, SQLiteMeta) else [led, Ledger(PostgresMeta(request.getfixturevalue(
        "pg_schema_dsn")))]
    got: list[tuple[int, bool]] = []
    barrier = threading.Barrier(8)

    def file(i: int) -> None:
        barrier.wait()
        got.append(nodes[i % len(nodes)].file_dispute(other.receipt, "bob", "k", {"n": i}))

    threads = [threading.Thread(target=file, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len({d for d, _ in got}) == 1 and sorted(n for _, n in got) == [False] * 7 + [True]
    assert len(led.disputes("bob")) == 2
    for n in nodes[1:]:
        n.meta.close()


def test_a_key_is_bound_to_its_request_and_a_generation_is_never_served_twice(meta: MetaStore) -> None:
    """Stripe's idempotency: a key is bound to a digest of its request. The same download again replays its
    receipt (the same bytes); the same generation again is never charged nor served again (its stored answer,
    or AlreadyServed); another request with the key is IdempotencyKeyReused. Nothing moves on a refusal."""
    led = Ledger(meta, PRICES)
    led.set_price("k", "alice", 300)
    led.credit("bob", 100_000)
    one = mk.request_digest("/v1/chat/completions", "", {"messages": [{"role": "user", "content": "hi"}]})
    two = mk.request_digest("/v1/chat/completions", "", {"messages": [{"role": "user", "content": "yo"}]})
    assert led.prior("bob", "x", "/v1/chat/completions", one, mk.GENERATE) is None  # new: nothing claimed
    rec = led.charge_generate("bob", "k", "alice", "x", None, 10, 0, 1, request=one,
                              scope="/v1/chat/completions")
    assert rec is not None and not rec.replayed
    balance = led.balance("bob")
    for ask in (lambda: led.prior("bob", "x", "/v1/chat/completions", one, mk.GENERATE),
                lambda: led.charge_generate("bob", "k", "alice", "x", None, 10, 0, 64, request=one,
                                            scope="/v1/chat/completions")):
        with pytest.raises(AlreadyServed) as served:
            ask()
        assert (served.value.receipt, served.value.answer, served.value.code) == (
            rec.receipt, None, "idempotency_key_already_served")
    with pytest.raises(IdempotencyKeyReused) as reused:  # another prompt, even with the same artifact
        led.charge_generate("bob", "k", "alice", "x", None, 10, 0, 64, request=two,
                            scope="/v1/chat/completions")
    assert reused.value.receipt == rec.receipt and reused.value.status == 422
    with pytest.raises(IdempotencyKeyReused):
        led.prior("bob", "x", "/v1/chat/completions", two, mk.GENERATE)
    with pytest.raises(IdempotencyKeyReused):  # the same key on another route
        led.charge_load("bob", "k", "alice", "x", None)
    led.keep_answer(rec.txn, '{"id": "chatcmpl-1"}')
    with pytest.raises(AlreadyServed) as served:
        led.prior("bob", "x", "/v1/chat/completions", one, mk.GENERATE)
    assert served.value.answer == '{"id": "chatcmpl-1"}'
    # the library's generate without a digest: the same call again is never generated again either
    g = led.charge_generate("bob", "k", "alice", "g", None, 10, 0, 8)
    assert g is not None
    with pytest.raises(AlreadyServed):
        led.charge_generate("bob", "k", "alice", "g", None, 10, 0, 8)
    assert led.balance("bob") == balance - g.amount
    # a download's repeat is the same bytes again: the first receipt, replayed, charged nothing
    d = led.charge_load("bob", "k", "alice", "d", None)
    again = led.charge_load("bob", "k", "alice", "d", None)
    assert d is not None and again is not None and (again.receipt, again.replayed) == (d.receipt, True)
    assert led.balance("bob") == balance - g.amount - 300
    audit = led.audit()
    assert (audit.total, audit.unbalanced) == (0, [])


def test_a_refunded_key_never_serves_again(meta: MetaStore) -> None:
    """A generation refunded before its first token (or a download refunded by a dispute) leaves its key
    bound to a refunded transaction: the key is refused from then on, never served for free."""
    led = Ledger(meta, PRICES)
    led.set_price("k", "alice", 300)
    led.credit("bob", 100_000)
    for charge in (lambda: led.charge_generate("bob", "k", "alice", "r1", None, 10, 0, 8),
                   lambda: led.charge_load("bob", "k", "alice", "r2", None)):
        rec = charge()
        assert rec is not None and led.refund(rec.receipt, "generation failed before its first token")
        balance = led.balance("bob")
        with pytest.raises(IdempotencyKeyRefunded) as refunded:
            charge()
        assert (refunded.value.receipt, refunded.value.code) == (rec.receipt, "idempotency_key_refunded")
        assert led.balance("bob") == balance == 100_000
    assert led.audit().transactions == {"credit": 1, "generate": 1, "sale": 1, "refund": 2}


def test_an_admin_key_is_bound_to_its_memo_and_reason(meta: MetaStore) -> None:
    led = Ledger(meta)
    first = led.credit("bob", 500, "pi_1", idem="pi_1", by="hook")
    assert led.credit("bob", 500, "pi_1", idem="pi_1", by="hook").replayed
    with pytest.raises(IdempotencyKeyReused):
        led.credit("bob", 500, "pi_2", idem="pi_1", by="hook")
    led.adjust("bob", -5, "typo", idem="a1", by="op")
    with pytest.raises(IdempotencyKeyReused):
        led.adjust("bob", -5, "another reason", idem="a1", by="op")
    assert led.balance("bob") == first.amount - 5


def test_a_transaction_is_refunded_once_however_many_refunds_race(meta: MetaStore,
                                                                  request: pytest.FixtureRequest) -> None:
    """Two refunds of one transaction at once cannot both post: the database holds one refund row per
    transaction. A refund that starts while another is posting (not committed yet) waits for it and then
    posts nothing; so do 8 at once on two nodes; and a second refund row is refused by the database itself."""
    led = Ledger(meta, PRICES)
    led.set_price("k", "alice", 300)
    led.credit("bob", 10_000)
    rec = led.charge_load("bob", "k", "alice", None, None)
    assert rec is not None
    late: list[Any] = []
    with meta.transaction() as cur:
        assert led._refund(cur, rec.receipt, "first") is not None
        second = threading.Thread(target=lambda: late.append(led.refund(rec.receipt, "second")))
        second.start()
        second.join(0.5)  # it waits on the first (or, before refunds were unique, had already posted)
    second.join()
    assert late == [None] and led.audit().transactions["refund"] == 1
    nodes = [led] if isinstance(meta, SQLiteMeta) else [led, Ledger(PostgresMeta(request.getfixturevalue(
        "pg_schema_dsn")), PRICES)]
    others = [led.charge_load("bob", "k", "alice", None, None) for _ in range(3)]
    got: list[Any] = []
    barrier = threading.Barrier(8)

    def refund(i: int) -> None:
        barrier.wait()
        got.append(nodes[i % len(nodes)].refund(others[i % 3].receipt))  # type: ignore[union-attr]

    threads = [threading.Thread(target=refund, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sum(g is not None for g in got) == 3 and led.audit().transactions["refund"] == 4
    assert (led.balance("bob"), led.audit().unbalanced) == (10_000, [])
    with pytest.raises(Exception, match="(?i)unique|duplicate"), meta.transaction() as cur:  # the database's
        cur.execute(meta.q("INSERT INTO market_refunds (txn, refund) VALUES (?, ?)"), (rec.txn, None))
    for n in nodes[1:]:
        n.meta.close()


def test_a_free_charge_without_a_key_takes_no_write_transaction(meta: MetaStore,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """On a free host every chat is 'charged' nothing: that must not take the database's write lock (on SQLite
    each such transaction serialised the concurrent requests behind an fsync). A priced one, or one with an
    Idempotency-Key to claim, still does."""
    free, priced = Ledger(meta, mk.HostPrices()), Ledger(meta, PRICES)
    free.set_price("k1", "alice", 0)
    opened: list[int] = []
    real = meta.transaction

    def counting() -> Any:
        opened.append(1)
        return real()

    reads = meta.read
    monkeypatch.setattr(meta, "read", lambda: reads() if meta.inline_reads else real())  # reads: not counted
    monkeypatch.setattr(meta, "transaction", counting)
    assert free.charge_generate("bob", "hosted-chat", mk.HOST, None, None, 100, 20, 10) is None
    assert free.charge_load("bob", "k1", "alice", None, None) is None
    assert opened == []
    assert free.charge_generate("bob", "hosted-chat", mk.HOST, "key-1", None, 100, 20, 10) is None
    assert len(opened) == 1  # an Idempotency-Key is still claimed (then released: nothing to charge)
    with pytest.raises(mk.PaymentRefused):
        priced.charge_generate("bob", "hosted-chat", mk.HOST, None, None, 100, 20, 10)
    assert len(opened) == 2
