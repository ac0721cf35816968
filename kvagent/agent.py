"""The KVAgent facade: read a document once, answer many questions from its cached KV.

It only composes the parts: a model (``models``), an engine (``engine``), a prompt template
(``prompt``), and the :class:`~kvagent.reuse.resolver.Resolver`, which finds or computes a KV through the
tiers (this process's memory, the local store, the registry when configured, a cached prefix, then
prefill) — the same resolver the LangChain models and the OpenAI-compatible endpoint use.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifacts import format as art
from .chat.prompt import PromptTemplate
from .chat.turn import PromptTurns, Reply, TurnEvent
from .config import Config
from .engines.base import Token
from .engines.batch import TransformersBatchEngine
from .engines.hf import Generation, TransformersEngine
from .engines.params import GenerationParams
from .errors import (
    ArtifactError,
    ConfigError,
    EngineError,
    KVAgentError,
    RegistryError,
    RegistryNotImplementedError,
    RegistryPaymentRequiredError,
)
from .kvcache.identity import KeyContext, token_tuple
from .kvcache.tensors import KVCache
from .models import LoadedModel
from .modes import AskMode
from .reuse.info import CacheInfo, CacheStatus
from .reuse.resolver import Resolution, Resolver
from .runtime import Progress, Runtime, build_runtime
from .tiers.store import KVStore

if TYPE_CHECKING:  # the registry client is imported only when a registry is configured
    from .artifacts.source import Handle
    from .client.registry import RegistryClient

log = logging.getLogger("kvagent")

__all__ = ["Answer", "CacheInfo", "DocumentHandle", "KVAgent", "Progress", "VerifyReport"]


@dataclass(frozen=True)
class DocumentHandle:
    """A document read by an agent: its content key and token ids (template prefix included)."""

    key: str
    token_ids: tuple[int, ...]
    source: str
    cache: CacheInfo

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: list[int]
    finish_reason: str
    key: str
    cache: CacheInfo
    prompt_tokens: int
    seconds: float
    first_token_seconds: float


@dataclass(frozen=True)
class VerifyReport:
    """Greedy output after reuse compared with a full prefill of the same token ids."""

    exact: bool
    compared_tokens: int
    first_divergence: int | None
    document_tokens: int
    reuse_seconds: float
    full_seconds: float
    reused_ids: list[int] = field(default_factory=list)
    full_ids: list[int] = field(default_factory=list)


class KVAgent:
    """Read documents once and answer questions by resuming from their KV.

    ``model`` is a model spec (``"smollm2"`` for the embedded default, a local Hugging Face
    directory, or a hub id already cached), a ``kvagent.models.LoadedModel``, or an already-loaded
    transformers model, in which case ``tokenizer`` must be given for the text APIs.

    The agent is a facade over its :class:`~kvagent.runtime.Runtime` (``runtime``), which owns the parts;
    answers are generated through the prompt-turn core (:class:`~kvagent.chat.turn.PromptTurns`) on the
    runtime's batching engine, as the OpenAI-compatible endpoint and the LangChain models do.
    """

    def __init__(
        self,
        model: str | Any | None = None,
        *,
        config: Config | None = None,
        tokenizer: Any | None = None,
        registry_client: RegistryClient | None = None,
        progress: Progress | None = None,
        **options: Any,
    ) -> None:
        """``options`` are :class:`~kvagent.config.Config` fields (``cache_dir=``, ``registry_url=``,
        ``token=``,
        ``budget=``...; None: not given): they override ``config``, or else KVAGENT_* variables and defaults.
        An unknown name is a ConfigError naming the closest option. ``tokenizer`` goes with an already-loaded
        transformers ``model``; ``registry_client`` replaces the client built from the options."""
        spec = model.name if isinstance(model, LoadedModel) else model if isinstance(model, str) else None
        if registry_client is not None and options.get("registry_url") is None:
            options["registry_url"] = registry_client.base_url
        options["model"] = spec
        cfg = config.with_options(**options) if config is not None else Config.from_env(**options)
        if isinstance(model, LoadedModel):
            tokenizer = model.tokenizer
        self._start(build_runtime(cfg, model=None if isinstance(model, str) else model, tokenizer=tokenizer,
                                  registry_client=registry_client, progress=progress), progress)

    @classmethod
    def from_runtime(cls, runtime: Runtime) -> KVAgent:
        """A facade over an already-built runtime (sharing its model, caches and counters)."""
        agent = cls.__new__(cls)
        agent._start(runtime, None)
        return agent

    def _start(self, runtime: Runtime, progress: Progress | None) -> None:
        self.runtime = runtime
        self._progress = progress
        self._remote: dict[str, Handle] = {}  # documents whose questions the registry answers
        self._remote_generate_ok = True
        self._turn_core: PromptTurns | None = None

    # -- the runtime's parts, read from it -------------------------------------------------
    @property
    def config(self) -> Config:
        """The options this agent runs with."""
        return self.runtime.config

    @property
    def loaded(self) -> LoadedModel:
        """The model, its tokenizer and their fingerprints."""
        return self.runtime.loaded

    @property
    def engine(self) -> TransformersEngine:
        """The transformers engine (prefill, and the reference decode of ``generate_full``)."""
        return self.runtime.engine

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (None for a bare model given without one: ids-only APIs)."""
        return self.runtime.tokenizer

    @property
    def template(self) -> PromptTemplate | None:
        """The prompt template documents and questions are tokenized with (None without a tokenizer)."""
        return self.runtime.template

    @property
    def context(self) -> KeyContext:
        """What a content key covers besides the token ids (model, tokenizer, template, dtype)."""
        return self.runtime.context

    @property
    def store(self) -> KVStore:
        """The local store of KV artifacts."""
        return self.runtime.store

    @property
    def expect(self) -> art.Expectation:
        """What an artifact must match to be resumed by this agent (model, tokenizer, dtype, KV layout): pass
        it to ``store.get(key, expect=...)`` to read a stored artifact as the agent would."""
        return self.runtime.resolver.registry_tier.expect

    @property
    def registry(self) -> RegistryClient | None:
        """The registry client (None when no registry is configured)."""
        return self.runtime.registry

    @property
    def resolver(self) -> Resolver:
        """The resolver that finds or computes a KV through the tiers."""
        return self.runtime.resolver

    @property
    def counters(self) -> dict[str, int]:
        """The resolver's counters (hits, prefills, publishes, ...), as ``stats()`` reports them."""
        return self.runtime.counters

    @property
    def turns(self) -> PromptTurns:
        """The prompt-turn core this agent generates through, on the runtime's batching engine (shared with
        any other front door on the same runtime; made on first use)."""
        if self._turn_core is None:
            batch = TransformersBatchEngine.shared(self.engine, self.tokenizer)
            self._turn_core = PromptTurns(batch, self.resolver, self.tokenizer)
        return self._turn_core

    # -- reading ---------------------------------------------------------------------------
    def read(self, source: str | os.PathLike[str]) -> DocumentHandle:
        """Read a document (a ``str`` of text, or a path) and make sure its KV is cached."""
        text, label = self._source_text(source)
        ids = self._template().document_ids(self.tokenizer, text)
        return self.read_ids(ids, source=label)

    def document_ids(self, text: str) -> list[int]:
        """The token ids a document is cached under: template prefix + the text's ids."""
        return self._template().document_ids(self.tokenizer, text)

    def key_of(self, token_ids: Sequence[int]) -> str:
        """The content key of a document's token ids under this agent's model, tokenizer and dtype."""
        return self.resolver.key_of(token_ids)

    def read_file(self, path: str | os.PathLike[str]) -> DocumentHandle:
        return self.read(Path(path))

    def read_ids(self, token_ids: Sequence[int], *, source: str = "<ids>") -> DocumentHandle:
        """Make sure the KV of exactly ``token_ids`` is cached (memory and local store)."""
        ids = token_tuple(token_ids)
        if not ids:
            raise EngineError("cannot read an empty document")
        res = self._resolve(ids)
        return DocumentHandle(key=res.key, token_ids=ids, source=source, cache=res.info)

    def kv_of(self, handle: DocumentHandle) -> KVCache:
        """The KV of a read document (from memory, the store, the registry, or a prefill)."""
        kv = self._resolve(handle.token_ids).kv
        assert kv is not None
        return kv

    def artifact_bytes(self, handle: DocumentHandle) -> bytes:
        """A read document's KV as artifact bytes (what the local store and the registry hold)."""
        return self.resolver.encode(handle.key, self.kv_of(handle))[1]

    def _resolve(self, ids: tuple[int, ...], *, remote_generate: bool = False) -> Resolution:
        report = self._progress
        progress = (lambda done, total: report("prefill", done, total)) if report is not None else None
        return self.resolver.resolve(ids, remote_generate=remote_generate, progress=progress)

    def _source_text(self, source: str | os.PathLike[str]) -> tuple[str, str]:
        if isinstance(source, os.PathLike):
            path = Path(source)
            try:
                return path.read_text(encoding="utf-8"), str(path)
            except (OSError, UnicodeDecodeError) as exc:
                raise KVAgentError(f"cannot read document {path}: {exc}") from exc
        if not isinstance(source, str):
            raise TypeError(f"read() takes text (str) or a path (os.PathLike), not {type(source).__name__}")
        if not source:
            raise EngineError("cannot read an empty document")
        return source, "<text>"

    # -- the registry ----------------------------------------------------------------------
    def publish(self, handle: DocumentHandle, visibility: str = "restricted", signing_key: Any = None,
                price: int | None = None) -> Handle:
        """Publish a read document's KV to the registry (regardless of the publish threshold);
        ``price``: what a load costs buyers, in integer micro-units of the registry's currency."""
        if self.registry is None:
            raise ConfigError("no registry configured: pass registry_url= or set KVAGENT_REGISTRY_URL")
        result = self.registry.publish(
            self.artifact_bytes(handle), visibility, signing_key=signing_key, price=price
        )
        self.counters["publishes"] += 1
        return result

    def forget_memory(self) -> None:
        """Drop this process's in-memory KV copies (the local store keeps them)."""
        self.resolver.memory.clear()

    # -- asking ----------------------------------------------------------------------------
    def ask(
        self, handle: DocumentHandle, question: str, *, mode: str = "auto", stop: Sequence[str] = (),
        **gen: Any,
    ) -> Answer:
        """Answer ``question`` about a read document, resuming from its cached KV.

        ``mode`` (an :class:`~kvagent.modes.AskMode` or its string): "local" always decodes here; "remote"
        asks the registry to generate from its copy; "auto" lets the policy choose. Registry failures fall
        back to local decoding. ``stop``: stop strings (the answer ends before the first one); ``gen``:
        :class:`~kvagent.engines.params.GenerationParams` fields.
        """
        t0 = time.perf_counter()
        suffix, params = self._question(question, gen)
        return self._complete(self._run(handle, suffix, params, stop, mode), t0)

    def ask_ids(
        self, handle: DocumentHandle, suffix_ids: Sequence[int], *, mode: str = "auto",
        stop: Sequence[str] = (), **gen: Any,
    ) -> Answer:
        """Continue a read document with ``suffix_ids`` (no tokenizer needed, unless ``stop`` strings are
        given); ``mode`` and ``stop`` as in ``ask``."""
        t0 = time.perf_counter()
        params = self.params(**gen)
        suffix = [int(t) for t in suffix_ids]
        return self._complete(self._run(handle, suffix, params, stop, mode), t0)

    def ask_many(self, handle: DocumentHandle, questions: Sequence[str], **gen: Any) -> list[Answer]:
        """Answer several questions over one document; its KV is loaded or prefilled once."""
        return [self.ask(handle, q, **gen) for q in questions]

    def stream(
        self, handle: DocumentHandle, question: str, *, mode: str = "auto", stop: Sequence[str] = (),
        **gen: Any,
    ) -> Iterator[str]:
        """Yield the answer's text as it is generated (stop tokens and stop strings are not shown)."""
        suffix, params = self._question(question, gen)
        run = self._run(handle, suffix, params, stop, mode)
        yield from run.reply.deltas(self._events(run))

    def _question(self, question: str, gen: dict[str, Any]) -> tuple[list[int], GenerationParams]:
        if not isinstance(question, str) or not question.strip():
            raise EngineError("the question must be a non-empty string")
        params = self.params(**gen)
        return self._template().question_ids(self.tokenizer, question), params

    def _run(self, handle: DocumentHandle, suffix: list[int], params: GenerationParams, stops: Sequence[str],
             mode: str) -> _Run:
        """Where the answer's tokens will come from: the local engine, or the registry (with local
        fallback)."""
        mode = AskMode.of(mode, "mode")
        if stops and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer; pass tokenizer= or use stop_token_ids")
        reply = Reply(self.tokenizer, params, stops)

        def run(kv: KVCache | None, info: CacheInfo) -> _Run:
            return _Run(handle, suffix, params, tuple(stops), kv, info, reply)

        if self.registry is None or mode == "local":
            res = self._resolve(handle.token_ids)
            return run(res.kv, res.info)
        tier = self.resolver.registry_tier
        if mode == "remote":
            local = self.resolver.memory.get("", handle.key)
            if handle.key not in self._remote:
                try:
                    found = self.registry.lookup(handle.key)
                except (RegistryError, ArtifactError) as exc:
                    found = None
                    tier.failed(f"registry lookup of {handle.key[:16]}… failed", exc)
                if found is not None:
                    self._remote[handle.key] = found
            if handle.key in self._remote:
                info = CacheInfo(CacheStatus.REMOTE_GENERATE,
                                 "mode='remote': the registry generates from its copy",
                                 handle.n_tokens, 0, source="registry")
                return run(None, info)
            log.warning(
                "mode='remote' but the registry has no artifact %s…; answering locally", handle.key[:16]
            )
            if local is not None:
                info = CacheInfo(CacheStatus.MEMORY, "in this process's memory", handle.n_tokens, 0,
                                 source="memory")
                return run(local, info)
        res = self._resolve(handle.token_ids, remote_generate=mode == "auto" and self._remote_generate_ok)
        if res.remote is not None:
            self._remote[handle.key] = res.remote
        return run(res.kv, res.info)

    def _events(self, run: _Run) -> Iterator[TurnEvent]:
        """The answer's events: a turn on the prompt-turn core from the document's KV, or tokens from the
        registry."""
        if run.kv is None:
            return self._remote_events(run)
        turn = self.turns.resume(run.kv, run.suffix, run.params, run.info, stops=run.stops)
        return self.turns.events(turn)

    def _remote_events(self, run: _Run) -> Iterator[TurnEvent]:
        """Tokens from the registry; on any failure, the rest from a local KV through the turn core (exact
        for greedy decoding)."""
        assert self.registry is not None
        tier = self.resolver.registry_tier
        key = run.handle.key
        produced: list[int] = []
        stream = self.registry.generate_stream(key, run.suffix, run.params, max_price=tier.price_cap())
        try:
            for tok in stream:
                produced.append(tok)
                yield Token(tok)
            self.counters["remote_generates"] += 1
            return
        except RegistryError as exc:
            self._remote.pop(key, None)
            if isinstance(exc, (RegistryPaymentRequiredError, RegistryNotImplementedError)):
                self._remote_generate_ok = False
            what = f"remote generate for {key[:16]}… failed after {len(produced)} tokens"
            reason = tier.failed(what, exc)
        finally:
            tier.note_spent(stream.charge)
            run.info = replace(run.info, charged=run.info.charged + stream.charge)
        res = self._resolve(run.handle.token_ids)
        run.info = replace(res.info, reason=f"{reason}; {res.info.reason}",
                           charged=run.info.charged + res.info.charged)
        left = run.params.max_new_tokens - len(produced)
        if left > 0 and res.kv is not None and not run.reply.stream.stopped:
            turn = self.turns.resume(res.kv, run.suffix + produced, replace(run.params, max_new_tokens=left),
                                     run.info, stops=run.stops)
            yield from self.turns.events(turn)

    def _complete(self, run: _Run, t0: float) -> Answer:
        """Drive ``run`` to its end; the answer as its reply worked it out."""
        first: list[float] = []

        def timed(events: Iterator[TurnEvent]) -> Iterator[TurnEvent]:
            for ev in events:
                if not first and isinstance(ev, Token):
                    first.append(time.perf_counter() - t0)
                yield ev

        for _delta in run.reply.deltas(timed(self._events(run))):
            pass
        return Answer(
            text=run.reply.text.strip(),
            token_ids=run.reply.token_ids,
            finish_reason=run.reply.finish_reason,
            key=run.handle.key,
            cache=run.info,
            prompt_tokens=run.handle.n_tokens + len(run.suffix),
            seconds=time.perf_counter() - t0,
            first_token_seconds=first[0] if first else 0.0,
        )

    def params(self, **gen: Any) -> GenerationParams:
        """GenerationParams with this model's stop tokens unless ``stop_token_ids`` is given."""
        return self.runtime.params(**gen)

    # -- checking --------------------------------------------------------------------------
    def verify(
        self, handle: DocumentHandle, question: str = "Summarise the document.", max_new_tokens: int = 32
    ) -> VerifyReport:
        """Greedy answer after reuse (through the turn core, as ``ask``) vs a full prefill of the same ids
        (the reference decode, ``generate_full``), with ``max_new_tokens`` forced."""
        params = GenerationParams(max_new_tokens=max_new_tokens, stop_token_ids=())
        res = self._resolve(handle.token_ids)
        assert res.kv is not None
        suffix = self._template().question_ids(self.tokenizer, question)
        t0 = time.perf_counter()
        run = _Run(handle, suffix, params, (), res.kv, res.info, Reply(self.tokenizer, params))
        reused = self._complete(run, t0).token_ids
        t1 = time.perf_counter()
        full = self.engine.generate(None, list(handle.token_ids) + suffix, params).token_ids
        t2 = time.perf_counter()
        div = next((i for i, (a, b) in enumerate(zip(reused, full, strict=False)) if a != b), None)
        if div is None and len(reused) != len(full):
            div = min(len(reused), len(full))
        return VerifyReport(
            exact=div is None, compared_tokens=min(len(reused), len(full)), first_divergence=div,
            document_tokens=handle.n_tokens, reuse_seconds=t1 - t0, full_seconds=t2 - t1,
            reused_ids=reused, full_ids=full,
        )

    def generate_full(self, token_ids: Sequence[int], **gen: Any) -> Generation:
        """Generate from a full prefill of ``token_ids`` with no cache (the reference path)."""
        return self.engine.generate(None, token_ids, self.params(**gen))

    # -- housekeeping ----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {**self.counters, "memory_entries": len(self.resolver.memory), **self.store.stats()}

    def warm_up(self) -> bool:
        """Measure this model's prefill on this machine (a few short forwards, about 2 s) when the calibration
        has no measured sample for it, so the first fetch-or-prefill decision rests on measurements, not on a
        first-use probe on a request's time; what ``kvagent serve`` does before it listens. True if it
        measured (False: samples already there, a fixed rate, or no calibration)."""
        cost = self.runtime.cost
        if cost is None:
            return False
        from .costs.calibration import warm_up

        return bool(warm_up(cost, self.engine))

    def close(self) -> None:
        """Close the store and write the outcomes not yet written (a short-lived process would lose them)."""
        self.runtime.close()

    def __enter__(self) -> KVAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _template(self) -> PromptTemplate:
        if self.template is None or self.tokenizer is None:
            raise ConfigError("this agent has no tokenizer; pass tokenizer= or use read_ids()/engine APIs")
        return self.template


@dataclass
class _Run:
    """One answer in the making: the document, the question's ids, the settings, the KV it resumes from (None:
    the registry generates), what the cache did (updated if a remote run falls back to local decoding) and
    the reply its events are fed to."""

    handle: DocumentHandle
    suffix: list[int]
    params: GenerationParams
    stops: tuple[str, ...]
    kv: KVCache | None
    info: CacheInfo
    reply: Reply

