"""Artifact size and KV codecs: bytes/token per dtype; ratio and encode/decode MB/s per codec;
greedy token agreement of the lossy int8 codec (never presented as exact).

The KV is real: the embedded SmolLM2 prefills a real document. bf16/fp16 figures cast that fp32 KV, a
fair proxy of what a bf16/fp16 model would store (the exponent/mantissa statistics are the model's).

    python -m benchmarks.codecs [--tokens 1024] [--json benchmarks/results/codecs.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kvagent import KVAgent, KVCache
from kvagent.artifacts.codecs import CODECS
from kvagent.engines.params import GenerationParams

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUESTIONS = ["Who founded the company?", "How much is a single adult fare?", "What happens to lost property?",
             "When do ferries leave in winter?"]


def measure(tensors: list[torch.Tensor], name: str, repeats: int) -> dict[str, Any]:
    codec = CODECS[name]
    raw = sum(t.numel() * t.element_size() for t in tensors)
    enc_t, dec_t = [], []
    blobs: list[bytes] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        blobs = [codec.encode(t) for t in tensors]
        enc_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = [
            codec.decode(memoryview(b), t.dtype, tuple(t.shape)) for b, t in zip(blobs, tensors, strict=True)
        ]
        dec_t.append(time.perf_counter() - t0)
    exact = all(
        torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(out, tensors, strict=True)
    )
    size = sum(len(b) for b in blobs)
    return {
        "codec": name,
        "lossless": codec.lossless,
        "bit_exact": exact,
        "ratio": raw / size,
        "encode_MBps": raw / statistics.median(enc_t) / 1e6,
        "decode_MBps": raw / statistics.median(dec_t) / 1e6,
        "raw_bytes": raw,
        "encoded_bytes": size,
    }


def int8_agreement(agent: KVAgent, kv: KVCache, new_tokens: int) -> dict[str, Any]:
    """Greedy tokens from the int8-roundtripped KV vs the exact KV, per question."""
    codec = CODECS["int8"]
    lossy = KVCache(
        keys=tuple(codec.decode(memoryview(codec.encode(k)), k.dtype, tuple(k.shape)) for k in kv.keys),
        values=tuple(codec.decode(memoryview(codec.encode(v)), v.dtype, tuple(v.shape)) for v in kv.values),
        token_ids=kv.token_ids,
    )
    params = GenerationParams(max_new_tokens=new_tokens, stop_token_ids=())
    same, prefix = 0, []
    for q in QUESTIONS:
        suffix = agent.template.question_ids(agent.tokenizer, q)
        a = agent.engine.generate(kv, suffix, params).token_ids
        b = agent.engine.generate(lossy, suffix, params).token_ids
        same += sum(x == y for x, y in zip(a, b, strict=True))
        prefix.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a)))
    total = new_tokens * len(QUESTIONS)
    return {"questions": len(QUESTIONS), "new_tokens": new_tokens, "position_match_rate": same / total,
            "tokens_before_first_divergence": prefix, "all_identical": all(p == new_tokens for p in prefix)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/codecs.json"))
    args = p.parse_args(argv)
    from tests.conftest import long_text

    agent = KVAgent(cache_dir=tempfile.mkdtemp(prefix="kvagent-codecs-"))
    ids = agent.document_ids(long_text(args.tokens + 64, agent.tokenizer))[: args.tokens]
    kv = agent.engine.prefill(ids)
    rows = []
    for dname, dt in DTYPES.items():
        tensors = [t.to(dt).contiguous() for t in (*kv.keys, *kv.values)]
        per_token = sum(t.numel() * t.element_size() for t in tensors) // args.tokens
        for name in CODECS:
            r = measure(tensors, name, args.repeats)
            rows.append({"dtype": dname, "bytes_per_token": per_token, **r})
            print(f"{dname:9} {name:12} ratio {r['ratio']:.3f}  enc {r['encode_MBps']:6.0f} MB/s  "
                  f"dec {r['decode_MBps']:6.0f} MB/s  exact={r['bit_exact']}", file=sys.stderr, flush=True)
    agreement = int8_agreement(agent, kv, 32)
    result = {
        "benchmark": "codecs",
        "model": agent.loaded.name,
        "tokens": args.tokens,
        "threads": torch.get_num_threads(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        "int8_greedy": agreement,
    }
    agent.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"KV codecs on {args.tokens} tokens of real SmolLM2 KV (median of {args.repeats})")
    for col in ("dtype", "B/token", "codec", "lossless", "ratio", "encode MB/s", "decode MB/s"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            r["dtype"],
            f"{r['bytes_per_token']:,}",
            r["codec"],
            "yes" if r["lossless"] else "NO (lossy)",
            f"{r['ratio']:.3f}",
            f"{r['encode_MBps']:.0f}",
            f"{r['decode_MBps']:.0f}",
        )
    Console().print(t)
    print(
        f"int8 (lossy) greedy agreement vs exact KV: {agreement['position_match_rate']:.1%} of positions, "
        f"tokens before first divergence {agreement['tokens_before_first_divergence']} of "
        f"{agreement['new_tokens']}"
    )
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
