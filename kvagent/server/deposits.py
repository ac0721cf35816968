"""Money entering the ledger from the chain: an x402 payment settled to the host's wallet is a deposit to the
payer's principal, from the system account ``#x402`` (whose balance is minus the net of all deposits).

:func:`record_deposit` writes inside a transaction its caller holds (the ledger's cursor), so the deposit and
the purchase it pays for commit together or not at all. It is idempotent per settlement transaction: the same
on-chain transfer deposits once, however often it is recorded.
"""

from __future__ import annotations

from typing import Any

from ..costs import market as mk
from ..errors import IdempotencyKeyReused
from .ledger import Ledger, Movement, Receipt

#: The system account x402 deposits come from (never a principal: principal names cannot start with ``#``).
CHAIN = mk.CHAIN
#: The ledger's transaction kind of a deposit.
DEPOSIT = mk.DEPOSIT


def deposit_postings(principal: str, amount: int) -> list[mk.Posting]:
    """A deposit: ``#x402`` pays ``principal`` ``amount`` (the tokens it paid the host on chain)."""
    return [mk.Posting(CHAIN, -amount), mk.Posting(principal, amount)]


def record_deposit(ledger: Ledger, cur: Any, principal: str, amount: int, network: str, transaction: str
                   ) -> Receipt:
    """Post the deposit of ``amount`` settled by ``transaction`` on ``network`` to ``principal``, in the
    caller's database transaction ``cur``, through the ledger's one charge helper (:meth:`Ledger._once`,
    keyed by ``#x402``'s claim on the settlement); a settlement already recorded returns its receipt,
    ``replayed``."""
    amount = mk.amount(amount, "deposit", allow_zero=False)
    idem = f"{network}:{transaction.lower()}"
    if len(idem) > mk.MAX_IDEMPOTENCY_KEY:
        raise ValueError("a settlement's network and transaction are too long to key a deposit")
    postings = deposit_postings(principal, amount)
    move = Movement(DEPOSIT, postings, amount, buyer=principal, memo=f"x402 {network} {transaction}",
                    refuse=lambda balances: mk.check_inflow(balances, postings))
    scope = f"{DEPOSIT}:{principal}"
    try:
        rec = ledger._once(CHAIN, idem, scope, mk.request_digest(DEPOSIT, principal, {"amount": amount}),
                           DEPOSIT, lambda _cur: move, cur)
    except IdempotencyKeyReused as exc:
        raise ValueError(f"settlement {transaction} is already recorded for another principal") from exc
    assert rec is not None  # a deposit is never zero
    return rec


def deposited(ledger: Ledger) -> int:
    """The net of all x402 deposits (what the chain should show the host's wallet received through x402)."""
    return -ledger.balance(CHAIN)
