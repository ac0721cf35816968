"""The market's double-entry ledger in the registry's database (SQLite or PostgreSQL).

Tables (made by the migrations, kvagent.server.schema): ``market_accounts`` (one balance per principal
and per system account), ``market_transactions`` (one row per charge, credit, refund or adjustment, with
its public receipt id), ``market_postings`` (the legs of each transaction; they sum to zero),
``market_idempotency`` (buyer + client key -> transaction), ``market_requests`` (the digest of the request
a key was claimed for, and the stored answer a repeat replays), ``market_refunds`` (one row per refunded
transaction), ``market_prices`` (an artifact's price per load), ``market_disputes`` and ``market_quarantine``.

Every idempotent money movement is one database transaction, written once (:meth:`Ledger._once`): the
owner's idempotency key is claimed first (a concurrent duplicate waits on it, then finds what holds it), the
postings are planned, the accounts touched are locked in name order (``SELECT ... FOR UPDATE`` on
PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already serialises writers), the balance is checked, then the
postings and balances are written and the key is bound to the transaction. A key is bound to a digest of
its request (:func:`kvagent.costs.market.request_digest`), as payment APIs define idempotency: the same
request
again replays the first receipt (a download) or is never served again (a generation: its stored answer or
:class:`kvagent.errors.AlreadyServed`); another request with the key is
:class:`kvagent.errors.IdempotencyKeyReused`; a refunded purchase's key is
:class:`kvagent.errors.IdempotencyKeyRefunded`. Admin credits and adjustments claim the admin's key the
same way (the claim row also records which admin posted them). A refund claims its transaction's row in
``market_refunds`` first, so a transaction is refunded once however many refunds race, and a dispute
locks the purchase's transaction row, so a receipt has one dispute however many filings race. The rules
themselves are kvagent.costs.market's.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..costs import market as mk
from ..errors import AlreadyServed, ConfigError, IdempotencyKeyRefunded, IdempotencyKeyReused
from .meta import MetaStore, PostgresMeta

QUARANTINED = "quarantined"
#: The idempotency owner of an admin operation posted through the library without naming its admin.
ADMIN = "#admin"
#: How many of the latest admin adjustments the audit lists.
AUDIT_ADJUSTMENTS = 100


def _check_idem(idem: str | None) -> None:
    if idem is not None and not 1 <= len(idem) <= mk.MAX_IDEMPOTENCY_KEY:
        raise ConfigError(f"Idempotency-Key must be 1..{mk.MAX_IDEMPOTENCY_KEY} characters")


@dataclass(frozen=True)
class Receipt:
    """A committed charge: its public id, the amount the buyer paid, and whether it was a replay."""

    receipt: str
    txn: int
    amount: int
    currency: str
    replayed: bool = False


@dataclass(frozen=True)
class Audit:
    """Ledger-wide checks: the sum of all balances (always 0), unbalanced transactions, negative
    principals."""

    total: int
    unbalanced: list[int]
    negative: dict[str, int]
    money_issued: int
    host: int  # the host's commissions and token fees
    transactions: dict[str, int]
    adjusted: int = 0  # net money admin adjustments added (negative: they took more out than in)
    adjustments: list[dict[str, Any]] = field(default_factory=list)  # the latest first, with who posted each
    chain_net: int = 0  # net money in from the chain: x402 deposits less payouts


@dataclass(frozen=True)
class Dispute:
    id: int
    receipt: str
    key: str
    status: str  # "refunded" | "rejected" | "open"
    outcome: str
    refund_receipt: str | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


#: An idempotency key reused for another request (the name this module gave it before the errors moved).
IdempotencyConflict = IdempotencyKeyReused


@dataclass(frozen=True)
class Movement:
    """What one idempotent money movement posts, planned inside its database transaction: its kind, postings
    and amount, the transaction row's fields, and ``refuse``, which raises (nothing posted) when the locked
    ``{account: balance}`` forbid it."""

    kind: str
    postings: list[mk.Posting]
    amount: int
    buyer: str | None = None
    key: str | None = None
    publisher: str | None = None
    memo: str = ""
    refuse: Callable[[dict[str, int]], None] | None = None


class Ledger:
    """Accounts, prices, charges, credits, refunds, disputes and quarantine over one MetaStore."""

    def __init__(self, meta: MetaStore, prices: mk.HostPrices | None = None):
        self.meta = meta
        self.prices = prices or mk.HostPrices()
        self._lock_sql = " FOR UPDATE" if isinstance(meta, PostgresMeta) else ""

    @property
    def currency(self) -> str:
        return self.prices.currency

    # -- reads ----------------------------------------------------------------------------------
    def balance(self, account: str) -> int:
        with self.meta.read() as cur:
            cur.execute(self.meta.q("SELECT balance FROM market_accounts WHERE principal = ?"), (account,))
            r = cur.fetchone()
        return int(r[0]) if r else 0

    def price(self, key: str, owner: str) -> int:
        """The price per load of ``owner``'s record of ``key`` (0, free, when it set none)."""
        with self.meta.read() as cur:
            return self._price(cur, key, owner)

    def _price(self, cur: Any, key: str, owner: str) -> int:
        cur.execute(self.meta.q("SELECT price FROM market_prices WHERE key = ? AND owner = ?"), (key, owner))
        r = cur.fetchone()
        return int(r[0]) if r else 0

    def set_price(self, key: str, owner: str, price: int) -> int:
        """Set ``owner``'s price for its record of ``key`` (each owner of a key prices its own record).

        Publishing sets it *before* the record commits, so an artifact is never visible unpriced; a price
        left by a publish that then failed prices nothing (no record of that owner exists to be sold).
        """
        price = mk.amount(price, "price")
        with self.meta.transaction() as cur:
            cur.execute(
                self.meta.q("INSERT INTO market_prices (key, owner, price, updated_at) VALUES (?,?,?,?) "
                            "ON CONFLICT (key, owner) DO UPDATE SET price = excluded.price, "
                            "updated_at = excluded.updated_at"),
                (key, owner, price, time.time()),
            )
        return price

    # -- money movements ------------------------------------------------------------------------
    def credit(self, principal: str, value: int, memo: str = "", *, idem: str | None = None,
               by: str = "") -> Receipt:
        """Admin credit: money enters from #mint (the payment-processor hook; see docs/market.md).

        With ``idem`` (the admin ``by``'s Idempotency-Key) a repeat returns the first receipt, ``replayed``.
        """
        value = mk.amount(value, "credit", allow_zero=False)
        owner, key = self._admin_key(by, idem)
        memo = memo[:mk.MAX_MEMO]
        postings = mk.credit_postings(principal, value)
        move = Movement(mk.CREDIT, postings, value, buyer=principal, memo=memo,
                        refuse=lambda balances: mk.check_inflow(balances, postings))
        rec = self._once(owner, key, f"{mk.CREDIT}:{principal}:{value}",
                         mk.request_digest(mk.CREDIT, principal, {"amount": value, "memo": memo}),
                         mk.CREDIT, lambda cur: move)
        assert rec is not None  # a credit is never free
        return rec

    def adjust(self, principal: str, delta: int, reason: str, *, idem: str | None = None, by: str = "",
               allow_negative: bool = False) -> Receipt:
        """An operator's correction of ``principal``'s balance by ``delta`` (either sign), against #adjust.

        ``reason`` is mandatory and shown in the principal's statement and the audit. A debit never takes a
        balance below zero unless ``allow_negative`` (the operator records a debt, e.g. a chargeback of money
        already spent): :class:`kvagent.costs.market.AdjustmentRefused` otherwise, nothing posted. With
        ``idem``
        a repeat returns the first receipt, ``replayed``.
        """
        delta = mk.signed_amount(delta, "adjustment")
        reason = reason.strip() if isinstance(reason, str) else ""
        if not 1 <= len(reason) <= mk.MAX_REASON:
            raise ConfigError(f"an adjustment needs a reason of 1..{mk.MAX_REASON} characters")
        owner, key = self._admin_key(by, idem)
        postings = mk.adjustment_postings(principal, delta)

        def refuse(balances: dict[str, int]) -> None:
            if mk.adjustment_refusal(delta, balances[principal], allow_negative):
                raise mk.AdjustmentRefused(principal, delta, balances[principal])
            mk.check_inflow(balances, postings)

        move = Movement(mk.ADMIN_ADJUST, postings, delta, buyer=principal, memo=reason, refuse=refuse)
        digest = mk.request_digest(mk.ADMIN_ADJUST, principal,
                                   {"amount": delta, "reason": reason, "allow_negative": allow_negative})
        rec = self._once(owner, key, f"{mk.ADMIN_ADJUST}:{principal}:{delta}", digest, mk.ADMIN_ADJUST,
                         lambda cur: move)
        assert rec is not None  # an adjustment is never zero
        return rec

    def has_account(self, principal: str) -> bool:
        """Whether ``principal`` has an account (an adjustment may correct it after its token is gone)."""
        with self.meta.read() as cur:
            cur.execute(self.meta.q("SELECT 1 FROM market_accounts WHERE principal = ?"), (principal,))
            return cur.fetchone() is not None

    @staticmethod
    def _admin_key(by: str, idem: str | None) -> tuple[str, str]:
        """(owner, key) of an admin operation's idempotency claim: the admin's own key, or a fresh one.

        Always claimed, so the row names the admin who posted the transaction (the audit shows it)."""
        _check_idem(idem)
        return by or ADMIN, idem or "srv-" + secrets.token_hex(16)

    def charge_load(
        self, buyer: str, key: str, publisher: str, idem: str | None, max_price: int | None, *,
        request: str | None = None, cur: Any = None,
    ) -> Receipt | None:
        """Charge one load of ``key`` at its price; ``None`` when free (price 0 or the publisher itself).

        Raises :class:`kvagent.costs.market.PaymentRefused` (nothing charged) when the price is above
        ``max_price`` or the buyer's balance; a repeated ``idem`` returns the first receipt (a download of
        the same bytes again), ``replayed``; ``request`` binds ``idem`` to a digest of the request (default:
        the key alone); ``cur`` posts in the caller's database transaction (:meth:`_once`)."""
        return self._charge(buyer, key, publisher, idem, max_price, mk.SALE, lambda price: (price, 0),
                            request=request, cur=cur)

    def charge_generate(self, buyer: str, key: str, publisher: str, idem: str | None, max_price: int | None,
                        input_tokens: int, cached_tokens: int, max_output_tokens: int, *,
                        request: str | None = None, scope: str | None = None, cur: Any = None
                        ) -> Receipt | None:
        """Charge a hosted generation up front for ``max_output_tokens``; :meth:`settle_generate` returns the
        rest.

        ``idem`` is bound to ``scope`` (default ``generate:<key>``) and ``request`` (the digest of the whole
        request, :func:`kvagent.costs.market.request_digest`): the same key again never generates again
        (:class:`kvagent.errors.AlreadyServed`, with the stored answer if one was kept), another request with
        it is :class:`kvagent.errors.IdempotencyKeyReused` and a refunded one's
        :class:`kvagent.errors.IdempotencyKeyRefunded`; nothing is charged."""

        def bill(price: int) -> tuple[int, int]:
            b = mk.generate_bill(self.prices, input_tokens, cached_tokens, max_output_tokens, price)
            return b.royalty, b.host_fee

        return self._charge(buyer, key, publisher, idem, max_price, mk.GENERATE, bill, request=request,
                            scope=scope, cur=cur)


    def quote_load(self, buyer: str, key: str, publisher: str) -> int:
        """What one load of ``key`` costs ``buyer`` now (0: free, or its own)."""
        return 0 if buyer == publisher else self.price(key, publisher)

    def quote_generate(self, buyer: str, key: str, publisher: str, input_tokens: int, cached_tokens: int,
                       max_output_tokens: int) -> int:
        """What :meth:`charge_generate` would pre-charge ``buyer`` now (an x402 payment pays exactly this)."""
        price = 0 if buyer == publisher else self.price(key, publisher)
        b = mk.generate_bill(self.prices, input_tokens, cached_tokens, max_output_tokens, price)
        return b.royalty + b.host_fee

    def settle_generate(self, receipt: Receipt, input_tokens: int, cached_tokens: int, max_output_tokens: int,
                        used_output_tokens: int, *, used_input_tokens: int | None = None,
                        used_cached_tokens: int | None = None) -> Receipt | None:
        """Give back what a pre-paid generation was charged beyond its use (one adjustment, #host -> buyer):
        its unused output tokens and, when ``used_input_tokens``/``used_cached_tokens`` say the engine found
        more of the prompt cached than the pre-charge counted (vLLM reports it at the end), the difference.
        Settling only ever gives back: a use that would cost more than the pre-charge moves nothing."""
        if receipt.replayed:
            return None
        ui = input_tokens if used_input_tokens is None else used_input_tokens
        uc = cached_tokens if used_cached_tokens is None else used_cached_tokens
        full = mk.generate_bill(self.prices, input_tokens, cached_tokens, max_output_tokens, 0).host_fee
        used = mk.generate_bill(self.prices, ui, uc, used_output_tokens, 0).host_fee
        back = full - used
        if back <= 0:
            return None
        with self.meta.transaction() as cur:
            cur.execute(self.meta.q("SELECT buyer, key, publisher FROM market_transactions WHERE id = ?"),
                        (receipt.txn,))
            buyer, key, publisher = cur.fetchone()
            postings = [mk.Posting(mk.HOST, -back), mk.Posting(buyer, back)]
            return self._post(cur, mk.ADJUST, postings, -back, buyer=buyer, key=key, publisher=publisher,
                              ref=receipt.txn, check_negative=False)

    def _charge(self, buyer: str, key: str, publisher: str, idem: str | None, max_price: int | None,
                kind: str, bill: Callable[[int], tuple[int, int]], *, request: str | None = None,
                scope: str | None = None, cur: Any = None) -> Receipt | None:
        _check_idem(idem)
        scope = scope or f"{kind}:{key}"
        if idem is None and cur is None and sum(bill(0)) == 0 and sum(bill(self.quote_load(buyer, key,
                                                                                       publisher))) == 0:
            # free, and no key to claim: nothing to post, so no write transaction (on a free host every
            # chat came here, and each took SQLite's write lock and an fsync just to release its claim).
            # The host's own fee is asked first: a priced host's charge never pays for the price read here.
            return None

        def plan(cur: Any) -> Movement | None:
            price = self._price(cur, key, publisher)
            royalty, host_fee = bill(price if buyer != publisher else 0)
            total = royalty + host_fee
            if total == 0:
                return None

            def refuse(balances: dict[str, int]) -> None:
                why = mk.refusal(total, balances[buyer], max_price)
                if why:
                    raise mk.PaymentRefused(mk.Quote(key, total, self.currency, balances[buyer], why))

            postings = mk.sale_postings(buyer, publisher, royalty, self.prices.commission_bps, host_fee)
            return Movement(kind, postings, total, buyer=buyer, key=key, publisher=publisher, refuse=refuse)

        return self._once(buyer, idem or "srv-" + secrets.token_hex(16), scope,
                          request or mk.request_digest(scope, key, None), kind, plan, cur)

    def _once(self, owner: str, idem: str, scope: str, digest: str, kind: str,
              plan: Callable[[Any], Movement | None], cur: Any = None) -> Receipt | None:
        """The one sequence of every idempotent money movement, in one database transaction: claim ``idem``
        for (``scope``, ``digest``), or answer what already holds it (:meth:`_held`); plan the postings
        (``None``: nothing to charge, the claim is released); lock their accounts in name order; let the plan
        refuse on the locked balances (nothing posted); post; bind the key to the transaction.

        ``cur``: post inside the caller's database transaction (an x402 payment's deposit and the purchase it
        pays for commit together), else in a transaction of its own."""
        if cur is not None:
            return self._once_in(cur, owner, idem, scope, digest, kind, plan)
        with self.meta.transaction() as own:
            return self._once_in(own, owner, idem, scope, digest, kind, plan)

    def _once_in(self, cur: Any, owner: str, idem: str, scope: str, digest: str, kind: str,
                 plan: Callable[[Any], Movement | None]) -> Receipt | None:
        replay = self._claim(cur, owner, idem, scope, digest, kind)
        if replay is not None:
            return replay
        move = plan(cur)
        if move is None:
            for table in ("market_requests", "market_idempotency"):
                cur.execute(self.meta.q(f"DELETE FROM {table} WHERE principal = ? AND idem_key = ?"),
                            (owner, idem))
            return None
        balances = self._lock(cur, [p.account for p in move.postings])
        if move.refuse is not None:
            move.refuse(balances)
        rec = self._post(cur, move.kind, move.postings, move.amount, buyer=move.buyer, key=move.key,
                         publisher=move.publisher, memo=move.memo, locked=True)
        cur.execute(
            self.meta.q("UPDATE market_idempotency SET txn = ? WHERE principal = ? AND idem_key = ?"),
            (rec.txn, owner, idem),
        )
        return rec

    def _claim(self, cur: Any, owner: str, idem: str, scope: str, digest: str, kind: str) -> Receipt | None:
        """Claim ``idem`` for this request, or answer what already holds it (:meth:`_held`).

        The claim is the first write of the transaction: a concurrent duplicate blocks on the key's row until
        this transaction ends, then finds what holds it (or, if this one rolled back, claims the key
        itself)."""
        cur.execute(
            self.meta.q("INSERT INTO market_idempotency (principal, idem_key, key, txn, created_at) "
                        "VALUES (?,?,?,NULL,?) ON CONFLICT DO NOTHING"),
            (owner, idem, scope, time.time()),
        )
        if cur.rowcount == 1:
            cur.execute(
                self.meta.q("INSERT INTO market_requests (principal, idem_key, request) VALUES (?,?,?)"),
                (owner, idem, digest),
            )
            return None
        held = self._held(cur, owner, idem, scope, digest, kind)
        if held is None:  # (never: the row that conflicted is committed) refuse rather than charge twice
            raise IdempotencyKeyReused("this Idempotency-Key is in use; send a new one")
        return held

    def _held(self, cur: Any, owner: str, idem: str, scope: str, digest: str, kind: str) -> Receipt | None:
        """What an already claimed ``idem`` answers to this request: ``None`` if nothing holds it; the first
        receipt, ``replayed``, for the same download or admin operation again; otherwise it raises
        (nothing is charged): :class:`AlreadyServed` for the same generation again (it is never generated
        twice; the stored answer, if kept, comes with it), :class:`IdempotencyKeyRefunded` when the purchase
        was refunded, :class:`IdempotencyKeyReused` for another request. A key claimed before requests had
        digests (no ``market_requests`` row) is compared by its scope alone."""
        cur.execute(
            self.meta.q(
                "SELECT i.key, r.request, r.answer, t.id, t.receipt, t.amount, f.txn "
                "FROM market_idempotency i LEFT JOIN market_requests r "
                "ON r.principal = i.principal AND r.idem_key = i.idem_key "
                "LEFT JOIN market_transactions t ON t.id = i.txn "
                "LEFT JOIN market_refunds f ON f.txn = i.txn WHERE i.principal = ? AND i.idem_key = ?"
            ),
            (owner, idem),
        )
        row = cur.fetchone()
        if row is None:
            return None
        held, request, answer, txn, receipt, amount, refunded = row
        if held != scope or (request is not None and request != digest) or txn is None:
            first = f" (receipt {receipt})" if receipt else ""
            raise IdempotencyKeyReused(
                f"this Idempotency-Key was already used for another request{first}; send a new key for a new "
                "request", receipt)
        if refunded is not None:
            raise IdempotencyKeyRefunded(
                f"the purchase made with this Idempotency-Key ({receipt}) was refunded: the key never serves "
                "again; send a new one", receipt)
        if kind == mk.GENERATE:
            kept = "" if answer is not None else " (its answer is not kept: streamed, or still running)"
            raise AlreadyServed(
                f"this Idempotency-Key's generation was already served ({receipt}) and is never generated "
                f"again{kept}; send a new key for a new generation", receipt, answer)
        return Receipt(receipt, int(txn), int(amount), self.currency, replayed=True)

    def prior(self, owner: str, idem: str | None, scope: str, digest: str, kind: str) -> Receipt | None:
        """What ``idem`` would answer to this request, read before any work is done (the routes ask it before
        they run the engine): ``None`` when the key is new, else as :meth:`_held`. The charge claims the key
        and decides again, atomically."""
        if idem is None:
            return None
        _check_idem(idem)
        with self.meta.read() as cur:
            return self._held(cur, owner, idem, scope, digest, kind)

    def keep_answer(self, txn: int, answer: str) -> None:
        """Store the final answer of the paid request that made transaction ``txn``: a repeat of its
        Idempotency-Key replays it (:class:`AlreadyServed` carries it) instead of generating again."""
        with self.meta.transaction() as cur:
            cur.execute(
                self.meta.q(
                    "UPDATE market_requests SET answer = ? WHERE EXISTS (SELECT 1 FROM market_idempotency i "
                    "WHERE i.txn = ? AND i.principal = market_requests.principal "
                    "AND i.idem_key = market_requests.idem_key)"
                ),
                (answer, txn),
            )


    def _lock(self, cur: Any, accounts: Sequence[str]) -> dict[str, int]:
        """Create missing accounts and lock them all, in name order (no deadlock between two charges)."""
        names = sorted(set(accounts))
        for a in names:
            cur.execute(self.meta.q("INSERT INTO market_accounts (principal, balance) VALUES (?, 0) "
                                    "ON CONFLICT DO NOTHING"), (a,))
        out: dict[str, int] = {}
        for a in names:
            cur.execute(
                self.meta.q("SELECT balance FROM market_accounts WHERE principal = ?" + self._lock_sql), (a,)
            )
            out[a] = int(cur.fetchone()[0])
        return out

    def _post(self, cur: Any, kind: str, postings: list[mk.Posting], amount: int, *, buyer: str | None = None,
              key: str | None = None, publisher: str | None = None, ref: int | None = None, memo: str = "",
              locked: bool = False, check_negative: bool = False) -> Receipt:
        if not mk.balanced(postings):
            # a bug in kvagent.costs.market, never user input
            raise AssertionError(f"unbalanced postings {postings}")
        if not locked:
            self._lock(cur, [p.account for p in postings])
        receipt = "rcpt_" + secrets.token_hex(12)
        cur.execute(
            self.meta.q(
                "INSERT INTO market_transactions (receipt, ts, kind, buyer, key, publisher, amount, ref, "
                "memo) "
                "VALUES (?,?,?,?,?,?,?,?,?) RETURNING id"
            ),
            (receipt, time.time(), kind, buyer, key, publisher, amount, ref, memo),
        )
        txn = int(cur.fetchone()[0])
        for p in postings:
            cur.execute(self.meta.q("INSERT INTO market_postings (txn, account, amount) VALUES (?,?,?)"),
                        (txn, p.account, p.amount))
            cur.execute(self.meta.q("UPDATE market_accounts SET balance = balance + ? WHERE principal = ?"),
                        (p.amount, p.account))
        return Receipt(receipt, txn, amount, self.currency)

    def refund(self, receipt: str, memo: str = "") -> Receipt | None:
        """Reverse a charge (and its adjustments) once; ``None`` if it was refunded already or is unknown.

        Once per transaction is the database's rule (``market_refunds``' primary key), whatever races; the
        purchase's Idempotency-Key then never serves again."""
        with self.meta.transaction() as cur:
            return self._refund(cur, receipt, memo)

    def _refund(self, cur: Any, receipt: str, memo: str) -> Receipt | None:
        cur.execute(
            self.meta.q("SELECT id, kind, buyer, key, publisher FROM market_transactions WHERE receipt = ?"),
            (receipt,),
        )
        r = cur.fetchone()
        if r is None or r[1] not in (mk.SALE, mk.GENERATE):
            return None
        txn, _, buyer, key, publisher = r
        # the refund's claim, its first write: the primary key makes it one per transaction (a concurrent
        # refund of the same transaction waits on this row, then finds it and posts nothing)
        cur.execute(
            self.meta.q("INSERT INTO market_refunds (txn, refund) VALUES (?, NULL) ON CONFLICT DO NOTHING"),
            (txn,),
        )
        if cur.rowcount != 1:
            return None
        cur.execute(
            self.meta.q(
                "SELECT p.account, p.amount FROM market_postings p JOIN market_transactions t "
                "ON t.id = p.txn WHERE t.id = ? OR (t.ref = ? AND t.kind = ?)"
            ),
            (txn, txn, mk.ADJUST),
        )
        net = mk.merge(mk.Posting(a, int(v)) for a, v in cur.fetchall())
        back = mk.reversal(net)
        paid = -sum(p.amount for p in net if p.account == buyer)
        rec = self._post(cur, mk.REFUND, back, paid, buyer=buyer, key=key, publisher=publisher, ref=int(txn),
                         memo=memo[:200])
        cur.execute(self.meta.q("UPDATE market_refunds SET refund = ? WHERE txn = ?"), (rec.txn, txn))
        return rec

    # -- disputes and quarantine ----------------------------------------------------------------
    def purchase(self, receipt: str, buyer: str) -> tuple[int, str, str] | None:
        """(transaction id, artifact key, publisher) of ``buyer``'s purchase with this receipt id."""
        with self.meta.transaction() as cur:
            cur.execute(
                self.meta.q(
                    "SELECT id, key, publisher FROM market_transactions WHERE receipt = ? "
                    "AND buyer = ? AND kind IN (?, ?)"
                ),
                (receipt, buyer, mk.SALE, mk.GENERATE),
            )
            r = cur.fetchone()
        return (int(r[0]), str(r[1]), str(r[2])) if r else None

    def file_dispute(self, receipt: str, buyer: str, key: str, evidence: dict[str, Any]) -> tuple[int, bool]:
        """(dispute id, whether it is new): a receipt has one dispute; filing again returns the first.

        The purchase's transaction row is locked first (``FOR UPDATE`` on PostgreSQL; SQLite serialises
        writers), so two filings at once, on one node or two, make one dispute."""
        with self.meta.transaction() as cur:
            cur.execute(self.meta.q("SELECT id FROM market_transactions WHERE receipt = ?" + self._lock_sql),
                        (receipt,))
            cur.fetchall()
            cur.execute(self.meta.q("SELECT id FROM market_disputes WHERE receipt = ? ORDER BY id LIMIT 1"),
                        (receipt,))
            first = cur.fetchone()
            if first is not None:
                return int(first[0]), False
            cur.execute(
                self.meta.q("INSERT INTO market_disputes (ts, receipt, buyer, key, evidence, status) "
                            "VALUES (?,?,?,?,?,?) RETURNING id"),
                (time.time(), receipt, buyer, key, json.dumps(evidence, sort_keys=True), "open"),
            )
            return int(cur.fetchone()[0]), True

    def dispute(self, dispute_id: int) -> Dispute:
        """One dispute as it stands (the answer to a repeated filing)."""
        with self.meta.read() as cur:
            cur.execute(self.meta.q("SELECT id, receipt, key, status, outcome, refund_receipt "
                                    "FROM market_disputes WHERE id = ?"), (dispute_id,))
            r = cur.fetchone()
        return Dispute(int(r[0]), r[1], r[2], r[3], r[4] or "", r[5])

    def resolve_dispute(self, dispute_id: int, proven: bool, outcome: str) -> Dispute:
        """Close a dispute: a proven one refunds the buyer and quarantines the artifact, in one
        transaction."""
        with self.meta.transaction() as cur:
            cur.execute(
                self.meta.q(
                    "SELECT d.receipt, d.key, t.publisher FROM market_disputes d JOIN "
                    "market_transactions t ON t.receipt = d.receipt WHERE d.id = ?"
                ),
                (dispute_id,),
            )
            receipt, key, publisher = cur.fetchone()
            refund = None
            if proven:
                rec = self._refund(cur, receipt, f"dispute {dispute_id}")
                refund = rec.receipt if rec else None
                self._quarantine(cur, key, publisher, dispute_id, outcome)
            status = "refunded" if proven else "rejected"
            cur.execute(self.meta.q("UPDATE market_disputes SET status = ?, outcome = ?, refund_receipt = ? "
                                    "WHERE id = ?"), (status, outcome[:500], refund, dispute_id))
        return Dispute(dispute_id, receipt, key, status, outcome[:500], refund)

    def record_open(self, dispute_id: int, outcome: str) -> Dispute:
        """Leave a dispute open for the operator (this host runs no model that could re-verify it)."""
        with self.meta.transaction() as cur:
            cur.execute(
                self.meta.q("UPDATE market_disputes SET outcome = ? WHERE id = ?"),
                (outcome[:500], dispute_id),
            )
            cur.execute(self.meta.q("SELECT receipt, key FROM market_disputes WHERE id = ?"), (dispute_id,))
            receipt, key = cur.fetchone()
        return Dispute(dispute_id, receipt, key, "open", outcome[:500], None)

    def disputes(self, buyer: str | None = None) -> list[Dispute]:
        sql = "SELECT id, receipt, key, status, outcome, refund_receipt FROM market_disputes"
        params: tuple[Any, ...] = ()
        if buyer is not None:
            sql, params = sql + " WHERE buyer = ?", (buyer,)
        with self.meta.read() as cur:
            cur.execute(self.meta.q(sql + " ORDER BY id"), params)
            return [Dispute(int(r[0]), r[1], r[2], r[3], r[4] or "", r[5]) for r in cur.fetchall()]

    def is_quarantined(self, key: str, owner: str) -> bool:
        with self.meta.read() as cur:
            cur.execute(
                self.meta.q("SELECT 1 FROM market_quarantine WHERE key = ? AND owner = ?"), (key, owner)
            )
            return cur.fetchone() is not None

    def _quarantine(self, cur: Any, key: str, owner: str, dispute_id: int | None, reason: str) -> None:
        """Hide ``owner``'s record of ``key`` from everyone but ``owner``: lookups, prefix lookups, downloads
        and generate then answer as for a missing key. The record's visibility and grants are kept in the
        quarantine row. The record is the key's first row (``artifacts``) or the owner's copy
        (``owner_copies``, kvagent.server.records)."""
        q = self.meta.q
        for table, grants, where in (("artifacts", "entitlements", "key = ?"),
                                     ("owner_copies", "owner_copy_grants", "key = ? AND owner = ?")):
            params: tuple[Any, ...] = (key,) if table == "artifacts" else (key, owner)
            cur.execute(q(f"SELECT visibility, owner FROM {table} WHERE {where}"), params)
            r = cur.fetchone()
            if r is None or r[1] != owner:
                continue
            if r[0] == QUARANTINED:
                return
            cur.execute(q(f"SELECT principal FROM {grants} WHERE {where}"), params)
            granted = sorted(x[0] for x in cur.fetchall())
            cur.execute(
                q("INSERT INTO market_quarantine (key, owner, ts, dispute, reason, visibility, entitlements) "
                  "VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"),
                (key, owner, time.time(), dispute_id, reason[:500], r[0], json.dumps(granted)),
            )
            cur.execute(q(f"DELETE FROM {grants} WHERE {where}"), params)
            cur.execute(q(f"UPDATE {table} SET visibility = ? WHERE {where}"), (QUARANTINED, *params))
            return

    # -- statements and audit -------------------------------------------------------------------
    def statement(self, principal: str) -> mk.Statement:
        with self.meta.transaction() as cur:
            cur.execute(self.meta.q(
                "SELECT t.id, t.kind, t.key, t.buyer, p.account, p.amount, t.receipt, t.memo, t.ts "
                "FROM market_postings p JOIN market_transactions t ON t.id = p.txn WHERE p.account = ? "
                "ORDER BY t.id"), (principal,))
            rows = [mk.StatementRow(int(r[0]), r[1], r[2], r[3], r[4], int(r[5]), r[6], r[7] or "",
                                    float(r[8])) for r in cur.fetchall()]
        return mk.statement(principal, rows)

    def audit(self) -> Audit:
        with self.meta.transaction() as cur:
            cur.execute("SELECT principal, balance FROM market_accounts")
            balances = {a: int(b) for a, b in cur.fetchall()}
            cur.execute("SELECT txn FROM market_postings GROUP BY txn HAVING SUM(amount) <> 0")
            unbalanced = [int(r[0]) for r in cur.fetchall()]
            cur.execute("SELECT account, SUM(amount) FROM market_postings GROUP BY account")
            posted = {a: int(s) for a, s in cur.fetchall()}
            cur.execute("SELECT kind, COUNT(*) FROM market_transactions GROUP BY kind")
            kinds = {k: int(n) for k, n in cur.fetchall()}
            cur.execute(self.meta.q(
                "SELECT t.receipt, t.ts, t.buyer, t.amount, t.memo, i.principal FROM market_transactions t "
                "LEFT JOIN market_idempotency i ON i.txn = t.id WHERE t.kind = ? ORDER BY t.id DESC LIMIT ?"),
                (mk.ADMIN_ADJUST, AUDIT_ADJUSTMENTS))
            adjustments = [{"receipt": r[0], "ts": float(r[1]), "principal": r[2], "amount": int(r[3]),
                            "reason": r[4] or "", "by": r[5]} for r in cur.fetchall()]
        drift = [a for a in set(balances) | set(posted) if balances.get(a, 0) != posted.get(a, 0)]
        if drift:  # balances are a cache of the postings; they must agree
            unbalanced.append(-1)
        negative = {a: b for a, b in balances.items() if b < 0 and a not in mk.SYSTEM_ACCOUNTS}
        return Audit(sum(balances.values()), unbalanced, negative, -balances.get(mk.MINT, 0),
                     balances.get(mk.HOST, 0), kinds, -balances.get(mk.ADJUSTMENTS, 0), adjustments,
                     -balances.get(mk.CHAIN, 0))


def open_ledger(meta: MetaStore, prices_file: Any = None, currency: str | None = None) -> Ledger:
    """The ledger of a server: its price file (if any), with ``currency`` overriding the file's."""
    prices = mk.HostPrices.from_file(prices_file) if prices_file else mk.HostPrices()
    if currency:
        prices = mk.HostPrices(**{**prices.__dict__, "currency": currency})
    return Ledger(meta, prices)
