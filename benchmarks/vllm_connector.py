"""Cross-engine exactness and first-request TTFT of vLLM with the KVAgentConnector (integrations/vllm).

Runs in an environment where vLLM is importable (see integrations/vllm/README.md). Starts a real kvagent
registry and one vLLM server (CPU, float32, the embedded SmolLM2) with the connector, then, on real documents
(the repository's own Markdown and the sample text, cut to about ``--tokens`` tokens):

* transformers -> vLLM: an SDK agent on another cache reads and publishes each document; vLLM answers a
  question about it from that KV (fetched, verified, loaded by the connector). Greedy output is compared
  with vLLM's own full prefill of the same ids (the same server under a fresh ``cache_salt``).
* vLLM -> transformers: vLLM prefills each document (the connector saves the KV); an SDK agent on vLLM's
  cache directory reads the document from that artifact and compares its greedy answer with transformers'
  full prefill (``KVAgent.verify``). Also records whether kvagent's ``sample`` verification accepts the
  vLLM-computed KV and the largest element difference from transformers' own KV.
* TTFT: the first streamed token of a request on a just-published document through the connector, then the
  same ids cold under a fresh salt (bare vLLM computing them), per document; medians reported.

    python benchmarks/vllm_connector.py --docs 6 --tokens 1000 --out benchmarks/results/vllm_connector.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "integrations" / "vllm" / "tests")]

QUESTIONS = ("Summarise the text in two sentences.", "What is the most important detail here?")


def documents(agent: Any, n: int, tokens: int) -> list[str]:
    """Up to ``n`` real documents of about ``tokens`` tokens each, from the repository's own prose."""
    sources = [
        REPO / "kvagent" / "data" / "sample.txt",
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
    ]
    out: list[str] = []
    for path in sources:
        words = path.read_text(encoding="utf-8").split(" ")
        start = 0
        while start < len(words) and len(out) < n:
            lo, hi = start + 1, len(words)
            while lo < hi:  # the longest run of words from ``start`` within ``tokens`` tokens
                mid = (lo + hi + 1) // 2
                if len(agent.document_ids(" ".join(words[start:mid]))) <= tokens:
                    lo = mid
                else:
                    hi = mid - 1
            if len(agent.document_ids(" ".join(words[start:lo]))) >= tokens * 0.8:
                out.append(" ".join(words[start:lo]))
            start = lo
        if len(out) >= n:
            break
    return out


def summarise(result: dict[str, Any], out: Path) -> None:
    """Add match rates and TTFT medians to ``result`` and write it to ``out``."""
    for name in ("t_to_v", "v_to_t"):
        rows = result[name]
        result[f"{name}_match_rate"] = sum(r["exact"] for r in rows) / len(rows) if rows else None
    ratios = [r["connector_s"] / r["cold_s"] for r in result["ttft"]]
    result["ttft_median_connector_s"] = statistics.median(r["connector_s"] for r in result["ttft"])
    result["ttft_median_cold_s"] = statistics.median(r["cold_s"] for r in result["ttft"])
    result["ttft_median_ratio"] = statistics.median(ratios)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--reverse-questions", type=int, default=len(QUESTIONS), help="per document, vLLM -> transformers"
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vllm_connector.json")
    args = ap.parse_args()

    import torch
    import vllm
    from vllm_procs import ALICE, TOKENS, VLLM_TOKEN, start_vllm

    from kvagent import KVAgent, KVStore, block_hashes
    from kvagent.config import Config
    from kvagent.models import ensure_embedded
    from kvagent.tiers.verification import verify_kv
    from tests.registry_server import start_server

    work = Path(tempfile.mkdtemp(prefix="kvagent-vllm-bench-"))
    model_dir = ensure_embedded(Config.resolve().models_dir)
    registry = start_server(work / "registry", TOKENS)
    t0 = time.perf_counter()
    server = start_vllm(
        model_dir,
        work / "vllm",
        {
            "cache_dir": str(work / "vllm-cache"),
            "registry_url": registry.url,
            "token": VLLM_TOKEN,
            "calibration": False,
            "bandwidth_bytes_per_s": 1e9,
            "prefill_tokens_per_s": 300.0,
        },
    )
    startup = time.perf_counter() - t0
    alice = KVAgent(cache_dir=work / "alice", registry_url=registry.url, token=ALICE, calibration=False)
    reader = KVAgent(cache_dir=work / "vllm-cache", calibration=False)
    result: dict[str, Any] = {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "model": "SmolLM2-135M-Instruct (embedded)",
        "vllm_startup_s": round(startup, 1),
        "max_tokens": args.max_tokens,
        "t_to_v": [],
        "v_to_t": [],
        "ttft": [],
    }
    try:
        docs = documents(alice, args.docs, args.tokens)
        server.complete([1, 2, 3, 4], max_tokens=2, cache_salt="warmup")
        for i, body in enumerate(docs):
            # transformers -> vLLM (and the first-request TTFT through the connector vs cold)
            doc = alice.read(body)
            alice.publish(doc, "public")
            ids0 = list(doc.token_ids) + alice.template.question_ids(alice.tokenizer, QUESTIONS[0])
            ttft_connector = server.first_token_seconds(ids0)
            ttft_cold = server.first_token_seconds(ids0, cache_salt=f"cold-{uuid.uuid4().hex}")
            result["ttft"].append(
                {
                    "doc": i,
                    "tokens": len(ids0),
                    "connector_s": round(ttft_connector, 3),
                    "cold_s": round(ttft_cold, 3),
                }
            )
            for q in QUESTIONS:
                ids = list(doc.token_ids) + alice.template.question_ids(alice.tokenizer, q)
                got = server.complete(ids, max_tokens=args.max_tokens)
                ref = server.complete(ids, max_tokens=args.max_tokens, cache_salt=f"full-{uuid.uuid4().hex}")
                cached = (got["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                same = got["choices"][0]["text"] == ref["choices"][0]["text"]
                result["t_to_v"].append({"doc": i, "question": q, "cached_tokens": cached, "exact": same})
            # vLLM -> transformers: a document vLLM prefilled, read back and decoded by transformers
            other = f"Part {i}.\n\n{body}"
            ids = reader.document_ids(other)
            server.complete(ids + reader.template.question_ids(reader.tokenizer, QUESTIONS[0]), max_tokens=2)
            store = KVStore(reader.config.store_dir)
            hashes = block_hashes(reader.context, ids, reader.config.block_size)
            deadline = time.monotonic() + 120
            while (hit := store.find_prefix(hashes)) is None and time.monotonic() < deadline:
                time.sleep(0.5)
            if hit is None:
                raise RuntimeError(f"vLLM's KV of document {i} was not saved:\n{server.log()[-3000:]}")
            vkv = store.get(hit[0], expect=reader.expect).artifact.kv  # type: ignore[union-attr]
            tkv = reader.engine.prefill(vkv.token_ids.tolist())
            diff = max(
                float((a - b).abs().max())
                for a, b in zip(vkv.keys + vkv.values, tkv.keys + tkv.values, strict=True)
            )
            check = verify_kv(reader.engine, vkv, "sample", probes=64, seed=i)
            handle = reader.read(other)
            for q in QUESTIONS[: args.reverse_questions]:
                report = reader.verify(handle, q, max_new_tokens=args.max_tokens)
                result["v_to_t"].append(
                    {
                        "doc": i,
                        "question": q,
                        "source": handle.cache.source,
                        "cached_tokens": handle.cache.cached_tokens,
                        "exact": report.exact,
                        "first_divergence": report.first_divergence,
                        "max_abs_kv_diff": diff,
                        "sample_verification_ok": check.ok,
                        "verification_rel_diff": check.max_rel_diff,
                    }
                )
            print(
                f"doc {i}: {len(ids0)} tokens, TTFT {ttft_connector:.2f} s vs cold {ttft_cold:.2f} s",
                flush=True,
            )
            summarise(result, args.out)  # after every document: a stopped run keeps what it measured
    finally:
        alice.close()
        reader.close()
        server.stop()
        registry.stop()
    summarise(result, args.out)
    keys = (
        "t_to_v_match_rate",
        "v_to_t_match_rate",
        "ttft_median_connector_s",
        "ttft_median_cold_s",
        "ttft_median_ratio",
    )
    print(json.dumps({k: result[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
