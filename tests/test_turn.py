"""The prompt turn on the batching engine (``chunked_prefill``): the resolver only finds what it can reuse,
the engine prefills the rest between its decode steps (issue 27). A miss is exact and kept (memory, store, the
caller's namespace only), a long uncached prompt never stalls the replies already decoding, and the engine's
forward feeds the cost model as a prefill sample of the right kind."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kvagent import KVAgent
from kvagent.chat.turn import PromptTurns, Turn
from kvagent.costs import calibration as cal
from kvagent.engines import Finish, GenerationRequest, Token, TransformersBatchEngine, Usage
from kvagent.engines.params import GenerationParams

PARAMS = GenerationParams(max_new_tokens=12)


def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (n,), generator=g).tolist()


@pytest.fixture()
def agent(tiny_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("KVAGENT_CALIBRATION", raising=False)
    a = KVAgent(tiny_model("llama"), cache_dir=tmp_path / "cache", block_size=16, memory_slots=4)
    yield a
    a.close()


def _turns(agent: Any, prefill_chunk: int = 64) -> tuple[PromptTurns, TransformersBatchEngine]:
    batch = TransformersBatchEngine(agent.engine, max_batch=4, prefill_chunk=prefill_chunk)
    turns = PromptTurns(batch, agent.resolver)
    assert turns.engine_prefills and batch.chunked_prefill
    return turns, batch


def _run(turns: PromptTurns, turn: Turn) -> list[int]:
    toks = []
    for ev in turns.events(turn):
        if isinstance(ev, Token):
            toks.append(ev.token_id)
        elif isinstance(ev, Finish):
            assert ev.reason == "length", ev
    return toks


def _no_resolver_prefill(agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("the resolver prefilled a prompt the engine prefills itself")

    monkeypatch.setattr(agent.resolver, "_prefill", refuse)


def test_a_miss_is_prefilled_by_the_engine_exact_and_kept(
    agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    turns, batch = _turns(agent)
    _no_resolver_prefill(agent, monkeypatch)
    ids = _ids(300, 1)
    prefills = agent.stats()["prefills"]
    want = agent.engine.generate(None, ids, PARAMS).token_ids  # a full prefill of the same ids
    turn = turns.prepare(ids, PARAMS)
    info = turn.info
    assert turn.request.prefix is None and list(turn.request.prompt_ids) == ids
    assert (info.status, info.source, info.cached_tokens, info.prefilled_tokens) == ("prefill", "", 0, 300)
    assert not info.hit and "nothing cached" in info.reason and agent.stats()["prefills"] == prefills + 1
    assert _run(turns, turn) == want
    # the prompt's KV is in memory at once: the same prompt again reuses all but its last token
    again = turns.prepare(ids, PARAMS)
    assert again.info.cached_tokens == 299 and again.info.source == "memory", again.info.reason
    assert again.info.prefilled_tokens == 1 and list(again.request.prompt_ids) == ids[-1:]
    assert _run(turns, again) == want
    # ... and in the local store once the answer is out
    agent.forget_memory()
    stored = turns.prepare(ids, PARAMS)
    assert stored.info.cached_tokens == 299 and stored.info.source == "store", stored.info.reason
    # a longer prompt that shares it: its new part runs with the reply, after the cached prefix
    longer = ids + _ids(40, 2)
    cont = turns.prepare(longer, PARAMS)
    assert cont.info.status == "prefix" and cont.info.cached_tokens == 300
    assert cont.request.prefix is not None and list(cont.request.prompt_ids) == longer[300:]
    assert _run(turns, cont) == agent.engine.generate(None, longer, PARAMS).token_ids
    batch.close()


def test_a_long_uncached_prompt_does_not_stall_the_running_reply(
    agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a 650-token prompt nobody has cached is prefilled (chunks of 32), a reply already decoding emits
    a token between every two chunks: no forward over more than one chunk (plus the reply's token, which
    shares it), on any thread (the order of
    events, not their timing). Before issue 27 the resolver prefilled the whole prompt in one forward on the
    request thread, holding the engine lock, and the running reply stood still."""
    chunk, n_long = 32, 650
    turns, batch = _turns(agent, prefill_chunk=chunk)
    log: list[Any] = []
    lock = threading.Lock()
    watching = threading.Event()

    def hook(_module: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if watching.is_set() and ids is not None and ids.shape[1] > 1:
            with lock:
                log.append(("prefill", int(ids.shape[1])))

    handle = agent.engine.model.register_forward_pre_hook(hook, with_kwargs=True)
    short, long_ = _ids(8, 10), _ids(n_long, 11)
    params_a, params_b = GenerationParams(max_new_tokens=120), GenerationParams(max_new_tokens=4)
    got: dict[str, list[int]] = {"a": [], "b": []}
    done = {"a": threading.Event(), "b": threading.Event()}
    started = threading.Event()

    def sink(name: str) -> Any:
        def put(ev: Any) -> None:
            with lock:
                if isinstance(ev, Token):
                    log.append(name)
                    got[name].append(ev.token_id)
                    if name == "a" and len(got["a"]) == 3:
                        started.set()
                elif isinstance(ev, Finish):
                    done[name].set()

        return put

    try:
        turns.submit(turns.prepare(short, params_a), sink("a"))
        assert started.wait(60)
        watching.set()
        with lock:
            log.append("b asked")
        turns.submit(turns.prepare(long_, params_b), sink("b"))  # prepare runs on this (the request) thread
        assert done["a"].wait(120) and done["b"].wait(120)
    finally:
        handle.remove()
    window = log[log.index("b asked") : log.index("b")]
    forwards = [e for e in window if isinstance(e, tuple)]
    # a forward carries at most one chunk of the prompt, beside the running reply's one decode token
    assert forwards and max(n for _, n in forwards) <= chunk + 1, forwards
    first, last = window.index(forwards[0]), len(window) - 1 - window[::-1].index(forwards[-1])
    n_chunks = -(-n_long // chunk)
    assert window[first:last].count("a") >= n_chunks - 1, window
    assert got["a"] == agent.engine.generate(None, short, params_a).token_ids
    assert got["b"] == agent.engine.generate(None, long_, params_b).token_ids
    batch.close()


def test_a_private_prompt_is_kept_in_its_namespace_only(agent: Any) -> None:
    turns, batch = _turns(agent)
    ids = _ids(200, 3)
    want = agent.engine.generate(None, ids, PARAMS).token_ids
    assert _run(turns, turns.prepare(ids, PARAMS, namespace="ns-alice")) == want
    for ns in ("ns-bob", None):
        other = turns.prepare(ids, PARAMS, namespace=ns)
        assert other.info.cached_tokens == 0 and other.info.status == "prefill", (ns, other.info.reason)
        assert other.request.prefix is None
    own = turns.prepare(ids, PARAMS, namespace="ns-alice")
    assert own.info.cached_tokens == 199 and own.info.source == "memory"
    agent.forget_memory()  # the store copy is salted the same way
    assert turns.prepare(ids, PARAMS, namespace="ns-bob").info.cached_tokens == 0
    assert turns.prepare(ids, PARAMS, namespace="ns-alice").info.source == "store"
    batch.close()


def test_the_engines_prefill_is_a_cost_model_sample_of_its_kind(agent: Any) -> None:
    """A miss the engine prefills is a from-scratch outcome (past 0, the "local-prefill" path) and measures
    the process's prefill rate, as the resolver's own prefill did; a prefix continued is a continuation. Each
    forward of the engine's chunked prefill (chunks of 64 here) is a sample of its own shape: the fit learns
    what the engine ran, not a 260-token forward that never happened."""
    cost = agent.resolver.cost
    assert cost is not None and agent.resolver.registry_tier.prefill_tokens_per_s is None
    seen: list[cal.Outcome] = []
    cost.observers.append(seen.append)
    turns, batch = _turns(agent)
    ids = _ids(260, 4)
    _run(turns, turns.prepare(ids, PARAMS))
    longer = ids + _ids(50, 5)
    _run(turns, turns.prepare(longer, PARAMS))
    deadline = time.monotonic() + 30  # the samples are recorded in the background
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [(o.kind, o.path, o.n_tokens, o.past) for o in seen] == [
        ("chat", "local-prefill", 260, 0), ("chat", "tail", 50, 260)
    ]
    assert all(o.predicted_s > 0 and o.actual_s > 0 for o in seen)
    assert (agent.resolver.registry_tier.prefill_tokens_per_s or 0) > 0
    want = {(64, 0), (64, 64), (64, 128), (64, 192), (4, 256), (50, 260)}
    while time.monotonic() < deadline:
        entry = cost.calibration.read()["prefill"].get(cost.profile.key, {"samples": []})
        samples = {(s[1], s[2]) for s in entry["samples"]}
        if want <= samples:
            break
        time.sleep(0.02)
    assert want <= samples and (260, 0) not in samples, samples
    batch.close()


def test_an_engine_without_chunked_prefill_is_resolved_as_before(agent: Any) -> None:
    """An engine that does not prefill prompts itself gets the resolver's prefilled KV and the last token."""

    class OneAtATime:
        max_positions = None
        resolves_prefix = False

        def __init__(self) -> None:
            self.requests: list[GenerationRequest] = []

        def submit(self, request: GenerationRequest, sink: Any) -> Any:
            self.requests.append(request)
            sink(Finish("length", Usage(request.n_prompt, 0, 0)))
            return self

        def cancel(self) -> None:
            pass

    turns = PromptTurns(OneAtATime(), agent.resolver)
    assert not turns.engine_prefills
    ids = _ids(120, 6)
    turn = turns.prepare(ids, PARAMS)
    assert turn.request.prefix is not None and turn.request.prefix.n_tokens == 119
    assert list(turn.request.prompt_ids) == ids[-1:] and turn.info.status == "prefill"
    assert turn.info.prefill_seconds > 0
