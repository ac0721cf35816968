"""Registry load on loopback: lookup throughput and latency under many concurrent clients, and blob
fetch throughput. Bounded in requests and time; talks only to a server process it starts on 127.0.0.1.

    python -m benchmarks.registry_load [--clients 64] [--requests 6400] [--blob-mb 48]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from kvagent import artifact as art
from kvagent.kv import KVCache
from kvagent.registry import RegistryClient

TOKENS = {"tok-publisher": {"principal": "publisher", "publish": True}, "tok-reader": {"principal": "reader", "publish": False}}
FP = "ab" * 32


def synthetic_artifact(tokens: int, layers: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    kv = KVCache(
        keys=tuple(torch.randn(1, 3, tokens, 64, generator=g) for _ in range(layers)),
        values=tuple(torch.randn(1, 3, tokens, 64, generator=g) for _ in range(layers)),
        token_ids=torch.randint(0, 49152, (tokens,), generator=g),
    )
    return art.encode(kv, model_fingerprint=FP, tokenizer_fingerprint=FP, template_hash=FP)[1]


async def lookups(url: str, keys: list[str], clients: int, total: int, max_seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(total))
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer tok-reader"}, limits=limits,
                                 timeout=30) as client:

        async def worker() -> None:
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                key = keys[i % len(keys)] if i % 10 else secrets.token_hex(32)  # 1 in 10 is a miss
                t0 = time.perf_counter()
                resp = await client.get(f"/v1/artifacts/{key}")
                latencies.append(time.perf_counter() - t0)
                statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "seconds": wall, "requests_per_s": len(lat) / wall,
            "p50_ms": 1e3 * lat[len(lat) // 2], "p99_ms": 1e3 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "max_ms": 1e3 * lat[-1], "statuses": statuses}


def blob_fetch(url: str, key: str, size: int, repeats: int) -> dict[str, Any]:
    times = []
    with RegistryClient(url, token="tok-reader") as client:
        handle = client.lookup(key)
        assert handle is not None
        for _ in range(repeats):
            t0 = time.perf_counter()
            data = client.download_blob(handle)
            times.append(time.perf_counter() - t0)
            assert len(data) == size
    med = statistics.median(times)
    return {"bytes": size, "repeats": repeats, "median_s": med, "MBps": size / med / 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=6400)
    p.add_argument("--max-seconds", type=float, default=60)
    p.add_argument("--artifacts", type=int, default=32)
    p.add_argument("--blob-tokens", type=int, default=1024, help="tokens of the fetched artifact (46 KB each)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/registry_load.json"))
    args = p.parse_args(argv)
    from tests.registry_server import start_server

    work = Path(tempfile.mkdtemp(prefix="kvagent-load-"))
    server = start_server(work / "data", TOKENS)
    try:
        keys = []
        with RegistryClient(server.url, token="tok-publisher") as pub:
            for i in range(args.artifacts):
                keys.append(pub.publish(synthetic_artifact(8, 2, seed=i), visibility="public").key)
            big = synthetic_artifact(args.blob_tokens, 30, seed=10_000)
            big_key = pub.publish(big, visibility="public").key
        load = asyncio.run(lookups(server.url, keys, args.clients, args.requests, args.max_seconds))
        fetch = blob_fetch(server.url, big_key, len(big), repeats=5)
    finally:
        server.stop()
    result = {"benchmark": "registry_load", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "lookup": load, "blob_fetch": fetch}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"lookups: {load['requests']} requests from {load['clients']} concurrent clients in {load['seconds']:.1f} s "
          f"= {load['requests_per_s']:.0f} req/s; p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms, "
          f"max {load['max_ms']:.1f} ms; statuses {load['statuses']}")
    print(f"blob fetch: {fetch['bytes'] / 1e6:.1f} MB in {fetch['median_s'] * 1e3:.0f} ms = {fetch['MBps']:.0f} MB/s (median of 5)")
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
