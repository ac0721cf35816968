"""Registry load on loopback, measured with ``wrk`` (a compiled load generator, not a Python client on the
same cores): lookups/s and p50/p99 latency for 1 vs 2 worker processes at 64 connections, then blob
download MB/s through the app (local blobs) vs through presigned S3 URLs (moto_server on loopback, or the
S3 server ``KVAGENT_TEST_S3_URL`` names with its AWS_* credentials, e.g. the Ceph RGW of
benchmarks/ceph_rgw.sh),
each with the kvagent client and with curl. Talks only to processes on 127.0.0.1; every run is bounded in
time.

    python -m benchmarks.registry_load [--connections 64] [--seconds 20] [--threads 2]

Needs ``wrk`` (apt-get install wrk) and, for the presigned figure, ``moto_server`` (pip install
'moto[server]').
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import torch

from kvagent.artifacts import format as art
from kvagent.client.registry import RegistryClient
from kvagent.kvcache.tensors import KVCache

TOKENS = {"tok-publisher": {"principal": "publisher", "publish": True},
          "tok-reader": {"principal": "reader", "publish": False}}
FP = "ab" * 32
LUA = """
local keys = {%s}
local i = 0
wrk.headers["Authorization"] = "Bearer tok-reader"
request = function()
  i = i + 1
  local key = keys[(i %% #keys) + 1]
  if i %% 10 == 0 then key = string.rep("0", 64) end -- 1 in 10 is a miss
  return wrk.format("GET", "/v1/artifacts/" .. key)
end
"""


def synthetic_artifact(tokens: int, layers: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    kv = KVCache(
        keys=tuple(torch.randn(1, 3, tokens, 64, generator=g) for _ in range(layers)),
        values=tuple(torch.randn(1, 3, tokens, 64, generator=g) for _ in range(layers)),
        token_ids=torch.randint(0, 49152, (tokens,), generator=g),
    )
    return art.encode(kv, model_fingerprint=FP, tokenizer_fingerprint=FP, template_hash=FP)[1]


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/s, p50/p99 latency (ms), request count and non-2xx/3xx count from ``wrk --latency`` output."""
    lat = {p: _ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    if not (rps and total and "50" in lat and "99" in lat):
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    return {"requests_per_s": float(rps.group(1)), "p50_ms": lat["50"], "p99_ms": lat["99"],
            "requests": int(total.group(1)), "non_2xx_3xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errors.group(0) if errors else None}


def wrk_lookups(
    url: str, keys: list[str], connections: int, threads: int, seconds: int, work: Path
) -> dict[str, Any]:
    script = work / "lookup.lua"
    script.write_text(LUA % ",".join(f'"{k}"' for k in keys))
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s",
           "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    return {**parse_wrk(out), "connections": connections, "threads": threads, "seconds": seconds}


def publish_set(url: str, n: int, big_tokens: int) -> tuple[list[str], str, int]:
    with RegistryClient(url, token="tok-publisher") as pub:
        keys = [pub.publish(synthetic_artifact(8, 2, seed=i), visibility="public").key for i in range(n)]
        big = synthetic_artifact(big_tokens, 30, seed=10_000)
        return keys, pub.publish(big, visibility="public").key, len(big)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its children (Linux /proc; 0.0 elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def blob_fetch(url: str, key: str, size: int, repeats: int, server_pid: int | None = None) -> dict[str, Any]:
    """Median download time of one blob, and the registry's CPU seconds per GB downloaded (``server_pid``)."""
    times = []
    cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
    with RegistryClient(url, token="tok-reader") as client:
        handle = client.lookup(key)
        assert handle is not None
        for _ in range(repeats):
            t0 = time.perf_counter()
            data = client.download_blob(handle).data
            times.append(time.perf_counter() - t0)
            assert len(data) == size
    med = statistics.median(times)
    out = {"bytes": size, "repeats": repeats, "median_s": med, "MBps": size / med / 1e6}
    if server_pid:
        out["registry_cpu_s_per_GB"] = (cpu_seconds(server_pid) - cpu0) / (size * repeats / 1e9)
    if shutil.which("curl"):  # a compiled client too: the Python client's own ceiling is not the server's
        blob_url = urljoin(url.rstrip("/") + "/", handle.blob_url)
        curl = statistics.median(curl_download(blob_url, size) for _ in range(repeats))
        out["curl_MBps"] = size / curl / 1e6
    return out


def curl_download(url: str, size: int) -> float:
    """Seconds for ``curl`` to download a blob: the registry's answer, and for a redirect the presigned URL it
    names
    (fetched without the bearer token, as the kvagent client does)."""
    t0 = time.perf_counter()
    cmd = [
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download} %{redirect_url}",
        "--max-time",
        "120",
    ]
    status, got, *location = subprocess.run([*cmd, "-H", "Authorization: Bearer tok-reader", url],
                                            capture_output=True, text=True, check=True).stdout.split()
    if status in ("302", "303", "307") and location:
        status, got, *_ = subprocess.run(
            [*cmd, location[0]], capture_output=True, text=True, check=True
        ).stdout.split()
    seconds = time.perf_counter() - t0
    if status != "200" or int(got) != size:
        raise RuntimeError(f"curl got HTTP {status} and {got} of {size} bytes from {url}")
    return seconds


def presigned_fetch(work: Path, blob_tokens: int, store_name: str | None) -> dict[str, Any]:
    """Blob MB/s through a presigned URL: the registry on an S3 bucket of moto_server on loopback, or of the
    server ``KVAGENT_TEST_S3_URL`` names (with its AWS_* credentials), e.g. benchmarks/ceph_rgw.sh's Ceph
    RGW."""
    from tests.registry_server import start_server
    from tests.s3_server import aws_env, new_bucket, s3_endpoint

    with ExitStack() as stack:
        s3 = stack.enter_context(s3_endpoint(work))
        stack.enter_context(aws_env(s3))
        srv = start_server(work / "s3", TOKENS, extra_args=["--blobs", f"s3://{new_bucket(s3)}/kv"])
        try:
            _, big_key, big_size = publish_set(srv.url, 1, blob_tokens)
            return {**blob_fetch(srv.url, big_key, big_size, repeats=5, server_pid=srv.proc.pid),
                    "object_store": store_name or f"the S3 API server at {s3}"}
        finally:
            srv.stop()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--workers", default="1,2", help="worker counts to compare")
    p.add_argument("--artifacts", type=int, default=32)
    p.add_argument(
        "--blob-tokens", type=int, default=1024, help="tokens of the fetched artifact (46 KB each)"
    )
    p.add_argument("--skip-presigned", action="store_true", help="no S3 (moto_server) run")
    p.add_argument(
        "--object-store", help="what KVAGENT_TEST_S3_URL runs, for the record (e.g. 'Ceph RGW 16.2')"
    )
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/registry_load.json"))
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    from tests.registry_server import start_server

    work = Path(tempfile.mkdtemp(prefix="kvagent-load-"))
    result: dict[str, Any] = {"benchmark": "registry_load", "cpus": os.cpu_count(),
                              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "lookup": {}}
    for workers in [int(w) for w in args.workers.split(",")]:
        srv = start_server(
            work / f"w{workers}", TOKENS, extra_args=["--workers", str(workers), "--log-level", "warning"]
        )
        try:
            keys, big_key, big_size = publish_set(srv.url, args.artifacts, args.blob_tokens)
            wrk_lookups(srv.url, keys, args.connections, args.threads, 3, work)  # warm-up
            load_before = load_average()
            r = wrk_lookups(srv.url, keys, args.connections, args.threads, args.seconds, work)
            result["lookup"][f"{workers}_workers"] = {**r, "load_average_before": load_before}
            if workers == 1:
                result["blob_through_app"] = blob_fetch(
                    srv.url, big_key, big_size, repeats=5, server_pid=srv.proc.pid
                )
        finally:
            srv.stop()
    if not args.skip_presigned:
        named = os.environ.get("KVAGENT_TEST_S3_URL")
        result["blob_presigned"] = presigned_fetch(
            work,
            args.blob_tokens,
            args.object_store or (None if named else "moto_server (Python) on loopback"),
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result["lookup"].items():
        print(
            f"lookups, {name.replace('_', ' ')}: {r['requests_per_s']:.0f} req/s, p50 {r['p50_ms']:.1f} ms, "
            f"p99 {r['p99_ms']:.1f} ms ({r['requests']} requests, {r['connections']} connections, "
            f"wrk -t{r['threads']} {r['seconds']} s; load average before {r['load_average_before']})"
        )
    for name in ("blob_through_app", "blob_presigned"):
        if name not in result:
            continue
        b = result[name]
        print(
            f"{name.replace('_', ' ')}: {b['bytes'] / 1e6:.0f} MB in {b['median_s'] * 1e3:.0f} ms = "
            f"{b['MBps']:.0f} MB/s; "
            f"with curl {b.get('curl_MBps', float('nan')):.0f} MB/s; "
            f"registry CPU {b.get('registry_cpu_s_per_GB', float('nan')):.2f} s per GB served"
        )
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
