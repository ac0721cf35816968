"""``kvagent account balance | statement | credit | adjust | topup | withdraw | chain-audit``: a principal's
registry account, through the registry client."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import open_registry


def register(sub: Any) -> None:
    """Add this group's commands to the ``kvagent`` subparsers ``sub``."""
    acc = sub.add_parser("account", help="your registry account: balance, statement; credit, adjust (admin)")
    asub = acc.add_subparsers(dest="account_command", required=True)
    bal = asub.add_parser("balance", help="your balance in integer micro-units")
    bal.add_argument("--json", action="store_true")
    bal.set_defaults(func=cmd_account_balance)
    stm = asub.add_parser(
        "statement", help="purchases and sales per artifact: loads, amounts, royalties, refunds"
    )
    stm.add_argument("--json", action="store_true")
    stm.set_defaults(func=cmd_account_statement)
    cre = asub.add_parser("credit", help="credit PRINCIPAL with AMOUNT micro-units (admin token only)")
    cre.add_argument("principal")
    cre.add_argument("amount", type=int)
    cre.add_argument("--memo", default="")
    cre.add_argument("--create", action="store_true", help="credit a principal no token names yet")
    cre.add_argument("--idempotency-key", help="repeat a credit safely: the same key credits once")
    cre.add_argument("--json", action="store_true")
    cre.set_defaults(func=cmd_account_credit)
    adj = asub.add_parser("adjust", help="correct PRINCIPAL's balance by AMOUNT micro-units (negative: a "
                                         "debit), with a reason (admin token only)")
    adj.add_argument("principal")
    adj.add_argument("amount", type=int)
    adj.add_argument("--reason", required=True, help="why (shown in the principal's statement and the audit)")
    adj.add_argument("--allow-negative", action="store_true", help="a debit may leave a debt")
    adj.add_argument("--idempotency-key", help="repeat an adjustment safely: the same key posts once")
    adj.add_argument("--json", action="store_true")
    adj.set_defaults(func=cmd_account_adjust)
    top = asub.add_parser("topup", help="add AMOUNT micro-units to your balance, paid by x402 from a wallet")
    top.add_argument("amount", type=int)
    top.add_argument("--wallet", default=None,
                     help="the paying wallet's key file (default: KVAGENT_WALLET_KEY)")
    top.add_argument("--json", action="store_true")
    top.set_defaults(func=cmd_account_topup)
    wdr = asub.add_parser("withdraw", help="pay AMOUNT micro-units of your balance out on chain to ADDRESS "
                                           "(from the host's wallet)")
    wdr.add_argument("amount", type=int)
    wdr.add_argument("--to", required=True, help="the 0x address to pay")
    wdr.add_argument("--principal", default=None, help="(admin) pay out this principal's balance instead")
    wdr.add_argument("--idempotency-key", help="repeat a withdrawal safely: the same key pays out once")
    wdr.add_argument("--json", action="store_true")
    wdr.set_defaults(func=cmd_account_withdraw)
    aud = asub.add_parser("chain-audit", help="(admin) compare the ledger's x402 deposits and withdrawals "
                                              "with the chain's transfers")
    aud.add_argument("--json", action="store_true")
    aud.set_defaults(func=cmd_account_chain_audit)


def cmd_account_balance(args: argparse.Namespace) -> int:
    with open_registry(args) as reg:
        acct = reg.account()
    print(json.dumps(acct) if args.json else f"{acct['principal']}: {acct['balance']} {acct['currency']}")
    return 0


def cmd_account_credit(args: argparse.Namespace) -> int:
    with open_registry(args) as reg:
        out = reg.credit(args.principal, args.amount, args.memo, create=args.create,
                         idempotency_key=args.idempotency_key)
    if args.json:
        print(json.dumps(out))
    else:
        again = " (a replay: nothing new credited)" if out.get("replayed") else ""
        print(
            f"credited {out['credited']} {out['currency']} to {out['principal']} (receipt {out['receipt']}); "
            f"balance {out['balance']}{again}"
        )
    return 0


def cmd_account_adjust(args: argparse.Namespace) -> int:
    with open_registry(args) as reg:
        out = reg.adjust(args.principal, args.amount, args.reason, allow_negative=args.allow_negative,
                         idempotency_key=args.idempotency_key)
    if args.json:
        print(json.dumps(out))
    else:
        again = " (a replay: nothing new posted)" if out.get("replayed") else ""
        print(f"adjusted {out['principal']} by {out['adjusted']} {out['currency']} "
              f"(receipt {out['receipt']}); balance {out['balance']}{again}")
    return 0


def cmd_account_topup(args: argparse.Namespace) -> int:
    from ..payments import load_wallet

    with open_registry(args) as reg:
        out = reg.topup(args.amount, load_wallet(args.wallet))
    print(json.dumps(out) if args.json else
          f"deposited {out['deposited']} {out['currency']} to {out['principal']} (receipt {out['receipt']}, "
          f"transaction {out['transaction']}); balance {out['balance']}")
    return 0


def cmd_account_withdraw(args: argparse.Namespace) -> int:
    with open_registry(args) as reg:
        out = reg.withdraw(args.amount, args.to, principal=args.principal,
                           idempotency_key=args.idempotency_key)
    if args.json:
        print(json.dumps(out))
    else:
        again = " (a replay: nothing new sent)" if out.get("replayed") else ""
        print(f"withdrew {out['amount']} {out['currency']} of {out['principal']} to {out['to']}: "
              f"{out['status']} (transaction {out['transaction']}, receipt {out['receipt']}); "
              f"balance {out['balance']}{again}")
    return 0


def cmd_account_chain_audit(args: argparse.Namespace) -> int:
    with open_registry(args) as reg:
        out = reg.chain_audit()
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{'ok' if out['ok'] else 'MISMATCH'}: {out['deposits']} deposits of {out['deposited']} "
              f"({out['confirmed']} on chain), withdrawn {out['withdrawn']} ({out['withdrawn_confirmed']} on "
              f"chain), missing {out['missing']}")
    return 0 if out["ok"] else 1


def cmd_account_statement(args: argparse.Namespace) -> int:
    with open_registry(args) as reg:
        s = reg.statement()
    if args.json:
        print(json.dumps(s))
        return 0
    cur = s["currency"]
    lines = [f"{s['principal']}: balance {s['balance']} {cur}, credits {s['credits']} {cur}"]
    for a in s.get("adjustments", []):
        lines.append(f"  adjustment {a['amount']:+d} {cur} ({a['receipt']}): {a['reason']}")
    for t in s.get("transfers", []):
        lines.append(f"  {t['kind']} {t['amount']:+d} {cur} ({t['receipt']}): {t['memo']}")
    for title, rows, cols in (("purchases", s["purchases"], ("loads", "amount", "refunds")),
                              ("sales", s["sales"], ("loads", "amount", "royalties", "refunds"))):
        lines.append(f"{title}:" if rows else f"{title}: none")
        for r in rows:
            lines.append(f"  {r['key'][:16]}…  " + "  ".join(f"{c} {r[c]}" for c in cols))
    print("\n".join(lines))
    return 0
