"""Prefix reuse through kvagent's resolver on a tiny random model: exact vs full prefill, found in memory and
in the store."""

from __future__ import annotations

import pytest
import torch
from kvagent import GenerationParams, KVAgent, Token, shared_prefix
from transformers import AutoModelForCausalLM, LlamaConfig

from langchain_kvagent._reuse import PromptRunner


@pytest.fixture(scope="module")
def tiny_agent(tmp_path_factory: pytest.TempPathFactory) -> KVAgent:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg)
    return KVAgent(model, cache_dir=tmp_path_factory.mktemp("tiny"), block_size=16, memory_slots=2)


def _ids(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (n,), generator=g).tolist()


def _reply(runner: PromptRunner, ids: list[int], params: GenerationParams) -> list[int]:
    """A reply's token ids through the runner's prompt turn (which keeps the prompt's KV the engine computes);
    the tiny model has no tokenizer for ``complete``'s text."""
    events = runner.turns.events(runner.prepare(ids, params))
    return [ev.token_id for ev in events if isinstance(ev, Token)]


def test_shared_prefix() -> None:
    a = torch.tensor([1, 2, 3, 4])
    assert shared_prefix(a, torch.tensor([1, 2, 9])) == 2
    assert shared_prefix(a, torch.tensor([1, 2, 3, 4, 5])) == 4
    assert shared_prefix(a, torch.tensor([7])) == 0


def test_second_prompt_resumes_and_matches_full_prefill(tiny_agent: KVAgent) -> None:
    doc = _ids(1, 80)
    q1, q2 = _ids(2, 7), _ids(3, 9)
    params = GenerationParams(max_new_tokens=12)
    runner = PromptRunner(tiny_agent, min_save_tokens=1)
    first, feed, info = runner.start(doc + q1)  # nothing cached: the engine prefills it all with the reply
    assert first is None and feed == doc + q1 and info.status == "prefill" and info.cached_tokens == 0
    assert _reply(runner, doc + q1, params) == tiny_agent.engine.generate(None, doc + q1, params).token_ids
    assert runner.start(doc + q1)[2].cached_tokens == len(doc) + len(q1) - 1
    kv, feed, info = runner.start(doc + q2)  # the shared prefix; the new question runs with the reply
    assert info.status == "prefix" and info.cached_tokens >= len(doc) and kv is not None
    assert info.prefilled_tokens == len(doc) + len(q2) - info.cached_tokens
    assert kv.token_ids.tolist() + feed == doc + q2
    reused = tiny_agent.engine.generate(kv, feed, params).token_ids
    full = tiny_agent.engine.generate(None, doc + q2, params).token_ids
    assert reused == full
    # what run() does: the reply's first forward hands the whole prompt's KV to the resolver to keep
    kept = list(tiny_agent.engine.stream(kv, feed, params, on_prompt=tiny_agent.resolver.keep))
    assert kept == full
    again = runner.start(doc + q2 + [5])[2]
    assert again.cached_tokens == len(doc) + len(q2), again.reason


def test_prefix_is_found_in_the_store_after_memory_is_dropped(tiny_agent: KVAgent) -> None:
    doc = _ids(4, 64)
    runner = PromptRunner(tiny_agent, min_save_tokens=1)
    _reply(runner, doc + [5, 6, 7], GenerationParams(max_new_tokens=1))  # computed by the engine, then stored
    tiny_agent.forget_memory()
    kv, feed, info = runner.start(doc + [9, 9, 1])
    assert kv is not None and info.cached_tokens == len(doc), info.reason
    assert info.source == "store" and "local store" in info.reason
    assert kv.token_ids.tolist() == doc and feed == [9, 9, 1]


def test_reuse_off_prefills_everything(tiny_agent: KVAgent) -> None:
    ids = _ids(5, 40)
    PromptRunner(tiny_agent, min_save_tokens=1).start(ids)
    kv, feed, info = PromptRunner(tiny_agent, reuse=False).start(ids)
    assert kv is None and feed == ids and info.status == "disabled" and info.prefilled_tokens == len(ids)


def test_a_miss_reports_the_seconds_the_engine_spent_prefilling_it(tiny_agent: KVAgent) -> None:
    runner = PromptRunner(tiny_agent, min_save_tokens=1)
    turn = runner.prepare(_ids(6, 90), GenerationParams(max_new_tokens=2))
    assert turn.info.status == "prefill" and turn.prefill_seconds == 0.0  # nothing has run yet
    list(runner.turns.events(turn))
    assert turn.engine_prefill_seconds > 0 and turn.prefill_seconds == turn.engine_prefill_seconds
