"""Publishers paid out: a withdrawal sends the host's token on chain from the host's wallet to an address.

The ledger is debited first, in one database transaction that claims the principal's idempotency key and
refuses an amount above its balance (``principal`` -> ``#x402``, kind ``withdrawal``); only then is the
transfer sent. A transfer that fails is reversed in the ledger (kind ``withdrawal_reversed``); a retry with
the same key sends nothing again and reports the first outcome. So a balance is never paid out twice, nor
beyond what it holds, however many requests race.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

from ..costs import market as mk
from ..errors import ConfigError, SettlementFailed
from ..payments import sdk
from .deposits import CHAIN
from .ledger import Ledger, Movement, Receipt

log = logging.getLogger("kvagent.server")

WITHDRAWAL = mk.WITHDRAWAL
WITHDRAWAL_REVERSED = mk.WITHDRAWAL_REVERSED
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_ERC20 = [
    {"name": "transfer", "type": "function", "stateMutability": "nonpayable",
     "inputs": [{"name": "to", "type": "address"}, {"name": "value", "type": "uint256"}],
     "outputs": [{"name": "", "type": "bool"}]},
]


class WithdrawalRefused(ConfigError):
    """A withdrawal above the principal's balance: nothing was posted or sent."""

    def __init__(self, principal: str, amount: int, balance: int):
        super().__init__(f"{principal} cannot withdraw {amount}: its balance is {balance}")
        self.principal, self.amount, self.balance = principal, amount, balance


@dataclass(frozen=True)
class Withdrawal:
    """A withdrawal's receipt, status (``sent`` | ``reversed`` | ``pending``) and chain transaction."""

    receipt: Receipt
    status: str
    transaction: str | None


class TokenSender:
    """Sends the host's token from the host's wallet (``key``: it pays the gas) over ``rpc_url``."""

    def __init__(self, rpc_url: str, token: str, key: str, timeout: float = 120.0):
        web3 = sdk.require("web3")
        account = sdk.require("eth_account").Account.from_key(key)
        self._w3 = web3.Web3(web3.Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))
        self._token = self._w3.eth.contract(address=web3.Web3.to_checksum_address(token), abi=_ERC20)
        self._account, self._timeout = account, timeout
        self._lock = threading.Lock()  # one nonce at a time from this wallet
        self.address: str = account.address

    def send(self, to: str, amount: int) -> str:
        """Transfer ``amount`` to ``to`` and wait for its receipt; the transaction hash (RuntimeError if it
        reverted)."""
        web3 = sdk.require("web3")
        with self._lock:
            tx = self._token.functions.transfer(web3.Web3.to_checksum_address(to), amount).build_transaction({
                "from": self.address, "chainId": self._w3.eth.chain_id,
                "nonce": self._w3.eth.get_transaction_count(self.address, "pending")})
            signed = self._account.sign_transaction(tx)
            h = self._w3.eth.send_raw_transaction(signed.raw_transaction)
        r = self._w3.eth.wait_for_transaction_receipt(h, timeout=self._timeout)
        if int(r["status"]) != 1:
            raise RuntimeError(f"transfer {h.hex()} reverted")
        return "0x" + bytes(h).hex().removeprefix("0x")


def withdraw(ledger: Ledger, sender: TokenSender, principal: str, amount: int, to: str,
             idem: str) -> Withdrawal:
    """Pay ``amount`` of ``principal``'s balance out to the address ``to`` (idempotent per ``idem``)."""
    amount = mk.amount(amount, "withdrawal", allow_zero=False)
    if not isinstance(to, str) or not _ADDRESS.match(to):
        raise ConfigError(f"withdraw to a 0x-prefixed 20-byte address, not {to!r}")
    if not 1 <= len(idem) <= mk.MAX_IDEMPOTENCY_KEY:
        raise ConfigError(f"Idempotency-Key must be 1..{mk.MAX_IDEMPOTENCY_KEY} characters")
    postings = [mk.Posting(principal, -amount), mk.Posting(CHAIN, amount)]

    def refuse(balances: dict[str, int]) -> None:
        if amount > balances[principal]:
            raise WithdrawalRefused(principal, amount, balances[principal])

    move = Movement(WITHDRAWAL, postings, amount, buyer=principal, memo=f"pending {to.lower()}",
                    refuse=refuse)
    scope = f"{WITHDRAWAL}:{to.lower()}:{amount}"
    rec = ledger._once(principal, idem, scope, mk.request_digest(WITHDRAWAL, principal,
                                                                  {"to": to.lower(), "amount": amount}),
                       WITHDRAWAL, lambda _cur: move)
    assert rec is not None  # a withdrawal is never zero
    if rec.replayed:
        with ledger.meta.read() as cur:
            return _outcome(ledger, cur, rec)
    try:
        tx = sender.send(to, amount)
    except Exception as exc:
        with ledger.meta.transaction() as cur:
            back = [mk.Posting(CHAIN, -amount), mk.Posting(principal, amount)]
            ledger._post(cur, WITHDRAWAL_REVERSED, back, amount, buyer=principal, ref=rec.txn,
                         memo=f"transfer failed: {type(exc).__name__}")
            _set_memo(ledger, cur, rec.txn, f"reversed {to.lower()}")
        log.warning("withdrawal %s of %d by %s failed and was reversed: %s", rec.receipt, amount, principal,
                    type(exc).__name__)
        raise SettlementFailed(f"the transfer failed ({type(exc).__name__}); the withdrawal was reversed",
                               "transfer_failed") from exc
    with ledger.meta.transaction() as cur:
        _set_memo(ledger, cur, rec.txn, f"sent {to.lower()} {tx}")
    log.info("withdrawal %s of %d by %s sent in %s", rec.receipt, amount, principal, tx)
    return Withdrawal(rec, "sent", tx)


def _set_memo(ledger: Ledger, cur: Any, txn: int, memo: str) -> None:
    cur.execute(ledger.meta.q("UPDATE market_transactions SET memo = ? WHERE id = ?"), (memo, txn))


def _outcome(ledger: Ledger, cur: Any, rec: Receipt) -> Withdrawal:
    cur.execute(ledger.meta.q("SELECT memo FROM market_transactions WHERE id = ?"), (rec.txn,))
    memo = str(cur.fetchone()[0] or "").split()
    status = memo[0] if memo else "pending"
    return Withdrawal(rec, status, memo[2] if status == "sent" and len(memo) > 2 else None)


def withdrawn(ledger: Ledger) -> int:
    """The net of all withdrawals sent (reversed ones excluded)."""
    with ledger.meta.read() as cur:
        cur.execute(ledger.meta.q("SELECT kind, COALESCE(SUM(amount), 0) FROM market_transactions "
                                  "WHERE kind IN (?, ?) GROUP BY kind"), (WITHDRAWAL, WITHDRAWAL_REVERSED))
        sums = {k: int(v) for k, v in cur.fetchall()}
    return sums.get(WITHDRAWAL, 0) - sums.get(WITHDRAWAL_REVERSED, 0)
