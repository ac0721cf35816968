"""Sequences of the batching engine that resume from one prefix read it in place, attended to together
(kvagent.engines.batch: ``_Segment``; kvagent.engines.attention: ``_cascade``): each reply still equals
greedy decoding from a full prefill of its own ids; a segment is shared by what its KV is (its source),
never by token ids: a published artifact's bytes across principals, private KV only in its namespace,
equal ids with other K/V never; a prefix shorter or longer than the shared one shares what both name; a
member that leaves does not change the others."""

from __future__ import annotations

import collections
import threading
from typing import Any

import pytest
import torch

import kvagent.engines.attention as attention
import kvagent.engines.batch as batched
from kvagent.engines import GenerationRequest, TransformersBatchEngine, events
from kvagent.engines.hf import TransformersEngine
from kvagent.engines.params import GenerationParams
from kvagent.kvcache.tensors import KVCache, KVSource
from tests.test_batching import _chat_ids, _hf_greedy, _ids, _tokens, _tokens_at_once, _with_a_leaver

GREEDY = GenerationParams(max_new_tokens=20)


class Spy:
    """Records every shared-prefix attention call's group size and the segment each admitted sequence got."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.groups: list[int] = []
        self.admitted: list[tuple[int | None, int, int]] = []  # (segment id, seg_n, base) per sequence
        self.prefixes: list[int] = []  # the prefix length of each, in the same order
        real_cascade, real_buffers = attention._cascade, batched.TransformersBatchEngine._buffers

        def cascade(query: Any, out: Any, rows: Any, members: Any, *args: Any) -> None:
            self.groups.append(len(members))
            real_cascade(query, out, rows, members, *args)

        def buffers(engine: Any, seq: Any, live: Any = None, share: Any = None) -> None:
            real_buffers(engine, seq, live, share)
            seg = seq.segment
            self.admitted.append((None if seg is None else id(seg), seq.seg_n, seq.base))
            self.prefixes.append(seq.request.prefix.n_tokens if seq.request.prefix is not None else 0)

        monkeypatch.setattr(attention, "_cascade", cascade)
        monkeypatch.setattr(batched.TransformersBatchEngine, "_buffers", buffers)

    def ready(self, batch: TransformersBatchEngine) -> TransformersBatchEngine:
        """``batch`` probed (its probe shares too), and what the probe did forgotten."""
        assert batch.chunked_prefill and batch._shares
        self.groups.clear()
        self.admitted.clear()
        self.prefixes.clear()
        return batch


def _tiny_batch(
    tiny_model: Any, spy: Spy, doc_tokens: int, seed: int
) -> tuple[Any, TransformersEngine, TransformersBatchEngine, list[int], KVCache]:
    """The tiny llama, its engine, a probed batching engine watched by ``spy``, a document and its KV."""
    model = tiny_model("llama")
    engine = TransformersEngine(model)
    batch = spy.ready(TransformersBatchEngine(engine, max_batch=8))
    doc = _ids(doc_tokens, seed)
    return model, engine, batch, doc, engine.prefill(doc)


def _copy(kv: KVCache) -> KVCache:
    """The same KV in storage of its own."""
    return KVCache(
        keys=tuple(k.clone() for k in kv.keys), values=tuple(v.clone() for v in kv.values),
        token_ids=kv.token_ids.clone(),
    )


def test_eight_agents_on_one_document_read_it_once_and_each_equals_generate(
    embedded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SmolLM2 (grouped-query attention, 9 query heads over 3): eight questions about one cached document,
    submitted at once; their tails are prefilled and decoded as one group over the document's KV, and each
    reply is transformers' greedy generate on the whole prompt."""
    from tests.conftest import long_text

    spy = Spy(monkeypatch)
    tok, engine = embedded.tokenizer, TransformersEngine(embedded.model)
    batch = spy.ready(TransformersBatchEngine(engine, max_batch=8, tokenizer=tok))
    doc = long_text(220, tok)
    prompts = [
        _chat_ids(tok, f"{doc}\n\nQuestion {i}: what does it say about item {i * 7}?") for i in range(8)
    ]
    common = min(batched.shared_prefix(prompts[0], p) for p in prompts)
    assert common > batched.SHARE_MIN
    kv = engine.prefill(prompts[0][:common])
    params = GenerationParams(max_new_tokens=16)
    out = _tokens_at_once(
        batch, [GenerationRequest(tuple(p[common:]), kv, params, namespace="ns-a") for p in prompts]
    )
    assert [o[0] for o in out] == [_hf_greedy(embedded.model, p, 16) for p in prompts]
    assert all(o[1].usage.cached_tokens == common for o in out)
    assert len({a[0] for a in spy.admitted}) == 1, "the eight did not share one segment"
    assert max(spy.groups) == 8
    batch.close()


def test_private_kv_shares_only_in_its_namespace_and_only_as_the_same_kv(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A private KV (computed here) is read in place only by requests of its namespace whose prefix is that
    KV (the same source: here a copy of its bytes under its name, as two reads of one stored artifact give
    it); the same tokens with K/V named by nothing, or the same KV in another namespace, read their own."""
    spy = Spy(monkeypatch)
    model, _engine, batch, doc, kv = _tiny_batch(tiny_model, spy, 120, 5)
    assert kv.source is not None and not kv.source.published
    requests = [
        GenerationRequest(tuple(_ids(4, 10)), kv, GREEDY, namespace="alice"),
        GenerationRequest(tuple(_ids(5, 11)), _copy(kv).with_source(kv.source), GREEDY, namespace="alice"),
        GenerationRequest(tuple(_ids(3, 14)), _copy(kv), GREEDY, namespace="alice"),
        GenerationRequest(tuple(_ids(6, 12)), kv, GREEDY, namespace="bob"),
        GenerationRequest(tuple(_ids(7, 13)), kv, GREEDY, namespace=None),
    ]
    out = _tokens_at_once(batch, requests)
    want = [_hf_greedy(model, doc + list(r.prompt_ids), GREEDY.max_new_tokens) for r in requests]
    assert [o[0] for o in out] == want
    segments = collections.Counter(seg for seg, _n, _base in spy.admitted)
    # alice's two of one source share; the unnamed copy, bob and None alone
    assert sorted(segments.values()) == [1, 1, 1, 2], spy.admitted
    batch.close()


class Shared(batched.BatchObserver):
    """Counts the decode-step sequences that read a shared prefix in place (what the server's
    ``kvagent_batch_shared_prefix_size`` observes)."""

    def __init__(self) -> None:
        self.sequences = 0

    def shared_prefix(self, sequences: int) -> None:
        self.sequences += sequences


def _published(kv: KVCache, name: str) -> KVCache:
    """``kv`` as a published artifact's decoded KV (named by its bytes)."""
    return kv.with_source(KVSource(f"artifact:{name}", kv.n_tokens, published=True, artifact=name))


def _tampered(kv: KVCache) -> KVCache:
    """The same token ids with other K/V (as a publisher who checks hashes, not KV, could publish)."""
    g = torch.Generator().manual_seed(99)
    return KVCache(
        keys=tuple(k * 3 + torch.randn(k.shape, generator=g) for k in kv.keys),
        values=tuple(v * -2 + torch.randn(v.shape, generator=g) for v in kv.values),
        token_ids=kv.token_ids.clone(),
    )


def test_equal_ids_with_other_kv_never_join_even_in_one_namespace(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack of issue 34: a tampered artifact with a genuine document's leading ids (another key) kept
    generating; a request on the genuine one (hosted generation ran every principal in one namespace) must
    attend to its own K/V: each reply equals its own KV's unbatched generation, nothing shared."""
    spy = Spy(monkeypatch)
    model, engine, batch, doc, kv = _tiny_batch(tiny_model, spy, 150, 15)
    shared = Shared()
    batch.observer = shared
    genuine = _published(kv, "g" * 64)
    bad = _published(_tampered(kv), "b" * 64).truncate(120)  # equal leading ids, a prefix of them
    long = GenerationParams(max_new_tokens=60)
    attacker = _tokens_in_background(batch, GenerationRequest(tuple(_ids(4, 40)), bad, long))
    victims = [GenerationRequest(tuple(_ids(5 + i, 41 + i)), genuine, GREEDY) for i in range(2)]
    out = _tokens_at_once(batch, victims)
    attacker.join(120)
    assert [o[0] for o in out] == [
        _hf_greedy(model, doc + list(r.prompt_ids), GREEDY.max_new_tokens) for r in victims
    ]
    solo = engine.generate(bad, _ids(4, 40), long).token_ids
    assert attacker.result[0] == solo  # type: ignore[attr-defined]
    attacker_seg = spy.admitted[0][0]
    assert all(a[0] != attacker_seg for a in spy.admitted[1:]), spy.admitted
    assert spy.admitted[1][0] == spy.admitted[2][0]  # the two on the genuine bytes read one copy
    batch.close()


def test_principals_on_one_published_artifact_share_it_and_private_kv_never(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three principals on one published artifact (each its own namespace, each its own decoded copy of the
    same bytes, one of them only its first 100 positions: a longer prompt starting with the document) read
    it in place together; a private KV with the same ids in a fourth namespace reads its own. Every reply
    equals greedy decoding of its own ids."""
    spy = Spy(monkeypatch)
    model, engine, batch, doc, kv = _tiny_batch(tiny_model, spy, 150, 16)
    shared = Shared()
    batch.observer = shared
    published = [_published(_copy(kv), "d" * 64) for _ in range(3)]
    requests = [
        GenerationRequest(tuple(_ids(4, 50)), published[0], GREEDY, namespace="alice"),
        GenerationRequest(tuple(_ids(5, 51)), published[1], GREEDY, namespace="bob"),
        GenerationRequest(tuple(_ids(6, 52)), published[2].truncate(100), GREEDY, namespace="carol"),
        GenerationRequest(tuple(_ids(7, 53)), engine.prefill(doc), GREEDY, namespace="dave"),
    ]
    first = _tokens_in_background(batch, requests[0])  # the first admitted: its copy becomes the segment
    out = _tokens_at_once(batch, requests[1:])
    first.join(120)
    got = [first.result, *out]  # type: ignore[attr-defined]
    prefixes = [doc, doc, doc[:100], doc]
    assert [g[0] for g in got] == [
        _hf_greedy(model, p + list(r.prompt_ids), GREEDY.max_new_tokens)
        for p, r in zip(prefixes, requests, strict=True)
    ]
    seg = spy.admitted[0][0]
    readers = {(n, base) for s, n, base in spy.admitted[1:] if s == seg}
    assert readers == {(150, 150), (100, 100)}, spy.admitted  # bob whole, carol her 100 positions
    assert sum(1 for s, _n, _b in spy.admitted if s == seg) == 3  # dave's private KV is not among them
    assert shared.sequences > 0
    batch.close()


def test_prefixes_shorter_or_longer_than_the_shared_one_share_what_they_have_in_common(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefix of 100 of the segment's 150 tokens reads 100 in place; one of 150 + 30 reads 150 and copies
    its last 30; both replies and both kept prompt KVs equal a full prefill's."""
    spy = Spy(monkeypatch)
    model, engine, batch, doc, full = _tiny_batch(tiny_model, spy, 180, 6)
    cases = [(150, _ids(3, 20)), (100, _ids(9, 21)), (180, _ids(2, 22)), (150, _ids(1, 23))]
    kept: list[list[KVCache]] = [[] for _ in cases]
    requests = [
        GenerationRequest(tuple(tail), full.truncate(n), GREEDY, on_prompt=kept[i].append, namespace="n")
        for i, (n, tail) in enumerate(cases)
    ]
    first = _tokens_in_background(batch, requests[0])  # the first admitted: its prefix becomes the segment
    out = _tokens_at_once(batch, requests[1:])
    first.join(120)
    got = [first.result, *out]  # type: ignore[attr-defined]
    want = [_hf_greedy(model, doc[:n] + tail, GREEDY.max_new_tokens) for n, tail in cases]
    assert [g[0] for g in got] == want
    got_layout = [(n, *a[1:]) for n, a in zip(spy.prefixes, spy.admitted, strict=True)]
    assert got_layout[0] == (150, 150, 0)  # (prefix, read from the segment, buffers start at)
    assert sorted(got_layout[1:]) == [(100, 100, 100), (150, 150, 150), (180, 150, 150)], got_layout
    assert len({a[0] for a in spy.admitted}) == 1
    for (n, tail), k in zip(cases, kept, strict=True):
        ref = engine.prefill(doc[:n] + tail)
        assert k[0].token_ids.tolist() == doc[:n] + tail
        for a, b in zip((*k[0].keys, *k[0].values), (*ref.keys, *ref.values), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    batch.close()


def _tokens_in_background(batch: Any, request: GenerationRequest) -> threading.Thread:
    """Start ``_tokens`` on a thread and return once the request is decoding (its first token is out)."""
    first = threading.Event()

    def run() -> None:
        toks, fin = [], None
        for ev in events(batch, request):
            if hasattr(ev, "token_id"):
                toks.append(ev.token_id)
                first.set()
            else:
                fin = ev
        t.result = (toks, fin)  # type: ignore[attr-defined]
        first.set()

    t = threading.Thread(target=run)
    t.start()
    assert first.wait(60)
    return t


def test_a_prompt_kv_computed_after_a_short_cached_prefix_is_shared_by_what_it_computed(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CI flake of test_concurrent_chat's shared-document test, at its cause: alice's document prompt
    resumed from a 3-token cached prefix (a chat template's first tokens), and the prompt KV the engine kept
    was named by that prefix's source alone, over 3 positions; so the agents that later resumed from the
    document's KV never read it in place together (fewer than SHARE_MIN named positions). Now the kept KV
    names all its positions (its prefix's source stays its base), and they share it."""
    spy = Spy(monkeypatch)
    model, engine, batch, doc, _kv = _tiny_batch(tiny_model, spy, 140, 8)
    short = engine.prefill(doc[:3])
    kept: list[KVCache] = []
    _tokens(batch, GenerationRequest(tuple(doc[3:]), short, GREEDY, on_prompt=kept.append, namespace="alice"))
    (prompt,) = kept
    assert prompt.source is not None and prompt.source.n == len(doc)
    assert [s.n for s in prompt.source.lineage()] == [len(doc), 3]
    spy.admitted.clear()
    shared = Shared()
    batch.observer = shared
    requests = [
        GenerationRequest(tuple(_ids(4 + i, 60 + i)), prompt, GREEDY, namespace="alice") for i in range(3)
    ]
    first = _tokens_in_background(batch, requests[0])
    out = _tokens_at_once(batch, requests[1:])
    first.join(120)
    got = [first.result, *out]  # type: ignore[attr-defined]
    assert [g[0] for g in got] == [
        _hf_greedy(model, doc + list(r.prompt_ids), GREEDY.max_new_tokens) for r in requests
    ]
    assert len({a[0] for a in spy.admitted}) == 1, spy.admitted
    assert sorted(n for _s, n, _b in spy.admitted) == [len(doc)] * 3
    assert shared.sequences > 0
    batch.close()


def test_a_prompt_kv_extended_from_a_published_artifact_still_shares_the_artifact(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alice's prompt KV computed after a published document names its own positions (private to her) and,
    through its base, the document's: bob, reading the artifact itself, reads the document's positions in
    place beside her; carol, in another namespace with alice's KV (which the resolver never hands her),
    reads only the published positions in common with them, never alice's own."""
    spy = Spy(monkeypatch)
    model, engine, batch, doc, kv = _tiny_batch(tiny_model, spy, 130, 9)
    published = _published(kv, "e" * 64)
    question = _ids(20, 70)
    alice_kv = engine.prefill_from(published, question)
    assert alice_kv.source is not None and not alice_kv.source.published
    pub = alice_kv.source.published_part()
    assert pub is not None and pub.n == len(doc) and pub.artifact == "e" * 64
    requests = [
        GenerationRequest(tuple(_ids(3, 80)), alice_kv, GREEDY, namespace="alice"),
        GenerationRequest(tuple(_ids(5, 81)), _published(_copy(kv), "e" * 64), GREEDY, namespace="bob"),
        GenerationRequest(tuple(_ids(4, 82)), alice_kv, GREEDY, namespace="carol"),
    ]
    first = _tokens_in_background(batch, requests[0])  # alice's KV becomes the segment
    out = _tokens_at_once(batch, requests[1:])
    first.join(120)
    got = [first.result, *out]  # type: ignore[attr-defined]
    prefixes = [doc + question, doc, doc + question]
    assert [g[0] for g in got] == [
        _hf_greedy(model, p + list(r.prompt_ids), GREEDY.max_new_tokens)
        for p, r in zip(prefixes, requests, strict=True)
    ]
    seg = spy.admitted[0][0]
    assert spy.admitted[0][1] == len(doc) + len(question)
    assert sorted(n for s, n, _b in spy.admitted[1:] if s == seg) == [len(doc), len(doc)], spy.admitted
    batch.close()


def test_a_lineage_stays_bounded_and_keeps_its_first_source() -> None:
    """A conversation extends its KV turn after turn: its source's lineage keeps at most MAX_LINEAGE
    sources, the newest and the first (a published document's), each naming fewer positions than the
    one before, and clipping a KV to its first positions names them by the source that covers them."""
    from kvagent.kvcache.tensors import MAX_LINEAGE, extended_source

    def kv_of(n: int, source: KVSource | None) -> KVCache:
        z = torch.zeros((1, 1, n, 2))
        return KVCache(keys=(z,), values=(z,), token_ids=torch.arange(n), source=source)

    kv = kv_of(100, KVSource("artifact:doc", 100, published=True, artifact="d" * 64))
    for turn in range(1, 21):
        kv = kv_of(100 + 10 * turn, extended_source(kv, 100 + 10 * turn))
    assert kv.source is not None
    chain = kv.source.lineage()
    assert len(chain) == MAX_LINEAGE and chain[0].n == 300 and chain[-1].digest == "artifact:doc"
    assert all(a.n > b.n for a, b in zip(chain, chain[1:], strict=False)) and kv.source.artifact == "d" * 64
    assert kv.truncate(100).source == chain[-1] and kv.truncate(295).source.n == 295  # type: ignore[union-attr]
    assert extended_source(kv, 300) is kv.source  # nothing computed: the same source


def test_a_member_that_leaves_does_not_change_the_others(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    model, _engine, batch, doc, kv = _tiny_batch(tiny_model, spy, 100, 7)
    tails = [_ids(3 + i, 30 + i) for i in range(3)]
    params = GenerationParams(max_new_tokens=30)
    results, left = _with_a_leaver(
        batch,
        [GenerationRequest(tuple(t), kv, params) for t in tails],
        GenerationRequest(tuple(_ids(4, 99)), kv, GenerationParams(max_new_tokens=400)),
    )
    assert left
    assert [r[0] for r in results] == [_hf_greedy(model, doc + t, 30) for t in tails]
    assert 4 in spy.groups and max(spy.groups[-5:]) <= 3


def test_sharing_is_off_when_asked_and_the_replies_are_the_same(tiny_model: Any) -> None:
    model = tiny_model("llama")
    engine = TransformersEngine(model)
    doc = _ids(90, 8)
    kv = engine.prefill(doc)
    requests = [GenerationRequest(tuple(_ids(4 + i, 40 + i)), kv, GREEDY) for i in range(4)]
    on, off = TransformersBatchEngine(engine), TransformersBatchEngine(engine, share_prefix=False)
    a, b = _tokens_at_once(on, requests), _tokens_at_once(off, requests)
    assert on._shares and not off._shares
    assert [x[0] for x in a] == [y[0] for y in b]
    on.close()
    off.close()


@pytest.mark.parametrize("consecutive", [True, False])
def test_the_shared_attention_matches_one_call_over_the_whole_kv(consecutive: bool) -> None:
    """``_cascade`` (segment and own K/V attended apart, merged by log-sum-exp) against SDPA over their
    concatenation: grouped-query heads, one query and a causal tail, the group's rows consecutive in the
    batch's row or not (another sequence's token between them, left untouched), within float rounding."""
    torch.manual_seed(0)
    heads, kv_heads, dim, seg_n = 9, 3, 64, 300
    rep = heads // kv_heads
    seg_k, seg_v = torch.randn(1, kv_heads, seg_n, dim), torch.randn(1, kv_heads, seg_n, dim)
    own = [(1, 20), (5, 7)]  # (queries, own K/V length): a decode step; a 5-token tail after 2 own tokens
    gap = 0 if consecutive else 1
    query = torch.randn(1, heads, sum(n for n, _ in own) + gap, dim)
    out = torch.full((1, query.shape[2], heads, dim), 7.0)
    members, refs, rows, off = [], [], [], 0
    for n, length in own:
        k, v = torch.randn(1, kv_heads, length, dim), torch.randn(1, kv_heads, length, dim)
        start = seg_n + length - n
        mask = attention._own_mask(start, n, seg_n, query.dtype, query.device)
        members.append((n, k, v, None if mask is None else mask.repeat(rep, 1)))
        full_k, full_v = torch.cat([seg_k, k], dim=2), torch.cat([seg_v, v], dim=2)
        refs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, off : off + n], full_k, full_v,
            attn_mask=attention._tail_mask(start, n, query.dtype, query.device), enable_gqa=True,
        ).transpose(1, 2))
        rows.extend(range(off, off + n))
        off += n + gap
    at: Any = slice(0, len(rows)) if consecutive else torch.tensor(rows)
    attention._cascade(query, out, at, members, seg_k, seg_v, None)
    torch.testing.assert_close(out[:, rows], torch.cat(refs, dim=1), rtol=1e-5, atol=1e-5)
    if not consecutive:
        assert torch.equal(out[0, 1], torch.full((heads, dim), 7.0))



def test_half_precision_models_batch_without_sharing_and_stay_exact(caplog: pytest.LogCaptureFixture) -> None:
    """In bf16 each partial attention is rounded before the merge (logits off by ~4e-3): the probe turns
    sharing off with its reason logged, the model still batches, and replies equal its own generate."""
    import logging

    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval().to(torch.bfloat16)
    engine = TransformersEngine(model)
    batch = TransformersBatchEngine(engine)
    with caplog.at_level(logging.INFO, logger="kvagent.engine"):
        assert batch.chunked_prefill and not batch._shares
    assert "not sharing prefixes" in caplog.text and "bfloat16" in caplog.text
    doc = _ids(90, 9)
    kv = engine.prefill(doc)
    requests = [GenerationRequest(tuple(_ids(4 + i, 50 + i)), kv, GREEDY) for i in range(3)]
    out = _tokens_at_once(batch, requests)
    want = [engine.generate(kv, list(r.prompt_ids), GREEDY).token_ids for r in requests]
    assert [o[0] for o in out] == want
    batch.close()
