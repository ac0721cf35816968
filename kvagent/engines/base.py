"""The engine interface: submit a request (prompt ids after an optional prefix KV, sampling, stop
conditions), get typed events pushed to a sink, cancel at any time.

Every front door (the OpenAI-compatible endpoint, hosted ``/generate``, LangChain) reaches a model through
this interface, by way of the prompt-turn core (:mod:`kvagent.chat.turn`); the transformers engine
(:mod:`kvagent.engines.batch`) and a vLLM engine implement it. Events are delivered on the engine's own
thread, in order, and end with exactly one :class:`Finish`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

from ..kvcache.tensors import KVCache
from .params import GenerationParams

if TYPE_CHECKING:
    from ..artifacts.source import RegistrySource

log = logging.getLogger("kvagent.engine")

#: how long closing an event iterator waits for its cancelled request to leave the batch
LEAVE_TIMEOUT_S = 60.0

FinishReason = Literal["stop", "length", "cancelled", "error"]


class PromptForward(NamedTuple):
    """One model forward that prefilled ``n_tokens`` of a prompt after ``past`` tokens already in its KV, in
    ``seconds`` (a chunked prefill is several); the ``(n_new, past, seconds)`` that
    ``Resolver.record_continuation`` takes."""

    n_tokens: int
    past: int
    seconds: float


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: ``prompt_ids`` run after ``prefix`` (None: from nothing), then decoding by ``params``.

    Generation ends at one of ``params.stop_token_ids`` (included in the tokens), at a stop string (the token
    that completes it is the last one sent), or after ``params.max_new_tokens``. ``on_prompt``, if set,
    receives the KV of the whole prompt (prefix then ``prompt_ids``) once it is computed, before the
    request's Finish (the batching engine first sends the first tokens of every prompt done in that step);
    ``on_prompt_forwards`` the forwards that computed it (:class:`PromptForward`).
    """

    prompt_ids: tuple[int, ...]
    prefix: KVCache | None
    params: GenerationParams
    stop_strings: tuple[str, ...] = ()
    on_prompt: Callable[[KVCache], object] | None = None
    #: receives the forwards that prefilled ``prompt_ids`` (one, or one per chunk), each timed alone, for the
    #: cost model; engines that cannot time them alone (another sequence shared one) never call it
    on_prompt_forwards: Callable[[tuple[PromptForward, ...]], object] | None = None
    #: the request's cache namespace (a server-derived salt for a principal's private prompts; None: the
    #: shared namespace; every front door sets it): an engine shares private KV only between requests of the
    #: same namespace (the batching engine's shared prefixes share across namespaces only the bytes of a
    #: published artifact, named by ``prefix.source``; an engine that resolves the prompt's KV itself,
    #: ``resolves_prefix``, also reads unsalted published KV)
    namespace: str | None = None
    #: the published KV the caller may read (the server's own registry, entitlements applied), for an engine
    #: that resolves the prompt's KV itself; None: only what the engine finds on its own
    registry: RegistrySource | None = None

    @property
    def n_prompt(self) -> int:
        return (self.prefix.n_tokens if self.prefix is not None else 0) + len(self.prompt_ids)


@dataclass(frozen=True)
class Usage:
    """What one request cost: tokens, time waiting for a batch slot, time from first forward to end."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0


@dataclass(frozen=True)
class Token:
    """One generated token id."""

    token_id: int


@dataclass(frozen=True)
class Finish:
    """The end of a request: why, what it cost, and the error when ``reason == "error"``."""

    reason: FinishReason
    usage: Usage
    error: BaseException | None = None


EngineEvent = Token | Finish
Sink = Callable[[EngineEvent], None]


class RequestHandle(Protocol):
    """A submitted request: ``cancel`` makes it leave its batch before the next step (ends "cancelled")."""

    def cancel(self) -> None: ...


class GenerationEngine(Protocol):
    """What the prompt-turn core needs from an engine.

    ``resolves_prefix``: the engine finds a prompt's cached KV itself (vLLM through kvagent's connector,
    which asks the same resolver): it takes whole prompts (``prefix`` None, ``namespace`` set) and reports
    the tokens it reused in ``Finish.usage.cached_tokens``; the prompt-turn core then resolves nothing.
    ``chunked_prefill``: the engine prefills whatever a request's ``prefix`` leaves of its prompt itself, in
    chunks between its decode steps (the batching transformers engine); the prompt-turn core then asks the
    resolver only for what it can reuse and never lets it prefill, so an uncached prompt does not stall the
    sequences already decoding. Without it the resolver prefills all but a short tail first."""

    max_positions: int | None
    resolves_prefix: bool

    @property
    def chunked_prefill(self) -> bool: ...

    def submit(self, request: GenerationRequest, sink: Sink) -> RequestHandle:
        """Queue ``request``; its events go to ``sink`` (on the engine's thread). Raises EngineError at once
        for a request it can never run (bad ids, a KV of another model, too long for the model)."""
        ...


def engine_failure(engine: object) -> str | None:
    """Why ``engine`` can no longer generate (its optional ``failure`` attribute: an engine core that died,
    an engine closed), or None while it can."""
    failure = getattr(engine, "failure", None)
    return str(failure) if failure else None


class Cancel:
    """A cancellation flag that also cancels the engine requests registered with it (thread-safe)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._handles: list[RequestHandle] = []

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            handles, self._handles = self._handles, []
        for h in handles:
            h.cancel()

    def is_set(self) -> bool:
        return self._event.is_set()

    def attach(self, handle: RequestHandle) -> None:
        """Cancel ``handle`` with this flag (at once if it is already set)."""
        with self._lock:
            if not self._event.is_set():
                self._handles.append(handle)
                return
        handle.cancel()


def events(engine: GenerationEngine, request: GenerationRequest) -> Iterator[EngineEvent]:
    """``request``'s events as a blocking iterator; closing it early cancels the request and waits until it
    has left its batch."""
    q: queue.SimpleQueue[EngineEvent] = queue.SimpleQueue()
    handle = engine.submit(request, q.put)
    done = False
    try:
        while not done:
            ev = q.get()
            done = isinstance(ev, Finish)
            yield ev
    finally:
        if not done:
            handle.cancel()
            try:
                while not isinstance(
                    q.get(timeout=LEAVE_TIMEOUT_S), Finish
                ):  # its slot is free once this returns
                    pass
            except queue.Empty:
                log.warning("a cancelled request did not leave its batch within %.0f s", LEAVE_TIMEOUT_S)
