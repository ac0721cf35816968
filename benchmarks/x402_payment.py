"""The latency x402 adds to a purchase: a prepaid charge and a paid one, side by side in one run, against the
test chain (anvil on loopback: ``.ci/chain.sh``, then ``source .ci/chain.env``).

    python -m benchmarks.x402_payment [--n 50] [--skip-routes] [--out FILE]

In process: prepaid is one ``Ledger.charge_load`` from a balance; paid is the buyer signing (``Payer.pay``),
then the host's ``x402_flow.pay``: verify and settle through the SDK's in-process facilitator (one
transaction mined per payment), then the deposit and the sale in one database transaction.

Through the routes: a real host process (``python -m kvagent.server`` with ``--x402-*``, its facilitator in
process) sells one public priced artifact; a token buyer with a balance downloads it (one GET, charged from
the balance) and a wallet-only buyer downloads it (the SDK's ``RegistryClient`` with a payer: the GET answered
402, the payment signed, the GET sent again with ``PAYMENT-SIGNATURE``, verified and settled before a byte).
Each load is a new purchase (a fresh Idempotency-Key). Interleaved, so both see the same load on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvagent.costs import market as mk
from kvagent.payments import SpendCaps, Wallet, X402Terms
from kvagent.payments.payer import Payer
from kvagent.server import x402_flow
from kvagent.server.ledger import Ledger, Receipt
from kvagent.server.meta import SQLiteMeta
from kvagent.server.x402 import X402Gateway

KEY, PUBLISHER, PRICE = "b" * 64, "pub", 1_000


def _sale(led: Ledger, cur: Any, buyer: str) -> Receipt:
    """One load bought in the caller's transaction (stands in for the ledger's charge taking a cursor)."""
    postings = mk.sale_postings(buyer, PUBLISHER, PRICE, led.prices.commission_bps)
    led._lock(cur, [p.account for p in postings])
    return led._post(cur, mk.SALE, postings, PRICE, buyer=buyer, key=KEY, publisher=PUBLISHER, locked=True)


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(x * 1000 for x in xs)
    return {"p50_ms": round(statistics.median(xs), 2), "p90_ms": round(xs[int(0.9 * (len(xs) - 1))], 2),
            "mean_ms": round(statistics.fmean(xs), 2)}


def run(n: int) -> dict[str, Any]:
    rpc = os.environ.get("KVAGENT_TEST_CHAIN_RPC")
    if not rpc:
        sys.exit("no test chain: run .ci/chain.sh and source .ci/chain.env")
    keys = json.load(open(os.environ["KVAGENT_TEST_CHAIN_ACCOUNTS"]))
    host = keys["addresses"]["host"]
    token = os.environ["KVAGENT_TEST_CHAIN_TOKEN"]
    terms = X402Terms("eip155:31337", token, host, os.environ["KVAGENT_TEST_CHAIN_TOKEN_NAME"],
                      os.environ["KVAGENT_TEST_CHAIN_TOKEN_VERSION"])
    gw = X402Gateway.in_process(terms, keys["facilitator"], rpc)
    payer = Payer(Wallet(keys["buyers"][-1]), SpendCaps(max_price_per_load=PRICE),
                  allowed_assets=[(terms.network, token)])
    with tempfile.TemporaryDirectory() as d:
        meta = SQLiteMeta(Path(d) / "meta.sqlite3")
        led = Ledger(meta, mk.HostPrices(commission_bps=1000))
        led.set_price(KEY, PUBLISHER, PRICE)
        led.credit("prepaid", PRICE * (n + 5))
        prepaid, paid, sign = [], [], []
        for i in range(n + 5):  # the first 5 of each warm up
            t0 = time.perf_counter()
            led.charge_load("prepaid", KEY, PUBLISHER, f"p{i}", None)
            t1 = time.perf_counter()
            payment = payer.pay(gw.required_header(PRICE, "http://bench/x"))
            t2 = time.perf_counter()
            x402_flow.pay(gw, led, payment.header, PRICE, None, lambda cur, who: _sale(led, cur, who))
            t3 = time.perf_counter()
            if i >= 5:
                prepaid.append(t1 - t0)
                sign.append(t2 - t1)
                paid.append(t3 - t1)
        a = led.audit()
        assert a.total == 0 and not a.unbalanced and a.transactions["deposit"] == n + 5
        meta.close()
    out: dict[str, Any] = {"n": n, "prepaid": _stats(prepaid), "paid": _stats(paid),
                           "buyer_sign": _stats(sign)}
    out["added_p50_ms"] = round(out["paid"]["p50_ms"] - out["prepaid"]["p50_ms"], 2)
    out["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()[0]}
    return out


def run_routes(n: int) -> dict[str, Any]:
    """Prepaid vs paid downloads of one priced artifact through a real host process (see the docstring)."""
    from benchmarks.registry_load import synthetic_artifact
    from kvagent.client.registry import RegistryClient
    from tests.registry_server import start_server

    keys = json.load(open(os.environ["KVAGENT_TEST_CHAIN_ACCOUNTS"]))
    token = os.environ["KVAGENT_TEST_CHAIN_TOKEN"]
    blob = synthetic_artifact(256, 4, seed=0)  # a 256-token KV of 4 layers (about 1.5 MB)
    tokens: dict[str, dict[str, object]] = {"tok-admin-0001": {"principal": "operator", "admin": True},
                                            "tok-pub-00001": {"principal": PUBLISHER, "publish": True},
                                            "tok-prepaid": {"principal": "prepaid"}}
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        for name in ("host", "facilitator"):
            (base / f"{name}.key").write_text(keys[name])
            (base / f"{name}.key").chmod(0o600)
        (base / "prices.json").write_text(json.dumps({"currency": "uUSD", "commission_bps": 1000}))
        srv = start_server(base / "data", tokens, extra_args=[
            "--prices", str(base / "prices.json"), "--x402-network", "eip155:31337", "--x402-asset", token,
            "--x402-token-name", os.environ["KVAGENT_TEST_CHAIN_TOKEN_NAME"],
            "--x402-token-version", os.environ["KVAGENT_TEST_CHAIN_TOKEN_VERSION"],
            "--x402-wallet", str(base / "host.key"), "--x402-facilitator-key", str(base / "facilitator.key"),
            "--x402-rpc", os.environ["KVAGENT_TEST_CHAIN_RPC"]])
        try:
            with (RegistryClient(srv.url, "tok-pub-00001") as pub,
                  RegistryClient(srv.url, "tok-admin-0001") as admin):
                handle = pub.publish(blob, "public", price=PRICE)
                admin.credit("prepaid", PRICE * (n + 5))
            payer = Payer(Wallet(keys["buyers"][-2]), SpendCaps(max_price_per_load=PRICE),
                          allowed_assets=[("eip155:31337", token)])
            prepaid, paid = [], []
            with RegistryClient(srv.url, "tok-prepaid") as pre, RegistryClient(srv.url, payer=payer) as wal:
                for i in range(n + 5):  # the first 5 of each warm up
                    t0 = time.perf_counter()
                    a = pre.download_blob(handle, max_price=PRICE)
                    t1 = time.perf_counter()
                    b = wal.download_blob(handle, max_price=PRICE)
                    t2 = time.perf_counter()
                    assert a.charge == b.charge == PRICE and bytes(a.data) == bytes(b.data) == blob
                    if i >= 5:
                        prepaid.append(t1 - t0)
                        paid.append(t2 - t1)
            assert payer.caps.spent == PRICE * (n + 5)
        finally:
            srv.stop()
    out: dict[str, Any] = {"n": n, "artifact_bytes": len(blob), "prepaid": _stats(prepaid),
                           "paid": _stats(paid)}
    out["added_p50_ms"] = round(out["paid"]["p50_ms"] - out["prepaid"]["p50_ms"], 2)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--skip-routes", action="store_true", help="the in-process figures only")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    res = run(args.n)
    if not args.skip_routes:
        res["routes"] = run_routes(args.n)
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
