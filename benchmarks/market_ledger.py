"""Throughput of the market ledger: purchases per second on SQLite and PostgreSQL, one thread and many.

    python -m benchmarks.market_ledger [--sales 400] [--threads 16] [--postgres-dsn DSN] [--out FILE]

Each purchase is one `Ledger.charge_load` (idempotency claim, price read, account locks, balance check,
transaction + 3 postings + 3 balance updates, commit). Afterwards the audit must hold (sum of balances 0,
no unbalanced transaction, no negative buyer, one sale per purchase). The server adds HTTP on top.
"""

from __future__ import annotations

import argparse
import json
import platform
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvagent.costs import market as mk
from kvagent.server.ledger import Ledger
from kvagent.server.meta import MetaStore, PostgresMeta, SQLiteMeta


def run(meta: MetaStore, sales: int, threads: int) -> dict[str, Any]:
    led = Ledger(meta, mk.HostPrices(commission_bps=1000))
    for i in range(3):
        led.set_price(f"k{i}", f"pub{i}", 100 + i)
    buyers = max(threads, 8)
    for b in range(buyers):
        led.credit(f"buyer{b}", 10**9)
    per_thread = sales // threads

    def work(t: int) -> None:
        for j in range(per_thread):
            led.charge_load(
                f"buyer{(t + j * threads) % buyers}", f"k{j % 3}", f"pub{j % 3}", f"{t}-{j}", None
            )

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    dt = time.perf_counter() - t0
    a = led.audit()
    assert (
        a.total == 0
        and not a.unbalanced
        and not a.negative
        and a.transactions["sale"] == per_thread * threads
    )
    return {
        "sales": per_thread * threads,
        "threads": threads,
        "seconds": round(dt, 3),
        "sales_per_s": round(per_thread * threads / dt, 1),
        "ms_per_sale": round(dt * 1000 / (per_thread * threads), 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.market_ledger")
    ap.add_argument("--sales", type=int, default=400)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--postgres-dsn", default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    backends = ["sqlite"] + (["postgres"] if args.postgres_dsn else [])
    for backend in backends:
        for threads in (1, args.threads):
            with tempfile.TemporaryDirectory() as d:
                schema = None
                meta: MetaStore
                if backend == "sqlite":
                    meta = SQLiteMeta(Path(d) / "m.sqlite3")
                else:
                    import psycopg
                    from psycopg.conninfo import make_conninfo

                    schema = f"kvbench_{secrets.token_hex(4)}"
                    with psycopg.connect(args.postgres_dsn, autocommit=True) as c:
                        c.execute(f"CREATE SCHEMA {schema}")
                    meta = PostgresMeta(make_conninfo(args.postgres_dsn, options=f"-c search_path={schema}"))
                try:
                    rows.append({"backend": backend, **run(meta, args.sales, threads)})
                finally:
                    meta.close()
                    if schema:
                        with psycopg.connect(args.postgres_dsn, autocommit=True) as c:
                            c.execute(f"DROP SCHEMA {schema} CASCADE")
            print(json.dumps(rows[-1]))
    result = {
        "benchmark": "market_ledger",
        "machine": platform.platform(),
        "python": platform.python_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
