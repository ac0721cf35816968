"""Forced-fetch reads of one published artifact, repeated: where does a read's time go, and which stage
varies?

A registry (``python -m kvagent.server`` on loopback, started here) holds one document published by agent A.
Then ``--repeats`` reads, each by a fresh ``KVAgent`` with an empty cache dir (so every read fetches, verifies
and
stores the artifact) and a forced fetch (``PolicyParams(min_tokens=0, prefill_tokens_per_s=1,
bandwidth_bytes_per_s=1e15)``), record ``CacheInfo.stages``. ``--new-process`` runs each read in its own
process,
as ``benchmarks/policy_regret`` does. The goal (issue 26): repeats vary by less than 1.5x.

    python -m benchmarks.fetch_stages [--tokens 1730] [--repeats 8] [--new-process]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.policy_regret import TOKEN, TOKENS, documents  # noqa: E402
from tests.registry_server import start_server  # noqa: E402

FORCED = dict(min_tokens=0, prefill_tokens_per_s=1.0, bandwidth_bytes_per_s=1e15)


def read_once(model: Any, tokenizer: Any, text: str, url: str, cache_dir: str) -> dict[str, Any]:
    from kvagent import KVAgent
    from kvagent.costs.policy import PolicyParams

    agent = KVAgent(model, tokenizer=tokenizer, cache_dir=cache_dir, registry_url=url, token=TOKEN,
                    policy=PolicyParams(**FORCED), publish=False)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    doc = agent.read(text)
    seconds = time.perf_counter() - t0
    agent.close()
    return {"seconds": seconds, "status": doc.cache.status, "stages": dict(doc.cache.stages),
            "bytes": doc.cache.bytes_read}


def child(args: argparse.Namespace) -> int:
    from kvagent.config import Config
    from kvagent.models import load_model

    loaded = load_model(None, Config.resolve().models_dir)
    print(json.dumps(read_once(loaded.model, loaded.tokenizer, Path(args.file).read_text(), args.registry,
                               tempfile.mkdtemp(prefix="fetch-stages-"))), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "child":
        p = argparse.ArgumentParser()
        p.add_argument("child")
        p.add_argument("--registry", required=True)
        p.add_argument("file")
        return child(p.parse_args())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1730)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument(
        "--new-process", action="store_true", help="each read in a new process (model load excluded)"
    )
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fetch_stages.json")
    args = p.parse_args(argv)
    from kvagent import KVAgent
    from kvagent.config import Config
    from kvagent.models import load_model

    work = Path(tempfile.mkdtemp(prefix="fetch-stages-"))
    doc = documents([args.tokens], work, "fetch")[args.tokens]
    server = start_server(work / "registry", TOKENS)
    rows: list[dict[str, Any]] = []
    try:
        loaded = load_model(None, Config.resolve().models_dir)
        publisher = KVAgent(loaded.model, tokenizer=loaded.tokenizer, cache_dir=work / "publisher",
                            registry_url=server.url, token=TOKEN, publish="public")
        publisher.read(doc.read_text())
        publisher.close()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        for i in range(args.repeats):
            if args.new_process:
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.fetch_stages",
                        "child",
                        "--registry",
                        server.url,
                        str(doc),
                    ],
                    cwd=REPO,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=1800,
                    check=True,
                )
                row = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
            else:
                row = read_once(
                    loaded.model, loaded.tokenizer, doc.read_text(), server.url, str(work / f"r{i}")
                )
            rows.append(row)
            print(f"read {i + 1}: {row['status']} {row['seconds']:.2f} s  "
                  + "  ".join(f"{k} {v:.2f}" for k, v in row["stages"].items()), flush=True)
    finally:
        server.stop()
    totals = [r["seconds"] for r in rows]
    stages = sorted({k for r in rows for k in r["stages"]})
    summary = {k: {"min": min(r["stages"].get(k, 0.0) for r in rows),
                   "median": statistics.median(r["stages"].get(k, 0.0) for r in rows),
                   "max": max(r["stages"].get(k, 0.0) for r in rows)} for k in stages}
    result = {
        "tokens": args.tokens,
        "new_process": args.new_process,
        "reads": rows,
        "stages": summary,
        "spread": max(totals) / min(totals),
        "run_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": os.getloadavg(),
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"\ntotal: min {min(totals):.2f} s, median {statistics.median(totals):.2f} s, max {max(totals):.2f} "
        "s "
        f"(max/min {result['spread']:.2f}x; goal < 1.5x); load average {os.getloadavg()[0]:.1f}"
    )
    for k, v in summary.items():
        print(f"  {k:13s} min {v['min']:.3f}  median {v['median']:.3f}  max {v['max']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
