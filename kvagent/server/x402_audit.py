"""The chain audit of x402 money: every deposit the ledger holds must be an on-chain transfer of exactly its
amount of the host's token to the host's wallet, in the settlement transaction the deposit names; every
withdrawal sent, a transfer of its amount from the host's wallet to the address it names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..payments import sdk
from .deposits import DEPOSIT
from .ledger import Ledger
from .withdrawals import WITHDRAWAL

#: keccak256("Transfer(address,address,uint256)"), the ERC-20 Transfer event's topic.
TRANSFER_TOPIC = "ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"


@dataclass(frozen=True)
class ChainAudit:
    """``deposited``: the ledger's deposits; ``confirmed``: what the chain shows of them; ``missing``: the
    receipts of deposits or withdrawals with no matching transfer (should be empty)."""

    deposits: int
    deposited: int
    confirmed: int
    missing: list[str] = field(default_factory=list)
    withdrawn: int = 0  # withdrawals sent, by the ledger
    withdrawn_confirmed: int = 0  # of those, what the chain shows

    @property
    def ok(self) -> bool:
        confirmed = (self.confirmed, self.withdrawn_confirmed)
        return not self.missing and (self.deposited, self.withdrawn) == confirmed


def chain_audit(ledger: Ledger, rpc_url: str, token: str, pay_to: str) -> ChainAudit:
    """Check each ledger deposit against its settlement transaction's receipt on the chain at ``rpc_url``."""
    web3 = sdk.require("web3")
    w3 = web3.Web3(web3.Web3.HTTPProvider(rpc_url))
    with ledger.meta.read() as cur:
        cur.execute(ledger.meta.q("SELECT receipt, amount, memo FROM market_transactions WHERE kind = ?"),
                    (DEPOSIT,))
        rows = cur.fetchall()
        cur.execute(ledger.meta.q("SELECT receipt, amount, memo FROM market_transactions WHERE kind = ? "
                                  "AND memo LIKE ?"), (WITHDRAWAL, "sent %"))
        sent = cur.fetchall()
    confirmed, missing = 0, []
    for receipt, amount, memo in rows:
        tx = str(memo).rsplit(" ", 1)[-1]
        if _transferred(w3, tx, token, pay_to) == int(amount):
            confirmed += int(amount)
        else:
            missing.append(str(receipt))
    withdrawn = out = 0
    for receipt, amount, memo in sent:
        _, to, tx = str(memo).split()
        withdrawn += int(amount)
        if _transferred(w3, tx, token, to, sender=pay_to) == int(amount):
            out += int(amount)
        else:
            missing.append(str(receipt))
    return ChainAudit(len(rows), sum(int(r[1]) for r in rows), confirmed, missing, withdrawn, out)


def _transferred(w3: Any, tx: str, token: str, pay_to: str, sender: str | None = None) -> int:
    """The amount of ``token`` that transaction ``tx`` moved to ``pay_to`` (from ``sender`` when given; 0 if
    none, or if it failed)."""
    try:
        r = w3.eth.get_transaction_receipt(tx)
    except Exception:  # unknown transaction (web3's TransactionNotFound) or a bad hash
        return 0
    if int(r["status"]) != 1:
        return 0
    total = 0
    for log in r["logs"]:
        topics = [bytes(t).hex().removeprefix("0x") for t in log["topics"]]
        if (str(log["address"]).lower() == token.lower() and len(topics) == 3 and topics[0] == TRANSFER_TOPIC
                and int(topics[2], 16) == int(pay_to, 16)
                and (sender is None or int(topics[1], 16) == int(sender, 16))):
            total += int(bytes(log["data"]).hex() or "0", 16)
    return total
