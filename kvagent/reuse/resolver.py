"""One resolver for every reuse path: the KV of a token sequence, from the fastest place that has it.

Tiers, fastest first; every miss says why:

1. **memory** (``kvagent.tiers.memory``): this process's LRU of KVs, by exact key, then by longest shared
token
prefix;
2. **local store**: exact key, then the artifact indexed under the longest shared block hash,
   refined to the exact common token prefix;
3. **registry** (``kvagent.tiers.registry``: a :class:`RegistrySource` is the HTTP
   :class:`~kvagent.client.registry.RegistryClient` for the SDK, the server's own metadata for its chat
endpoint):
   exact key or block-hash prefix, fetched only when the cost policy says it pays, checked (checksum,
   header, signature, KV against its tokens) before use, and refined to the exact common token prefix;
4. **prefill** of whatever no tier covers, continuing from the longest prefix found.

Matching is token-level: a cached KV helps any request whose ids start with some of its ids (a
cached KV is truncated to the common prefix; attention is causal, so that is exact). The SDK facade
(``KVAgent.read``/``ask``), the LangChain models and the OpenAI-compatible endpoint all call
:meth:`Resolver.resolve`.

A *namespace* keeps private prompt caches apart: it salts the key context (``identity.salted``), so
the memory and store entries of one principal can never be found from another principal's ids. The
registry tier always uses the shared (unsalted) context: published artifacts are found by everyone
entitled to them.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Concatenate, ParamSpec

from ..artifacts import format as art
from ..artifacts.source import Fetched, RegistrySource
from ..costs import stages as stg
from ..engines.hf import check_context
from ..errors import KVAgentError
from ..kvcache.identity import KeyContext, block_hashes, document_key, salted, token_tuple
from ..kvcache.prefix import shared_prefix
from ..kvcache.tensors import KVCache, KVSource
from ..tiers.lookup import Candidate, Lookup, PrefillProgress, ResolverSettings
from ..tiers.memory import KVMemory
from ..tiers.registry import ClientSource, RegistryTier
from ..tiers.saving import KVSaver, OnSaved
from ..tiers.singleflight import single_flight
from ..tiers.store import KVStore
from .accounting import ReadCosts, ReadCounters
from .info import CacheInfo, CacheStatus

if TYPE_CHECKING:
    from ..artifacts.source import Handle
    from ..costs.calibration import CostModel
    from ..engines.hf import TransformersEngine
    from ..tiers.store import StoreLookup

log = logging.getLogger("kvagent")

__all__ = [
    "MAX_TAIL",
    "CacheInfo",
    "ClientSource",
    "Fetched",
    "KVMemory",
    "PrefillProgress",
    "RegistrySource",
    "Resolution",
    "Resolver",
    "ResolverSettings",
    "shared_prefix",
]

# : How many uncovered prompt ids a chat turn leaves to its reply's first forward (``resolve(max_tail=)``): a
# new
#: question or tool result, not a new document (those prefill in chunks, with progress)
MAX_TAIL = 512


@dataclass(frozen=True)
class Resolution:
    """The KV of exactly the requested ids (``kv``), or a registry handle to generate from (``remote``)."""

    key: str
    kv: KVCache | None
    info: CacheInfo
    remote: Handle | None = None
    save: Callable[[], None] | None = None  # with ``defer_save``: writes the computed KV to the store
    # : with ``max_tail``: the last requested ids that ``kv`` does not cover yet; the caller feeds them with
    # its own
    # : first forward (``TransformersEngine.stream(..., on_prompt=...)``) and keeps the result
    # (``Resolver.keep``)
    tail: tuple[int, ...] = ()


class _Default:
    """Marker: use the resolver's own registry source."""


DEFAULT_REGISTRY = _Default()


P = ParamSpec("P")


def _accounted(
    resolve: Callable[Concatenate[Resolver, P], Resolution],
) -> Callable[Concatenate[Resolver, P], Resolution]:
    """Run ``resolve`` with a stage clock (``kvagent.costs.stages``) and account for it
    (``Resolver._account``)."""

    @functools.wraps(resolve)
    def wrapper(self: Resolver, *args: P.args, **kwargs: P.kwargs) -> Resolution:
        with stg.measuring() as clock:
            res = resolve(self, *args, **kwargs)
        return self._account(res, clock, bool(kwargs.get("document", True)))

    return wrapper


class Resolver:
    """Finds or computes the KV of token ids through the tiers (see the module docstring).

    Its collaborators do the rest, and callers reach them directly: ``registry_tier`` (sources, purchases
    and budget: ``spent``, ``price_cap()``, ``note_spent()``; bandwidth, verification, disputes, the
    breaker: ``failed()``), ``saver`` (encode, store and publish a computed KV: ``publisher``, ``codec``,
    ``on_saved``), ``costs`` (predictions checked against costs, calibration samples) and ``counters``.
    """

    def __init__(
        self,
        engine: TransformersEngine,
        context: KeyContext,
        store: KVStore,
        *,
        memory: KVMemory | None = None,
        registry: RegistrySource | None = None,
        settings: ResolverSettings | None = None,
        publisher: str | None = None,
        codec: str = "raw",
        on_saved: OnSaved | None = None,
        cost: CostModel | None = None,
    ) -> None:
        self.engine = engine
        self.context = context
        self.store = store
        self.memory = memory if memory is not None else KVMemory(2)
        self.registry = registry
        self.settings = settings or ResolverSettings()
        # calibrated estimates + circuit breaker (kvagent.costs.calibration); None: in-process rates
        self.cost = cost
        self.counters = ReadCounters()
        self.saver = KVSaver(store, publisher=publisher, codec=codec, on_saved=on_saved)
        self.registry_tier = RegistryTier(
            engine, context, store, settings=self.settings, cost=cost, count=self.counters.add
        )
        self.costs = ReadCosts(cost, self.registry_tier)
        self._last_key: tuple[KeyContext, tuple[int, ...], str] | None = None

    # -- public ------------------------------------------------------------------------------
    def key_of(self, token_ids: Sequence[int], namespace: str | None = None) -> str:
        return document_key(self._ctx(namespace), token_ids)

    @_accounted
    def resolve(
        self,
        token_ids: Sequence[int],
        *,
        namespace: str | None = None,
        registry: RegistrySource | None | _Default = DEFAULT_REGISTRY,
        min_save_tokens: int = 1,
        document: bool = True,
        remote_generate: bool = False,
        progress: PrefillProgress | None = None,
        defer_save: bool = False,
        max_tail: int = 0,
        compute: bool = True,
    ) -> Resolution:
        """The KV of exactly ``token_ids`` (or of all but a short tail of them, see ``max_tail``).

        ``namespace``: private cache namespace (server-derived salt), or None for the shared one.
        ``registry``: the registry source to consult (default: the resolver's own; None for none).
        ``min_save_tokens``: keep the result (memory + store) when at least this many tokens were computed.
        ``document``: a document read (exact-key registry lookup first, single flight across processes) rather
        than a prompt (prefix lookups only). ``remote_generate``: the answer may be "let the registry
        generate"
        (``Resolution.remote`` set, ``kv`` None). ``defer_save``: do not write the computed KV to the store
        now; ``Resolution.save`` does it when called (e.g. after the answer has been sent). ``max_tail``: when
        a
        cached prefix leaves at most this many ids to compute, do not prefill them: ``Resolution.kv`` is the
        prefix
        and ``Resolution.tail`` the rest, for a caller whose next forward runs them anyway (a chat turn's
        first
        token) — one pass over the cached KV instead of two. Nothing is saved for such a resolution.
        ``compute=False`` (with ``document=False``): never prefill; ``Resolution.kv`` is the longest cached
        prefix
        (None when there is none) and ``Resolution.tail`` the ids it leaves, for another engine's connector.
        """
        ids = token_tuple(token_ids)
        if not ids:
            raise KVAgentError("cannot resolve an empty token sequence")
        self.check_context(len(ids))
        ctx = self._ctx(namespace)
        lookup = Lookup(
            ids, namespace or "", ctx, self._key(ctx, ids), self.context, self.settings.block_size,
            source=self.registry if isinstance(registry, _Default) else registry, document=document,
            remote_generate=remote_generate, min_save_tokens=min_save_tokens, defer_save=defer_save,
            max_tail=max_tail if compute else len(ids), progress=progress, compute=compute,
        )
        kv = self.memory.get(lookup.namespace, lookup.key)
        if kv is not None:
            self.counters.add("memory_hits")
            info = CacheInfo(
                CacheStatus.MEMORY, "in this process's memory", len(ids), 0, source="memory",
                origin=lookup.key,
            )
            return Resolution(lookup.key, kv, info)
        with stg.stage("lookup"):
            found = self.store.get(lookup.key, expect=self.registry_tier.expect)
        if found.artifact is not None:
            return self._local_hit(lookup, found, "found in the local store")
        if not document:
            return self._walk(lookup, found.reason)
        with single_flight(self.store.directory / "locks", lookup.key, self.settings.lock_timeout) as flight:
            if flight.waited:  # another process was computing this key: it is probably stored now
                stg.add("wait", flight.seconds)
                again = self.store.get(lookup.key, expect=self.registry_tier.expect)
                if again.artifact is not None:
                    why = f"computed by another process while we waited {flight.seconds:.1f} s"
                    return self._local_hit(lookup, again, why)
            return self._walk(lookup, found.reason)

    def check_context(self, n_tokens: int) -> None:
        """Refuse ``n_tokens`` beyond the model's positions, before any prefill (unless overflow is
        allowed)."""
        check_context(n_tokens, self.engine.max_positions, self.settings.allow_context_overflow)

    def remember(self, key: str, kv: KVCache, namespace: str | None = None) -> None:
        self.memory.put(namespace or "", key, kv)

    def keep(self, kv: KVCache, namespace: str | None = None, store: bool = True) -> str:
        """Keep a KV the caller computed (e.g. after a ``max_tail`` resolution): in memory, and in the local
        store unless ``store`` is False. Returns its key."""
        ids = tuple(kv.token_ids.tolist())
        ctx = self._ctx(namespace)
        key = document_key(ctx, ids)
        self.memory.put(namespace or "", key, kv)
        if store:
            self._save(namespace or "", key, kv, block_hashes(ctx, ids, self.settings.block_size))
        return key

    def encode(self, key: str, kv: KVCache, namespace: str | None = None) -> tuple[art.ArtifactHeader, bytes]:
        """Artifact bytes of ``kv`` under this resolver's (possibly salted) context."""
        header, parts = self.saver.encode_parts(key, kv, self._ctx(namespace))
        return header, b"".join(parts)

    # -- tiers ---------------------------------------------------------------------------------
    def _ctx(self, namespace: str | None) -> KeyContext:
        return salted(self.context, namespace) if namespace else self.context

    def _key(self, ctx: KeyContext, ids: tuple[int, ...]) -> str:
        """``document_key(ctx, ids)``, remembered for the last sequence (a read is often followed by its
        use)."""
        last = self._last_key
        if last is not None and last[0] == ctx and last[1] == ids:
            return last[2]
        key = document_key(ctx, ids)
        self._last_key = (ctx, ids, key)
        return key

    def _local_hit(self, lookup: Lookup, found: StoreLookup, why: str) -> Resolution:
        assert found.artifact is not None
        kv, t0 = self._stored(found.artifact), lookup.started
        self.costs.local_load(found.nbytes, time.perf_counter() - t0)
        self.memory.put(lookup.namespace, lookup.key, kv)
        self.counters.add("local_hits")
        self.counters.add("tokens_saved", len(lookup.ids))
        info = CacheInfo(CacheStatus.LOCAL, why, len(lookup.ids), 0, load_seconds=time.perf_counter() - t0,
                         bytes_read=found.nbytes, source="store", origin=lookup.key)
        return Resolution(lookup.key, kv, info)

    def _walk(self, lookup: Lookup, miss_reason: str) -> Resolution:
        """Longest local prefix, then the registry if it can cover more, then prefill the rest."""
        reasons = [miss_reason]
        with stg.stage("lookup"):
            best, why = self._local_prefix(lookup)
        reasons.append(why)
        lookup.local_tokens = best.n if best else 0
        if lookup.source is not None:
            answer = self.registry_tier.consult(lookup.source, lookup)
            reasons.append(answer.reason)
            if answer.remote is not None:
                info = CacheInfo(
                    CacheStatus.REMOTE_GENERATE,
                    answer.reason,
                    len(lookup.ids),
                    0,
                    load_seconds=answer.seconds,
                    source="registry",
                    origin=answer.remote.key,
                )
                return Resolution(lookup.key, None, info, remote=answer.remote)
            if answer.candidate is not None:
                best = answer.candidate
        return self._compute(lookup, best, "; ".join(r for r in reasons if r))

    def _compute(self, lookup: Lookup, best: Candidate | None, reason: str) -> Resolution:
        """The KV of ``lookup.ids`` from ``best`` (or from nothing): prefill what it leaves, keep the
        result."""
        ids, key, ns = lookup.ids, lookup.key, lookup.namespace
        t1 = time.perf_counter()
        lookup_s = t1 - lookup.started
        n_cached = best.n if best else 0
        if best is not None and 0 < len(ids) - n_cached <= lookup.max_tail:
            reason += f"; the last {len(ids) - n_cached} tokens run with the reply"
            stg.path_done()  # a fetch's KV is complete: its fetch is checked (the tail is the caller's)
            return Resolution(
                key, best.kv, self._hit(best, reason, len(ids), lookup_s, 0.0), tail=ids[n_cached:]
            )
        if best is None and not lookup.compute:
            reason += "; nothing cached (left to the caller's engine)"
            info = CacheInfo(CacheStatus.PREFILL, reason, 0, len(ids), lookup_seconds=lookup_s)
            return Resolution(key, None, info, tail=ids)
        if best is not None and n_cached == len(ids):
            kv, prefill_s = best.kv, 0.0
        else:
            if best is None or best.source != "registry":  # a fetch's prediction covers its rest already
                self.costs.predict_prefill(len(ids) - n_cached, n_cached)
            with stg.stage("resume"):
                kv = self._prefill(ids, best.kv if best else None, lookup.progress)
            prefill_s = time.perf_counter() - t1
            self.costs.record_prefill(len(ids) - n_cached, n_cached, prefill_s)
        stg.path_done()
        note = ""
        save: Callable[[], None] | None = None
        if len(ids) - n_cached >= max(1, lookup.min_save_tokens):
            if lookup.defer_save:
                def save() -> None:
                    self._save(ns, key, kv, lookup.hashes)
            else:
                with stg.stage("store_write"):
                    note = self._save(ns, key, kv, lookup.hashes)
        self.memory.put(ns, key, kv)
        reason += note
        if best is None:
            self.counters.add("prefills")
            log.info("prefilling %d tokens of %s…: %s", len(ids), key[:16], reason)
            info = CacheInfo(
                CacheStatus.PREFILL, reason, 0, len(ids), prefill_seconds=prefill_s, lookup_seconds=lookup_s
            )
            return Resolution(key, kv, info, save=save)
        return Resolution(key, kv, self._hit(best, reason, len(ids), lookup_s, prefill_s), save=save)

    # -- predictions checked against costs (``self.costs``) -----------------------------------------
    def record_continuation(self, forwards: Sequence[tuple[int, int, float]]) -> None:
        """A chat turn's prompt was prefilled by the engine's ``forwards``, each ``(n_new, past, seconds)``
        (one forward, or one per chunk of a chunked prefill): prefill samples for the cost model (with
        ``past`` 0 at the first, a whole prompt from scratch, left to the engine by a ``compute=False``
        resolution, which also measures this process's prefill rate as a resolver prefill does), and one
        outcome, the forwards' total against the sum of their predictions (in the background)."""
        self.costs.record_continuation(forwards)

    def _account(self, res: Resolution, clock: stg.StageClock, document: bool) -> Resolution:
        """Attach the read's stages and prediction to its CacheInfo and record the outcome."""
        if res.info.status == "memory":
            return res
        finished = not res.tail and res.remote is None  # else only a fetch's own part is checked
        return replace(res, info=self.costs.account(res.info, clock, document, finished))

    def _hit(self, best: Candidate, reason: str, n_ids: int, load_s: float, prefill_s: float) -> CacheInfo:
        """Count a resolution that reused ``best`` (a cached prefix or a registry copy) and describe it."""
        status = CacheStatus.REMOTE if best.source == "registry" else CacheStatus.PREFIX
        self.counters.add("remote_hits" if status == "remote" else "prefix_hits")
        self.counters.add("tokens_saved", best.n)
        return CacheInfo(
            status,
            reason,
            best.n,
            n_ids - best.n,
            load_seconds=load_s,
            prefill_seconds=prefill_s,
            bytes_read=best.nbytes,
            source=best.source,
            origin=best.origin,
            lookup_seconds=load_s if n_ids > best.n else 0.0,
            charged=best.charged,
        )

    def _local_prefix(self, lookup: Lookup) -> tuple[Candidate | None, str]:
        """The longest KV in memory or the local store whose tokens are a prefix of the lookup's ids."""
        best: Candidate | None = None
        block = self.settings.block_size
        mem = self.memory.longest_prefix(lookup.namespace, lookup.target)
        if mem is not None:
            mem_key, kv, n = mem
            best = Candidate(kv.truncate(n), n, "memory", origin=mem_key)
        hit = self.store.find_prefix(lookup.hashes) if lookup.hashes else None
        if not lookup.hashes:
            why = f"no prefix lookup in the store (shorter than one {block}-token block)"
        elif hit is None:
            why = "no cached document shares its first block"
        elif best is not None and (hit[1] + 1) * block <= best.n:
            why = "the stored prefix candidate cannot beat the one in memory"
        else:
            t0 = time.perf_counter()
            found = self.store.get(hit[0], expect=self.registry_tier.expect)
            if found.artifact is None:
                why = f"prefix candidate unusable: {found.reason}"
            else:
                kv = self._stored(found.artifact)
                n = shared_prefix(kv.token_ids, lookup.target)
                self.memory.put(lookup.namespace, hit[0], kv)
                if n > (best.n if best else 0):
                    best = Candidate(
                        kv.truncate(n), n, "store", time.perf_counter() - t0, found.nbytes, origin=hit[0]
                    )
                why = ""
        if best is None:
            return None, why
        where = "in memory" if best.source == "memory" else "in the local store"
        return best, f"reused a cached prefix of {best.n} tokens {where}"

    def _stored(self, artifact: art.Artifact) -> KVCache:
        """A local store artifact's KV, named by its bytes (private), with the published artifact it copies
        when the store recorded one (so that ``purge`` of that artifact reaches what is derived from it). A
        copy whose leading positions the store recorded as a published artifact's bytes names those by it
        (its ``base``), as the copy in memory did: a principal's saved prompt still reads the document part
        in place beside other principals reading the same artifact."""
        h = artifact.header
        derived = self.store.derived_from(h.key)
        pub = self.store.published_prefix(h.key)
        base = None
        if pub is not None and derived is not None:
            base = KVSource(pub[0], min(pub[1], h.token_count), published=True, artifact=derived)
        src = replace(art.stored_source(h), artifact=derived, base=base)
        return artifact.kv.with_source(src)

    def purge(self, artifact_key: str) -> int:
        """Forget every copy of published artifact ``artifact_key`` this resolver keeps, in every namespace:
        memory entries whose KV copies it (a fetched copy, a prompt KV that began with it) and store entries
        derived from it (staged copies, prompt saves, the fetched artifact itself). Returns how many
        entries went (deleted or already gone)."""
        stored = set(self.store.drop_derived(artifact_key))

        def doomed(key: str, kv: KVCache) -> bool:
            return key in stored or (kv.source is not None and kv.source.artifact == artifact_key)

        dropped = self.memory.drop(doomed)
        if dropped or len(stored) > 1:
            log.info("dropped %d memory and %d stored copies of %s…", dropped, len(stored) - 1,
                     artifact_key[:16])
        return dropped + len(stored)

    # -- computing ------------------------------------------------------------------------------
    def _prefill(
        self, ids: tuple[int, ...], prefix: KVCache | None, progress: PrefillProgress | None
    ) -> KVCache:
        if prefix is None:
            return self.engine.prefill(ids, progress=progress)
        return self.engine.prefill_from(prefix, ids[prefix.n_tokens :], progress=progress)

    def _save(self, ns: str, key: str, kv: KVCache, hashes: list[str]) -> str:
        """Store a computed KV locally, indexed by ``hashes`` (and publish it); returns a note."""
        return self.saver.save(ns, key, kv, hashes, self._ctx(ns or None))
