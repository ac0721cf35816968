"""The prompt turn: one place that turns prompt ids into a generation on an engine.

A turn resolves the KV of all but the prompt's last token through the
:class:`~kvagent.reuse.resolver.Resolver`
(memory, local store, registry, prefill), leaving a short uncovered tail to the reply's first forward, and
keeps the prompt's KV that forward computes (in memory at once, in the local store through the returned
``save``), so the next turn that shares its beginning resumes from it. It then submits the request to the
engine. A guided reply (a forced tool call, schema JSON: :mod:`kvagent.chat.guided`) is a series of such
turns,
one per value.

The OpenAI-compatible endpoint, hosted ``/generate``, the LangChain models and the ``KVAgent`` facade are thin
adapters over this module; a reply's text, stop handling and finish reason are worked out by one
:class:`Reply` for all of them. An engine that prefills prompts itself between its decode steps
(``chunked_prefill``: the batching transformers engine) is asked for no prefill at all: the resolver answers
with what it can reuse only (its reuse-only lookup, ``compute=False``, the tiers, policy and checks
unchanged), and the engine computes the rest, the whole prompt on a miss, in chunks, so a new prompt never
stalls the replies already decoding; that KV is kept the same way. An engine that resolves the prompt's KV
itself (``resolves_prefix``: vLLM behind kvagent's connector, which asks the same resolver) gets the whole
prompt instead; its Finish says what it
reused (:func:`settled`).
Events: :class:`Cached` first (what the cache did), then the engine's
:class:`~kvagent.engines.base.Token` events and one :class:`~kvagent.engines.base.Finish`; a guided reply
sends one :class:`Guided` instead of tokens.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..artifacts.source import RegistrySource
from ..engines.base import (
    Cancel,
    EngineEvent,
    Finish,
    GenerationEngine,
    GenerationRequest,
    PromptForward,
    Sink,
    Token,
    Usage,
    events,
)
from ..engines.params import GenerationParams
from ..engines.textstream import TextStream
from ..errors import EngineError
from ..kvcache.tensors import KVCache
from ..reuse.info import CacheInfo, CacheStatus
from ..reuse.resolver import MAX_TAIL, Resolver

log = logging.getLogger("kvagent")

#: A guided reply's writer: given ``continue_(forced_text) -> text deltas``, returns the reply's text
Guide = Callable[[Callable[[str], Iterator[str]]], str]


@dataclass(frozen=True)
class Cached:
    """What the cache did for the turn's prompt (the first event of a turn)."""

    info: CacheInfo


@dataclass(frozen=True)
class Guided:
    """A guided reply, written whole: its text and how many tokens the model generated for it."""

    text: str
    n_tokens: int


TurnEvent = Cached | Guided | EngineEvent


@dataclass
class Turn:
    """A prepared prompt: the engine request, what the cache did, and the deferred store write of its KV."""

    ids: list[int]
    request: GenerationRequest
    info: CacheInfo
    #: writes the prompt's KV to the local store (call once the answer is out); None when there is nothing to
    # keep
    save: Callable[[], None] | None = None
    #: seconds the engine's forwards spent on the prompt's uncached part (set once the engine has run them;
    # ``info.prefill_seconds`` is what the resolver spent before)
    engine_prefill_seconds: float = 0.0

    @property
    def prefill_seconds(self) -> float:
        """Seconds spent prefilling the prompt so far, by the resolver and by the engine."""
        return self.info.prefill_seconds + self.engine_prefill_seconds


@dataclass
class GuidedReply:
    """A guided reply's text, the tokens generated for it, and the cache report of its first continuation."""

    text: str
    n_tokens: int
    info: CacheInfo | None
    usage: Usage = field(default_factory=lambda: Usage(0, 0, 0))


def continuation_ids(tokenizer: Any, ids: Sequence[int], forced: str) -> list[int]:
    """The prompt ``ids`` followed by the forced text of a guided reply (its ids, no special tokens added)."""
    return [*ids, *tokenizer.encode(forced, add_special_tokens=False)] if forced else list(ids)


class Reply:
    """A turn's reply as text, from its events: the one place where a reply's stop handling (stop tokens, stop
    strings, partial characters held back) and its finish reason are worked out, for every front door.

    ``token_ids`` holds every generated id up to the stop (a stop token included); ``text`` what has been
    shown; ``finish_reason`` is ``"stop"`` (a stop token or string, or an engine that stopped it) or
    ``"length"``."""

    def __init__(self, tokenizer: Any, params: GenerationParams, stops: Sequence[str] = ()) -> None:
        self.stream = TextStream(tokenizer, params.stop_token_ids, stops)
        self.token_ids: list[int] = []
        self.usage: Usage | None = None

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def finish_reason(self) -> str:
        return self.stream.finish_reason or "length"

    def feed(self, ev: TurnEvent) -> str:
        """The text ``ev`` makes showable: a generated token's (none once the reply has stopped), or at the
        engine's Finish the tail held back (the Finish's reason, unless a stop came first)."""
        if isinstance(ev, Token):
            if self.stream.stopped:
                return ""
            self.token_ids.append(ev.token_id)
            return self.stream.push(ev.token_id)
        if isinstance(ev, Finish):
            self.usage = ev.usage
            return self.stream.finish("length" if ev.reason == "length" else "stop")
        return ""

    def deltas(self, events: Iterable[TurnEvent]) -> Iterator[str]:
        """Feed all of ``events`` (a turn's, or bare Token events from elsewhere: their end is a "length" end
        unless a stop came), yielding the showable text; an engine's error Finish is raised."""
        for ev in events:
            if isinstance(ev, Finish) and ev.reason == "error":
                raise ev.error if ev.error is not None else EngineError("generation failed")
            delta = self.feed(ev)
            if delta:
                yield delta
        tail = self.stream.finish()
        if tail:
            yield tail


class PromptTurns:
    """Runs prompt turns on ``engine``, resuming through ``resolver``; ``tokenizer`` serves guided replies."""

    def __init__(self, engine: GenerationEngine, resolver: Resolver, tokenizer: Any = None) -> None:
        self.engine = engine
        self.resolver = resolver
        self.tokenizer = tokenizer

    # -- one turn -----------------------------------------------------------------------------
    def prepare(
        self,
        ids: Sequence[int],
        params: GenerationParams,
        *,
        stops: Sequence[str] = (),
        namespace: str | None = None,
        reuse: bool = True,
        keep: bool = True,
        min_save_tokens: int | None = None,
        defer_save: bool = True,
        **resolve: Any,
    ) -> Turn:
        """Resolve the KV of ``ids[:-1]`` and build the engine request (blocking: may read the store, ask the
        registry or, for an engine without ``chunked_prefill``, prefill). ``namespace``: the private cache
        namespace; ``resolve``: further ``Resolver.resolve`` options (``registry=``). ``reuse=False``
        prefills the whole prompt with the reply (the reference); ``keep=False`` keeps nothing;
        ``min_save_tokens``: keep a prompt's KV only when that many of its tokens were computed (the
        resolver's default when None); ``defer_save=False`` lets the resolver write a KV it computed to the
        store at once (else ``Turn.save`` does, when called)."""
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("a prompt needs at least one token")
        if self.engine_resolves:
            return self._whole(ids, params, stops, namespace, reuse, resolve.get("registry"))
        if not reuse or len(ids) == 1:
            reason = "KV reuse disabled: full prefill" if not reuse else "one-token prompt"
            info = CacheInfo(CacheStatus.DISABLED if not reuse else CacheStatus.PREFILL, reason, 0, len(ids))
            request = GenerationRequest(tuple(ids), None, params, tuple(stops), namespace=namespace)
            return Turn(ids, request, info)
        if min_save_tokens is not None:
            resolve["min_save_tokens"] = min_save_tokens if keep else len(ids) + 1
        if self.engine_prefills:  # reuse only: what no tier covers is prefilled by the engine, in chunks
            resolve["compute"] = False
        res = self.resolver.resolve(
            ids[:-1], namespace=namespace, document=False, defer_save=defer_save, max_tail=MAX_TAIL, **resolve
        )
        info = res.info
        info = replace(info, prefilled_tokens=len(ids) - info.cached_tokens)  # the whole prompt's count
        feed = [*res.tail, ids[-1]] if res.kv is not None else ids
        if res.kv is None and self.engine_prefills:  # counted as the resolver's own prefill was
            self.resolver.counters.add("prefills")
        save = res.save if keep else None
        on_prompt = timed = None
        if len(feed) > 1:  # the reply's first forward computes the rest of the prompt (or all of it)
            enough = len(feed) >= max(2, min_save_tokens or 0)
            if keep and (enough or res.kv is None):  # a whole prompt goes to memory, as a resolver prefill's
                on_prompt, save = self._keeper(namespace, store=enough)
            # those forwards are a prefill (from scratch, or a continuation of the cached prefix; one, or one
            # per chunk): samples for the cost model, and an outcome against the prediction

            def timed(forwards: tuple[PromptForward, ...]) -> None:
                turn.engine_prefill_seconds = sum(f.seconds for f in forwards)
                self.resolver.record_continuation(forwards)

        request = GenerationRequest(
            tuple(feed), res.kv, params, tuple(stops), on_prompt, timed, namespace=namespace
        )
        turn = Turn(ids, request, info, save)
        return turn

    def resume(
        self, kv: KVCache, ids: Sequence[int], params: GenerationParams, info: CacheInfo, *,
        stops: Sequence[str] = (), namespace: str | None = None,
    ) -> Turn:
        """A turn that continues a KV the caller resolved itself (a read document, ``KVAgent.ask``): the
        engine runs ``ids`` after ``kv``; ``info`` is what the cache did for ``kv``. Nothing is kept (a
        question's KV is not a document's)."""
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("a turn needs at least one token after its KV")
        request = GenerationRequest(tuple(ids), kv, params, tuple(stops), namespace=namespace)
        return Turn([*(int(t) for t in kv.token_ids.tolist()), *ids], request, info)

    def submit(self, turn: Turn, sink: Sink, cancel: Cancel | None = None) -> None:
        """Start ``turn`` on the engine; its events go to ``sink`` (``cancel`` stops it)."""
        handle = self.engine.submit(turn.request, sink)
        if cancel is not None:
            cancel.attach(handle)

    def events(self, turn: Turn, cancel: Cancel | None = None) -> Iterator[TurnEvent]:
        """``turn``'s events as a blocking iterator (Cached, Token..., Finish); closing it early cancels the
        request. The prompt's KV is written to the store once the request has ended."""
        yield Cached(turn.info)
        try:
            for ev in events(self.engine, turn.request):
                yield ev
                if cancel is not None and cancel.is_set() and not isinstance(ev, Finish):
                    return  # closing the engine's iterator cancels the request
        finally:
            if turn.save is not None:
                _save_quietly(turn.save)

    # -- guided replies -----------------------------------------------------------------------
    def guided(
        self,
        ids: Sequence[int],
        params: GenerationParams,
        guide: Guide,
        *,
        cancel: Cancel | None = None,
        on_save: Callable[[Callable[[], None]], None] | None = None,
        **resolve: Any,
    ) -> GuidedReply:
        """Write a guided reply: ``guide`` asks for a continuation of the prompt (plus the text written so
        far) for every value, each one a turn that resumes from the previous one's KV. ``on_save`` receives
        each continuation's deferred store write (None: they are not stored). Blocking."""
        if self.tokenizer is None:
            raise ValueError("guided replies need a tokenizer")
        reply = GuidedReply("", 0, None)
        base = [int(t) for t in ids]
        prompt_tokens = len(base)

        def continue_(forced: str) -> Iterator[str]:
            turn = self.prepare(continuation_ids(self.tokenizer, base, forced), params, **resolve)
            if on_save is None:
                turn.save = None
            if reply.info is None:
                reply.info = turn.info

            def tokens() -> Iterator[int]:
                for ev in self.events(turn, cancel):
                    if isinstance(ev, Token):
                        reply.n_tokens += 1
                        yield ev.token_id
                    elif isinstance(ev, Finish) and ev.reason == "error" and ev.error is not None:
                        raise ev.error

            yield from TextStream(self.tokenizer, params.stop_token_ids).deltas(tokens())
            if on_save is not None and turn.save is not None:
                on_save(turn.save)
                turn.save = None

        reply.text = guide(continue_)
        cached = reply.info.cached_tokens if reply.info is not None else 0
        reply.usage = Usage(prompt_tokens, cached, reply.n_tokens)
        return reply

    # -- helpers ------------------------------------------------------------------------------
    @property
    def engine_resolves(self) -> bool:
        """Whether the engine finds the prompt's cached KV itself (``GenerationEngine.resolves_prefix``)."""
        return bool(getattr(self.engine, "resolves_prefix", False))

    @property
    def engine_prefills(self) -> bool:
        """Whether the engine prefills what the cache does not cover itself, between its decode steps
        (``GenerationEngine.chunked_prefill``)."""
        return bool(getattr(self.engine, "chunked_prefill", False))

    def _whole(self, ids: list[int], params: GenerationParams, stops: Sequence[str], namespace: str | None,
               reuse: bool, registry: RegistrySource | None = None) -> Turn:
        """A turn for an engine that resolves the prompt's KV itself: the whole prompt, in ``namespace``, with
        the published KV the caller may read (``registry``); what it reused comes with the Finish
        (``Usage.cached_tokens``)."""
        if not reuse:  # a namespace nothing else uses: the engine computes the whole prompt (the reference)
            namespace, registry = "full-prefill-" + secrets.token_hex(16), None
        reason = "the engine resolves the prompt's KV itself (kvagent's resolver behind its connector)"
        info = CacheInfo(CacheStatus.ENGINE if reuse else CacheStatus.DISABLED, reason, 0, len(ids))
        request = GenerationRequest(
            tuple(ids), None, params, tuple(stops), namespace=namespace, registry=registry
        )
        return Turn(ids, request, info)

    def _keeper(
        self, namespace: str | None, store: bool = True
    ) -> tuple[Callable[[Any], None], Callable[[], None] | None]:
        """(on_prompt, save) for a prompt whose tail (or whole) the reply computes: its KV goes to memory as
        soon as the first forward has it (for the next turn), and to the local store when ``save`` is called
        (None unless ``store``)."""
        kept: list[Any] = []
        resolver = self.resolver

        def on_prompt(kv: Any) -> None:
            kept.append(kv)
            resolver.keep(kv, namespace=namespace, store=False)

        def save() -> None:
            if kept:
                resolver.keep(kept[0], namespace=namespace)

        return on_prompt, save if store else None


def settled(info: CacheInfo, usage: Usage) -> CacheInfo:
    """The cache report of a turn whose engine resolved the prompt's KV itself, once its Finish says how many
    prompt tokens the engine reused (other reports are returned as they are)."""
    if info.status != "engine":
        return info
    n = usage.cached_tokens
    source = "engine" if n else ""
    reason = f"{info.reason}: {n} of {usage.prompt_tokens} prompt tokens reused"
    return replace(info, cached_tokens=n, prefilled_tokens=max(0, usage.prompt_tokens - n), reason=reason,
                   source=source)


def _save_quietly(save: Callable[[], None]) -> None:
    """Run a deferred store write; a failure is logged (the answer is unaffected)."""
    try:
        save()
    except Exception:
        log.exception("could not keep the prompt KV (the answer is unaffected)")
