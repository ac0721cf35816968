"""The OpenAI-compatible endpoint of a real ``kvagent serve --model smollm2`` process, driven by the official
``openai`` client and LangChain's ``ChatOpenAI``: token-exact answers, KV reuse reported as cached_tokens,
registry hits across machines, per-principal isolation, OpenAI-shaped errors, queueing and cancellation."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from kvagent import KVAgent, shared_prefix
from kvagent.costs.policy import PolicyParams
from tests.conftest import SAMPLE, long_text
from tests.registry_server import start_server

pytestmark = pytest.mark.slow

TOKENS = {
    "alice-token-0001": {"principal": "alice", "publish": True},
    "bob-token-000002": {"principal": "bob", "publish": False},
    "carol-token-0003": {"principal": "carol", "publish": False},
}
DOC = SAMPLE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tmp_path_factory.mktemp("openai") / "data", TOKENS, model="smollm2",
                       extra_args=["--max-queue", "2"])
    yield srv
    srv.stop()


def client(server, token: str = "alice-token-0001") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0, timeout=300)


def ask(question: str, doc: str = DOC) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{doc}\n\nQuestion: {question}"}]


def reference(embedded, messages: list[dict[str, Any]], max_tokens: int) -> str:
    """Greedy answer of a full prefill of the same ids with plain ``transformers.generate``."""
    import torch

    tok = embedded.tokenizer
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with torch.inference_mode():
        out = embedded.model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                      eos_token_id=stops, pad_token_id=stops[0])
    new = out[0, len(ids):].tolist()
    return tok.decode([t for t in new if t not in stops], skip_special_tokens=True)


def test_models_and_unknown_model(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["smollm2"]
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="gpt-4o", messages=ask("hi"))
    assert err.value.body["code"] == "model_not_found"


def test_second_question_reuses_the_document_and_is_exact(server, embedded):
    c = client(server)
    first = c.chat.completions.create(model="smollm2", messages=ask("How much is a single adult fare?"),
                                      temperature=0, max_tokens=24)
    n_doc = len(embedded.tokenizer.encode(DOC, add_special_tokens=False))
    msgs = ask("Who founded the company?")
    second = c.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=24)
    assert first.usage.prompt_tokens > n_doc and first.choices[0].finish_reason in ("stop", "length")
    assert second.usage.prompt_tokens_details.cached_tokens >= 0.9 * n_doc, second.model_extra["kvagent"]
    assert second.model_extra["kvagent"]["cache"]["source"] == "memory"
    assert second.choices[0].message.content == reference(embedded, msgs, 24)


def test_streaming_equals_whole_and_reports_usage(server, embedded):
    c = client(server)
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}]
    whole = c.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=16)
    chunks = list(c.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=16,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content == reference(embedded, msgs, 16)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1  # the same prompt again


def test_raw_completions_are_exact(server, embedded):
    import torch

    c = client(server)
    prompt = "The capital of France is"
    r = c.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=12)
    ids = embedded.tokenizer.encode(prompt, add_special_tokens=True)
    with torch.inference_mode():
        out = embedded.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                      pad_token_id=embedded.tokenizer.eos_token_id)
    new = [t for t in out[0, len(ids):].tolist() if t != embedded.tokenizer.eos_token_id]
    assert r.object == "text_completion" and r.usage.prompt_tokens == len(ids)
    assert r.choices[0].text == embedded.tokenizer.decode(new, skip_special_tokens=True)


def test_langchain_chat_openai_in_an_lcel_chain(server, embedded):
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="alice-token-0001", model="smollm2", temperature=0,
                     max_tokens=20, max_retries=0)
    prompt = ChatPromptTemplate.from_messages([("user", "{doc}\n\nQuestion: {q}")])
    chain = prompt | llm | StrOutputParser()
    answer = chain.invoke({"doc": DOC, "q": "What is the largest vessel?"})
    assert answer == reference(embedded, ask("What is the largest vessel?"), 20)
    msg = llm.invoke(ask("What is the largest vessel?"))
    assert msg.usage_metadata["input_token_details"]["cache_read"] >= msg.usage_metadata["input_tokens"] - 1


def test_document_published_elsewhere_is_hit_through_the_registry(server, embedded, tmp_path):
    text = long_text(1200, embedded.tokenizer)
    publisher = KVAgent(
        embedded.model,
        tokenizer=embedded.tokenizer,
        cache_dir=tmp_path / "a",
        registry_url=server.url,
        token="alice-token-0001",
        policy=PolicyParams(min_tokens=256),
    )
    publisher.publish(publisher.read(text), "public")
    publisher.close()
    c = client(server, "bob-token-000002")  # another principal, another machine: only the registry can help
    msgs = ask("What is this text about?", text)
    r = c.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=16)
    n_doc = len(embedded.tokenizer.encode(text, add_special_tokens=False))
    cache = r.model_extra["kvagent"]["cache"]
    assert cache["source"] == "registry", cache
    assert r.usage.prompt_tokens_details.cached_tokens >= 0.9 * n_doc, cache
    assert r.choices[0].message.content == reference(embedded, msgs, 16)


def test_a_deleted_published_document_is_never_reused_from_a_readers_copies(server, embedded, tmp_path):
    """Issue 34: bob's chats about alice's published document keep copies of its KV in bob's namespace (his
    prompt KV in memory and in the host's store); once alice deletes the artifact, bob's next chat reuses
    none of it (a poisoned artifact quarantined is dropped the same way: ``ModelHost.forget``)."""
    text = "Ferry notes, to be deleted. " + long_text(700, embedded.tokenizer)
    publisher = KVAgent(embedded.model, tokenizer=embedded.tokenizer, cache_dir=tmp_path / "a",
                        registry_url=server.url, token="alice-token-0001",
                        policy=PolicyParams(min_tokens=256))
    key = publisher.publish(publisher.read(text), "public").key
    publisher.close()
    c = client(server, "bob-token-000002")
    msgs = ask("What is this text about?", text)
    n_doc = len(embedded.tokenizer.encode(text, add_special_tokens=False))
    first = c.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=8)
    assert first.model_extra["kvagent"]["cache"]["source"] == "registry", first.model_extra["kvagent"]
    again = c.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=8)
    assert again.usage.prompt_tokens_details.cached_tokens >= 0.9 * n_doc  # bob's own copy now
    r = httpx.delete(f"{server.url}/v1/artifacts/{key}", headers={"Authorization": "Bearer alice-token-0001"},
                     timeout=60)
    assert r.status_code == 204, r.text
    after = c.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=8)
    assert after.usage.prompt_tokens_details.cached_tokens < 0.5 * n_doc, after.model_extra["kvagent"]
    assert after.choices[0].message.content == reference(embedded, msgs, 8)


def test_private_prompts_never_reach_another_principal(server, embedded):
    secret = "Alice's private notes: " + long_text(600, embedded.tokenizer)
    msgs = ask("Summarise.", secret)
    a = client(server, "alice-token-0001")
    a.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=4)
    again = a.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=4)
    assert again.usage.prompt_tokens_details.cached_tokens > 0.9 * again.usage.prompt_tokens
    template = embedded.tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False)
    n_template = len(embedded.tokenizer.encode(template.split("<|im_start|>user")[0] + "<|im_start|>user\n"))
    # the same prompt, and one sharing its long prefix, each from a principal that never sent the text itself
    for token, m in (("bob-token-000002", msgs), ("carol-token-0003", ask("Anything else?", secret))):
        r = client(server, token).chat.completions.create(
            model="smollm2", messages=m, temperature=0, max_tokens=4
        )
        # at most their own earlier prompts' chat-template prefix (the default system prompt), never A's text
        assert r.usage.prompt_tokens_details.cached_tokens <= n_template, r.model_extra["kvagent"]


def test_bad_input_gets_openai_shaped_errors(server):
    c = client(server)
    bad = [
        dict(messages=[{"role": "robot", "content": "x"}]),
        dict(messages=[]),
        dict(messages=[{"role": "user", "content": 5}]),
        dict(messages=ask("x"), n=2),
        dict(messages=ask("x"), temperature="hot"),
        dict(messages=ask("x"), stop=["a", "b", "c", "d", "e"]),
    ]
    for kw in bad:
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="smollm2", **kw)
        assert err.value.status_code == 400 and err.value.body["type"] == "invalid_request_error", kw
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="smollm2", messages=ask("x"), max_tokens=9000)
    assert err.value.body["code"] == "context_length_exceeded" and "8192" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(
            model="smollm2",
            messages=ask("x"),
            tools=[
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
                }
            ],
        )
    assert "smollm2" in err.value.body["message"] and "tools" in err.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        client(server, "not-a-valid-token").chat.completions.create(model="smollm2", messages=ask("x"))
    raw = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                     headers={"Authorization": "Bearer alice-token-0001"}, timeout=30)
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_disconnect_stops_generation_and_a_full_queue_says_429(server):
    c = client(server)
    before = _metric(server, "kvagent_generation_tokens_total")
    stream = c.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Count to 1000."}],
        temperature=0,
        max_tokens=2000,
        stream=True,
    )
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the client goes away mid-stream
    busy: list[int] = []

    def hold() -> None:  # two long requests fill the 2-slot queue: one generating, one waiting for the model
        with httpx.stream(
            "POST",
            server.url + "/v1/chat/completions",
            timeout=300,
            headers={"Authorization": "Bearer alice-token-0001"},
            json={
                "model": "smollm2",
                "messages": [{"role": "user", "content": "Tell a long story."}],
                "max_tokens": 60,
                "temperature": 0,
                "stream": True,
            },
        ) as r:
            busy.append(r.status_code)
            for _ in r.iter_bytes():
                pass

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while not busy and time.monotonic() < deadline:  # the first one streams (the second waits behind it)
        time.sleep(0.05)
    time.sleep(1.0)
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model="smollm2", messages=ask("x"), max_tokens=2)
    assert int(err.value.response.headers["retry-after"]) >= 1
    for t in threads:
        t.join(300)
    assert busy == [200, 200]
    generated = _metric(server, "kvagent_generation_tokens_total") - before
    assert generated < 2000 + 2 * 60  # the abandoned stream stopped long before its 2000 tokens
    assert _metric(server, 'kvagent_completion_requests_total{endpoint="chat",result="cancelled"}') >= 1
    assert _metric(server, "kvagent_prefix_cache_queries_total") > 0
    assert "kvagent_time_to_first_token_seconds_bucket" in httpx.get(server.url + "/metrics", timeout=10).text


def test_registry_only_node_has_no_model(tmp_path):
    srv = start_server(tmp_path / "data", TOKENS)
    try:
        c = client(srv)
        assert c.models.list().data == []
        with pytest.raises(openai.NotFoundError) as err:
            c.chat.completions.create(model="smollm2", messages=ask("x"))
        assert err.value.body["code"] == "model_not_found"
    finally:
        srv.stop()


def test_shared_prefix_is_token_level():
    assert shared_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert shared_prefix([1, 2], [1, 2, 3]) == 2
    assert shared_prefix([], [1]) == 0


def test_document_read_and_chat_ids_differ_only_at_the_end(embedded, tmp_path):
    """The measured fact the endpoint handles: a document's ids inside a chat message can differ at its last
    token (BPE merges across the boundary), so reuse must be token-level, not per artifact."""
    agent = KVAgent(embedded.model, tokenizer=embedded.tokenizer, cache_dir=tmp_path)
    doc_ids = agent.document_ids(DOC)
    chat = embedded.tokenizer.apply_chat_template(ask("Where?"), add_generation_prompt=True, tokenize=True)
    chat = chat["input_ids"] if not isinstance(chat, list) else chat
    n = shared_prefix(doc_ids, chat)
    assert len(doc_ids) - 2 <= n <= len(doc_ids)
    agent.close()


@pytest.mark.parametrize(("max_tokens", "stop", "finish"), [
    (64, [], "stop"),  # the model's end-of-turn token (the answer is 52 tokens)
    (8, [], "length"),
    (64, ["Holloway"], "stop"),  # a stop string inside the answer
])
def test_the_facade_and_the_endpoint_finish_alike(server, embedded, tmp_path, max_tokens, stop, finish):
    """KVAgent and the OpenAI-compatible endpoint generate through one turn core: for the same prompt ids
    they give the same text, the same finish reason and the same number of tokens (EOS, max tokens, a
    stop string)."""
    agent = KVAgent(embedded.model, tokenizer=embedded.tokenizer, cache_dir=tmp_path)
    doc = agent.read(DOC)
    question = agent.template.question_ids(agent.tokenizer, "Who founded the company?")
    ans = agent.ask_ids(doc, question, max_new_tokens=max_tokens, stop=stop)
    streamed = "".join(agent.stream(doc, "Who founded the company?", max_new_tokens=max_tokens, stop=stop))
    agent.close()
    r = client(server).completions.create(model="smollm2", prompt=[*doc.token_ids, *question], temperature=0,
                                          max_tokens=max_tokens, stop=stop or None)
    choice = r.choices[0]
    assert (ans.finish_reason, choice.finish_reason) == (finish, finish)
    assert ans.text and ans.text == choice.text.strip() == streamed.strip()
    assert len(ans.token_ids) == r.usage.completion_tokens
    assert all(s not in ans.text for s in stop)
    if finish == "length":
        assert len(ans.token_ids) == max_tokens
    elif not stop:
        assert ans.token_ids[-1] in agent.template.stop_token_ids


def test_metrics_follow_prometheus_naming(server):
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("kvagent_prefix_cache_queries_total", "kvagent_prefix_cache_hits_total",
                 "kvagent_time_to_first_token_seconds_count"):
        assert name in text, name

