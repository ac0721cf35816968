"""The KVAgentConnector in a real vLLM server (CPU), against a real kvagent registry and SDK agents.

"vLLM's own full prefill" is the same server answering the same token ids under a fresh ``cache_salt``: a
salted request shares no KV with anything (neither vLLM's prefix cache nor kvagent's), so it computes the
whole prompt.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from kvagent import KVAgent, KVCache, KVStore, block_hashes
from kvagent.artifacts import format as art
from kvagent.client.registry import RegistryClient

pytestmark = pytest.mark.vllm

from vllm_procs import ADMIN, ALICE, VLLM_TOKEN  # noqa: E402

ENGINE_PREFIX = "vllm "


def document(paragraphs: list[str], agent: KVAgent, index: int, tokens: int = 700) -> str:
    """A distinct document of about ``tokens`` tokens: the sample's paragraphs from a different start."""
    out: list[str] = []
    i = (index * 3) % len(paragraphs)
    while len(agent.document_ids("\n\n".join(out))) < tokens:
        out.append(paragraphs[i % len(paragraphs)])
        i += 1
    return f"Document {index}.\n\n" + "\n\n".join(out)


def prompt(agent: KVAgent, doc_ids: tuple[int, ...] | list[int], question: str) -> list[int]:
    assert agent.template is not None
    return list(doc_ids) + list(agent.template.question_ids(agent.tokenizer, question))


def cached(resp: dict[str, Any]) -> int:
    details = resp["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def text(resp: dict[str, Any]) -> str:
    return str(resp["choices"][0]["text"])


def full_prefill(server: Any, ids: list[int]) -> dict[str, Any]:
    resp = server.complete(ids, cache_salt=f"fresh-{uuid.uuid4().hex}")
    assert cached(resp) == 0, "a fresh salt must share nothing"
    return resp


def test_reuses_a_document_an_sdk_agent_published(
    vllm_server: Any, alice: KVAgent, paragraphs: list[str]
) -> None:
    doc = alice.read(document(paragraphs, alice, 0))
    alice.publish(doc, "public")
    ids = prompt(alice, doc.token_ids, "What is this document about?")
    reference = full_prefill(vllm_server, ids)
    got = vllm_server.complete(ids)
    assert cached(got) >= doc.n_tokens - 128 and cached(got) > 0, (cached(got), doc.n_tokens)
    assert text(got) == text(reference)
    assert "from kvagent (registry" in vllm_server.log()


def test_a_prompt_vllm_computed_is_read_back_by_an_sdk_agent(
    vllm_server: Any, model_dir: Any, registry: Any, alice: KVAgent, paragraphs: list[str]
) -> None:
    reader = KVAgent(
        cache_dir=vllm_server.cache_dir, calibration=False
    )  # the vLLM host's own cache directory
    try:
        body = document(paragraphs, reader, 1)
        doc_ids = reader.document_ids(body)
        vllm_server.complete(prompt(reader, doc_ids, "Summarise it."), max_tokens=4)
        store = KVStore(reader.config.store_dir)
        hashes = block_hashes(reader.context, doc_ids, reader.config.block_size)
        deadline = time.monotonic() + 120
        while (hit := store.find_prefix(hashes)) is None and time.monotonic() < deadline:
            time.sleep(0.5)  # the connector writes artifacts on a background thread
        assert hit is not None, vllm_server.log()[-3000:]
        header = store.get(hit[0], expect=reader.expect).artifact.header  # type: ignore[union-attr]
        assert header.engine is not None and header.engine.startswith(ENGINE_PREFIX)
        doc = reader.read(body)
        assert doc.cache.source == "store" and doc.cache.cached_tokens == len(doc_ids), doc.cache
        report = reader.verify(doc, "Summarise it.")  # KV computed by vLLM, decoded by transformers
        assert report.exact, report
        # published too (unsalted, publish="public"): another machine finds it
        found = RegistryClient(registry.url, ALICE).lookup_prefix(hashes)
        assert found is not None and found[0].key == hit[0]
    finally:
        reader.close()


def test_a_priced_artifact_is_bought_once_and_charged_once(
    vllm_server: Any, registry: Any, alice: KVAgent, paragraphs: list[str]
) -> None:
    with RegistryClient(registry.url, ADMIN) as admin:
        admin.credit("vllmhost", 100_000)
    doc = alice.read(document(paragraphs, alice, 2))
    handle = alice.publish(doc, "public", price=1500)
    first = vllm_server.complete(prompt(alice, doc.token_ids, "Who is mentioned first?"))
    second = vllm_server.complete(prompt(alice, doc.token_ids, "What is the last point?"))
    assert cached(first) > 0 and cached(second) > 0
    with RegistryClient(registry.url, VLLM_TOKEN) as host:
        purchases = [p for p in host.statement()["purchases"] if p["key"] == handle.key]
    assert purchases == [{"key": handle.key, "loads": 1, "amount": 1500, "royalties": 0, "refunds": 0}]


def test_a_registry_that_is_down_or_lying_changes_no_answer(
    vllm_server: Any, proxy: Any, registry: Any, alice: KVAgent, paragraphs: list[str]
) -> None:
    down = alice.read(document(paragraphs, alice, 3))
    lying = alice.read(document(paragraphs, alice, 4))
    poisoned = alice.read(document(paragraphs, alice, 5))
    alice.publish(down, "public")
    alice.publish(lying, "public")
    _publish_poisoned(alice, registry, poisoned)
    try:
        for doc, mode in ((down, "down"), (lying, "lie"), (poisoned, "pass")):
            proxy.mode = mode
            ids = prompt(alice, doc.token_ids, "What does it say?")
            got = vllm_server.complete(ids)
            assert cached(got) == 0, (mode, cached(got))
            assert text(got) == text(full_prefill(vllm_server, ids)), mode
    finally:
        proxy.mode = "pass"
    log = vllm_server.log()
    assert "failed" in log and "verification" in log


def _publish_poisoned(alice: KVAgent, registry: Any, doc: Any) -> None:
    """Publish under ``doc``'s key a well-formed artifact whose KV is not its tokens' (layer 3 is off)."""
    kv = alice.kv_of(doc)
    values = list(kv.values)
    values[3] = values[3] * 1.5
    bad = KVCache(keys=kv.keys, values=tuple(values), token_ids=kv.token_ids)
    ctx = alice.context
    _, blob = art.encode(
        bad,
        model_fingerprint=ctx.model_fingerprint,
        tokenizer_fingerprint=ctx.tokenizer_fingerprint,
        template_hash=ctx.template_hash,
    )
    with RegistryClient(registry.url, ALICE) as client:
        client.publish(blob, "public")


def test_salted_requests_never_share_kv(
    vllm_server: Any, registry: Any, alice: KVAgent, paragraphs: list[str]
) -> None:
    body = document(paragraphs, alice, 6)
    doc_ids = alice.document_ids(body)
    ids = prompt(alice, doc_ids, "Name one thing it covers.")
    a1 = vllm_server.complete(ids, cache_salt="tenant-a")
    b = vllm_server.complete(ids, cache_salt="tenant-b")
    time.sleep(2)  # let the connector's background saves finish
    hashes = block_hashes(alice.context, doc_ids, alice.config.block_size)
    with RegistryClient(registry.url, ALICE) as client:
        assert client.lookup_prefix(hashes) is None, "a salted prompt's KV was published"
    plain = vllm_server.complete(ids)
    a2 = vllm_server.complete(ids, cache_salt="tenant-a")
    assert cached(a1) == 0 and cached(b) == 0 and cached(plain) == 0
    assert cached(a2) > 0  # the same tenant reuses its own prompt
    assert text(a1) == text(b) == text(plain) == text(a2)
