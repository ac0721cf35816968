"""Cross-engine exactness and first-request TTFT of vLLM with the KVAgentConnector (integrations/vllm).

Runs in an environment where vLLM is importable (see integrations/vllm/README.md). Starts a real kvagent
registry and two vLLM servers (CPU, the embedded SmolLM2, ``--dtype`` as given, compiled as vLLM runs by
default unless ``--eager``), each with the connector: a *publisher* (``publish=public``: the KV of the
prompts it computes is saved and published) and a *reader* (``engines=any``, so KV from either engine is
taken and its exactness measured; the reader's fetch policy is the connector's default, calibrated on its
own empty cache). On real documents (the repository's own prose, cut to about ``--tokens`` tokens), per
document:

* vLLM -> vLLM, a document published elsewhere: the publisher answers one question
  about the document; once its KV is in the registry, the reader's *first* request on the document (another
  question) streams through the connector (lookup, download, verification, load), then the same ids cold
  under fresh ``cache_salt`` s (bare vLLM computing them, ``--cold-repeats`` times). TTFT of both, and
  whether the connector's greedy answer equals the cold one (vLLM's own full prefill of the same ids);
* transformers -> vLLM: an SDK agent (the same dtype) reads and publishes a variant of the document; the
  reader's first request on it against its own full prefill, as above;
* vLLM -> transformers: an SDK agent on the publisher's cache directory reads the document from the artifact
  vLLM saved and compares its greedy answers with transformers' full prefill (``KVAgent.verify``); also
  whether kvagent's ``sample`` verification accepts the vLLM-computed KV and the largest element difference
  from transformers' own KV.

    python benchmarks/vllm_connector.py --dtype bfloat16 --docs 5 --tokens 1600 \
        --out benchmarks/results/vllm_connector_bf16.json
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
    for name in ("v_to_v", "t_to_v", "v_to_t"):
        rows = result[name]
        hits = [r for r in rows if r["exact"] is not None]
        result[f"{name}_match_rate"] = sum(r["exact"] for r in hits) / len(hits) if hits else None
        result[f"{name}_measured"] = f"{len(hits)} of {len(rows)}"
    for name in ("v_to_v", "t_to_v"):
        rows = [r for r in result[name] if "connector_s" in r]
        result[f"{name}_connector_hits"] = sum(1 for r in rows if r["cached_tokens"])
        if rows:
            result[f"{name}_ttft_median_connector_s"] = statistics.median(r["connector_s"] for r in rows)
            result[f"{name}_ttft_median_cold_s"] = statistics.median(r["cold_s"] for r in rows)
            result[f"{name}_ttft_median_ratio"] = statistics.median(
                r["connector_s"] / r["cold_s"] for r in rows
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def wait_published(client: Any, hashes: list[str], blocks: int, timeout: float = 180) -> None:
    """Until the registry holds an artifact covering at least ``blocks`` of ``hashes``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = client.lookup_prefix(hashes)
        if found is not None and found[1] >= blocks:
            return
        time.sleep(0.25)
    raise RuntimeError(f"no artifact covering {blocks} blocks was published within {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=5)
    ap.add_argument(
        "--tokens", type=int, default=1600, help="each document's length, at most (80%% at least)"
    )
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="bfloat16",
        help="vLLM's --dtype and the SDK agents' (bfloat16: what vLLM picks on this CPU by default)",
    )
    ap.add_argument(
        "--eager", action="store_true", help="vLLM with --enforce-eager (default: compiled, as vLLM)"
    )
    ap.add_argument(
        "--cold-repeats", type=int, default=3, help="cold TTFTs per request (their median is used)"
    )
    ap.add_argument(
        "--reverse-questions", type=int, default=len(QUESTIONS), help="per document, vLLM -> transformers"
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vllm_connector.json")
    args = ap.parse_args()

    import torch
    import vllm
    from vllm_procs import ALICE, TOKENS, VLLM_TOKEN, start_vllm

    from kvagent import KVAgent, KVStore, block_hashes
    from kvagent.client.registry import RegistryClient
    from kvagent.config import Config
    from kvagent.models import ensure_embedded
    from kvagent.tiers.verification import verify_kv
    from tests.registry_server import start_server

    work = Path(tempfile.mkdtemp(prefix="kvagent-vllm-bench-"))
    model_dir = ensure_embedded(Config.resolve().models_dir)
    registry = start_server(work / "registry", TOKENS)
    t0 = time.perf_counter()

    def connector_server(name: str, token: str, **extra: object) -> Any:
        """A vLLM server with the connector on ``<work>/<name>-cache``, the registry and ``extra``."""
        config = {"cache_dir": str(work / f"{name}-cache"), "registry_url": registry.url, "token": token,
                  **extra}
        return start_vllm(model_dir, work / f"vllm-{name}", config, dtype=args.dtype, eager=args.eager)

    publisher = connector_server("pub", ALICE, publish="public", calibration=False)
    reader_vllm = connector_server("read", VLLM_TOKEN, engines="any")
    startup = time.perf_counter() - t0
    sdk = KVAgent(
        cache_dir=work / "sdk", registry_url=registry.url, token=ALICE, calibration=False, dtype=args.dtype
    )
    lookups = RegistryClient(registry.url, VLLM_TOKEN)
    result: dict[str, Any] = {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "vllm_mode": "eager" if args.eager else "compiled",
        "model": "SmolLM2-135M-Instruct (embedded)",
        "reader_policy": "the connector's default (calibrated on its own empty cache), engines=any",
        "vllm_startup_s": round(startup, 1),
        "max_tokens": args.max_tokens,
        "cold_repeats": args.cold_repeats,
        "v_to_v": [],
        "t_to_v": [],
        "v_to_t": [],
    }
    block = sdk.config.block_size

    def first_request(ids: list[int]) -> dict[str, Any]:
        """The reader's first request on ``ids`` through the connector, then cold under fresh salts."""
        ttft, text, cached = reader_vllm.streamed(ids, max_tokens=args.max_tokens)
        colds = [
            reader_vllm.streamed(ids, max_tokens=args.max_tokens, cache_salt=f"cold-{uuid.uuid4().hex}")
            for _ in range(args.cold_repeats)
        ]
        return {
            "tokens": len(ids),
            "cached_tokens": cached,
            "connector_s": round(ttft, 3),
            "cold_s": round(statistics.median(c[0] for c in colds), 3),
            "cold_all_s": [round(c[0], 3) for c in colds],
            "cold_cached_tokens": [c[2] for c in colds],
            # a request kvagent served nothing to is vLLM against itself: no exactness measured
            "exact": text == colds[0][1] if cached else None,
            "cold_answers_agree": len({c[1] for c in colds}) == 1,
        }

    try:
        docs = documents(sdk, args.docs, args.tokens)
        for server in (publisher, reader_vllm):
            server.complete([1, 2, 3, 4], max_tokens=2, cache_salt="warmup")
        for i, body in enumerate(docs):
            # vLLM -> vLLM: published by the other vLLM, the reader's first request on it
            doc_ids = sdk.document_ids(body)
            publisher.complete(doc_ids + sdk.template.question_ids(sdk.tokenizer, QUESTIONS[0]), max_tokens=1)
            hashes = block_hashes(sdk.context, doc_ids, block)
            wait_published(lookups, hashes, len(doc_ids) // block)
            row = first_request(doc_ids + sdk.template.question_ids(sdk.tokenizer, QUESTIONS[1]))
            result["v_to_v"].append({"doc": i, "question": QUESTIONS[1], **row})
            print(
                f"doc {i}: vLLM -> vLLM, {row['tokens']} tokens ({row['cached_tokens']} from the connector): "
                f"TTFT {row['connector_s']:.3f} s vs cold {row['cold_s']:.3f} s, exact {row['exact']}",
                flush=True,
            )
            # transformers -> vLLM: a variant the SDK read and published
            other = f"Part {i}.\n\n{body}"
            doc = sdk.read(other)
            sdk.publish(doc, "public")
            row = first_request(list(doc.token_ids) + sdk.template.question_ids(sdk.tokenizer, QUESTIONS[0]))
            result["t_to_v"].append({"doc": i, "question": QUESTIONS[0], **row})
            print(
                f"doc {i}: transformers -> vLLM ({row['cached_tokens']} from the connector): "
                f"TTFT {row['connector_s']:.3f} s vs cold {row['cold_s']:.3f} s, exact {row['exact']}",
                flush=True,
            )
            # vLLM -> transformers: the publisher's saved artifact, read by the SDK on its cache directory
            reader = KVAgent(cache_dir=work / "pub-cache", calibration=False, dtype=args.dtype)
            try:
                store = KVStore(reader.config.store_dir)
                hit = store.find_prefix(block_hashes(reader.context, doc_ids, block))
                if hit is None:
                    raise RuntimeError(f"the publisher's KV of document {i} is not in its store")
                vkv = store.get(hit[0], expect=reader.expect).artifact.kv  # type: ignore[union-attr]
                tkv = reader.engine.prefill(vkv.token_ids.tolist())
                diff = max(
                    float((a.float() - b.float()).abs().max())
                    for a, b in zip(vkv.keys + vkv.values, tkv.keys + tkv.values, strict=True)
                )
                check = verify_kv(reader.engine, vkv, "sample", probes=64, seed=i)
                handle = reader.read(body)
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
            finally:
                reader.close()
            summarise(result, args.out)  # after every document: a stopped run keeps what it measured
    finally:
        sdk.close()
        lookups.close()
        reader_vllm.stop()
        publisher.stop()
        registry.stop()
    summarise(result, args.out)
    keys = [
        k
        for k in result
        if k.endswith(("_match_rate", "_median_connector_s", "_median_cold_s", "_median_ratio"))
    ]
    print(json.dumps({k: result[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
