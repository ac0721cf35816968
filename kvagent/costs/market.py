"""The market's pure rules: money, host prices, quotes, postings that sum to zero, statements.

Money is an ``int`` count of micro-units of the one currency a server declares (``uUSD`` = 1e-6 USD by
default); no float ever touches an amount. A sale is one transaction of postings that sum to zero:

    buyer      -price
    publisher  +price - commission        commission = price * commission_bps // 10_000
    #host      +commission

Hosted generation adds the host's token charges (to ``#host``) to the publisher's load price. Credits
come from ``#mint``, the outside world (a payment processor), whose balance is minus all money issued,
so the sum over every account is always zero. An operator's correction (an ``admin_adjust``, either
sign, with a reason) is posted against ``#adjust``, whose balance is minus the net of all corrections.
``#``-names cannot collide with principals (the token file allows ``[A-Za-z0-9_.@:-]`` only). The
server's ledger (kvagent.server.ledger) applies these rules inside database transactions; :class:`Book`
applies them in memory (the model the property tests use).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, IdempotencyKeyRefunded

HOST = "#host"
MINT = "#mint"
ADJUSTMENTS = "#adjust"
#: Where x402 money comes from and goes to: minus the net of deposits (payments in) and withdrawals (payouts).
CHAIN = "#x402"
SYSTEM_ACCOUNTS = (HOST, MINT, ADJUSTMENTS, CHAIN)
DEFAULT_CURRENCY = "uUSD"
BPS = 10_000
TOKENS_PER_MTOK = 1_000_000
#: The buyer's own prefill price: the paper's $5 per million input tokens = 5 uUSD per token.
DEFAULT_PREFILL_MICROS_PER_TOKEN = 5

# -- limits: the validation uses these names, docs/market.md lists them (tests/test_market.py compares) --
#: Largest amount accepted anywhere: a credit, an adjustment, a price, X-KVAgent-Max-Price (fits a signed
#: 64-bit column with room for sums: 9.2e18 / 1e15 leaves 9,000 maximal amounts per account).
MAX_AMOUNT = 10**15
#: Largest balance in size: of a principal, of the money ever credited (#mint) and of the net of the
#: adjustments (#adjust). Money enters only through credits and adjustments, which check it, so no sum
#: in a 64-bit column (at most 9.2e18) can overflow.
MAX_BALANCE = 10**18
#: Longest ``Idempotency-Key`` header, in characters.
MAX_IDEMPOTENCY_KEY = 128
#: Longest credit memo, in characters.
MAX_MEMO = 200
#: Longest reason of an admin adjustment (one character at least: the reason is mandatory).
MAX_REASON = 200
#: Longest ``detail`` of a dispute's evidence, in characters.
MAX_DISPUTE_DETAIL = 500
#: Longest receipt id a dispute may name (kvagent's are ``rcpt_`` + 24 hex characters).
MAX_RECEIPT_ID = 64
#: Longest currency name (``uUSD``).
MAX_CURRENCY = 16
#: Every limit by the name docs/market.md's table gives it.
LIMITS = {
    "amount": MAX_AMOUNT,
    "balance": MAX_BALANCE,
    "commission_bps": BPS,
    "idempotency_key": MAX_IDEMPOTENCY_KEY,
    "memo": MAX_MEMO,
    "reason": MAX_REASON,
    "dispute_detail": MAX_DISPUTE_DETAIL,
    "receipt_id": MAX_RECEIPT_ID,
    "currency": MAX_CURRENCY,
}

SALE, GENERATE, CREDIT, REFUND, ADJUST = "sale", "generate", "credit", "refund", "adjust"
#: An operator's correction of a balance (either sign, with a reason), against #adjust; ``adjust`` is the
#: give-back of a prepaid generation's unused tokens.
ADMIN_ADJUST = "admin_adjust"
#: Money from and to the chain (x402): a payment's deposit, a payout, a payout whose transfer failed.
DEPOSIT, WITHDRAWAL, WITHDRAWAL_REVERSED = "deposit", "withdrawal", "withdrawal_reversed"
TRANSFERS = (DEPOSIT, WITHDRAWAL, WITHDRAWAL_REVERSED)


def amount(value: Any, what: str = "amount", *, allow_zero: bool = True) -> int:
    """``value`` as a non-negative integer amount of micro-units (ConfigError otherwise; floats refused)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer count of micro-units, got {value!r:.40}")
    if value < 0 or value > MAX_AMOUNT or (value == 0 and not allow_zero):
        raise ConfigError(f"{what} must be in {0 if allow_zero else 1}..{MAX_AMOUNT}, got {value}")
    return value


def signed_amount(value: Any, what: str = "amount") -> int:
    """``value`` as a non-zero integer amount of either sign, at most :data:`MAX_AMOUNT` in size."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer count of micro-units, got {value!r:.40}")
    if value == 0 or abs(value) > MAX_AMOUNT:
        raise ConfigError(f"{what} must be in -{MAX_AMOUNT}..-1 or 1..{MAX_AMOUNT}, got {value}")
    return value


def per_mtok(tokens: int, micros_per_mtok: int) -> int:
    """The charge for ``tokens`` at a rate per million tokens, rounded up to a whole micro-unit."""
    return -(-tokens * micros_per_mtok // TOKENS_PER_MTOK)


@dataclass(frozen=True)
class HostPrices:
    """The host operator's price file (``kvagent serve --prices prices.json``).

    Token rates are micro-units per million tokens, so the 0.1x read tariff of $5/Mtok (0.5 uUSD per
    token) stays an integer: ``{"input_per_mtok": 5000000, "cached_input_per_mtok": 500000}``.
    """

    currency: str = DEFAULT_CURRENCY
    input_per_mtok: int = 0
    cached_input_per_mtok: int = 0
    output_per_mtok: int = 0
    commission_bps: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.currency, str) or not 1 <= len(self.currency) <= MAX_CURRENCY:
            raise ConfigError(f"currency must be a short string such as 'uUSD', got {self.currency!r:.40}")
        for name in ("input_per_mtok", "cached_input_per_mtok", "output_per_mtok"):
            amount(getattr(self, name), name)
        if amount(self.commission_bps, "commission_bps") > BPS:
            raise ConfigError(f"commission_bps must be in 0..{BPS}, got {self.commission_bps}")

    @classmethod
    def from_mapping(cls, raw: Any, source: str = "prices") -> HostPrices:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a JSON object")
        unknown = set(raw) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ConfigError(f"{source}: unknown fields {sorted(unknown)}")
        return cls(**raw)

    @classmethod
    def from_file(cls, path: Path) -> HostPrices:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read price file {path}: {exc}") from exc
        return cls.from_mapping(raw, source=str(path))


@dataclass(frozen=True)
class Posting:
    account: str
    amount: int


def balanced(postings: Iterable[Posting]) -> bool:
    return sum(p.amount for p in postings) == 0


def split_sale(price: int, commission_bps: int) -> tuple[int, int]:
    """(publisher's share, host's commission) of a sale at ``price``; they add up to ``price``."""
    commission = price * commission_bps // BPS
    return price - commission, commission


def merge(postings: Iterable[Posting]) -> list[Posting]:
    out: dict[str, int] = {}
    for p in postings:
        out[p.account] = out.get(p.account, 0) + p.amount
    return [Posting(a, v) for a, v in out.items() if v != 0]


def sale_postings(
    buyer: str, publisher: str, price: int, commission_bps: int, host_fee: int = 0
) -> list[Posting]:
    """One charge: the buyer pays ``price`` (royalty to the publisher, less commission) plus ``host_fee``."""
    share, commission = split_sale(price, commission_bps)
    return merge(
        [Posting(buyer, -(price + host_fee)), Posting(publisher, share), Posting(HOST, commission + host_fee)]
    )


def credit_postings(principal: str, value: int) -> list[Posting]:
    """Money entering the system (a payment processor's settlement): #mint pays the principal."""
    return [Posting(MINT, -value), Posting(principal, value)]


def adjustment_postings(principal: str, delta: int) -> list[Posting]:
    """An operator's correction: ``delta`` (either sign) moves between #adjust and the principal."""
    return [Posting(ADJUSTMENTS, -delta), Posting(principal, delta)]


def reversal(postings: Sequence[Posting]) -> list[Posting]:
    """The postings that undo ``postings`` (a refund)."""
    return [Posting(p.account, -p.amount) for p in postings]


@dataclass(frozen=True)
class GenerateBill:
    """A hosted generation's charge: the host's token fees and the publisher's royalty (its load price)."""

    host_fee: int
    royalty: int

    @property
    def total(self) -> int:
        return self.host_fee + self.royalty


def generate_bill(
    prices: HostPrices, input_tokens: int, cached_tokens: int, output_tokens: int, load_price: int
) -> GenerateBill:
    """Bill ``input_tokens`` prefilled, ``cached_tokens`` read from the KV and ``output_tokens`` generated."""
    fee = (
        per_mtok(input_tokens, prices.input_per_mtok)
        + per_mtok(cached_tokens, prices.cached_input_per_mtok)
        + per_mtok(output_tokens, prices.output_per_mtok)
    )
    return GenerateBill(fee, load_price)


@dataclass(frozen=True)
class Quote:
    """What a 402 answer carries: what it would cost, in what, what the buyer has, and why it was refused."""

    key: str
    price: int
    currency: str
    balance: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "price": self.price, "currency": self.currency, "balance": self.balance,
                "reason": self.reason}


def request_digest(route: str, target: str, body: Any) -> str:
    """What an ``Idempotency-Key`` is bound to: sha256 hex of the request's route, its target (an artifact
    key, a principal) and its body as canonical JSON (sorted keys, no spaces), so a repeat of the same
    request has the same digest and any other request another (Stripe's rule: one key, one request)."""
    text = json.dumps([route, target, body], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def refusal(price: int, balance: int, max_price: int | None) -> str | None:
    """Why a charge of ``price`` must not happen (``None``: it may)."""
    if max_price is not None and price > max_price:
        return "price_above_max"
    if price > balance:
        return "insufficient_balance"
    return None


def check_inflow(balances: Mapping[str, int], postings: Sequence[Posting]) -> None:
    """Refuse money entering (a credit or adjustment) that would take an account past :data:`MAX_BALANCE`."""
    for p in postings:
        after = balances.get(p.account, 0) + p.amount
        if abs(after) > MAX_BALANCE:
            raise ConfigError(f"this would take the balance of {p.account} to {after}, past the limit of "
                              f"{MAX_BALANCE} in size")


def adjustment_refusal(delta: int, balance: int, allow_negative: bool) -> str | None:
    """Why an admin adjustment of ``delta`` must not happen: a debit never takes a balance below zero
    unless the operator says it records a debt (``allow_negative``)."""
    if delta < 0 and balance + delta < 0 and not allow_negative:
        return "insufficient_balance"
    return None


# -- statements ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StatementRow:
    """One posting of a transaction as a statement sees it."""

    txn: int
    kind: str
    key: str | None
    buyer: str | None
    account: str
    amount: int
    receipt: str = ""
    memo: str = ""
    ts: float = 0.0


@dataclass(frozen=True)
class AdjustmentLine:
    """An admin adjustment of a statement's principal: what it moved (signed) and the operator's reason."""

    receipt: str
    amount: int
    reason: str
    ts: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ArtifactLine:
    key: str
    loads: int = 0
    amount: int = 0  # purchases: spent; sales: revenue from loads
    royalties: int = 0  # sales: royalties earned from hosted generation
    refunds: int = 0  # amounts reversed by refunds (buyer: received back, publisher: given back)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TransferLine:
    """A deposit or withdrawal of a statement's principal (signed: + in, - out) and its chain memo."""

    receipt: str
    kind: str
    amount: int
    memo: str
    ts: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Statement:
    principal: str
    purchases: dict[str, ArtifactLine] = field(default_factory=dict)
    sales: dict[str, ArtifactLine] = field(default_factory=dict)
    credits: int = 0
    adjustments: list[AdjustmentLine] = field(default_factory=list)
    #: deposits (x402 payments in) and withdrawals (payouts) of the principal, signed, with their memo (the
    #: settlement or transfer transaction)
    transfers: list[TransferLine] = field(default_factory=list)
    #: every receipt that moved the principal's balance: (receipt, kind, key, signed amount, ts)
    receipts: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"principal": self.principal, "credits": self.credits,
                "adjusted": sum(a.amount for a in self.adjustments),
                "adjustments": [a.to_json() for a in self.adjustments],
                "deposited": sum(t.amount for t in self.transfers if t.kind == DEPOSIT),
                "withdrawn": -sum(t.amount for t in self.transfers if t.kind != DEPOSIT),
                "transfers": [t.to_json() for t in self.transfers],
                "receipts": self.receipts,
                "purchases": [v.to_json() for _, v in sorted(self.purchases.items())],
                "sales": [v.to_json() for _, v in sorted(self.sales.items())]}


def statement(principal: str, rows: Iterable[StatementRow]) -> Statement:
    """Aggregate ``principal``'s postings per artifact: purchases as buyer, sales as publisher."""
    st = Statement(principal)
    for r in rows:
        if r.account != principal:
            continue
        st.receipts.append({"receipt": r.receipt, "kind": r.kind, "key": r.key, "amount": r.amount,
                            "ts": r.ts})
        if r.kind in TRANSFERS:
            st.transfers.append(TransferLine(r.receipt, r.kind, r.amount, r.memo, r.ts))
            continue
        if r.kind == CREDIT:
            st.credits += r.amount
            continue
        if r.kind == ADMIN_ADJUST:
            st.adjustments.append(AdjustmentLine(r.receipt, r.amount, r.memo, r.ts))
            continue
        if r.key is None:
            continue
        buying = r.buyer == principal
        lines = st.purchases if buying else st.sales
        line = lines.setdefault(r.key, ArtifactLine(r.key))
        if r.kind == REFUND:
            line.refunds += abs(r.amount)
            line.loads -= 1
        elif buying:
            line.loads += 1 if r.kind in (SALE, GENERATE) else 0
            line.amount += -r.amount
        elif r.kind == GENERATE:
            line.loads += 1
            line.royalties += r.amount
        else:
            line.loads += 1
            line.amount += r.amount
    return st


# -- an in-memory book: the reference model of the ledger's invariants -----------------------------------
class PaymentRefused(Exception):
    """Raised by :meth:`Book.charge` with the quote a 402 answer would carry."""

    def __init__(self, quote: Quote):
        super().__init__(quote.reason)
        self.quote = quote


class AdjustmentRefused(ConfigError):
    """An admin debit larger than the balance, without ``allow_negative``: nothing was posted."""

    def __init__(self, principal: str, delta: int, balance: int):
        super().__init__(f"a debit of {-delta} would take {principal}'s balance of {balance} below zero; "
                         "debit at most the balance, or set allow_negative to record a debt")
        self.principal, self.delta, self.balance = principal, delta, balance


@dataclass
class Book:
    """Balances, transactions and idempotency keys in memory, under exactly the server's rules."""

    commission_bps: int = 0
    currency: str = DEFAULT_CURRENCY
    balances: dict[str, int] = field(default_factory=dict)
    transactions: dict[int, list[Posting]] = field(default_factory=dict)
    idempotency: dict[tuple[str, str], int] = field(default_factory=dict)
    refunded: set[int] = field(default_factory=set)

    def balance(self, account: str) -> int:
        return self.balances.get(account, 0)

    def _post(self, postings: list[Posting]) -> int:
        assert balanced(postings)
        txn = len(self.transactions) + 1
        self.transactions[txn] = postings
        for p in postings:
            self.balances[p.account] = self.balance(p.account) + p.amount
        return txn

    def credit(self, principal: str, value: int) -> int:
        return self._post(credit_postings(principal, amount(value, allow_zero=False)))

    def adjust(self, principal: str, delta: int, allow_negative: bool = False) -> int:
        """An admin adjustment; :class:`AdjustmentRefused` if a debit overdraws without ``allow_negative``."""
        delta = signed_amount(delta)
        if adjustment_refusal(delta, self.balance(principal), allow_negative):
            raise AdjustmentRefused(principal, delta, self.balance(principal))
        return self._post(adjustment_postings(principal, delta))

    def charge(
        self, buyer: str, publisher: str, key: str, price: int, idem: str, max_price: int | None = None
    ) -> int | None:
        """The receipt (transaction id) of buying ``key``; ``None`` when free; the same receipt for a repeated
        ``idem``, or :class:`IdempotencyKeyRefunded` once that purchase was refunded (the key never serves
        again)."""
        if (buyer, idem) in self.idempotency:
            txn = self.idempotency[(buyer, idem)]
            if txn in self.refunded:
                raise IdempotencyKeyRefunded(f"the purchase with this Idempotency-Key ({txn}) was refunded")
            return txn
        if price == 0 or buyer == publisher:
            return None
        why = refusal(price, self.balance(buyer), max_price)
        if why:
            raise PaymentRefused(Quote(key, price, self.currency, self.balance(buyer), why))
        txn = self._post(sale_postings(buyer, publisher, price, self.commission_bps))
        self.idempotency[(buyer, idem)] = txn
        return txn

    def refund(self, txn: int) -> int | None:
        """Reverse a charge once; a second refund of the same transaction does nothing."""
        if txn in self.refunded:
            return None
        self.refunded.add(txn)
        return self._post(reversal(self.transactions[txn]))
