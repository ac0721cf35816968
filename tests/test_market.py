"""The market's pure rules (kvagent.costs.market): amounts, price files, sale postings, statements, and
property tests of the ledger invariants on the in-memory Book."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvagent.costs import market as mk
from kvagent.errors import ConfigError, IdempotencyKeyRefunded

PRINCIPALS = ["alice", "bob", "carol", "dave"]


def test_amounts_are_integers_never_floats() -> None:
    assert mk.amount(12) == 12 and mk.amount("12000") == 12000
    for bad in (1.5, 2.0, -1, True, "1e3", "12.5", None, mk.MAX_AMOUNT + 1):
        with pytest.raises(ConfigError):
            mk.amount(bad)
    with pytest.raises(ConfigError):
        mk.amount(0, allow_zero=False)


def test_price_file(tmp_path: Path) -> None:
    f = tmp_path / "prices.json"
    f.write_text(
        json.dumps(
            {
                "currency": "uEUR",
                "input_per_mtok": 5_000_000,
                "cached_input_per_mtok": 500_000,
                "commission_bps": 1000,
            }
        )
    )
    p = mk.HostPrices.from_file(f)
    assert (p.currency, p.cached_input_per_mtok, p.commission_bps) == ("uEUR", 500_000, 1000)
    for bad in ({"input_per_mtok": 0.5}, {"commission_bps": 10_001}, {"surprise": 1}, [1]):
        with pytest.raises(ConfigError):
            mk.HostPrices.from_mapping(bad)


def test_read_tariff_rounds_up_to_whole_micro_units() -> None:
    # the 0.1x read tariff of $5/Mtok is 0.5 uUSD per token: 3 tokens cost 1.5, billed 2
    assert mk.per_mtok(3, 500_000) == 2
    assert mk.per_mtok(2000, 500_000) == 1000
    assert mk.per_mtok(0, 500_000) == 0
    bill = mk.generate_bill(mk.HostPrices(input_per_mtok=5_000_000, cached_input_per_mtok=500_000,
                                          output_per_mtok=20_000_000), 10, 2000, 64, 300)
    assert (bill.host_fee, bill.royalty, bill.total) == (50 + 1000 + 1280, 300, 2630)


def test_sale_postings_split_commission() -> None:
    ps = mk.sale_postings("bob", "alice", 1000, 1500)
    assert {p.account: p.amount for p in ps} == {"bob": -1000, "alice": 850, mk.HOST: 150}
    assert mk.balanced(ps) and mk.balanced(mk.reversal(ps))


def test_refusal_reasons() -> None:
    assert mk.refusal(10, 100, None) is None
    assert mk.refusal(10, 100, 9) == "price_above_max"
    assert mk.refusal(10, 9, None) == "insufficient_balance"
    assert mk.refusal(10, 10, 10) is None


def test_book_charges_once_per_idempotency_key_and_quotes_402() -> None:
    book = mk.Book(commission_bps=1000)
    with pytest.raises(mk.PaymentRefused) as e:
        book.charge("bob", "alice", "k1", 500, "i1")
    assert e.value.quote.to_json() == {"key": "k1", "price": 500, "currency": "uUSD", "balance": 0,
                                       "reason": "insufficient_balance"}
    book.credit("bob", 1000)
    r1 = book.charge("bob", "alice", "k1", 500, "i1")
    assert book.charge("bob", "alice", "k1", 500, "i1") == r1  # a retry: same receipt, no new charge
    assert (book.balance("bob"), book.balance("alice"), book.balance(mk.HOST)) == (500, 450, 50)
    assert book.charge("bob", "alice", "k2", 0, "i2") is None  # free
    assert book.charge("alice", "alice", "k1", 500, "i3") is None  # an owner never pays itself


def test_statement_aggregates_purchases_sales_royalties_and_refunds() -> None:
    rows = [
        mk.StatementRow(1, mk.CREDIT, None, "bob", "bob", 5000),
        mk.StatementRow(2, mk.SALE, "k1", "bob", "bob", -100),
        mk.StatementRow(2, mk.SALE, "k1", "bob", "alice", 90),
        mk.StatementRow(3, mk.SALE, "k1", "bob", "bob", -100),
        mk.StatementRow(3, mk.SALE, "k1", "bob", "alice", 90),
        mk.StatementRow(4, mk.GENERATE, "k1", "carol", "alice", 90),
        mk.StatementRow(5, mk.REFUND, "k1", "bob", "bob", 100),
        mk.StatementRow(5, mk.REFUND, "k1", "bob", "alice", -90),
    ]
    bob, alice = mk.statement("bob", rows), mk.statement("alice", rows)
    assert bob.credits == 5000 and bob.purchases["k1"].to_json() == {
        "key": "k1", "loads": 1, "amount": 200, "royalties": 0, "refunds": 100}
    assert alice.sales["k1"].to_json() == {
        "key": "k1",
        "loads": 2,
        "amount": 180,
        "royalties": 90,
        "refunds": 90,
    }


# -- properties ------------------------------------------------------------------------------------------
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("credit"), st.sampled_from(PRINCIPALS), st.integers(1, 10_000)),
        st.tuples(st.just("buy"), st.sampled_from(PRINCIPALS), st.sampled_from(PRINCIPALS),
                  st.integers(0, 5_000), st.integers(0, 6), st.one_of(st.none(), st.integers(0, 5_000))),
        st.tuples(st.just("refund"), st.integers(1, 40)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops=_ops, bps=st.integers(0, mk.BPS))
# found by hypothesis: buy, refund, then the same buyer's key again (it raised past the test's model)
@example(ops=[("credit", "dave", 1), ("buy", "dave", "alice", 1, 0, None), ("refund", 2),
              ("buy", "dave", "alice", 0, 0, None)], bps=0)
def test_book_invariants(ops: list[tuple], bps: int) -> None:
    """Whatever happens: every transaction sums to zero, all balances sum to zero (#mint holds minus the
    money issued), principals' money only changes by credits, a buyer never goes negative through a
    purchase, one idempotency key never charges twice, and a key whose purchase was refunded is refused."""
    book = mk.Book(commission_bps=bps)
    issued, charges = 0, set()
    receipt_of: dict[tuple[str, int], int] = {}  # (buyer, idempotency key) -> its purchase's receipt
    for op in ops:
        if op[0] == "credit":
            book.credit(op[1], op[2])
            issued += op[2]
        elif op[0] == "buy":
            _, buyer, publisher, price, idem, max_price = op
            before = book.balance(buyer)
            n_txn = len(book.transactions)
            try:
                r = book.charge(buyer, publisher, f"k{price}", price, f"i{idem}", max_price)
            except mk.PaymentRefused as e:
                assert e.quote.price == price and e.quote.balance == before
                assert len(book.transactions) == n_txn  # a refusal posts nothing
                continue
            except IdempotencyKeyRefunded:  # that key's purchase was refunded: the key never serves again
                assert receipt_of[(buyer, idem)] in book.refunded
                assert len(book.transactions) == n_txn
                continue
            if r is not None:
                receipt_of.setdefault((buyer, idem), r)
            if r is not None and r in charges:
                assert len(book.transactions) == n_txn  # replay
            if r is not None and r not in charges:
                charges.add(r)
                assert book.balance(buyer) == before - price >= 0
        elif op[1] in book.transactions and op[1] in charges:
            book.refund(op[1])
            assert book.refund(op[1]) is None  # refunded once only
    assert all(mk.balanced(t) for t in book.transactions.values())
    assert sum(book.balances.values()) == 0
    assert book.balance(mk.MINT) == -issued
    assert (
        sum(v for a, v in book.balances.items() if a not in mk.SYSTEM_ACCOUNTS) + book.balance(mk.HOST)
        == issued
    )
    refunds_only_negative = all(book.balance(p) >= 0 for p in PRINCIPALS) or bool(book.refunded)
    assert refunds_only_negative  # only a clawback by refund can push a publisher below zero


@given(price=st.integers(0, mk.MAX_AMOUNT), bps=st.integers(0, mk.BPS))
def test_split_is_exact(price: int, bps: int) -> None:
    share, commission = mk.split_sale(price, bps)
    assert share + commission == price and 0 <= commission <= price
    assert mk.balanced(mk.sale_postings("b", "p", price, bps, host_fee=7))


# -- economics --market and the buyer's money settings -------------------------------------------------
def test_market_band_paper_scenario() -> None:
    from kvagent.analysis import economics as econ

    p = econ.CostParams()
    shipped, hosted = econ.market_report(p, 1000)
    assert not shipped.band_open  # egress (2.6x the prefill) is above what any buyer saves
    assert hosted.band_open and hosted.floor_usd < hosted.tariff_price_usd < hosted.ceiling_usd
    # the publisher's break-even at the 0.1x tariff: prefill / (0.1 prefill - prefill / r) = 1 / (0.1 - 1/r)
    assert hosted.tariff_break_even_sales == pytest.approx(1 / (0.1 - 1 / p.reuse_ratio))
    assert hosted.micros(hosted.tariff_price_usd) == round(0.1 * 3774 * 5)  # 5 uUSD per token, 0.1x
    assert hosted.tariff_buyer_savings_total_usd == pytest.approx(1000 * 0.9 * econ.prefill_cost(p))


def test_economics_market_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from kvagent.analysis import economics as econ

    assert econ.main(["--market", "--json", "--agents", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [b["delivery"] for b in out["market"]] == ["shipped", "hosted"]
    assert out["market"][0]["min_sales"] is None  # never: JSON null
    assert econ.main(["--market", "--agents", "100"]) == 0
    assert "publisher breaks even after 12.5 sales" in capsys.readouterr().out


def test_money_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvagent.config import Config

    monkeypatch.setenv("KVAGENT_BUDGET", "20000")
    monkeypatch.setenv("KVAGENT_MAX_PRICE_PER_LOAD", "900")
    c = Config.resolve(max_price_per_load=1200)
    assert (c.max_price_per_load, c.budget, c.prefill_cost_per_token) == (1200, 20000, 5)
    monkeypatch.setenv("KVAGENT_PREFILL_COST_PER_TOKEN", "0.5")
    with pytest.raises(ConfigError):
        Config.resolve()


# -- the client's side, on an in-memory transport ------------------------------------------------------
def test_client_reuses_one_idempotency_key_across_retries_and_never_retries_402() -> None:
    import httpx

    from kvagent.client.registry import parse_handle
    from kvagent.errors import RegistryPaymentRequiredError
    from tests.test_registry_client import BLOB, KEY, client_for, handle_json

    seen: list[httpx.Request] = []
    answers = [httpx.Response(503), httpx.Response(200, content=BLOB, headers={
        "X-KVAgent-Receipt": "rcpt_1", "X-KVAgent-Charged": "700", "content-length": str(len(BLOB))})]

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return answers.pop(0)

    c, _ = client_for(handler)
    h = parse_handle({**handle_json(), "price": 700, "currency": "uUSD"}, key=KEY)
    assert (h.price, h.currency) == (700, "uUSD")
    got = c.download_blob(h, max_price=800)
    assert bytes(got.data) == BLOB
    keys = {r.headers["idempotency-key"] for r in seen}
    assert len(seen) == 2 and len(keys) == 1  # the retry carried the same key: the server charges once
    assert seen[0].headers["x-kvagent-max-price"] == "800"
    assert (got.receipt, got.charge) == ("rcpt_1", 700)

    quote = {"key": KEY, "price": 700, "currency": "uUSD", "balance": 5, "reason": "insufficient_balance"}
    calls = []

    def broke(req: httpx.Request) -> httpx.Response:
        calls.append(req)
        return httpx.Response(402, json={"error": "payment_required", "detail": "…", "quote": quote})

    c2, _ = client_for(broke)
    with pytest.raises(RegistryPaymentRequiredError) as e:
        c2.download_blob(h)
    assert e.value.quote == quote and len(calls) == 1
    with pytest.raises(Exception, match="price"):
        parse_handle({**handle_json(), "price": 1.5}, key=KEY)


def test_admin_flag_in_the_token_file() -> None:
    from kvagent.server.auth import TokenTable

    t = TokenTable.from_mapping({"admin-token-01": {"principal": "op", "admin": True},
                                 "user-token-001": {"principal": "bob"}})
    op, bob = t.lookup("Bearer admin-token-01"), t.lookup("Bearer user-token-001")
    assert op is not None and op.admin and bob is not None and not bob.admin
    with pytest.raises(ConfigError):
        TokenTable.from_mapping({"admin-token-01": {"principal": "op", "admin": "yes"}})
    assert t.known_principal("op") and t.known_principal("bob")
    assert not t.known_principal("ghost-not-in-token-file") and not t.known_principal(mk.MINT)


def test_adjustments_are_signed_balanced_and_never_overdraw_by_default() -> None:
    assert mk.signed_amount(-5) == -5 and mk.signed_amount(mk.MAX_AMOUNT) == mk.MAX_AMOUNT
    for bad in (0, mk.MAX_AMOUNT + 1, -mk.MAX_AMOUNT - 1, 1.5, True, "5", None):
        with pytest.raises(ConfigError):
            mk.signed_amount(bad)
    assert mk.balanced(mk.adjustment_postings("bob", -7)) and mk.balanced(mk.adjustment_postings("bob", 7))
    assert mk.adjustment_refusal(-7, 7, False) is None
    assert mk.adjustment_refusal(-8, 7, False) == "insufficient_balance"
    assert mk.adjustment_refusal(-8, 7, True) is None and mk.adjustment_refusal(5, -100, False) is None
    book = mk.Book()
    book.credit("bob", 10)
    with pytest.raises(mk.AdjustmentRefused):
        book.adjust("bob", -11)
    book.adjust("bob", -11, allow_negative=True)
    assert (book.balance("bob"), book.balance(mk.ADJUSTMENTS), sum(book.balances.values())) == (-1, 11, 0)
    with pytest.raises(ConfigError, match="limit"):
        mk.check_inflow({mk.MINT: -mk.MAX_BALANCE}, mk.credit_postings("bob", 1))
    mk.check_inflow({mk.MINT: 1 - mk.MAX_BALANCE}, mk.credit_postings("bob", 1))


def test_statement_lists_admin_adjustments_apart() -> None:
    rows = [mk.StatementRow(1, mk.CREDIT, None, "bob", "bob", 500, "rcpt_a"),
            mk.StatementRow(2, mk.ADMIN_ADJUST, None, "bob", "bob", -200, "rcpt_b", "mistaken credit", 5.0),
            mk.StatementRow(3, mk.SALE, "k", "bob", "bob", -100, "rcpt_c")]
    s = mk.statement("bob", rows).to_json()
    assert s["credits"] == 500 and s["adjusted"] == -200 and s["purchases"][0]["amount"] == 100
    assert s["adjustments"] == [{"receipt": "rcpt_b", "amount": -200, "reason": "mistaken credit", "ts": 5.0}]


def test_the_documented_limits_are_the_enforced_ones() -> None:
    """docs/market.md's limits table names each constant and its value; the validation uses the same names."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "market.md").read_text(encoding="utf-8")
    table = doc.split("## Limits", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (int(cells[1].split()[0]), cells[2].strip("`"))
    assert {name: value for name, (value, _) in rows.items()} == mk.LIMITS
    for name, (value, const) in rows.items():
        assert getattr(mk, const) == value, name
    from kvagent.server.market_routes import AdjustRequest, CreditRequest, DisputeRequest

    def max_length(model: Any, name: str) -> int:
        return int(model.model_json_schema()["properties"][name]["maxLength"])

    assert max_length(CreditRequest, "memo") == mk.MAX_MEMO
    assert max_length(AdjustRequest, "reason") == mk.MAX_REASON
    assert max_length(DisputeRequest, "detail") == mk.MAX_DISPUTE_DETAIL
    assert max_length(DisputeRequest, "receipt") == mk.MAX_RECEIPT_ID
    with pytest.raises(ConfigError, match=str(mk.MAX_AMOUNT)):
        mk.amount(mk.MAX_AMOUNT + 1, "price")
    with pytest.raises(ConfigError):
        mk.HostPrices(currency="u" * (mk.MAX_CURRENCY + 1))
    with pytest.raises(ConfigError):
        mk.HostPrices(commission_bps=mk.BPS + 1)
