"""Several processes sharing one cache dir prefill a missing document once (single flight per key)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.reliability.procs import run_workers

pytestmark = pytest.mark.slow

N_PROC = 4


# runs in a spawned process
def _worker(model_dir: str, cache_dir: str, ids: list[int], barrier, out) -> None:
    from transformers import AutoModelForCausalLM

    from kvagent import GenerationParams, KVAgent

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    agent = KVAgent(model, tokenizer=None, cache_dir=cache_dir)
    barrier.wait()
    handle = agent.read_ids(ids)
    tokens = agent.ask_ids(handle, [5, 6, 7], max_new_tokens=12, stop_token_ids=()).token_ids
    full = agent.engine.generate(None, list(ids) + [5, 6, 7], GenerationParams(max_new_tokens=12)).token_ids
    out.put((handle.cache.status, agent.counters["prefills"], tokens == full))
    agent.close()


def test_one_prefill_across_processes(tmp_path: Path, tiny_model) -> None:
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    ids = torch.randint(0, 512, (1500,), generator=torch.Generator().manual_seed(5)).tolist()
    results = run_workers(
        _worker, N_PROC, lambda _: (str(model_dir), str(tmp_path / "cache"), ids), timeout=240
    )
    assert sum(prefills for _, prefills, _ in results) == 1, results
    assert sorted(status for status, _, _ in results) == ["local"] * (N_PROC - 1) + ["prefill"]
    assert all(exact for *_, exact in results)
