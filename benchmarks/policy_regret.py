"""Regret of the cost policy: what a new process chooses by default vs the faster of the forced paths.

One run, real processes, a real registry (``python -m kvagent.server`` on loopback, started here):

1. agent A (its own process) reads and publishes one document per length;
2. per link — ``loopback`` (direct) and ``throttled`` (a rate-limiting TCP proxy in this process, 10 MB/s
   from server to client by default) — one warm-up process reads another document (so "an earlier process
   on the machine has read one document"), then per length three *new* processes B read the document:
   the default policy, a forced fetch (``PolicyParams(min_tokens=0, prefill_tokens_per_s=1,
   bandwidth_bytes_per_s=1e15)``) and a forced local prefill (``PolicyParams(min_tokens=10**9)``), each
   with an empty cache dir and the machine's shared calibration file; every mode runs ``--repeats`` times with
   the order rotated each round, and their medians are compared: regret = default / faster forced;
3. a stalled registry (a socket that accepts and never answers): one process reads three documents,
   then a second process three more; each read reports how long it waited for the registry
   (``CacheInfo.lookup_seconds``) and is compared with a local-only prefill of the same ids.

4. the chat endpoint of a long-running host (``benchmarks.policy_regret_endpoint``): three ``kvagent serve``
   hosts, one per mode, after a history of chats; the same medians and regret.

    python -m benchmarks.policy_regret [--lengths 256,512,1024,2048,4096] [--throttle-mbps 10] [--repeats 3]
    python -m benchmarks.policy_regret --endpoint-only [--endpoint-lengths 512,1024,2048] [--history 5]

The default column measures the policy the resolver uses: with ``kvagent.costs.calibration.CostModel`` wired
into ``kvagent.reuse.resolver`` it is the calibrated one; before that, the in-process rates and built-in
constants (the JSON records which). Times are ``KVAgent.read`` wall time, model load excluded.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.registry_server import free_port, start_server  # noqa: E402

TOKEN = "tok-bench"
TOKENS = {TOKEN: {"principal": "bench", "publish": True}}
MODES = ("default", "fetch", "prefill")


# -- documents -----------------------------------------------------------------------------------
@functools.cache
def _tokenizer() -> Any:
    from kvagent.config import Config
    from kvagent.models import load_model

    return load_model(None, Config.resolve().models_dir).tokenizer


def documents(lengths: list[int], out_dir: Path, tag: str) -> dict[int, Path]:
    """One text per length (distinct first line, so no two share a block prefix), about that many tokens."""
    tok = _tokenizer()
    paras = [p for p in (REPO / "kvagent" / "data" / "sample.txt").read_text().split("\n\n") if p.strip()]
    files = {}
    for n in lengths:
        out, i = [f"Document {tag}-{n}."], 0
        while len(tok.encode("\n\n".join(out), add_special_tokens=False)) < n:
            out.append(f"Section {i + 1}. {paras[i % len(paras)]}")
            i += 1
        ids = tok.encode("\n\n".join(out), add_special_tokens=False)[:n]
        path = out_dir / f"{tag}-{n}.txt"
        path.write_text(tok.decode(ids))
        files[n] = path
    return files


# -- a throttled link and a stalled registry -----------------------------------------------------
class Throttle:
    """A loopback TCP proxy limiting server→client bytes to ``rate`` bytes/s (a token bucket per proxy)."""

    def __init__(self, upstream_port: int, rate: float) -> None:
        self.upstream_port, self.rate = upstream_port, rate
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._next = 0.0
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, limit: bool) -> None:
            try:
                while data := await src.read(16384):
                    if limit:
                        now = time.monotonic()
                        self._next = max(self._next, now) + len(data) / self.rate
                        await asyncio.sleep(self._next - now)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w, False), pipe(up_r, writer, True))


def stalled_registry() -> str:
    """A socket on loopback that accepts connections and never answers (they stay open until exit)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []

    def accept_forever() -> None:
        while True:
            held.append(srv.accept()[0])

    threading.Thread(target=accept_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}"


# -- child processes -----------------------------------------------------------------------------
def child(args: argparse.Namespace) -> int:
    """One new process: read documents with one policy; print one JSON line per read."""
    from kvagent import KVAgent
    from kvagent.costs.policy import PolicyParams

    params = {
        "default": PolicyParams(),
        "fetch": PolicyParams(min_tokens=0, prefill_tokens_per_s=1.0, bandwidth_bytes_per_s=1e15),
        "prefill": PolicyParams(min_tokens=10**9),
    }[args.mode]
    agent = KVAgent(cache_dir=args.cache_dir, registry_url=args.registry, token=TOKEN, policy=params,
                    publish="public" if args.publish else False)
    local = None
    if args.baseline:
        local = KVAgent(
            agent.loaded.model,
            tokenizer=agent.tokenizer,
            cache_dir=Path(args.cache_dir) / "baseline",
            local_only=True,
        )
    for f in args.files:
        text = Path(f).read_text()
        t0 = time.perf_counter()
        doc = agent.read(text)
        seconds = time.perf_counter() - t0
        rec: dict[str, Any] = {
            "file": f,
            "tokens": doc.n_tokens,
            "seconds": seconds,
            "status": doc.cache.status,
            "reason": doc.cache.reason,
            "lookup_seconds": doc.cache.lookup_seconds,
            "stages": dict(doc.cache.stages),
            "predicted_seconds": doc.cache.predicted_seconds,
        }
        if local is not None:
            t1 = time.perf_counter()
            local.read(text)
            rec["prefill_seconds"] = time.perf_counter() - t1
        print(json.dumps(rec), flush=True)
    agent.close()
    return 0


def spawn(mode: str, files: list[Path], registry: str, calibration: Path, *, publish: bool = False,
          baseline: bool = False) -> list[dict[str, Any]]:
    cache = tempfile.mkdtemp(prefix=f"regret-{mode}-")
    cmd = [sys.executable, "-m", "benchmarks.policy_regret", "child", "--mode", mode, "--registry", registry,
           "--cache-dir", cache, *(["--publish"] if publish else []), *(["--baseline"] if baseline else []),
           *map(str, files)]
    env = {**os.environ, "KVAGENT_CALIBRATION": str(calibration), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


# -- the experiment ------------------------------------------------------------------------------
def regret_row(n: int, f: Path, url: str, calibration: Path, repeats: int) -> dict[str, Any]:
    """Every mode ``repeats`` times, each in a new process, the order rotated every round (default, fetch,
    prefill;
    fetch, prefill, default; ...), so that no mode always runs first or right after another; medians
    compared."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for i in range(repeats):
        for mode in MODES[i % len(MODES):] + MODES[:i % len(MODES)]:
            runs[mode].append(spawn(mode, [f], url, calibration)[0])
    row: dict[str, Any] = {"tokens": n}
    for mode, recs in runs.items():
        row[mode] = statistics.median(r["seconds"] for r in recs)
        row[f"{mode}_all"] = [r["seconds"] for r in recs]
        row[f"{mode}_lookup_all"] = [r.get("lookup_seconds", 0.0) for r in recs]
        row[f"{mode}_stages_all"] = [r.get("stages", {}) for r in recs]  # where a slow run's seconds went
        if mode == "default":  # the default's own prediction of its path, against what the read took
            row["default_predicted_all"] = [r.get("predicted_seconds", 0.0) for r in recs]
        row[f"{mode}_status"] = recs[0]["status"]
    statuses = {r["status"] for r in runs["default"]}
    if len(statuses) > 1:  # the default changed its mind between runs: say so rather than hide it
        row["default_status"] = "/".join(sorted(statuses))
    row["default_reason"] = runs["default"][0]["reason"]
    row["regret"] = row["default"] / min(row["fetch"], row["prefill"])
    return row


def resolver_is_calibrated() -> bool:
    src = (
        (REPO / "kvagent" / "resolver.py").read_text() if (REPO / "kvagent" / "resolver.py").exists() else ""
    )
    return "CostModel" in src


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "child":
        p = argparse.ArgumentParser()
        p.add_argument("child")
        p.add_argument("--mode", choices=MODES, required=True)
        p.add_argument("--registry", required=True)
        p.add_argument("--cache-dir", required=True)
        p.add_argument("--publish", action="store_true")
        p.add_argument("--baseline", action="store_true")
        p.add_argument("files", nargs="+")
        return child(p.parse_args())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="256,512,1024,2048,4096")
    p.add_argument("--throttle-mbps", type=float, default=10.0)
    p.add_argument("--warm-tokens", type=int, default=1024, help="the warm-up document's length")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs (new processes) per mode, the order rotated each round; medians compared")
    p.add_argument(
        "--stall-lengths",
        default="384,768,1536,400,800,1600",
        help="documents read against the stalled registry: half by a first process, half by a second",
    )
    p.add_argument(
        "--stall-only",
        action="store_true",
        help="re-measure only the stalled registry (after one warm-up read), keeping --out's regret table",
    )
    p.add_argument("--endpoint-lengths", default="512,1024,2048",
                   help="document lengths asked through the chat endpoint of a long-running host")
    p.add_argument("--history", type=int, default=5, help="chats each host serves before the documents")
    p.add_argument("--no-endpoint", action="store_true", help="leave out the chat endpoint")
    p.add_argument("--endpoint-only", action="store_true",
                   help="measure only the chat endpoint, keeping --out's other results")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "policy_regret.json")
    p.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "results" / "policy_regret.png")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    work = Path(tempfile.mkdtemp(prefix="policy-regret-"))
    calibration = work / "calibration.json"  # the machine's shared calibration, fresh for this run
    docs = documents(lengths, work, "doc")
    warm = documents([args.warm_tokens], work, "warm")[args.warm_tokens]
    stall_docs = list(documents([int(x) for x in args.stall_lengths.split(",")], work, "stall").values())
    half = len(stall_docs) // 2
    server = start_server(work / "registry", TOKENS)
    result: dict[str, Any] = {"calibrated_resolver": resolver_is_calibrated(), "lengths": lengths,
                              "throttle_MBps": args.throttle_mbps, "links": {},
                              "run_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.stall_only:  # keep the previous run's regret table; this run re-measures the stalled registry
        result = {**json.loads(args.out.read_text()), "stalled_run_at": result["run_at"]}
    if args.endpoint_only:
        from benchmarks import policy_regret_endpoint as ep

        previous = json.loads(args.out.read_text()) if args.out.exists() else {}
        ends = [int(x) for x in args.endpoint_lengths.split(",")]
        server.stop()
        previous["endpoint"] = {**ep.endpoint_regret(ends, args.repeats, args.history, work, documents),
                                "run_at": result["run_at"]}
        args.out.write_text(json.dumps(previous, indent=2))
        ep.table(previous["endpoint"])
        return 0
    try:
        if args.stall_only:
            # an earlier process on this machine read one document
            spawn("default", [warm], server.url, calibration)
        else:
            spawn(
                "default",
                [*docs.values(), warm],
                server.url,
                work / "publisher-calibration.json",
                publish=True,
            )
        throttle = Throttle(server.port, args.throttle_mbps * 1e6)
        for link, url in () if args.stall_only else (("loopback", server.url), ("throttled", throttle.url)):
            rows = []
            spawn("default", [warm], url, calibration)  # an earlier process on this machine read one document
            for n, f in docs.items():
                row = regret_row(n, f, url, calibration, args.repeats)
                rows.append(row)
                print(
                    f"{link:9s} {n:5d} tokens: default {row['default_status']:8s} {row['default']:6.2f} s, "
                    f"fetch {row['fetch']:6.2f} s, prefill {row['prefill']:6.2f} s, regret "
                    f"{row['regret']:.2f}x "
                    f"(runs: {', '.join(str(len(row[m + '_all'])) for m in MODES)})",
                    flush=True,
                )
            result["links"][link] = rows
        dead = stalled_registry()
        first = spawn("default", stall_docs[:half], dead, calibration, baseline=True)
        second = spawn("default", stall_docs[half:], dead, calibration, baseline=True)
        result["stalled"] = [
            {
                "process": 1 if i < half else 2,
                "tokens": r["tokens"],
                "seconds": r["seconds"],
                "prefill_seconds": r["prefill_seconds"],
                "added_seconds": r["seconds"] - r["prefill_seconds"],
                "lookup_seconds": r["lookup_seconds"],
                "reason": r["reason"],
            }
            for i, r in enumerate(first + second)
        ]
        for r in result["stalled"]:
            print(
                f"stalled registry, process {r['process']}, {r['tokens']} tokens: waited "
                f"{r['lookup_seconds']:.2f} s "
                f"before prefilling; read {r['added_seconds']:+.2f} s vs a local-only read "
                f"({r['reason'][-120:]})",
                flush=True,
            )
    finally:
        server.stop()
    from benchmarks import policy_regret_endpoint as ep

    # every default read checked against its prediction (the forced modes fix their rates: nothing predicted)
    result["sdk_distribution"] = ep.distribution(calibration)
    if not args.no_endpoint and not args.stall_only:
        ends = [int(x) for x in args.endpoint_lengths.split(",")]
        result["endpoint"] = ep.endpoint_regret(ends, args.repeats, args.history, work, documents)
    args.out.write_text(json.dumps(result, indent=2))
    table(result)
    ep.print_distribution("SDK reads (default policy)", result["sdk_distribution"])
    if "endpoint" in result:
        ep.table(result["endpoint"])
    plot(result, args.plot)
    return 0


def table(result: dict[str, Any]) -> None:
    print("\n| link | tokens | default chose | default | forced fetch | forced prefill | regret |")
    print("|---|---|---|---|---|---|---|")
    for link, rows in result["links"].items():
        for r in rows:
            print(
                f"| {link} | {r['tokens']:,} | {r['default_status']} | {r['default']:.2f} s | "
                f"{r['fetch']:.2f} s | "
                f"{r['prefill']:.2f} s | {r['regret']:.2f}x |"
            )
    worst = max(r["regret"] for rows in result["links"].values() for r in rows)
    print(f"\nworst regret {worst:.2f}x (goal ≤ 1.25x); calibrated resolver: {result['calibrated_resolver']}")
    stalled = result.get("stalled", [])
    if stalled:
        waits, added = [r["lookup_seconds"] for r in stalled], [r["added_seconds"] for r in stalled]
        print(
            f"stalled registry: the first read waited {waits[0]:.2f} s for it, later reads at most "
            f"{max(waits[1:]):.2f} s "
            f"(goal ≤ 1 s); read time over a local-only read of the same document: first {added[0]:+.2f} s, "
            "later "
            f"{', '.join(f'{a:+.2f}' for a in added[1:])} s (prefill's own run-to-run spread included)"
        )


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(result["links"]), figsize=(5 * len(result["links"]), 4), sharey=True)
    for ax, (link, rows) in zip(
        axes if len(result["links"]) > 1 else [axes], result["links"].items(), strict=True
    ):
        xs = [r["tokens"] for r in rows]
        for mode, style in (("fetch", "s--"), ("prefill", "^--"), ("default", "o-")):
            ax.plot(
                xs,
                [r[mode] for r in rows],
                style,
                label=f"{mode}" if mode != "default" else "default (new process)",
            )
        ax.set_xscale("log", base=2)
        ax.set_title(f"{link}: worst regret {max(r['regret'] for r in rows):.2f}x")
        ax.set_xlabel("document tokens")
        ax.grid(alpha=0.3)
    (axes[0] if len(result["links"]) > 1 else axes).set_ylabel("KVAgent.read seconds")
    axes[-1].legend() if len(result["links"]) > 1 else axes.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
