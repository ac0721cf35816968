"""LangChain chains on the embedded model: cached output equals uncached output, and hits are reported."""

from __future__ import annotations

import pytest
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate

from langchain_kvagent import ChatKVAgent, KVAgentLLM, KVDocumentLoader
from langchain_kvagent.chat_models import to_chat_dicts

pytestmark = pytest.mark.slow


def tokens_through_document(agent, messages, document: str) -> int:  # type: ignore[no-untyped-def]
    """How many prompt tokens precede the document's end (less one that may merge with what follows)."""
    rendered = agent.tokenizer.apply_chat_template(
        to_chat_dicts(messages), tokenize=False, add_generation_prompt=True
    )
    end = rendered.index(document) + len(document)
    return len(agent.tokenizer.encode(rendered[:end], add_special_tokens=False)) - 1


QUESTIONS = ["Who founded the company?", "How long did the first crossing take?"]


def test_loader_reads_each_document_once(agent, document) -> None:  # type: ignore[no-untyped-def]
    sources = [Document(page_content=document, metadata={"source": "sample"}), "A short note about seals."]
    first = list(KVDocumentLoader(sources, agent=agent).lazy_load())
    again = list(KVDocumentLoader(sources, agent=agent).lazy_load())
    assert [d.page_content for d in first] == [document, "A short note about seals."]
    assert first[0].metadata["source"] == "sample"
    for doc in first + again:
        assert doc.metadata["kv_key"] == agent.key_of(agent.document_ids(doc.page_content))
        assert doc.metadata["kv_tokens"] == len(agent.document_ids(doc.page_content))
        assert doc.metadata["kv_reason"]
    assert {d.metadata["kv_status"] for d in again} <= {"memory", "local"}


@pytest.mark.parametrize("layout", ["system", "human"])
def test_chat_chain_cached_equals_uncached_and_second_call_hits(agent, document, layout) -> None:  # type: ignore[no-untyped-def]
    if layout == "system":
        prompt = ChatPromptTemplate.from_messages(
            [("system", "Answer from this document.\n\n{context}"), ("human", "{question}")]
        )
    else:
        prompt = ChatPromptTemplate.from_messages([("human", "{context}\n\nQuestion: {question}")])
    agent.forget_memory()
    agent.store.clear()
    cached = ChatKVAgent(agent=agent, max_tokens=16)
    uncached = ChatKVAgent(agent=agent, max_tokens=16, kv_reuse=False)
    for i, question in enumerate(QUESTIONS):
        inputs = {"context": document, "question": question}
        message = (prompt | cached).invoke(inputs)
        reference = (prompt | uncached | StrOutputParser()).invoke(inputs)
        assert message.content == reference
        meta = message.response_metadata
        assert meta["kv_cached_tokens"] + meta["kv_prefilled_tokens"] == meta["prompt_tokens"]
        if i == 1:
            n_doc = tokens_through_document(agent, prompt.format_messages(**inputs), document)
            assert meta["kv_status"] == "prefix" and meta["kv_cached_tokens"] >= n_doc, (n_doc, meta)
            assert message.usage_metadata["input_token_details"]["cache_read"] == meta["kv_cached_tokens"]


def test_llm_chain_hits_a_document_read_by_the_loader(agent, document) -> None:  # type: ignore[no-untyped-def]
    agent.forget_memory()
    agent.store.clear()
    (doc,) = KVDocumentLoader([document], agent=agent).lazy_load()
    assert doc.metadata["kv_status"] == "prefill"
    llm = KVAgentLLM(agent=agent, max_tokens=16)
    prompt = PromptTemplate.from_template("{context}\n\nQuestion: {question}")
    result = (prompt | llm.bind(max_tokens=16)).invoke({"context": document, "question": QUESTIONS[0]})
    reference = (prompt | KVAgentLLM(agent=agent, max_tokens=16, kv_reuse=False)).invoke(
        {"context": document, "question": QUESTIONS[0]}
    )
    assert result == reference
    info = (
        llm.generate([prompt.format(context=document, question=QUESTIONS[1])])
        .generations[0][0]
        .generation_info
    )
    assert info is not None and info["kv_status"] == "prefix"
    # The document's last token merges with the "\n\n" that follows it, so all but at most one are reused.
    assert info["kv_cached_tokens"] >= doc.metadata["kv_tokens"] - 1


def test_stream_gives_the_same_text_as_invoke(agent, document) -> None:  # type: ignore[no-untyped-def]
    chat = ChatKVAgent(agent=agent, max_tokens=20)
    messages = [("human", f"{document}\n\nQuestion: {QUESTIONS[1]}")]
    chunks = list(chat.stream(messages))
    assert len(chunks) > 2
    assert "".join(c.text for c in chunks) == chat.invoke(messages).content
    # memory: the same prompt
    assert chunks[-1].response_metadata["kv_status"] in ("memory", "prefix", "prefill")
    llm = KVAgentLLM(agent=agent, max_tokens=20)
    prompt = f"{document}\n\nQuestion: {QUESTIONS[0]}"
    assert "".join(llm.stream(prompt)) == llm.invoke(prompt)


def test_stop_strings_end_the_text(agent, document) -> None:  # type: ignore[no-untyped-def]
    llm = KVAgentLLM(agent=agent, max_tokens=24)
    prompt = f"{document}\n\nQuestion: {QUESTIONS[0]}"
    full = llm.invoke(prompt)
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    cut = llm.invoke(prompt, stop=[stop])
    assert cut == full[: full.index(stop)]
    assert "".join(llm.stream(prompt, stop=[stop])) == cut
    result = llm.generate([prompt], stop=[stop]).generations[0][0]
    assert result.generation_info["finish_reason"] == "stop"


def test_batch_and_max_tokens(agent, document) -> None:  # type: ignore[no-untyped-def]
    chat = ChatKVAgent(agent=agent, max_tokens=4, kv_save_prompts=False)
    prompts = [[("human", f"{document}\n\nQuestion: {q}")] for q in QUESTIONS]
    out = chat.batch(prompts, config={"max_concurrency": 1})
    assert [m.response_metadata["completion_tokens"] for m in out] == [4, 4]
    assert [m.content for m in out] == [chat.invoke(p).content for p in prompts]


def test_callbacks_receive_each_token(agent, document) -> None:  # type: ignore[no-untyped-def]
    from langchain_core.callbacks import BaseCallbackHandler

    class Tokens(BaseCallbackHandler):
        def __init__(self) -> None:
            self.tokens: list[str] = []

        def on_llm_new_token(self, token: str, **kwargs) -> None:  # type: ignore[no-untyped-def]
            self.tokens.append(token)

    handler = Tokens()
    chat = ChatKVAgent(agent=agent, max_tokens=8)
    text = "".join(
        c.text
        for c in chat.stream(f"{document}\n\nQuestion: {QUESTIONS[0]}", config={"callbacks": [handler]})
    )
    assert "".join(handler.tokens) == text and text


def test_identifying_params_hold_settings_only(agent) -> None:  # type: ignore[no-untyped-def]
    params = ChatKVAgent(agent=agent, temperature=0.5, max_tokens=7)._identifying_params
    assert params["max_tokens"] == 7 and params["temperature"] == 0.5
    assert params["model_fingerprint"] == agent.context.model_fingerprint
    assert all(isinstance(v, (str, int, float, type(None), list)) for v in params.values())
