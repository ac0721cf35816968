"""Prefill vs reuse, side by side in one run: time to first token and analytic FLOPs.

Three paths per document length, interleaved and repeated (median reported; the warm paths run as raw/SDK
pairs, alternating which goes first, ``--warm-repeats`` times, since they cost a second where a cold run costs
minutes; ``sdk_keeps`` is the ratio of the medians, ``sdk_keeps_paired`` the median of the pairs' ratios):

* cold  — full prefill of document + question ids, then the first token (what every agent does today);
* raw   — the document's KV already in memory, forward the question ids only (the paper's "reuse");
* sdk   — kvagent end to end on a store hit: key, store read, checksum, deserialise, resume, first token;
* sdk cold — kvagent reading a never-seen document (prefill + local store write) vs a plain prefill of it.

Then, per length, where a warm read spends its time (``warm_breakdown``, the SDK's own code path with
its stage timers): key, store lookup, read (open + map), header parse, integrity check, decode
(tensors + key re-derivation), LRU touch, building the transformers cache, resume (first token).

    python -m benchmarks.reuse_vs_prefill                         # embedded SmolLM2, fp32, CPU
    python -m benchmarks.reuse_vs_prefill --config qwen3-4b --dtype bfloat16 --device cuda
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
from pathlib import Path
from typing import Any

import torch

from kvagent import KVAgent
from kvagent.artifacts import format as art
from kvagent.engines.params import GenerationParams

PAPER_LENGTHS = [255, 485, 945, 1888, 3774]
ONE_TOKEN = GenerationParams(max_new_tokens=1, stop_token_ids=())
QUESTION = "Which vessel is the largest, and how many cars can it carry?"

QWEN3_4B = dict(  # Qwen/Qwen3-4B config.json (architecture only; weights are random)
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True,
)


def flops(n_params: int, layers: int, d_model: int, doc: int, suffix: int) -> tuple[float, float]:
    """(prefill, reuse) FLOPs: 2·P per token for the weights plus causal attention (QKᵀ and AV)."""
    n = doc + suffix
    prefill = 2 * n_params * n + 2 * layers * d_model * n * n
    reuse = 2 * n_params * suffix + 2 * layers * d_model * (n * n - doc * doc)
    return prefill, reuse


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def build(args: argparse.Namespace, cache_dir: Path) -> tuple[KVAgent, Any]:
    if args.config == "qwen3-4b":
        from transformers import AutoModelForCausalLM, Qwen3Config

        torch.manual_seed(0)
        cfg = Qwen3Config(**QWEN3_4B)
        model = (
            AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype or "bfloat16"))
            .to(args.device)
            .eval()
        )
        agent = KVAgent(model, tokenizer=None, cache_dir=cache_dir)
        return agent, None
    agent = KVAgent(args.model, cache_dir=cache_dir, dtype=args.dtype)
    if args.device != "cpu":  # the runtime's engine is built on the model where it is: move it, build again
        agent.loaded.model.to(args.device)
        agent = KVAgent(agent.loaded, cache_dir=cache_dir, dtype=args.dtype)
    return agent, agent.tokenizer


def document_ids(agent: KVAgent, tokenizer: Any, n: int, seed: int) -> list[int]:
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, agent.engine.config.vocab_size, (n,), generator=g).tolist()
    from tests.conftest import long_text

    return agent.document_ids(long_text(n + 64, tokenizer))[:n]


#: Stages of a warm read, in order (see ``warm_breakdown``).
STAGES = ("key", "lookup", "read", "parse", "integrity", "decode", "touch", "cache", "resume")


def warm_breakdown(agent: KVAgent, ids: list[int], suffix: list[int]) -> dict[str, float]:
    """Seconds per stage of one warm read from the local store through the first token."""
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    key = agent.key_of(ids)
    t["key"] = time.perf_counter() - t0
    found = agent.store.get(key, expect=agent.resolver.registry_tier.expect, timings=t)
    assert found.artifact is not None, found.reason
    kv = found.artifact.kv
    engine = agent.engine
    with torch.inference_mode():
        t0 = time.perf_counter()
        cache = engine.new_cache(kv)
        t1 = time.perf_counter()
        out = engine.forward(cache, input_ids=torch.tensor([suffix], device=engine.device), logits_to_keep=1)
        int(out.logits[0, -1].argmax())
        t2 = time.perf_counter()
    t.update(cache=t1 - t0, resume=t2 - t1)
    return {stage: t[stage] for stage in STAGES}


def breakdown_line(ms: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.1f}" for k, v in ms.items()) + f"  (ms; sum {sum(ms.values()):.1f})"


def sdk_path(agent: KVAgent, ids: list[int], suffix: list[int], want: list[int]) -> None:
    """kvagent end to end on a store hit: key, store read, checksum, deserialise, resume, first token.

    The caller empties the memory tier first (``agent.forget_memory()``), outside the clock: releasing the
    previous
    read's KV is no part of this read, as the raw path's KV, held throughout, is never released either.
    """
    handle = agent.read_ids(ids)
    assert handle.cache.status == "local", handle.cache.reason
    kv = agent.kv_of(handle)  # the memory tier now holds what read_ids loaded
    out = agent.engine.generate(kv, suffix, ONE_TOKEN).token_ids
    assert out == want, "first token after reuse differs from full prefill"


def forget_document(agent: KVAgent, ids: list[int]) -> None:
    """Make ``ids`` a never-seen document again (outside the clock: deleting is no part of a read)."""
    agent.forget_memory()
    agent.store.delete(agent.key_of(ids))


def sdk_cold_read(agent: KVAgent, ids: list[int]) -> None:
    """kvagent reading a never-seen document: key, lookups, prefill, local store write (encode, digests,
    file)."""
    handle = agent.read_ids(ids)
    assert handle.cache.status == "prefill", handle.cache.reason


#: What a cold SDK read adds to a prefill, timed apart (see ``cold_breakdown``).
COLD_STAGES = ("key", "lookup", "encode", "store")


def cold_breakdown(agent: KVAgent, ids: list[int], kv: Any) -> dict[str, float]:
    """Seconds per stage a cold read adds to its prefill: key, store lookup (a miss), encode, store write."""
    from kvagent.reuse.resolver import block_hashes

    forget_document(agent, ids)
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    key = agent.key_of(ids)
    t1 = time.perf_counter()
    missed = agent.store.get(key, expect=agent.resolver.registry_tier.expect)
    assert missed.artifact is None
    t2 = time.perf_counter()
    ctx = agent.resolver.context
    # as the read does: the buffers go to the store file without a joined copy
    header, parts = art.encode_parts(
        kv, key=key, model_fingerprint=ctx.model_fingerprint, tokenizer_fingerprint=ctx.tokenizer_fingerprint,
        template_hash=ctx.template_hash, position_offset=ctx.position_offset, codec=agent.config.codec)
    t3 = time.perf_counter()
    agent.store.put(header, parts, block_hashes(ctx, ids, agent.resolver.settings.block_size))
    t4 = time.perf_counter()
    t.update(key=t1 - t0, lookup=t2 - t1, encode=t3 - t2, store=t4 - t3)
    return t


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    cache_dir = Path(tempfile.mkdtemp(prefix="kvagent-bench-"))
    agent, tok = build(args, cache_dir)
    engine = agent.engine
    model = agent.loaded.model
    n_params = sum(p.numel() for p in model.parameters())
    cfg = engine.config.get_text_config(decoder=True)
    suffix = agent.template.question_ids(tok, QUESTION) if tok is not None else list(range(1, 14))
    rows = []
    for n in args.lengths:
        ids = document_ids(agent, tok, n, seed=n)
        handle = agent.read_ids(ids)  # prefill + store once (not timed)
        kv = engine.prefill(ids)
        first_cold = engine.generate(None, ids + suffix, ONE_TOKEN).token_ids
        cold, raw, sdk, prefill, sdk_cold = [], [], [], [], []

        def warm_pair(i: int, ids: list[int] = ids, kv: Any = kv, want: list[int] = first_cold,
                      raw: list[float] = raw, sdk: list[float] = sdk) -> None:
            """raw then SDK, or SDK then raw (alternating), back to back: a pair shares the machine's
            state."""
            for path in ("raw", "sdk") if i % 2 == 0 else ("sdk", "raw"):
                if path == "raw":
                    raw.append(_timed(lambda: engine.generate(kv, suffix, ONE_TOKEN)))
                else:
                    agent.forget_memory()
                    sdk.append(_timed(lambda: sdk_path(agent, ids, suffix, want)))

        for i in range(args.repeats):
            cold.append(_timed(lambda ids=ids: engine.generate(None, ids + suffix, ONE_TOKEN)))
            warm_pair(i)
            if not args.skip_sdk_cold:  # alternating which goes first, as the warm pairs do
                for path in ("prefill", "sdk") if i % 2 == 0 else ("sdk", "prefill"):
                    if path == "prefill":
                        prefill.append(_timed(lambda ids=ids: engine.prefill(ids)))
                    else:
                        forget_document(agent, ids)
                        sdk_cold.append(_timed(lambda ids=ids: sdk_cold_read(agent, ids)))
        # warm pairs cost ~1 s, a cold one minutes
        for i in range(args.repeats, max(args.repeats, args.warm_repeats)):
            warm_pair(i)
        if sdk_cold:  # what the cold read stored resumes to the same first token
            assert engine.generate(agent.kv_of(handle), suffix, ONE_TOKEN).token_ids == first_cold
        stages = [warm_breakdown(agent, ids, suffix) for _ in range(args.repeats)]
        breakdown = {k: statistics.median(b[k] for b in stages) * 1000 for k in STAGES}
        f_pre, f_reuse = flops(n_params, cfg.num_hidden_layers, cfg.hidden_size, n, len(suffix))
        c, r, s = statistics.median(cold), statistics.median(raw), statistics.median(sdk)
        row = {
            "tokens": n,
            "suffix_tokens": len(suffix),
            "cold_s": c,
            "raw_reuse_s": r,
            "sdk_warm_s": s,
            "raw_ratio": c / r,
            "sdk_ratio": c / s,
            "sdk_keeps": (c / s) / (c / r),
            "flops_prefill": f_pre,
            "flops_reuse": f_reuse,
            "flops_ratio": f_pre / f_reuse,
            "kv_bytes": kv.nbytes,
            "artifact_key": handle.key,
            "cold_all_s": cold,
            "raw_all_s": raw,
            "sdk_all_s": sdk,
            "sdk_over_raw": r / s,
            "sdk_breakdown_ms": breakdown,
            "warm_pairs": len(sdk),
            "sdk_keeps_paired": statistics.median(a / b for a, b in zip(raw, sdk, strict=True)),
        }
        if sdk_cold:  # the cold path kept honest: a never-seen document read by the SDK vs a plain prefill
            cold_stages = [cold_breakdown(agent, ids, kv) for _ in range(args.repeats)]
            row.update(
                prefill_s=statistics.median(prefill),
                sdk_cold_s=statistics.median(sdk_cold),
                prefill_all_s=prefill,
                sdk_cold_all_s=sdk_cold,
                sdk_cold_over_prefill=statistics.median(sdk_cold) / statistics.median(prefill),
                sdk_cold_paired=statistics.median(b / a for a, b in zip(prefill, sdk_cold, strict=True)),
                sdk_cold_breakdown_ms={
                    k: statistics.median(b[k] for b in cold_stages) * 1000 for k in COLD_STAGES
                },
            )
        rows.append(row)
        if sdk_cold:
            print(
                f"        SDK cold read {row['sdk_cold_s'] * 1000:8.1f} ms = "
                f"{row['sdk_cold_over_prefill']:.1%} of a plain prefill "
                f"(paired {row['sdk_cold_paired']:.1%}); added to the prefill: "
                f"{breakdown_line(row['sdk_cold_breakdown_ms'])}",
                file=sys.stderr,
                flush=True,
            )
        print(
            f"{n:>6} tokens  cold {c * 1000:8.1f} ms  raw {r * 1000:7.1f} ms ({row['raw_ratio']:5.1f}x)  "
            f"sdk {s * 1000:7.1f} ms ({row['sdk_ratio']:5.1f}x, keeps {row['sdk_keeps']:.1%}, "
            f"paired {row['sdk_keeps_paired']:.1%} over {len(sdk)} pairs)  "
            f"FLOPs {row['flops_ratio']:5.1f}x\n        warm read: {breakdown_line(breakdown)}",
            file=sys.stderr,
            flush=True,
        )
    agent.close()
    return {
        "benchmark": "reuse_vs_prefill",
        "model": args.config or agent.loaded.name,
        "dtype": str(engine.dtype).replace("torch.", ""),
        "device": args.device,
        "params": n_params,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "repeats": args.repeats,
        "warm_repeats": max(args.repeats, args.warm_repeats),
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"prefill vs reuse — {result['model']} {result['dtype']} on {result['device']} "
        f"(median of {result['repeats']} cold, {result.get('warm_repeats', result['repeats'])} warm)"
    )
    for col in (
        "tokens",
        "cold TTFT",
        "SDK cold ÷ prefill",
        "raw reuse",
        "raw x",
        "SDK warm",
        "SDK x",
        "SDK keeps",
        "paired",
        "FLOPs x",
        "KV MB",
    ):
        t.add_column(col, justify="right")
    for r in result["rows"]:
        sdk_cold = f"{r['sdk_cold_over_prefill']:.1%}" if "sdk_cold_over_prefill" in r else "-"
        t.add_row(
            str(r["tokens"]),
            f"{r['cold_s'] * 1000:.0f} ms",
            sdk_cold,
            f"{r['raw_reuse_s'] * 1000:.1f} ms",
            f"{r['raw_ratio']:.1f}",
            f"{r['sdk_warm_s'] * 1000:.1f} ms",
            f"{r['sdk_ratio']:.1f}",
            f"{r['sdk_keeps']:.1%}",
            f"{r['sdk_keeps_paired']:.1%}" if "sdk_keeps_paired" in r else "-",
            f"{r['flops_ratio']:.1f}",
            f"{r['kv_bytes'] / 1e6:.0f}",
        )
    Console().print(t)
    b = Table(title="where a warm read spends its time (ms, median)")
    for col in ("tokens", *STAGES, "sum"):
        b.add_column(col, justify="right")
    for r in result["rows"]:
        ms = r["sdk_breakdown_ms"]
        b.add_row(str(r["tokens"]), *(f"{ms[k]:.1f}" for k in STAGES), f"{sum(ms.values()):.1f}")
    Console().print(b)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--paper-lengths", action="store_true", help=f"use the paper's lengths {PAPER_LENGTHS}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default=None, help="model spec (default: embedded SmolLM2)")
    p.add_argument("--config", choices=["qwen3-4b"], help="random-init model of this architecture instead")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--warm-repeats",
        type=int,
        default=15,
        help="raw/SDK warm pairs per length (at least --repeats; the cold runs are the expensive part)",
    )
    p.add_argument(
        "--skip-sdk-cold", action="store_true", help="do not time the SDK's cold read (halves the run)"
    )
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/reuse_vs_prefill.json"))
    args = p.parse_args(argv)
    if args.paper_lengths:
        args.lengths = PAPER_LENGTHS
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
