"""Money entering the ledger from the chain: an x402 payment settled to the host's wallet is a deposit to the
payer's principal, from the system account ``#x402`` (whose balance is minus the net of all deposits).

:func:`record_deposit` writes inside a transaction its caller holds (the ledger's cursor), so the deposit and
the purchase it pays for commit together or not at all. It is idempotent per settlement transaction: the same
on-chain transfer deposits once, however often it is recorded.
"""

from __future__ import annotations

import time
from typing import Any

from ..costs import market as mk
from .ledger import Ledger, Receipt

#: The system account x402 deposits come from (never a principal: principal names cannot start with ``#``).
CHAIN = "#x402"
#: The ledger's transaction kind of a deposit.
DEPOSIT = "deposit"


def deposit_postings(principal: str, amount: int) -> list[mk.Posting]:
    """A deposit: ``#x402`` pays ``principal`` ``amount`` (the tokens it paid the host on chain)."""
    return [mk.Posting(CHAIN, -amount), mk.Posting(principal, amount)]


def record_deposit(ledger: Ledger, cur: Any, principal: str, amount: int, network: str, transaction: str
                   ) -> Receipt:
    """Post the deposit of ``amount`` settled by ``transaction`` on ``network`` to ``principal``, in the
    caller's database transaction ``cur``; a settlement already recorded returns its receipt, ``replayed``."""
    amount = mk.amount(amount, "deposit", allow_zero=False)
    idem = f"{network}:{transaction.lower()}"
    if len(idem) > mk.MAX_IDEMPOTENCY_KEY:
        raise ValueError("a settlement's network and transaction are too long to key a deposit")
    try:
        replay = claim(ledger, cur, CHAIN, idem, f"{DEPOSIT}:{principal}")
    except ValueError as exc:
        raise ValueError(f"settlement {transaction} is already recorded for another principal") from exc
    if replay is not None:
        return replay
    postings = deposit_postings(principal, amount)
    balances = ledger._lock(cur, [p.account for p in postings])
    mk.check_inflow(balances, postings)
    rec = ledger._post(cur, DEPOSIT, postings, amount, buyer=principal, memo=f"x402 {network} {transaction}",
                       locked=True)
    bind(ledger, cur, CHAIN, idem, rec.txn)
    return rec


def claim(ledger: Ledger, cur: Any, owner: str, idem: str, scope: str) -> Receipt | None:
    """Claim ``owner``'s idempotency key ``idem`` for ``scope`` in ``cur``'s transaction (a concurrent claim
    waits on it); the receipt of the transaction that already holds it, ``replayed``; ValueError if it is
    held for another scope. :func:`bind` names the transaction once posted."""
    q = ledger.meta.q
    cur.execute(q("INSERT INTO market_idempotency (principal, idem_key, key, txn, created_at) "
                  "VALUES (?,?,?,NULL,?) ON CONFLICT DO NOTHING"), (owner, idem, scope, time.time()))
    if cur.rowcount == 1:
        return None
    cur.execute(q("SELECT i.key, t.id, t.receipt, t.amount FROM market_idempotency i LEFT JOIN "
                  "market_transactions t ON t.id = i.txn WHERE i.principal = ? AND i.idem_key = ?"),
                (owner, idem))
    held, txn, receipt, value = cur.fetchone()
    if held != scope or txn is None:
        raise ValueError(f"this key is already used for another operation ({str(held).split(':')[0]})")
    return Receipt(receipt, int(txn), int(value), ledger.currency, replayed=True)


def bind(ledger: Ledger, cur: Any, owner: str, idem: str, txn: int) -> None:
    """Name the transaction that holds a key claimed by :func:`claim`."""
    cur.execute(ledger.meta.q("UPDATE market_idempotency SET txn = ? WHERE principal = ? AND idem_key = ?"),
                (txn, owner, idem))


def deposited(ledger: Ledger) -> int:
    """The net of all x402 deposits (what the chain should show the host's wallet received through x402)."""
    return -ledger.balance(CHAIN)
