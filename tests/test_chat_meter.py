"""What a chat/completion run counts (kvagent.server.chat_meter), on a real metrics registry."""

from __future__ import annotations

from kvagent.chat.turn import Cached, Guided
from kvagent.engines import Finish, Token, Usage
from kvagent.reuse.info import CacheInfo, CacheStatus
from kvagent.server.chat_meter import ChatMeter
from kvagent.server.metrics import Metrics


def _value(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_a_streamed_run_counts_its_prompt_cache_hits_tokens_and_first_token() -> None:
    m = Metrics()
    meter = ChatMeter(m, "chat", 10, started=0.0)
    assert meter.info is None and meter.cached_tokens == 0 and meter.ttft is None
    meter.observe(Cached(CacheInfo(CacheStatus.PREFIX, "a prefix", 8, 2, source="memory")))
    assert meter.cached_tokens == 8
    for t in (5, 6, 7):
        meter.observe(Token(t))
    meter.observe(Finish("length", Usage(10, 8, 3, queue_seconds=0.25, compute_seconds=0.5)))
    meter.ended("ok")
    assert meter.n_generated == 3 and meter.ttft is not None and meter.ttft > 0
    assert _value(m, "kvagent_prompt_tokens_total") == 10
    assert _value(m, "kvagent_prefix_cache_queries_total") == 10
    assert _value(m, "kvagent_prefix_cache_hits_total", source="memory") == 8
    assert _value(m, "kvagent_generation_tokens_total") == 3
    assert _value(m, "kvagent_time_to_first_token_seconds_count", endpoint="chat") == 1  # the first only
    assert _value(m, "kvagent_request_queue_time_seconds_sum", endpoint="chat") == 0.25
    assert _value(m, "kvagent_request_inference_time_seconds_sum", endpoint="chat") == 0.5
    assert _value(m, "kvagent_completion_requests_total", endpoint="chat", result="ok") == 1


def test_a_guided_reply_counts_its_tokens_at_once() -> None:
    m = Metrics()
    meter = ChatMeter(m, "completion", 4, started=0.0)
    meter.observe(Cached(CacheInfo(CacheStatus.PREFILL, "nothing cached", 0, 4)))
    meter.observe(Guided('{"a": 1}', 6))
    assert meter.n_generated == 6 and meter.ttft is not None
    assert _value(m, "kvagent_generation_tokens_total") == 6
    assert _value(m, "kvagent_prefix_cache_hits_total", source="") == 0


def test_an_engine_that_resolved_the_prompt_reports_its_hits_at_the_finish() -> None:
    m = Metrics()
    meter = ChatMeter(m, "chat", 10, started=0.0)
    meter.observe(Cached(CacheInfo(CacheStatus.ENGINE, "vLLM resolves the prompt", 0, 10)))
    assert meter.cached_tokens == 0 and _value(m, "kvagent_prefix_cache_hits_total", source="engine") == 0
    meter.observe(Token(1))
    meter.observe(Finish("stop", Usage(10, 6, 1)))
    assert meter.cached_tokens == 6 and meter.info is not None and meter.info.source == "engine"
    assert _value(m, "kvagent_prefix_cache_hits_total", source="engine") == 6


def test_a_failed_finish_is_not_observed_and_the_end_is_labelled() -> None:
    m = Metrics()
    meter = ChatMeter(m, "chat", 3, started=0.0)
    meter.observe(Finish("error", Usage(0, 0, 0), RuntimeError("x")))
    meter.ended("error")
    assert _value(m, "kvagent_request_queue_time_seconds_count", endpoint="chat") == 0
    assert _value(m, "kvagent_completion_requests_total", endpoint="chat", result="error") == 1
    meter.ended("cancelled")
    assert _value(m, "kvagent_completion_requests_total", endpoint="chat", result="cancelled") == 1
