"""The batching transformers engine (kvagent.engines.batch): concurrent requests decode together and
each reply equals its own single-sequence decode; requests join and leave between steps; per-request settings
hold."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from kvagent.engines import (
    BatchObserver,
    Finish,
    GenerationRequest,
    PromptForward,
    Token,
    TransformersBatchEngine,
    events,
)
from kvagent.engines.batch import PREFILL_CHUNK, _Handle, _Part, _Seq
from kvagent.engines.hf import TransformersEngine
from kvagent.engines.params import GenerationParams
from kvagent.errors import EngineError
from tests.conftest import TINY_ARCHS

GREEDY = GenerationParams(max_new_tokens=24)


def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (n,), generator=g).tolist()


def _tokens(engine: Any, request: GenerationRequest) -> tuple[list[int], Finish]:
    toks: list[int] = []
    for ev in events(engine, request):
        if isinstance(ev, Token):
            toks.append(ev.token_id)
        else:
            return toks, ev
    raise AssertionError("no Finish")


def _tokens_at_once(engine: Any, requests: list[GenerationRequest]) -> list[Any]:
    """``_tokens`` of every request, submitted from one thread each, at once (the threads wait for each
    other before submitting)."""
    out: list[Any] = [None] * len(requests)
    gate = threading.Barrier(len(requests))

    def run(i: int) -> None:
        gate.wait()
        out[i] = _tokens(engine, requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


class Steps(BatchObserver):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def step(self, batch_size: int, seconds: float) -> None:
        self.sizes.append(batch_size)


@pytest.fixture()
def llama(tiny_model: Any) -> TransformersEngine:
    return TransformersEngine(tiny_model("llama"))


def test_concurrent_requests_decode_together_and_each_equals_its_own_decode(
    llama: TransformersEngine,
) -> None:
    steps = Steps()
    batch = TransformersBatchEngine(llama, max_batch=8, observer=steps)
    doc = _ids(120, 1)
    kv = llama.prefill(doc)
    prompts = [(kv, _ids(3 + i, 10 + i)) for i in range(6)] + [(None, _ids(40, 30)), (None, _ids(7, 31))]
    params = [GenerationParams(max_new_tokens=8 + 3 * i) for i in range(8)]
    want = [
        llama.generate(None, (doc if k is not None else []) + s, p).token_ids
        for (k, s), p in zip(prompts, params, strict=True)
    ]
    got = _tokens_at_once(
        batch, [GenerationRequest(tuple(s), k, p) for (k, s), p in zip(prompts, params, strict=True)]
    )
    assert [g[0] for g in got] == want
    assert [g[1].reason for g in got] == ["length"] * 8
    assert got[0][1].usage.cached_tokens == len(doc) and got[0][1].usage.completion_tokens == 8
    assert max(steps.sizes) > 1, "the requests never decoded together"
    batch.close()


def test_an_engine_has_one_shared_batching_front_which_the_transformers_factory_gives(
    llama: TransformersEngine,
) -> None:
    """``TransformersBatchEngine.shared``: made on first use with the first caller's bounds, then the same
    object for every caller (the server's factory and LangChain's runner batch together); a tokenizer given
    later fills in a missing one. Built by the batch module, so the transformers engine does not import it."""
    from types import SimpleNamespace

    from kvagent.plugins import EngineContext, transformers_engine

    front = TransformersBatchEngine.shared(llama, max_batch=3, prefill_chunk=16)
    assert (front.max_batch, front.prefill_chunk, front.tokenizer) == (3, 16, None)
    assert llama.batch_front is front
    tok = object()
    assert TransformersBatchEngine.shared(llama, tok, max_batch=9) is front
    assert (front.max_batch, front.tokenizer) == (3, tok)
    runtime: Any = SimpleNamespace(engine=llama, tokenizer=None)
    assert transformers_engine(EngineContext(runtime, None, 5)) is front
    assert front.tokenizer is tok
    fresh = TransformersBatchEngine.shared(TransformersEngine(llama.model), max_batch=2)
    assert fresh is not front and fresh.prefill_chunk == PREFILL_CHUNK and fresh.max_batch == 2
    front.close()
    fresh.close()


def test_a_batch_of_one_is_bitwise_the_single_sequence_decode(llama: TransformersEngine) -> None:
    """Same kernels, same shapes: one sequence through the batched step gives exactly the stream's logits."""
    batch = TransformersBatchEngine(llama, max_batch=4)
    kv = llama.prefill(_ids(50, 2))
    suffix = _ids(4, 3)
    params = GenerationParams(max_new_tokens=16)
    assert _tokens(batch, GenerationRequest(tuple(suffix), kv, params))[0] == list(
        llama.stream(kv, suffix, params)
    )
    batch.close()


def test_cancel_leaves_at_once_and_the_others_are_unchanged(llama: TransformersEngine) -> None:
    batch = TransformersBatchEngine(llama, max_batch=4)
    prompts = [_ids(20, 40 + i) for i in range(3)]
    params = GenerationParams(max_new_tokens=40)
    want = [llama.generate(None, p, params).token_ids for p in prompts]
    results, left = _with_a_leaver(
        batch,
        [GenerationRequest(tuple(p), None, params) for p in prompts],
        GenerationRequest(tuple(_ids(30, 99)), None, GenerationParams(max_new_tokens=400)),
    )
    assert left
    assert [r[0] for r in results] == want
    deadline = time.monotonic() + 10  # the counters update right after the step that sent the last Finish
    while (batch.running or batch.waiting) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batch.running == 0 and batch.waiting == 0


def _with_a_leaver(
    batch: Any, requests: list[GenerationRequest], leaver: GenerationRequest
) -> tuple[list[Any], bool]:
    """``_tokens`` of ``requests``, submitted at once with ``leaver``, whose client goes away after its fourth
    event (closing the iterator cancels, and returns once the request has left the batch); whether it
    left."""
    out: list[Any] = [None] * len(requests)
    left = threading.Event()
    gate = threading.Barrier(len(requests) + 1)

    def run(i: int) -> None:
        gate.wait()
        out[i] = _tokens(batch, requests[i])

    def leave() -> None:
        gate.wait()
        it = events(batch, leaver)
        for n, _ev in enumerate(it):
            if n == 3:
                it.close()
                left.set()
                break

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    threads.append(threading.Thread(target=leave))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out, left.is_set()


def test_max_batch_bounds_the_batch_and_the_rest_wait(llama: TransformersEngine) -> None:
    steps = Steps()
    batch = TransformersBatchEngine(llama, max_batch=2, observer=steps)
    prompts = [_ids(10, 50 + i) for i in range(5)]
    params = GenerationParams(max_new_tokens=6)
    out = _tokens_at_once(batch, [GenerationRequest(tuple(p), None, params) for p in prompts])
    assert max(steps.sizes) == 2
    assert [o[0] for o in out] == [llama.generate(None, p, params).token_ids for p in prompts]
    assert any(o[1].usage.queue_seconds > 0 for o in out)


def test_per_request_sampling_stops_and_prompt_kv(llama: TransformersEngine, embedded: Any) -> None:
    tok = embedded.tokenizer
    batch = TransformersBatchEngine(llama, max_batch=4, tokenizer=tok)
    prompt = _ids(12, 60)
    sampled = GenerationParams(max_new_tokens=12, temperature=0.9, top_k=20, seed=7)
    a, _ = _tokens(batch, GenerationRequest(tuple(prompt), None, sampled))
    b, _ = _tokens(batch, GenerationRequest(tuple(prompt), None, sampled))
    assert (
        a == b == list(llama.stream(None, prompt, sampled))
    )  # seeded: reproducible, the stream's own sampling
    greedy = llama.generate(None, prompt, GenerationParams(max_new_tokens=12)).token_ids
    stop_id = greedy[4]
    toks, fin = _tokens(
        batch,
        GenerationRequest(
            tuple(prompt), None, GenerationParams(max_new_tokens=12, stop_token_ids=(stop_id,))
        ),
    )
    assert toks == greedy[: greedy.index(stop_id) + 1] and fin.reason == "stop"
    text = tok.decode(greedy, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        toks, fin = _tokens(
            batch,
            GenerationRequest(tuple(prompt), None, GenerationParams(max_new_tokens=12), stop_strings=(stop,)),
        )
        assert fin.reason == "stop" and stop in tok.decode(toks, skip_special_tokens=True)
        assert stop not in tok.decode(toks[:-1], skip_special_tokens=True)
    kept: list[Any] = []
    kv = llama.prefill(prompt[:8])
    _tokens(
        batch,
        GenerationRequest(tuple(prompt[8:]), kv, GenerationParams(max_new_tokens=2), on_prompt=kept.append),
    )
    assert kept[0].token_ids.tolist() == prompt
    torch.testing.assert_close(kept[0].keys[0], llama.prefill(prompt).keys[0], rtol=1e-4, atol=1e-4)


def test_requests_it_can_never_run_are_refused_at_submit(llama: TransformersEngine) -> None:
    batch = TransformersBatchEngine(llama, max_batch=2)
    with pytest.raises(EngineError):
        batch.submit(GenerationRequest((), None, GREEDY), lambda ev: None)
    with pytest.raises(EngineError):
        batch.submit(GenerationRequest((10**6,), None, GREEDY), lambda ev: None)
    with pytest.raises(EngineError):
        batch.submit(GenerationRequest((1,), None, GenerationParams(max_new_tokens=10**6)), lambda ev: None)
    with pytest.raises(EngineError):
        batch.submit(GenerationRequest((1,), None, GREEDY, stop_strings=("x",)), lambda ev: None)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "mistral"])
def test_other_architectures_batch_or_fall_back_and_stay_exact(tiny_model: Any, arch: str) -> None:
    engine = TransformersEngine(tiny_model(arch))
    batch = TransformersBatchEngine(engine, max_batch=4)
    prompts = [_ids(30, 70 + i) for i in range(3)]
    out = _tokens_at_once(batch, [GenerationRequest(tuple(p), None, GREEDY) for p in prompts])
    assert [o[0] for o in out] == [engine.generate(None, p, GREEDY).token_ids for p in prompts]


def _chat_ids(tok: Any, text: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def test_a_stop_string_split_across_tokens_ends_the_job_at_its_token(embedded: Any) -> None:
    """SmolLM2, two requests decoding together: the one whose stop string (split across two tokens) completes
    gets its Finish right after that token, counts only the tokens up to it, and leaves the batch (the other
    decodes on alone); the other is unchanged."""
    tok, engine = embedded.tokenizer, TransformersEngine(embedded.model)
    steps = Steps()
    batch = TransformersBatchEngine(engine, max_batch=4, tokenizer=tok, observer=steps)
    params = GenerationParams(max_new_tokens=24)
    a, b = _chat_ids(tok, "Write a short story about a ferry."), _chat_ids(tok, "Name three rivers.")
    ref_a, ref_b = (engine.generate(None, p, params).token_ids for p in (a, b))
    k = 5  # the stop string: the end of the text up to token k and the start of token k + 1
    head, more = tok.decode(ref_a[: k + 1]), tok.decode(ref_a[: k + 2])
    stop = head[-2:] + more[len(head) : len(head) + 2]
    assert len(stop) == 4 and stop not in head and stop in more, (stop, head, more)
    assert stop not in tok.decode(ref_a[k + 1 : k + 2]), "the stop string must span two tokens"
    out = _tokens_at_once(
        batch,
        [
            GenerationRequest(tuple(a), None, params, stop_strings=(stop,)),
            GenerationRequest(tuple(b), None, params),
        ],
    )
    (toks_a, fin_a), (toks_b, fin_b) = out
    assert toks_a == ref_a[: k + 2] and fin_a.reason == "stop"
    assert fin_a.usage.completion_tokens == k + 2
    assert toks_b == ref_b and fin_b.reason == "length"
    # a produced k + 2 tokens: its first from the prefill, the rest from at most k + 1 decode steps
    assert sum(1 for s in steps.sizes if s == 2) <= k + 1 and steps.sizes[-1] == 1
    batch.close()


def _hf_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """``transformers.generate`` greedy on ``ids`` (an explicit all-ones mask: ``generate`` would otherwise
    mask every prompt token equal to the pad id)."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n,
            min_new_tokens=n, do_sample=False, pad_token_id=0,
        )
    return list(out[0, len(ids) :].tolist())


def test_eight_prompts_of_different_lengths_prefilled_in_chunks_each_equal_generate(tiny_model: Any) -> None:
    model = tiny_model("llama")
    engine = TransformersEngine(model)
    batch = TransformersBatchEngine(engine, max_batch=8, prefill_chunk=64)
    lengths = [5, 40, 64, 65, 130, 257, 333, 410]  # most longer than one chunk
    doc = _ids(150, 80)
    kv = engine.prefill(doc)
    requests, want = [], []
    for i, n in enumerate(lengths):
        prefix = kv if i % 3 == 1 else None  # some resume from a prefix KV, their tails chunked after it
        tail = _ids(n, 90 + i)
        params = GenerationParams(max_new_tokens=10 + i)
        requests.append(GenerationRequest(tuple(tail), prefix, params))
        want.append(_hf_greedy(model, (doc if prefix is not None else []) + tail, params.max_new_tokens))
    out = _tokens_at_once(batch, requests)
    assert [o[0] for o in out] == want
    assert all(o[1].reason == "length" for o in out)
    batch.close()


def test_chunked_prefill_on_smollm2_equals_generate(embedded: Any) -> None:
    from tests.conftest import long_text

    tok, engine = embedded.tokenizer, TransformersEngine(embedded.model)
    batch = TransformersBatchEngine(engine, max_batch=4, tokenizer=tok, prefill_chunk=64)
    doc = long_text(300, tok)
    prompts = [_chat_ids(tok, f"{doc[:n]}\n\nSummarise this in one line.") for n in (600, 1400)]
    params = GenerationParams(max_new_tokens=12)
    out = _tokens_at_once(batch, [GenerationRequest(tuple(p), None, params) for p in prompts])
    assert max(len(p) for p in prompts) > 4 * 64
    assert [o[0] for o in out] == [_hf_greedy(embedded.model, p, 12) for p in prompts]
    batch.close()


def test_a_long_prompt_coming_in_does_not_stop_the_others_emitting(llama: TransformersEngine) -> None:
    """A 600-token prompt, prefilled in 19 chunks of 32, joins while another request decodes: the running one
    emits a token between every two chunks (the order of events, not their timing), and both are exact."""
    chunk, n_long = 32, 600
    batch = TransformersBatchEngine(llama, max_batch=4, prefill_chunk=chunk)
    log: list[str] = []
    lock = threading.Lock()
    running_started = threading.Event()
    short, long_ = _ids(8, 100), _ids(n_long, 101)
    params_a, params_b = GenerationParams(max_new_tokens=60), GenerationParams(max_new_tokens=4)
    got: dict[str, list[int]] = {"a": [], "b": []}
    done = {"a": threading.Event(), "b": threading.Event()}

    def sink(name: str) -> Any:
        def put(ev: Any) -> None:
            with lock:
                if isinstance(ev, Token):
                    log.append(name)
                    got[name].append(ev.token_id)
                    if name == "a" and len(got["a"]) == 3:
                        running_started.set()
                else:
                    done[name].set()

        return put

    batch.submit(GenerationRequest(tuple(short), None, params_a), sink("a"))
    assert running_started.wait(60)
    with lock:
        log.append("b submitted")
    batch.submit(GenerationRequest(tuple(long_), None, params_b), sink("b"))
    assert done["a"].wait(120) and done["b"].wait(120)
    between = log[log.index("b submitted") : log.index("b")]
    n_chunks = -(-n_long // chunk)
    assert between.count("a") >= n_chunks - 1, log
    assert got["a"] == llama.generate(None, short, params_a).token_ids
    assert got["b"] == llama.generate(None, long_, params_b).token_ids
    batch.close()


def test_prefill_chunk_must_be_positive(llama: TransformersEngine) -> None:
    with pytest.raises(EngineError):
        TransformersBatchEngine(llama, prefill_chunk=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_several_tails_prefilled_in_one_forward_each_equal_generate(tiny_model: Any, arch: str) -> None:
    """Tails after prefixes of different lengths (and one from nothing), several prefilled in one forward,
    one of them split across chunks: every reply equals ``transformers.generate`` on its own full ids."""
    model = tiny_model(arch)
    engine = TransformersEngine(model)
    batch = TransformersBatchEngine(engine, max_batch=8, prefill_chunk=48)
    doc = _ids(120, 200)
    kv = engine.prefill(doc)
    # (prefix tokens, tail tokens); the 70-token tail is prefilled in two chunks
    cases = [(0, 6), (17, 1), (17, 9), (60, 23), (33, 4), (90, 12), (120, 70)]
    requests, want = [], []
    for i, (p, n) in enumerate(cases):
        tail = _ids(n, 210 + i)
        params = GenerationParams(max_new_tokens=6 + i)
        requests.append(GenerationRequest(tuple(tail), kv.truncate(p) if p else None, params))
        want.append(_hf_greedy(model, doc[:p] + tail, params.max_new_tokens))
    segments: list[int] = []  # per model call: how many sequences' tokens it ran (runs of positions)

    def count(_m: Any, _a: Any, kw: dict[str, Any]) -> None:
        pos = kw["position_ids"][0].tolist() if kw.get("position_ids") is not None else [0]
        segments.append(1 + sum(1 for a, b in zip(pos, pos[1:], strict=False) if b != a + 1))

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    out: list[Any] = [None] * len(requests)
    threads = [
        threading.Thread(target=lambda i=i: out.__setitem__(i, _tokens(batch, requests[i])))
        for i in range(len(requests))
    ]
    try:
        with engine.lock:  # the requests queue up while the scheduler waits for the model (its probe)
            for t in threads:
                t.start()
            time.sleep(0.3)
        for t in threads:
            t.join(120)
    finally:
        hook.remove()
    assert [o[0] for o in out] == want
    assert max(segments) >= 4, segments  # several tails (and decoding sequences) in one forward
    batch.close()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_tail_in_a_batched_forward_is_bitwise_its_own_forward(
    tiny_model: Any, embedded: Any, arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One tail through the batched forward (direct SDPA sharing the K/V heads; after a prefix an additive
    mask) gives exactly the logits of a plain forward (transformers' SDPA wrapper; after a prefix repeated
    K/V heads and a boolean mask): after a prefix, from nothing, one token; on SmolLM2 too (grouped-query
    attention, 9 heads over 3)."""
    import kvagent.engines.attention as attention

    direct: list[bool] = []
    real = attention._direct_sdpa

    def spy(*args: Any) -> bool:
        direct.append(real(*args))
        return direct[-1]

    monkeypatch.setattr(attention, "_direct_sdpa", spy)
    for model in (tiny_model(arch), embedded.model):
        engine = TransformersEngine(model)
        batch = TransformersBatchEngine(engine)
        assert batch._probe()
        vocab = engine.config.get_text_config(decoder=True).vocab_size
        doc = engine.prefill([t % vocab for t in _ids(70, 300)])
        for kv, n in ((doc, 13), (None, 13), (doc, 1)):  # after a prefix, from nothing, one token
            tail = tuple(t % vocab for t in _ids(n, 301))
            with torch.inference_mode():
                want = engine.forward(
                    engine.new_cache(kv), input_ids=torch.tensor([tail]), logits_to_keep=1
                ).logits[0, -1]
                seq = _Seq(GenerationRequest(tail, kv, GREEDY), lambda _e: None, _Handle(batch), 0.0)
                batch._buffers(seq)
                got = batch._forward([_Part(seq, tail, seq.n)])[0]
            assert torch.equal(got, want), (kv is not None, n)
        assert direct and all(direct), "the direct SDPA path did not run"
        direct.clear()
        batch.close()


def test_prompt_forwards_are_reported_only_when_they_ran_alone(llama: TransformersEngine) -> None:
    batch = TransformersBatchEngine(llama, max_batch=4, prefill_chunk=4)
    kv = llama.prefill(_ids(40, 400))
    alone: list[tuple[PromptForward, ...]] = []
    _tokens(batch, GenerationRequest(tuple(_ids(9, 401)), kv, GREEDY, on_prompt_forwards=alone.append))
    # a 9-token tail in chunks of 4 after 40 cached tokens: three forwards, each after what came before
    assert len(alone) == 1 and [(f.n_tokens, f.past) for f in alone[0]] == [(4, 40), (4, 44), (1, 48)]
    assert all(f.seconds > 0 for f in alone[0])
    shared: list[tuple[PromptForward, ...]] = []
    done = threading.Semaphore(0)
    with batch._cv:  # the scheduler admits all three at once, and prefills them in one forward
        for i in range(3):
            request = GenerationRequest(tuple(_ids(9, 402 + i)), kv, GREEDY, on_prompt_forwards=shared.append)
            batch.submit(request, lambda ev: done.release() if isinstance(ev, Finish) else None)
    for _ in range(3):
        assert done.acquire(timeout=60)
    assert shared == []
    batch.close()
