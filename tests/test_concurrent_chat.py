"""Concurrent chat requests through a real ``kvagent serve --model smollm2`` process: they decode together in
the engine's batch (seen in ``kvagent_batch_size``), those resuming from one cached document of their
namespace read it once per step (``kvagent_batch_shared_prefix_size``), and every reply equals
``transformers.generate`` greedy on its own ids (prompt tails prefilled in chunks of 8 tokens); a client that
disconnects mid-batch leaves the others' replies unchanged."""

from __future__ import annotations

import re
import threading
from typing import Any

import httpx
import openai
import pytest

from tests.registry_server import start_server
from tests.test_openai_endpoint import reference

pytestmark = pytest.mark.slow

TOKENS = {"alice-token-0001": {"principal": "alice"}, "bob-token-000002": {"principal": "bob"}}
DOC = (
    "The Harbour Ferry Company was founded in 1921 by Ada Lind in the port town of Vessel Bay. It runs "
    "three routes across the bay: the Northern line to Kettle Point, the Island line to Gull Rock and the "
    "night line. Its largest ship is the Northern Star, which carries 400 passengers. A single adult fare "
    "costs 4 euros, a return fare 7 euros, and children under ten travel free. The head office is on Quay "
    "Street."
)
QUESTIONS = [
    "Who founded the company?",
    "How much is a return fare?",
    "What is the largest ship?",
    "Where is the head office?",
    "Name the three routes.",
    "Do children pay?",
    "When was the company founded?",
    "How many passengers fit on the Northern Star?",
]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(
        tmp_path_factory.mktemp("concurrent") / "data",
        TOKENS,
        model="smollm2",
        # the questions after the cached document (tails of 10-30 tokens) are prefilled in chunks
        extra_args=["--max-queue", "16", "--max-batch", "8", "--prefill-chunk", "8"],
    )
    yield srv
    srv.stop()


def _messages(i: int) -> list[dict[str, str]]:
    # alternate principals and a system prompt, so the batch mixes cached prefixes of different namespaces
    msgs = [{"role": "user", "content": f"{DOC}\n\nQuestion: {QUESTIONS[i]}"}]
    return ([{"role": "system", "content": "Answer in one sentence."}] + msgs) if i % 3 == 2 else msgs


def _stream(server: Any, i: int, out: dict[int, str], barrier: threading.Barrier) -> None:
    token = "alice-token-0001" if i % 2 == 0 else "bob-token-000002"
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0, timeout=600)
    barrier.wait()
    chunks = c.chat.completions.create(
        model="smollm2", messages=_messages(i), temperature=0, max_tokens=MAX_TOKENS, stream=True
    )
    out[i] = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def _batch_sizes(server: Any, name: str = "kvagent_batch_size") -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(rf'^{name}_bucket\{{le="([^"]+)"\}} (\S+)$', text, re.M)
    }


def _more_than_one(before: dict[str, float], after: dict[str, float]) -> float:
    """Observations above 1 between two reads of a histogram's buckets."""
    return (after["+Inf"] - after["1.0"]) - (before.get("+Inf", 0) - before.get("1.0", 0))


def test_eight_concurrent_prompts_decode_together_and_each_equals_its_reference(
    server: Any, embedded: Any
) -> None:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="alice-token-0001", max_retries=0, timeout=600)
    c.chat.completions.create(
        model="smollm2", messages=_messages(0), temperature=0, max_tokens=1
    )  # doc cached
    before = _batch_sizes(server)
    out: dict[int, str] = {}
    barrier = threading.Barrier(8)
    threads = [threading.Thread(target=_stream, args=(server, i, out, barrier)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    assert _more_than_one(before, _batch_sizes(server)) > 0, "no decode step ran more than one sequence"
    for i in range(8):
        assert out[i] == reference(embedded, _messages(i), MAX_TOKENS), (i, QUESTIONS[i])


def test_a_disconnect_mid_batch_leaves_the_others_unchanged(server: Any, embedded: Any) -> None:
    out: dict[int, str] = {}
    barrier = threading.Barrier(5)
    left = threading.Event()

    def leaver() -> None:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="alice-token-0001", max_retries=0, timeout=600)
        barrier.wait()
        stream = c.chat.completions.create(
            model="smollm2",
            temperature=0,
            max_tokens=400,
            stream=True,
            messages=[{"role": "user", "content": f"{DOC}\n\nRetell it at length."}],
        )
        for n, _chunk in enumerate(stream):
            if n == 4:
                break
        stream.close()  # the client goes away while the others decode
        left.set()

    threads = [threading.Thread(target=_stream, args=(server, i, out, barrier)) for i in (1, 3, 4, 6)]
    threads.append(threading.Thread(target=leaver))
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    assert left.is_set()
    for i in (1, 3, 4, 6):
        assert out[i] == reference(embedded, _messages(i), MAX_TOKENS), (i, QUESTIONS[i])


def test_agents_asking_about_one_cached_document_read_it_once_per_step(server: Any, embedded: Any) -> None:
    """Four of alice's agents, each with its own request about her cached document (long answers, so they
    decode together): the steps read the document's KV once for all of them, and each reply equals its
    reference."""
    def messages(i: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{DOC}\n\nRetell it at length, as chapter {i + 1} of a story."}]

    c = openai.OpenAI(base_url=server.url + "/v1", api_key="alice-token-0001", max_retries=0, timeout=600)
    c.chat.completions.create(model="smollm2", messages=messages(0), temperature=0, max_tokens=1)
    before = _batch_sizes(server, "kvagent_batch_shared_prefix_size")
    out: dict[int, str] = {}
    barrier = threading.Barrier(4)

    def agent(i: int) -> None:
        barrier.wait()
        chunks = c.chat.completions.create(
            model="smollm2", messages=messages(i), temperature=0, max_tokens=MAX_TOKENS, stream=True
        )
        out[i] = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    shared = _more_than_one(before, _batch_sizes(server, "kvagent_batch_shared_prefix_size"))
    assert shared > 0, "no decode step read the document's KV for more than one agent"
    for i in range(4):
        assert out[i] == reference(embedded, messages(i), MAX_TOKENS), i
