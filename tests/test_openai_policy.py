"""Issue 26's scenario on a real ``kvagent serve --model smollm2`` process: a long-running host that has
calibrated
itself on its own chats still reuses a document another principal published, through ``/v1/chat/completions``.

After 0, 3 and 20 earlier chats of mixed lengths (the host's cost model learns from each of them), a third
principal asks about a freshly published document: ``usage.prompt_tokens_details.cached_tokens`` must cover at
least 90% of it. Before the fix, three measurements of about one length made the fit price the prompt's short
tail
after the published prefix like a full prefill, and the host prefilled everything (cached_tokens 24).
"""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from kvagent import KVAgent
from kvagent.costs.policy import PolicyParams
from tests.conftest import long_text
from tests.registry_server import start_server

pytestmark = pytest.mark.slow

TOKENS = {
    "alice-token-0001": {"principal": "alice", "publish": True},
    "bob-token-000002": {"principal": "bob", "publish": False},
    "carol-token-0003": {"principal": "carol", "publish": False},
}
CHAT_LENGTHS = (35, 70, 120, 45, 90)  # tokens of the earlier chats' messages, cycled: mixed lengths


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tmp_path_factory.mktemp("policy") / "data", TOKENS, model="smollm2")
    yield srv
    srv.stop()


def _client(server, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0, timeout=600)


def _metric(server, name: str, labels: str = "") -> float:
    """The sum of ``name``'s samples whose labels contain ``labels`` (e.g. ``path="fetch-only"``)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    pattern = rf"^{name}(?:{{([^}}]*)}})? (\S+)$"
    return sum(float(m.group(2)) for m in re.finditer(pattern, text, re.M) if labels in (m.group(1) or ""))


@pytest.mark.timeout(2400)  # about a minute on a quiet machine; a shared CI box can be 20x slower
def test_published_documents_are_reused_after_0_3_and_20_chats(server, embedded, tmp_path):
    carol, bob = _client(server, "carol-token-0003"), _client(server, "bob-token-000002")
    chats = 0
    for round_, earlier in enumerate((0, 3, 20)):
        for i in range(chats, earlier):  # the host's own history: other principals' chats of mixed lengths
            text = long_text(CHAT_LENGTHS[i % len(CHAT_LENGTHS)], embedded.tokenizer)
            carol.chat.completions.create(model="smollm2", temperature=0, max_tokens=1, messages=[
                {"role": "user", "content": f"Chat {i}: {text}\n\nSay yes."}])
        chats = earlier
        doc = f"Report {round_} of the harbour authority.\n\n" + long_text(1200, embedded.tokenizer)
        publisher = KVAgent(
            embedded.model,
            tokenizer=embedded.tokenizer,
            cache_dir=tmp_path / f"pub{round_}",
            registry_url=server.url,
            token="alice-token-0001",
            policy=PolicyParams(min_tokens=256),
        )
        publisher.publish(publisher.read(doc), "public")
        publisher.close()
        r = bob.chat.completions.create(model="smollm2", temperature=0, max_tokens=4, messages=[
            {"role": "user", "content": f"{doc}\n\nQuestion: Who runs the harbour?"}])
        n_doc = len(embedded.tokenizer.encode(doc, add_special_tokens=False))
        cache = r.model_extra["kvagent"]["cache"]
        assert r.usage.prompt_tokens_details.cached_tokens >= 0.9 * n_doc, (earlier, cache)
        assert cache["source"] == "registry", (earlier, cache)
    # the host checked its decisions against what they cost, and says so in Prometheus
    assert _metric(server, "kvagent_cost_prediction_ratio_count") >= 1
    # each fetch too, though the reply's forward ran the question after it: its fetch part alone
    assert _metric(server, "kvagent_cost_prediction_ratio_count", 'path="fetch-only"') == 3
