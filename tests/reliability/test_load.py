"""Load: several agent processes sharing one cache dir and one registry. Each document is prefilled
once in all (single flight per key), every publish lands, and processes with empty caches then load
every document from the registry — all answers equal a full prefill's."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from kvagent.client.registry import RegistryClient
from tests.registry_server import start_server
from tests.reliability.procs import run_workers

pytestmark = pytest.mark.slow

TOKENS = {"alice-token-0001": {"principal": "alice", "publish": True},
          "bob-token-000002": {"principal": "bob", "publish": False}}
SUFFIX = [5, 6, 7]
WRITERS, READERS, DOCS = 4, 3, 3


def _work(model_dir: str, cache_dir: str, url: str, token: str, docs: list[list[int]], barrier: Any,
          out: Any) -> None:  # runs in a spawned process
    from transformers import AutoModelForCausalLM

    from kvagent import GenerationParams, KVAgent
    from kvagent.costs.policy import PolicyParams

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    publish = "public" if token.startswith("alice") else False
    agent = KVAgent(
        model,
        tokenizer=None,
        cache_dir=cache_dir,
        registry_url=url,
        token=token,
        publish=publish,
        policy=PolicyParams(min_tokens=256, prefill_tokens_per_s=50.0),
    )
    barrier.wait()
    rows = []
    for ids in docs:
        handle = agent.read_ids(ids)
        tokens = agent.ask_ids(handle, SUFFIX, max_new_tokens=10, stop_token_ids=()).token_ids
        full = agent.engine.generate(None, ids + SUFFIX, GenerationParams(max_new_tokens=10)).token_ids
        rows.append((handle.key, handle.cache.status, tokens == full))
    out.put((agent.counters["prefills"], rows))
    agent.close()


def test_processes_sharing_a_cache_dir_and_a_registry(tmp_path: Path, tiny_model) -> None:
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    docs = [torch.randint(0, 512, (900,), generator=torch.Generator().manual_seed(40 + d)).tolist()
            for d in range(DOCS)]
    server = start_server(tmp_path / "data", TOKENS)
    try:
        t0 = time.perf_counter()
        # writers: one shared cache dir, each reading the documents in a different order
        writers = run_workers(
            _work,
            WRITERS,
            lambda i: (
                str(model_dir),
                str(tmp_path / "shared"),
                server.url,
                "alice-token-0001",
                docs[i % DOCS :] + docs[: i % DOCS],
            ),
        )
        assert sum(prefills for prefills, _ in writers) == DOCS, writers  # one prefill per document, in all
        assert all(exact for _, rows in writers for *_, exact in rows), writers
        keys = {key for _, rows in writers for key, *_ in rows}
        assert len(keys) == DOCS
        with RegistryClient(server.url, "bob-token-000002") as c:  # no lost publish
            assert all(c.lookup(k) is not None for k in keys)
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert f'kvagent_publishes_total{{result="created"}} {float(DOCS)}' in metrics, metrics
        # readers: empty caches of their own, everything comes from the registry, intact
        readers = run_workers(
            _work,
            READERS,
            lambda i: (str(model_dir), str(tmp_path / f"reader{i}"), server.url, "bob-token-000002", docs),
        )
        assert sum(prefills for prefills, _ in readers) == 0, readers
        assert {status for _, rows in readers for _, status, _ in rows} == {"remote"}, readers
        assert all(exact for _, rows in readers for *_, exact in rows), readers
        assert time.perf_counter() - t0 < 600
    finally:
        server.stop()
    assert "Traceback" not in server.log()
