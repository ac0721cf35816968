"""Quickstart: read a document once, ask two questions from its cached KV, and verify exactness.

Run: python examples/quickstart.py   (offline: uses the embedded SmolLM2 model)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from kvagent import KVAgent

SAMPLE = Path(__file__).resolve().parents[1] / "kvagent" / "data" / "sample.txt"


def main() -> None:
    with tempfile.TemporaryDirectory() as cache_dir, KVAgent(cache_dir=cache_dir) as agent:
        t0 = time.perf_counter()
        doc = agent.read(SAMPLE)
        print(
            f"read {doc.source}: {doc.n_tokens} tokens, cache {doc.cache.status} "
            f"({time.perf_counter() - t0:.2f}s)"
        )
        for question in ("Who founded the company?", "How much is a return fare?"):
            answer = agent.ask(doc, question, max_new_tokens=40)
            print(f"Q: {question}\nA: {answer.text}\n   cache {answer.cache.status}, {answer.seconds:.2f}s")
        report = agent.verify(doc, "What happens to lost property?", max_new_tokens=16)
        print(
            f"verify: exact={report.exact} over {report.compared_tokens} tokens "
            f"(reuse {report.reuse_seconds:.2f}s vs full prefill {report.full_seconds:.2f}s)"
        )
        if not report.exact:
            raise SystemExit(f"reuse diverged from full prefill at token {report.first_divergence}")


if __name__ == "__main__":
    main()
