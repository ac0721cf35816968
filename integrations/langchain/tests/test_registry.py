"""LangChain models resume from the registry through kvagent's resolver: a document published by another
agent is hit on the very first question, answers equal a full prefill, and a broken registry changes
nothing."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import httpx
import pytest
from kvagent import KVAgent
from kvagent.client.registry import RegistryClient
from kvagent.costs.policy import PolicyParams
from langchain_core.messages import HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate

from langchain_kvagent import ChatKVAgent, KVAgentLLM, KVDocumentLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tests.registry_server import start_server  # noqa: E402

pytestmark = pytest.mark.slow

TOKENS = {
    "alice-token-0001": {"principal": "alice", "publish": True},
    "bob-token-000002": {"principal": "bob", "publish": False},
}
QUESTION = "Who founded the company?"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    srv = start_server(tmp_path_factory.mktemp("lc-registry") / "data", TOKENS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def published(registry, agent, document, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Agent A (another cache dir: another machine) reads the document and publishes it publicly."""
    a = KVAgent(agent.loaded.model, tokenizer=agent.tokenizer, cache_dir=tmp_path_factory.mktemp("machine-a"),
                registry_url=registry.url, token="alice-token-0001")
    handle = a.read(document)
    a.publish(handle, "public")
    a.close()
    return handle


def reader(agent, tmp_path: Path, **kw) -> KVAgent:  # type: ignore[no-untyped-def]
    """Agent B on an empty cache dir, registry configured (the default cost policy unless ``policy`` is
    given)."""
    return KVAgent(agent.loaded.model, tokenizer=agent.tokenizer, cache_dir=tmp_path, **kw)


def full_answer(agent, ids: list[int], max_tokens: int) -> str:  # type: ignore[no-untyped-def]
    out = agent.generate_full(ids, max_new_tokens=max_tokens).token_ids
    stops = set(agent.template.stop_token_ids)
    return agent.tokenizer.decode([t for t in out if t not in stops], skip_special_tokens=True)


def test_chat_model_first_question_hits_the_registry(registry, published, agent, document, tmp_path) -> None:  # type: ignore[no-untyped-def]
    b = reader(agent, tmp_path, registry_url=registry.url, token="bob-token-000002")
    chat = ChatKVAgent(agent=b, max_tokens=16)
    messages = [HumanMessage(f"{document}\n\nQuestion: {QUESTION}")]
    msg = chat.invoke(messages)
    n_doc = published.n_tokens
    why = msg.response_metadata.get("kv_reason")  # a failure says why the read did not hit
    assert msg.usage_metadata["input_token_details"]["cache_read"] >= 0.9 * n_doc, why
    assert msg.response_metadata["kv_source"] == "registry" and "registry" in why
    assert msg.content == full_answer(agent, chat.prompt_ids(messages), 16)
    b.close()


def test_chat_model_built_from_registry_url_and_token_fields(registry, published, document, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What a new user writes first, by analogy with ChatOpenAI(base_url=..., api_key=...): an empty cache,
    the
    registry given as fields, and the published document is read from the registry."""
    chat = ChatKVAgent(
        registry_url=registry.url, token="bob-token-000002", cache_dir=str(tmp_path), max_tokens=8
    )
    msg = chat.invoke([HumanMessage(f"{document}\n\nQuestion: {QUESTION}")])
    assert msg.usage_metadata["input_token_details"]["cache_read"] >= 0.9 * published.n_tokens, (
        msg.response_metadata
    )
    assert msg.response_metadata["kv_source"] == "registry", msg.response_metadata
    chat.runtime.close()


def test_llm_and_lcel_chain_hit_the_registry(registry, published, agent, document, tmp_path) -> None:  # type: ignore[no-untyped-def]
    b = reader(agent, tmp_path / "llm", registry_url=registry.url, token="bob-token-000002")
    llm = KVAgentLLM(agent=b, max_tokens=12)
    prompt = PromptTemplate.from_template("{context}\n\nQuestion: {question}")
    result = llm.generate([prompt.format(context=document, question=QUESTION)])
    info = result.generations[0][0].generation_info
    assert info["kv_cached_tokens"] >= 0.9 * published.n_tokens and info["kv_source"] in (
        "registry",
        "store",
    ), info
    c = reader(agent, tmp_path / "chain", registry_url=registry.url, token="bob-token-000002")
    chain = ChatPromptTemplate.from_messages([("human", "{context}\n\nQuestion: {question}")]) | ChatKVAgent(
        agent=c, max_tokens=12) | StrOutputParser()
    answer = chain.invoke({"context": document, "question": QUESTION})
    ids = ChatKVAgent(agent=c).prompt_ids([HumanMessage(f"{document}\n\nQuestion: {QUESTION}")])
    assert answer == full_answer(agent, ids, 12)
    assert c.stats()["remote_hits"] == 1
    b.close()
    c.close()


def test_loader_fetches_once_and_the_chat_model_reuses_it(  # type: ignore[no-untyped-def]
    registry, published, agent, document, tmp_path
) -> None:
    b = reader(agent, tmp_path, registry_url=registry.url, token="bob-token-000002")
    [doc] = list(KVDocumentLoader([document], agent=b).lazy_load())
    assert doc.metadata["kv_status"] == "remote"
    msg = ChatKVAgent(agent=b, max_tokens=8).invoke([HumanMessage(f"{document}\n\nQuestion: {QUESTION}")])
    assert msg.response_metadata["kv_source"] in ("memory", "store")
    assert msg.usage_metadata["input_token_details"]["cache_read"] >= 0.9 * published.n_tokens
    assert b.stats()["remote_hits"] == 1  # fetched once
    b.close()


@pytest.mark.parametrize("failure", ["down", "lying"])
def test_a_broken_registry_leaves_the_chain_answer_unchanged(  # type: ignore[no-untyped-def]
    failure, published, agent, document, tmp_path, caplog
) -> None:
    if failure == "down":
        kw = {"registry_url": "http://127.0.0.1:9", "token": "bob-token-000002"}
    else:  # answers every lookup with a handle whose blob is garbage
        blob_handle = {"key": published.key}

        def handler(req: httpx.Request) -> httpx.Response:
            if req.url.path.endswith("/blob"):
                return httpx.Response(200, content=b"\0" * 64)
            return httpx.Response(200, json=blob_handle)

        kw = {"registry_client": RegistryClient("http://lying.test", "t", sleep=lambda _s: None,
                                                client=httpx.Client(transport=httpx.MockTransport(handler)))}
    caplog.set_level(logging.WARNING, logger="kvagent")
    b = reader(agent, tmp_path, policy=PolicyParams(min_tokens=64), **kw)
    chain = ChatPromptTemplate.from_messages([("human", "{context}\n\nQuestion: {question}")]) | ChatKVAgent(
        agent=b, max_tokens=12) | StrOutputParser()
    answer = chain.invoke({"context": document, "question": QUESTION})
    ids = ChatKVAgent(agent=b).prompt_ids([HumanMessage(f"{document}\n\nQuestion: {QUESTION}")])
    assert answer == full_answer(agent, ids, 12)
    assert b.stats()["registry_failures"] >= 1
    assert any("prefilling locally" in r.getMessage() for r in caplog.records)
    b.close()

