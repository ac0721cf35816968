"""Poisoned-KV detection: how often `sample` verification catches planted tampering, whether the
tampering would have changed the answer, and what `sample` costs next to a full prefill (one run).

    python -m benchmarks.poisoning [--lengths 512 2048] [--trials 10] [--probes 64] [--dtype bfloat16]

Honest KV is checked with ``--honest-seeds`` probe draws, both as computed in one pass and in 256-token chunks
(as a host's batching engine computes it); each row gives the largest honest difference and, per kind of
tampering, the smallest difference a tampered KV showed: the margin a dtype's tolerance sits in.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kvagent import KVAgent
from kvagent.engines.params import GenerationParams
from kvagent.kvcache.tensors import KVCache
from kvagent.tiers.verification import verify_kv

QUESTION = "Who founded the company?"
ANSWER = GenerationParams(max_new_tokens=8, stop_token_ids=())
SPAN = 32  # positions a span tampering touches


def _replace(
    kv: KVCache, layer: int, keys: torch.Tensor | None = None, values: torch.Tensor | None = None
) -> KVCache:
    ks, vs = list(kv.keys), list(kv.values)
    if keys is not None:
        ks[layer] = keys
    if values is not None:
        vs[layer] = values
    return KVCache(tuple(ks), tuple(vs), kv.token_ids)


def tamper(
    agent: KVAgent, kv: KVCache, ids: list[int], kind: str, rng: random.Random, docs: list[list[int]]
) -> KVCache:
    n, L = len(ids), len(kv.keys)
    if kind == "changed-token":
        alt = list(ids)
        p = rng.randrange(len(agent.template.prefix_ids), n)
        alt[p] = rng.randrange(agent.engine.config.vocab_size)
        return _claim(agent.engine.prefill(alt), kv)
    if kind == "swapped-document":
        return _claim(agent.engine.prefill(rng.choice(docs)[:n]), kv)
    if kind.startswith("layer-span-noise"):
        rel = float(kind.rsplit("-", 1)[1])
        layer = rng.randrange(0, L - 1)
        s = rng.randrange(0, n - SPAN)
        v = kv.values[layer].clone()
        g = torch.Generator().manual_seed(rng.randrange(1 << 30))
        v[:, :, s : s + SPAN] += rel * v.std() * torch.randn(v[:, :, s : s + SPAN].shape, generator=g)
        return _replace(kv, layer, values=v)
    if kind == "one-position-mid-layer":
        layer, p = L // 2, rng.randrange(0, n - 1)
        k, v = kv.keys[layer].clone(), kv.values[layer].clone()
        k[:, :, p] *= 1.5
        v[:, :, p] *= 1.5
        return _replace(kv, layer, keys=k, values=v)
    if kind == "last-layer-span":
        s = rng.randrange(0, n - SPAN)
        v = kv.values[L - 1].clone()
        v[:, :, s : s + SPAN] *= 1.5
        return _replace(kv, L - 1, values=v)
    raise ValueError(kind)


def _claim(bad: KVCache, honest: KVCache) -> KVCache:
    return KVCache(bad.keys, bad.values, honest.token_ids)


KINDS = ["changed-token", "swapped-document", "layer-span-noise-0.1", "layer-span-noise-1.0",
         "one-position-mid-layer", "last-layer-span"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--probes", type=int, default=64, help="positions `sample` recomputes in every layer")
    p.add_argument("--honest-seeds", type=int, default=3, help="probe draws over each honest KV")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/poisoning.json"))
    args = p.parse_args(argv)
    from tests.conftest import long_text

    agent = KVAgent(cache_dir=tempfile.mkdtemp(prefix="kvagent-poison-"), dtype=args.dtype)
    engine = agent.engine
    rng = random.Random(2026)
    text = long_text(max(args.lengths) * 2 + 64, agent.tokenizer)
    all_ids = agent.document_ids(text)
    suffix = agent.template.question_ids(agent.tokenizer, QUESTION)
    rows = []
    for n in args.lengths:
        ids = all_ids[:n]
        others = [all_ids[n : 2 * n], all_ids[n // 2 : n // 2 + n]]  # other text of the same length
        prefill_times = []
        for _ in range(3):
            t0 = time.perf_counter()
            kv = engine.prefill(ids)
            prefill_times.append(time.perf_counter() - t0)
        prefill_s = statistics.median(prefill_times)
        chunked = engine.prefill(ids[:256])
        for start in range(256, n, 256):
            chunked = engine.prefill_from(chunked, ids[start : start + 256])
        honest = [verify_kv(engine, k, "sample", probes=args.probes, seed=s)
                  for k in (kv, chunked) for s in range(args.honest_seeds)]
        sample_s = statistics.median(r.seconds for r in honest)
        reference = engine.generate(kv, suffix, ANSWER).token_ids
        row: dict[str, Any] = {
            "tokens": n,
            "probes": args.probes,
            "prefill_s": prefill_s,
            "sample_s": sample_s,
            "sample_cost_fraction": sample_s / prefill_s,
            "dtype": args.dtype,
            "tolerance": honest[0].tolerance,
            "honest_checks": len(honest),
            "honest_false_alarms": sum(not r.ok for r in honest),
            "honest_max_rel_diff": max(r.max_rel_diff for r in honest),
            "honest_rel_diffs": sorted(round(r.max_rel_diff, 5) for r in honest),
            # a SPAN-position span in the last layer escapes every probe with 1 minus this chance
            "last_layer_span_expected_detection": 1 - (1 - SPAN / n) ** min(args.probes, n),
            "kinds": {},
        }
        for kind in KINDS:
            detected = harmful = harmful_missed = 0
            diffs = []
            for _ in range(args.trials):
                bad = tamper(agent, kv, ids, kind, rng, others)
                rep = verify_kv(engine, bad, "sample", probes=args.probes, seed=rng.randrange(1 << 30))
                diffs.append(rep.max_rel_diff)
                changed = engine.generate(bad, suffix, ANSWER).token_ids != reference
                detected += not rep.ok
                harmful += changed
                harmful_missed += changed and rep.ok
            row["kinds"][kind] = {"trials": args.trials, "detected": detected, "changed_answer": harmful,
                                  "changed_answer_but_missed": harmful_missed,
                                  "min_rel_diff": min(diffs), "median_rel_diff": statistics.median(diffs)}
            print(
                f"{n:>5} {kind:24} detected {detected}/{args.trials}  changed the answer "
                f"{harmful}/{args.trials}"
                f"  harmful and missed {harmful_missed}  smallest difference {min(diffs):.3g}",
                file=sys.stderr,
                flush=True,
            )
        print(f"{n:>5} last-layer-span expected detection {row['last_layer_span_expected_detection']:.0%}",
              file=sys.stderr, flush=True)
        print(
            f"{n:>5} sample verification ({args.probes} probes) {sample_s * 1e3:.0f} ms vs prefill "
            f"{prefill_s * 1e3:.0f} ms "
            f"= {row['sample_cost_fraction']:.1%}; false alarms on honest KV {row['honest_false_alarms']}/"
            f"{len(honest)} (largest honest difference {row['honest_max_rel_diff']:.3g}, tolerance "
            f"{row['tolerance']:g})",
            file=sys.stderr,
            flush=True,
        )
        rows.append(row)
    agent.close()
    result = {
        "benchmark": "poisoning",
        "model": agent.loaded.name,
        "dtype": args.dtype,
        "trials": args.trials,
        "probes": args.probes,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
