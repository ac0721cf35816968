"""KVAgent on the embedded SmolLM2 model: exactness after reuse, cache tiers, misses with reasons."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kvagent import EngineError, KVAgent, KVAgentError
from tests.conftest import SAMPLE, long_text

pytestmark = pytest.mark.slow

QUESTION = "What does the document say about fares?"


def _fresh(agent: KVAgent) -> KVAgent:
    """A second agent on the same model and cache dir with nothing in memory (another process, in effect)."""
    return KVAgent(agent.loaded.model, tokenizer=agent.tokenizer, cache_dir=agent.config.cache_dir)


@pytest.mark.parametrize("doc_tokens", [300, 1000, 2500])
def test_answer_from_cache_equals_full_prefill(embedded_agent, doc_tokens):
    agent = embedded_agent
    ids = agent.document_ids(long_text(doc_tokens, agent.tokenizer))[:doc_tokens]
    first = agent.read_ids(ids)
    assert first.cache.status == "prefill" and first.cache.prefilled_tokens == doc_tokens
    other = _fresh(agent)
    doc = other.read_ids(ids)
    assert doc.key == first.key and doc.cache.status == "local" and doc.cache.bytes_read > 0
    q_ids = agent.template.question_ids(agent.tokenizer, QUESTION)
    reused = other.ask(doc, QUESTION, max_new_tokens=32, stop_token_ids=())
    full = agent.generate_full(list(ids) + q_ids, max_new_tokens=32, stop_token_ids=())
    assert len(reused.token_ids) == 32
    assert reused.token_ids == full.token_ids
    other.close()


def test_read_ask_stream_and_stats(embedded_agent):
    agent = embedded_agent
    doc = agent.read(SAMPLE)  # a Path
    assert doc.source == str(SAMPLE) and doc.cache.status == "prefill"
    again = agent.read(SAMPLE.read_text(encoding="utf-8"))  # the same text as a str
    assert again.key == doc.key and again.cache.status == "memory"
    ans = agent.ask(doc, "Who founded the company?", max_new_tokens=24)
    streamed = "".join(agent.stream(doc, "Who founded the company?", max_new_tokens=24))
    assert ans.text and streamed.strip() == ans.text
    assert ans.cache.hit and ans.prompt_tokens > doc.n_tokens
    stats = agent.stats()
    assert stats["prefills"] == 1 and stats["memory_hits"] >= 2 and stats["artifacts"] == 1


def test_verify_reports_token_exact(embedded_agent):
    doc = embedded_agent.read(SAMPLE)
    rep = embedded_agent.verify(doc, "Summarise the timetable.", max_new_tokens=32)
    assert rep.exact and rep.compared_tokens == 32 and rep.first_divergence is None
    assert rep.reused_ids == rep.full_ids


def test_corrupt_local_entry_is_a_logged_miss_and_the_answer_is_unchanged(embedded_agent, caplog):
    agent = embedded_agent
    doc = agent.read(SAMPLE)
    expected = agent.ask(doc, QUESTION, max_new_tokens=16, stop_token_ids=()).token_ids
    # Flip one byte in the middle of the stored artifact file.
    files = sorted(Path(agent.config.store_dir).rglob("*.val"), key=lambda p: p.stat().st_size)
    target = files[-1]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))
    other = _fresh(agent)
    with caplog.at_level(logging.WARNING, logger="kvagent"):
        doc2 = other.read(SAMPLE)
    assert doc2.cache.status == "prefill"
    assert "checksum" in doc2.cache.reason.lower() and "evicted" in doc2.cache.reason
    assert any("evicting" in r.message for r in caplog.records)
    assert other.ask(doc2, QUESTION, max_new_tokens=16, stop_token_ids=()).token_ids == expected
    other.close()


def test_prompt_that_starts_with_a_cached_document_hits_its_prefix(embedded_agent):
    agent = embedded_agent
    base = long_text(700, agent.tokenizer)
    doc = agent.read(base)
    extended_ids = list(doc.token_ids) + agent.tokenizer.encode(
        "\n\nAppendix: the cafe also sells tea.", add_special_tokens=False
    )
    other = _fresh(agent)
    ext = other.read_ids(extended_ids)
    assert ext.cache.status == "prefix"
    assert ext.cache.cached_tokens == doc.n_tokens
    assert ext.cache.prefilled_tokens == len(extended_ids) - doc.n_tokens
    q = agent.template.question_ids(agent.tokenizer, QUESTION)
    got = other.ask(ext, QUESTION, max_new_tokens=32, stop_token_ids=()).token_ids
    assert got == agent.generate_full(extended_ids + q, max_new_tokens=32, stop_token_ids=()).token_ids
    other.close()


def test_short_document_miss_reason_mentions_the_block_size(embedded_agent):
    doc = embedded_agent.read("A very short note.")
    assert doc.cache.status == "prefill" and "block" in doc.cache.reason


def test_bad_input_is_a_clear_error(embedded_agent, tmp_path):
    with pytest.raises(EngineError):
        embedded_agent.read("")
    with pytest.raises(KVAgentError, match="cannot read document"):
        embedded_agent.read(tmp_path / "missing.txt")
    with pytest.raises(TypeError):
        embedded_agent.read(b"bytes are not text")  # type: ignore[arg-type]
    doc = embedded_agent.read("Some text for the agent.")
    with pytest.raises(EngineError):
        embedded_agent.ask(doc, "   ")
    with pytest.raises(EngineError):
        embedded_agent.ask(doc, "ok?", max_new_tokens=0)
    with pytest.raises(EngineError):
        embedded_agent.ask(doc, "ok?", not_a_parameter=1)


def test_memory_tier_is_bounded(embedded, tmp_path):
    agent = KVAgent(embedded.model, tokenizer=embedded.tokenizer, cache_dir=tmp_path, memory_slots=1)
    a = agent.read("First document about ferries.")
    agent.read("Second document about lighthouses.")
    assert agent.stats()["memory_entries"] == 1
    assert agent.read("First document about ferries.").cache.status == "local"
    assert a.key == agent.read("First document about ferries.").key
    agent.close()


def test_close_stops_the_batching_thread(embedded, tmp_path):
    """An agent that answered has a batching scheduler thread; ``close`` ends it (a process that makes and
    closes agents no longer keeps an idle thread, and its model, per closed agent)."""
    import threading

    def schedulers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "kvagent-batch"}

    before = schedulers()
    agent = KVAgent(embedded.model, tokenizer=embedded.tokenizer, cache_dir=tmp_path)
    agent.ask(agent.read("A short note about ferries."), "What is it about?", max_new_tokens=2)
    mine = schedulers() - before
    assert len(mine) == 1
    agent.close()
    (thread,) = mine
    thread.join(10)
    assert not thread.is_alive()


def test_compressed_artifacts_are_exact_too(embedded, tmp_path):
    agent = KVAgent(embedded.model, tokenizer=embedded.tokenizer, cache_dir=tmp_path, codec="bplane-zstd")
    ids = agent.document_ids(long_text(400, agent.tokenizer))[:400]
    agent.read_ids(ids)
    entry = next(iter(agent.store.entries()))
    assert entry.nbytes < 400 * agent.engine.layout.bytes_per_token(agent.engine.dtype)  # it did compress
    other = KVAgent(embedded.model, tokenizer=embedded.tokenizer, cache_dir=tmp_path)  # any codec reads any
    doc = other.read_ids(ids)
    assert doc.cache.status == "local"
    q = agent.template.question_ids(agent.tokenizer, QUESTION)
    assert other.ask(doc, QUESTION, max_new_tokens=32, stop_token_ids=()).token_ids == \
        agent.generate_full(list(ids) + q, max_new_tokens=32, stop_token_ids=()).token_ids
    other.close()
    agent.close()


def test_a_short_tail_runs_with_the_reply_and_is_kept_exactly(embedded_agent):
    """``max_tail``: the cached prefix comes back with the uncovered ids; the reply's first forward runs them,
    ``on_prompt`` hands back the whole prompt's KV, and both the answer and that KV equal a full prefill."""
    import torch

    from kvagent import GenerationParams

    agent = embedded_agent
    resolver, engine = agent.resolver, agent.engine
    doc = agent.read(long_text(600, agent.tokenizer))
    q = agent.template.question_ids(agent.tokenizer, QUESTION)
    prompt = list(doc.token_ids) + q
    res = resolver.resolve(prompt[:-1], document=False, max_tail=64)
    assert (
        res.kv is not None
        and res.kv.n_tokens == doc.n_tokens
        and res.tail == tuple(prompt[doc.n_tokens : -1])
    )
    assert (
        res.info.cached_tokens == doc.n_tokens
        and res.info.prefilled_tokens == len(res.tail)
        and res.save is None
    )
    kept = []
    params = GenerationParams(max_new_tokens=24, stop_token_ids=())
    got = list(engine.stream(res.kv, [*res.tail, prompt[-1]], params, on_prompt=kept.append))
    assert got == agent.generate_full(prompt, max_new_tokens=24, stop_token_ids=()).token_ids
    (full,) = kept
    assert full.token_ids.tolist() == prompt
    want = engine.prefill(prompt)
    for a, b in zip(full.keys + full.values, want.keys + want.values, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-3)
    # a tail longer than max_tail is prefilled as before
    longer = resolver.resolve(prompt[:-1], document=False, max_tail=len(q) - 2, min_save_tokens=10**6)
    assert longer.tail == () and longer.kv is not None and longer.kv.n_tokens == len(prompt) - 1
    key = resolver.keep(full)
    assert resolver.memory.get("", key) is not None and key in agent.store


def test_compute_false_finds_the_cached_prefix_and_never_computes(embedded_agent):
    """``resolve(..., compute=False)`` (what another engine's connector asks): the longest cached prefix and
    the
    uncovered ids, or no KV at all on a miss; nothing is prefilled or stored either way."""
    agent = embedded_agent
    resolver = agent.resolver
    doc = agent.read(long_text(600, agent.tokenizer))
    q = agent.template.question_ids(agent.tokenizer, QUESTION)
    prompt = list(doc.token_ids) + q
    agent.forget_memory()
    before = (resolver.counters["prefills"], len(list(agent.store.entries())))
    res = resolver.resolve(prompt, document=False, compute=False)
    assert res.kv is not None and res.kv.n_tokens == doc.n_tokens and res.tail == tuple(q)
    assert res.info.source == "store" and res.info.origin == doc.key
    miss = resolver.resolve([t + 1 for t in prompt[:300]], document=False, compute=False)
    assert miss.kv is None and len(miss.tail) == 300 and miss.info.cached_tokens == 0
    assert (resolver.counters["prefills"], len(list(agent.store.entries()))) == before


@pytest.fixture(scope="module")
def embedded_bf16():
    from kvagent.config import Config
    from kvagent.models import load_model

    return load_model(None, Config.resolve().models_dir, dtype="bfloat16")


def test_bf16_reuse_is_bitwise_the_computing_agents_own_and_never_meets_float32(embedded_bf16, embedded,
                                                                                tmp_path):
    """In bf16 an answer after reuse is not guaranteed to equal a one-shot full prefill's (bf16 matrix
    products round a row differently with the call's row count; measured in docs/deploy.md). What holds bit
    for bit: the stored artifact (lossless bplane-zstd) is the KV the prefill computed, so another agent's
    answer from the store equals the computing agent's answer from memory; the key says bfloat16, so a
    float32 agent on the same cache computes its own."""
    lm = embedded_bf16
    agent = KVAgent(lm.model, tokenizer=lm.tokenizer, cache_dir=tmp_path, dtype="bfloat16",
                    codec="bplane-zstd")
    ids = agent.document_ids(long_text(600, agent.tokenizer))[:600]
    first = agent.read_ids(ids)
    assert first.cache.status == "prefill" and agent.runtime.context.dtype == "bfloat16"
    assert next(iter(agent.store.entries())).dtype == "bfloat16"
    other = KVAgent(lm.model, tokenizer=lm.tokenizer, cache_dir=tmp_path, dtype="bfloat16")
    doc = other.read_ids(ids)
    assert doc.key == first.key and doc.cache.status == "local"
    for question in (QUESTION, "Who founded the company?", "Summarise section 2."):
        mine = agent.ask(first, question, max_new_tokens=32, stop_token_ids=())
        assert mine.cache.status == "memory"
        assert other.ask(doc, question, max_new_tokens=32, stop_token_ids=()).token_ids == mine.token_ids
    fp32 = KVAgent(embedded.model, tokenizer=embedded.tokenizer, cache_dir=tmp_path, dtype="float32")
    assert fp32.read_ids(ids).cache.status == "prefill"
    for a in (agent, other, fp32):
        a.close()


def test_warm_up_measures_prefill_once_on_a_machine_with_no_samples(embedded, tmp_path):  # type: ignore[no-untyped-def]
    """``KVAgent.warm_up`` (what the vLLM connector runs when it starts): measured samples on a fresh
    calibration, then nothing more to do; a first decision after it no longer rests on a probe."""
    from kvagent import KVAgent

    agent = KVAgent(embedded.model, tokenizer=embedded.tokenizer, cache_dir=tmp_path / "c")
    try:
        cost = agent.runtime.cost
        assert cost is not None and cost.needs_warm_up()
        assert agent.warm_up() is True and not cost.needs_warm_up()
        assert agent.warm_up() is False
        assert cost.estimate_prefill(600).source == "measured"
    finally:
        agent.close()
    off = KVAgent(embedded.model, tokenizer=embedded.tokenizer, cache_dir=tmp_path / "off", calibration=False)
    try:
        assert off.warm_up() is False
    finally:
        off.close()
