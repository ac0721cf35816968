"""One resolver for every reuse path: the KV of a token sequence, from the fastest place that has it.

Tiers, fastest first; every miss says why:

1. **memory**: this process's LRU of KVs, by exact key, then by longest shared token prefix;
2. **local store**: exact key, then the artifact indexed under the longest shared block hash,
   refined to the exact common token prefix;
3. **registry** (a :class:`RegistrySource`: the HTTP :class:`~kvagent.registry.RegistryClient` for the
   SDK, the server's own metadata for its chat endpoint): exact key or block-hash prefix, fetched only
   when the cost policy says it pays, checked (checksum, header, signature, KV against its tokens)
   before use, and refined to the exact common token prefix;
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
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Concatenate, ParamSpec, Protocol

import torch

from . import artifact as art
from . import policy as pol
from . import stages as stg
from .engine import check_context
from .errors import (
    ArtifactError,
    ArtifactIntegrityError,
    KVAgentError,
    RegistryError,
    RegistryPaymentRequiredError,
    RegistrySkippedError,
    RegistryUnavailableError,
    StoreError,
)
from .identity import KeyContext, block_hashes, document_key, salted, token_tuple
from .kv import KVCache
from .singleflight import single_flight
from .store import KVStore
from .verification import verify_kv

if TYPE_CHECKING:
    from .calibration import CostModel
    from .engine import TransformersEngine
    from .registry import Handle, RegistryClient

log = logging.getLogger("kvagent")

#: progress(done, total) while prefilling
PrefillProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class CacheInfo:
    """What the cache did for one read or prompt, and why (shown to users; never silent).

    ``status``: "memory" | "local" | "prefix" | "remote" | "remote-generate" | "prefill".
    ``source``: where the reused tokens came from: "memory", "store", "registry", or "" (none);
    ``origin``: the key of the cached KV (or published artifact) that supplied them;
    ``lookup_seconds``: when tokens were computed (a prefill, or a prefix extended), what finding the best
    cached start cost first (local store, prefix index, registry lookup and any download), i.e. the read's
    time over the computing alone.
    ``stages``: seconds per stage of the read (``kvagent.stages.STAGES``: lookup, wait, probe, download,
    verification, store_write, resume), the stages that took time only; ``predicted_seconds``: what the cost model predicted
    for the path the read took (0.0: no prediction, e.g. a memory hit).
    """

    status: str
    reason: str
    cached_tokens: int
    prefilled_tokens: int
    load_seconds: float = 0.0
    prefill_seconds: float = 0.0
    bytes_read: int = 0
    source: str = ""
    origin: str = ""
    lookup_seconds: float = 0.0
    stages: Mapping[str, float] = field(default_factory=dict)
    predicted_seconds: float = 0.0

    @property
    def hit(self) -> bool:
        return self.status in ("memory", "local", "prefix", "remote", "remote-generate")


#: How many uncovered prompt ids a chat turn leaves to its reply's first forward (``resolve(max_tail=)``): a new
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
    #: with ``max_tail``: the last requested ids that ``kv`` does not cover yet; the caller feeds them with its own
    #: first forward (``TransformersEngine.stream(..., on_prompt=...)``) and keeps the result (``Resolver.keep``)
    tail: tuple[int, ...] = ()


@dataclass(frozen=True)
class Fetched:
    """A verified artifact from a registry source; ``blob`` is set when it should be kept in the local store."""

    artifact: art.Artifact
    nbytes: int
    seconds: float
    blob: bytes | bytearray | None = None
    charged: int = 0  # what the registry charged for it, integer micro-units (0: free)
    receipt: str | None = None  # the purchase's receipt id, for a dispute


class RegistrySource(Protocol):
    """Where published artifacts come from: lookups by key and by block-hash prefix, and verified fetches."""

    label: str  # shown in reasons; for a remote source, its URL (the calibration and the breaker key on it)
    remote: bool  # across a network: lookups get deadlines and a circuit breaker, links are calibrated
    can_generate: bool  # whether it can continue generation from its copy (remote generate)
    bandwidth_hint: float | None  # bytes/s to assume before a fetch has been measured (None: the policy's default)

    def lookup(self, key: str, *, timeout: float | None = None) -> Handle | None: ...

    def lookup_prefix(self, hashes: Sequence[str], *, timeout: float | None = None) -> tuple[Handle, int] | None: ...

    def fetch(self, handle: Handle, expect: art.Expectation, *, max_price: int | None = None) -> Fetched:
        """Download (buying it for at most ``max_price`` when it is sold) and check checksum, header and signature;
        raise RegistryError (RegistryPaymentRequiredError for a refused purchase) or ArtifactError."""

    def dispute(self, handle: Handle, receipt: str, reason: str, difference: float) -> str:
        """Report a bought artifact that failed verification; returns what the registry said."""


class ClientSource:
    """A :class:`RegistryClient` as a registry source (what the SDK uses)."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self.label = client.base_url
        self.remote = True
        self.can_generate = True
        self.bandwidth_hint: float | None = None

    def lookup(self, key: str, *, timeout: float | None = None) -> Handle | None:
        return self.client.lookup(key, timeout=timeout)

    def lookup_prefix(self, hashes: Sequence[str], *, timeout: float | None = None) -> tuple[Handle, int] | None:
        return self.client.lookup_prefix(hashes, timeout=timeout)

    def fetch(self, handle: Handle, expect: art.Expectation, *, max_price: int | None = None) -> Fetched:
        self.client.last_charge, self.client.last_receipt = 0, None
        artifact, blob = self.client.download_verified(handle, expect, max_price=max_price)
        return Fetched(artifact, len(blob), self.client.last_download_seconds, blob,
                       charged=self.client.last_charge, receipt=self.client.last_receipt)

    def dispute(self, handle: Handle, receipt: str, reason: str, difference: float) -> str:
        answer = self.client.dispute(handle.key, receipt, difference=difference, detail=reason)
        return str(answer.get("status", answer))


class KVMemory:
    """A bounded LRU of KVs per namespace (thread-safe). Entries are immutable KVCaches."""

    def __init__(self, slots: int) -> None:
        self.slots = max(0, slots)
        self._entries: OrderedDict[tuple[str, str], KVCache] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, namespace: str, key: str) -> KVCache | None:
        with self._lock:
            kv = self._entries.get((namespace, key))
            if kv is not None:
                self._entries.move_to_end((namespace, key))
            return kv

    def put(self, namespace: str, key: str, kv: KVCache) -> None:
        with self._lock:
            self._entries[(namespace, key)] = kv
            self._entries.move_to_end((namespace, key))
            while len(self._entries) > self.slots:
                self._entries.popitem(last=False)

    def longest_prefix(self, namespace: str, ids: torch.Tensor) -> tuple[str, KVCache, int] | None:
        """The entry of ``namespace`` sharing the most leading tokens with ``ids``: (key, kv, n)."""
        with self._lock:
            entries = [(k[1], kv) for k, kv in self._entries.items() if k[0] == namespace]
        best: tuple[str, KVCache, int] | None = None
        for key, kv in entries:
            n = shared_prefix(kv.token_ids, ids)
            if n > 0 and (best is None or n > best[2]):
                best = (key, kv, n)
        return best

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def shared_prefix(a: torch.Tensor | Sequence[int], b: torch.Tensor | Sequence[int]) -> int:
    """How many leading tokens two id sequences share."""
    ta = torch.as_tensor(a, dtype=torch.int64)
    tb = torch.as_tensor(b, dtype=torch.int64)
    m = min(int(ta.numel()), int(tb.numel()))
    if m == 0:
        return 0
    diff = (ta[:m] != tb[:m]).nonzero()
    return int(diff[0]) if diff.numel() else m


@dataclass
class _Candidate:
    kv: KVCache  # already truncated to ``n`` tokens
    n: int
    source: str  # "memory" | "store" | "registry"
    seconds: float = 0.0
    nbytes: int = 0
    origin: str = ""  # the key of the KV / artifact it came from


class _Default:
    """Marker: use the resolver's own registry source."""


DEFAULT_REGISTRY = _Default()


@dataclass
class ResolverSettings:
    """What the resolver needs to know besides its components (see kvagent.config for the user-facing names)."""

    block_size: int = 256
    verify: str = "sample"
    verify_probes: int = 64
    lock_timeout: float = 600.0
    allow_context_overflow: bool = False
    policy: pol.PolicyParams = field(default_factory=pol.PolicyParams)
    max_price_per_load: int | None = None  # never buy a load above this (micro-units; None: no limit)
    budget: int | None = None  # never spend more than this in all (micro-units; None: unlimited)
    prefill_cost_per_token: int = 5  # what a local prefill costs, per token (the paper's $5 / M tokens)


P = ParamSpec("P")


def _accounted(resolve: Callable[Concatenate[Resolver, P], Resolution]) -> Callable[Concatenate[Resolver, P], Resolution]:
    """Run ``resolve`` with a stage clock (``kvagent.stages``) and account for it (``Resolver._account``)."""

    @functools.wraps(resolve)
    def wrapper(self: Resolver, *args: P.args, **kwargs: P.kwargs) -> Resolution:
        with stg.measuring() as clock:
            res = resolve(self, *args, **kwargs)
        return self._account(res, clock, bool(kwargs.get("document", True)))

    return wrapper


class Resolver:
    """Finds or computes the KV of token ids through the tiers (see the module docstring)."""

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
        on_saved: Callable[[str, Callable[[], bytes], int], str] | None = None,
        cost: CostModel | None = None,
    ) -> None:
        self.engine = engine
        self.context = context
        self.store = store
        self.memory = memory if memory is not None else KVMemory(2)
        self.registry = registry
        self.settings = settings or ResolverSettings()
        self.publisher = publisher
        self.codec = codec
        # called with (key, artifact_bytes, n_tokens) after a computed KV is stored (publishing); artifact_bytes()
        # joins the artifact's bytes only when asked, so a reader that does not publish never copies them
        self.on_saved = on_saved
        self.cost = cost  # calibrated estimates + circuit breaker (kvagent.calibration); None: in-process rates
        self.spent = 0  # micro-units spent on purchases by this resolver
        self._probed = False
        self._load_recorded = -1e9
        self.expect = art.Expectation(
            model_fingerprint=context.model_fingerprint,
            tokenizer_fingerprint=context.tokenizer_fingerprint,
            dtype=context.dtype,
            layout=engine.layout,
        )
        self.counters: dict[str, int] = {
            "memory_hits": 0, "local_hits": 0, "prefix_hits": 0, "prefills": 0, "tokens_saved": 0,
            "remote_hits": 0, "remote_generates": 0, "publishes": 0, "registry_failures": 0, "poisoned": 0,
        }
        self.prefill_tokens_per_s: float | None = None  # measured in this process
        self.bandwidth: dict[str, float] = {}  # measured bytes/s per registry label
        self._verified: set[tuple[str, str]] = set()  # (key, payload digest) already checked against its tokens
        self._lock = threading.Lock()
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
    ) -> Resolution:
        """The KV of exactly ``token_ids`` (or of all but a short tail of them, see ``max_tail``).

        ``namespace``: private cache namespace (server-derived salt), or None for the shared one.
        ``registry``: the registry source to consult (default: the resolver's own; None for none).
        ``min_save_tokens``: keep the result (memory + store) when at least this many tokens were computed.
        ``document``: a document read (exact-key registry lookup first, single flight across processes) rather
        than a prompt (prefix lookups only). ``remote_generate``: the answer may be "let the registry generate"
        (``Resolution.remote`` set, ``kv`` None). ``defer_save``: do not write the computed KV to the store
        now; ``Resolution.save`` does it when called (e.g. after the answer has been sent). ``max_tail``: when a
        cached prefix leaves at most this many ids to compute, do not prefill them: ``Resolution.kv`` is the prefix
        and ``Resolution.tail`` the rest, for a caller whose next forward runs them anyway (a chat turn's first
        token) — one pass over the cached KV instead of two. Nothing is saved for such a resolution.
        """
        ids = token_tuple(token_ids)
        if not ids:
            raise KVAgentError("cannot resolve an empty token sequence")
        self.check_context(len(ids))
        source = self.registry if isinstance(registry, _Default) else registry
        ns = namespace or ""
        ctx = self._ctx(namespace)
        key = self._key(ctx, ids)
        kv = self.memory.get(ns, key)
        if kv is not None:
            self._count("memory_hits")
            info = CacheInfo("memory", "in this process's memory", len(ids), 0, source="memory", origin=key)
            return Resolution(key, kv, info)
        t0 = time.perf_counter()
        with stg.stage("lookup"):
            found = self.store.get(key, expect=self.expect)
        if found.artifact is not None:
            return self._local_hit(ns, key, ids, found.artifact.kv, found.nbytes, t0, "found in the local store")
        if not document:
            return self._miss(ns, ctx, key, ids, found.reason, t0, source, min_save_tokens, False, remote_generate,
                              progress, defer_save, max_tail)
        with single_flight(self.store.directory / "locks", key, self.settings.lock_timeout) as flight:
            if flight.waited:  # another process was computing this key: it is probably stored now
                stg.add("wait", flight.seconds)
                again = self.store.get(key, expect=self.expect)
                if again.artifact is not None:
                    why = f"computed by another process while we waited {flight.seconds:.1f} s"
                    return self._local_hit(ns, key, ids, again.artifact.kv, again.nbytes, t0, why)
            return self._miss(ns, ctx, key, ids, found.reason, t0, source, min_save_tokens, True, remote_generate,
                              progress, defer_save, max_tail)

    def check_context(self, n_tokens: int) -> None:
        """Refuse ``n_tokens`` beyond the model's positions, before any prefill (unless overflow is allowed)."""
        check_context(n_tokens, self.engine.max_positions, self.settings.allow_context_overflow)

    def remember(self, key: str, kv: KVCache, namespace: str | None = None) -> None:
        self.memory.put(namespace or "", key, kv)

    def keep(self, kv: KVCache, namespace: str | None = None, store: bool = True) -> str:
        """Keep a KV the caller computed (e.g. after a ``max_tail`` resolution): in memory, and in the local
        store unless ``store`` is False. Returns its key."""
        ids = tuple(kv.token_ids.tolist())
        key = document_key(self._ctx(namespace), ids)
        self.memory.put(namespace or "", key, kv)
        if store:
            self._save(namespace or "", key, kv, ids)
        return key

    def encode(self, key: str, kv: KVCache, namespace: str | None = None) -> tuple[art.ArtifactHeader, bytes]:
        """Artifact bytes of ``kv`` under this resolver's (possibly salted) context."""
        header, parts = self._encode_parts(key, kv, namespace)
        return header, b"".join(parts)

    def _encode_parts(self, key: str, kv: KVCache, namespace: str | None) -> tuple[art.ArtifactHeader, list[memoryview]]:
        ctx = self._ctx(namespace)
        return art.encode_parts(
            kv, key=key, model_fingerprint=ctx.model_fingerprint, tokenizer_fingerprint=ctx.tokenizer_fingerprint,
            template_hash=ctx.template_hash, position_offset=ctx.position_offset, publisher=self.publisher,
            codec=self.codec,
        )

    # -- tiers ---------------------------------------------------------------------------------
    def _ctx(self, namespace: str | None) -> KeyContext:
        return salted(self.context, namespace) if namespace else self.context

    def _key(self, ctx: KeyContext, ids: tuple[int, ...]) -> str:
        """``document_key(ctx, ids)``, remembered for the last sequence (a read is often followed by its use)."""
        last = self._last_key
        if last is not None and last[0] == ctx and last[1] == ids:
            return last[2]
        key = document_key(ctx, ids)
        self._last_key = (ctx, ids, key)
        return key

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def _local_hit(
        self, ns: str, key: str, ids: tuple[int, ...], kv: KVCache, nbytes: int, t0: float, why: str
    ) -> Resolution:
        if self.cost is not None and time.monotonic() - self._load_recorded > 30.0:
            # calibrate local loads at most every 30 s per process: a warm read must not pay a file write
            self._load_recorded = time.monotonic()
            threading.Thread(target=self.cost.record_load, args=(nbytes, time.perf_counter() - t0),
                             daemon=True, name="kvagent-calibrate").start()
        self.memory.put(ns, key, kv)
        self._count("local_hits")
        self._count("tokens_saved", len(ids))
        info = CacheInfo("local", why, len(ids), 0, load_seconds=time.perf_counter() - t0, bytes_read=nbytes,
                         source="store", origin=key)
        return Resolution(key, kv, info)

    def _miss(
        self, ns: str, ctx: KeyContext, key: str, ids: tuple[int, ...], miss_reason: str, t0: float,
        source: RegistrySource | None, min_save_tokens: int, document: bool, remote_generate: bool,
        progress: PrefillProgress | None, defer_save: bool = False, max_tail: int = 0,
    ) -> Resolution:
        """Longest local prefix, then the registry if it can cover more, then prefill the rest."""
        reasons = [miss_reason]
        with stg.stage("lookup"):
            best, why = self._local_prefix(ns, ctx, ids)
        reasons.append(why)
        if source is not None:
            remote, why = self._from_registry(source, key, ids, best.n if best else 0, document, remote_generate)
            reasons.append(why)
            if isinstance(remote, Resolution):
                return remote
            if remote is not None:
                best = remote
        t1 = time.perf_counter()
        n_cached = best.n if best else 0
        if best is not None and 0 < len(ids) - n_cached <= max_tail:
            reason = "; ".join(r for r in reasons if r) + f"; the last {len(ids) - n_cached} tokens run with the reply"
            return Resolution(key, best.kv, self._hit(best, reason, len(ids), t1 - t0, 0.0), tail=ids[n_cached:])
        if best is not None and n_cached == len(ids):
            kv, prefill_s = best.kv, 0.0
        else:
            if best is None or best.source != "registry":  # a fetch's prediction covers its rest already
                self._predict_prefill(len(ids) - n_cached, n_cached)
            with stg.stage("resume"):
                kv = self._prefill(ids, best.kv if best else None, progress)
            prefill_s = time.perf_counter() - t1
            if len(ids) - n_cached >= 32 and prefill_s > 0:
                self.prefill_tokens_per_s = (len(ids) - n_cached) / prefill_s
                if self.cost is not None:
                    self.cost.record_prefill(len(ids) - n_cached, n_cached, prefill_s)
        stg.path_done()
        computed = len(ids) - n_cached
        note = ""
        save: Callable[[], None] | None = None
        if computed >= max(1, min_save_tokens):
            if defer_save:
                def save() -> None:
                    self._save(ns, key, kv, ids)
            else:
                with stg.stage("store_write"):
                    note = self._save(ns, key, kv, ids)
        self.memory.put(ns, key, kv)
        reason = "; ".join(r for r in reasons if r) + note
        if best is None:
            self._count("prefills")
            log.info("prefilling %d tokens of %s…: %s", len(ids), key[:16], reason)
            info = CacheInfo("prefill", reason, 0, len(ids), prefill_seconds=prefill_s, lookup_seconds=t1 - t0)
            return Resolution(key, kv, info, save=save)
        return Resolution(key, kv, self._hit(best, reason, len(ids), t1 - t0, prefill_s), save=save)

    def _hit(self, best: _Candidate, reason: str, n_ids: int, load_s: float, prefill_s: float) -> CacheInfo:
        """Count a resolution that reused ``best`` (a cached prefix or a registry copy) and describe it."""
        status = "remote" if best.source == "registry" else "prefix"
        self._count("remote_hits" if status == "remote" else "prefix_hits")
        self._count("tokens_saved", best.n)
        return CacheInfo(status, reason, best.n, n_ids - best.n, load_seconds=load_s, prefill_seconds=prefill_s,
                         bytes_read=best.nbytes, source=best.source, origin=best.origin,
                         lookup_seconds=load_s if n_ids > best.n else 0.0)

    def _local_prefix(self, ns: str, ctx: KeyContext, ids: tuple[int, ...]) -> tuple[_Candidate | None, str]:
        """The longest KV in memory or the local store whose tokens are a prefix of ``ids``."""
        target = torch.as_tensor(ids, dtype=torch.int64)
        best: _Candidate | None = None
        mem = self.memory.longest_prefix(ns, target)
        if mem is not None:
            mem_key, kv, n = mem
            best = _Candidate(kv.truncate(n), n, "memory", origin=mem_key)
        hashes = block_hashes(ctx, ids, self.settings.block_size)
        if not hashes:
            why = f"no prefix lookup in the store (shorter than one {self.settings.block_size}-token block)"
        else:
            hit = self.store.find_prefix(hashes)
            if hit is None:
                why = "no cached document shares its first block"
            elif best is not None and (hit[1] + 1) * self.settings.block_size <= best.n:
                why = "the stored prefix candidate cannot beat the one in memory"
            else:
                t0 = time.perf_counter()
                found = self.store.get(hit[0], expect=self.expect)
                if found.artifact is None:
                    why = f"prefix candidate unusable: {found.reason}"
                else:
                    kv = found.artifact.kv
                    n = shared_prefix(kv.token_ids, target)
                    self.memory.put(ns, hit[0], kv)
                    if n > (best.n if best else 0):
                        best = _Candidate(kv.truncate(n), n, "store", time.perf_counter() - t0, found.nbytes,
                                          origin=hit[0])
                    why = ""
        if best is None:
            return None, why
        where = "in memory" if best.source == "memory" else "in the local store"
        return best, f"reused a cached prefix of {best.n} tokens {where}"

    def _from_registry(
        self, source: RegistrySource, key: str, ids: tuple[int, ...], n_local: int, document: bool,
        remote_generate: bool,
    ) -> tuple[_Candidate | Resolution | None, str]:
        """Consult the registry and the policy: a candidate covering more than ``n_local`` tokens, or why not."""
        params = self._params()
        if len(ids) - n_local < params.min_tokens:
            return None, f"registry not consulted ({len(ids) - n_local} uncached tokens < {params.min_tokens}-token threshold)"
        t0 = time.perf_counter()
        shared_key = self._key(self.context, ids)  # the read's own key unless it is in a private namespace
        try:
            with stg.stage("lookup"):
                if self.cost is not None and source.remote:
                    hit = self.cost.guarded_lookup(
                        source.label, len(ids) - n_local,
                        lambda deadline: self._remote_lookup(source, shared_key, ids, document, deadline),
                    )
                else:
                    hit = self._remote_lookup(source, shared_key, ids, document, None)
        except RegistrySkippedError as exc:
            return None, f"{exc}; prefilling locally"
        except (RegistryError, ArtifactError) as exc:
            return None, self._registry_failed(f"registry lookup at {source.label} failed", exc)
        if hit is None:
            return None, "the registry has nothing for it"
        handle, covered = hit
        if covered <= n_local:
            return None, f"the registry's best prefix ({covered} tokens) does not beat the local one"
        can_generate = remote_generate and source.can_generate and covered == len(ids) and n_local == 0
        req = pol.Request(
            n_tokens=len(ids) - n_local,
            remote_artifact=True,
            remote_tokens=covered - n_local,
            artifact_bytes=handle.size,
            bytes_per_token=self.engine.layout.bytes_per_token(self.engine.dtype),
            remote_generate=can_generate,
            bandwidth_bytes_per_s=self.bandwidth.get(source.label) or source.bandwidth_hint,
            prefill_tokens_per_s=None if self.cost is not None else self.prefill_tokens_per_s,
            price_micros=handle.price,
        )
        if self.cost is not None:
            if not self._probed:  # a machine with no history measures prefill once (<= 1 s) instead of assuming
                from .calibration import engine_probe

                self._probed = True
                with stg.stage("probe"):
                    self.cost.ensure_probed(engine_probe(self.engine))
            decision = self.cost.decide(req, url=source.label if source.remote else None, past=n_local,
                                        params=params)
        else:
            decision = pol.decide(req, params)
        log.info("registry policy for %s…: %s (%s)", key[:16], decision.choice, decision.reason)
        if decision.choice == pol.REMOTE_GENERATE:
            info = CacheInfo("remote-generate", f"policy: {decision.reason}", len(ids), 0,
                             load_seconds=time.perf_counter() - t0, source="registry", origin=handle.key)
            return Resolution(key, None, info, remote=handle), ""
        if decision.choice != pol.FETCH:
            if decision.choice == pol.LOCAL_PREFILL and self._predicts():
                stg.predict("prefix-prefill" if n_local else "local-prefill", decision.estimates["prefill_s"],
                            len(ids) - n_local, n_local)
            return None, f"policy: {decision.reason}"
        if self._predicts():
            stg.predict(pol.FETCH, decision.estimates["fetch_s"], len(ids) - n_local, n_local)
        t_fetch = time.perf_counter()
        try:
            fetched = source.fetch(handle, replace(self.expect, key=handle.key), max_price=self.price_cap())
            stg.add("download", fetched.seconds)
            stg.add("verification", time.perf_counter() - t_fetch - fetched.seconds)  # checksum, header, signature
        except RegistryPaymentRequiredError as exc:
            q = exc.quote
            return None, (f"not bought: {q.get('reason', 'refused')} (price {q.get('price')} {q.get('currency')}, "
                          f"balance {q.get('balance')}); prefilling locally")
        except (RegistryError, ArtifactError) as exc:
            if self.cost is not None and source.remote and isinstance(exc, RegistryUnavailableError):
                self.cost.record_failure(source.label, f"{type(exc).__name__}: {exc}")
            return None, self._registry_failed(f"fetching {handle.key[:16]}… from the registry failed ({source.label})", exc)
        with self._lock:
            self.spent += fetched.charged
        if fetched.seconds > 0:
            self.bandwidth[source.label] = fetched.nbytes / fetched.seconds
            if self.cost is not None and source.remote:
                self.cost.record_download(source.label, fetched.nbytes, fetched.seconds)
        remote_kv = fetched.artifact.kv
        with stg.stage("verification"):
            checked = self._check(handle.key, fetched.artifact)
        if checked is not None:
            if fetched.receipt:
                checked += self._dispute(source, handle, fetched.receipt, checked)
            return None, checked
        if fetched.blob is not None:
            with stg.stage("store_write"):
                self._keep_fetched(fetched)
        n = shared_prefix(remote_kv.token_ids, torch.as_tensor(ids, dtype=torch.int64))
        if n <= n_local:
            return None, f"the registry's artifact shares only {n} tokens"
        mode = self.settings.verify
        what = "fetched from the registry" if fetched.blob is not None else "loaded from the registry"
        bought = f"bought for {fetched.charged} µ-units; " if fetched.charged else ""
        why = (
            f"{what}: {n} of {len(ids)} tokens, checksum verified, KV {mode}-verified against its tokens; "
            f"{bought}policy: {decision.reason}"
        )
        cand = _Candidate(remote_kv.truncate(n), n, "registry", time.perf_counter() - t0, fetched.nbytes,
                          origin=handle.key)
        return cand, why

    def _params(self) -> pol.PolicyParams:
        """The policy settings of one decision: the configured ones, with the money left to spend."""
        s = self.settings
        left = None if s.budget is None else max(0, s.budget - self.spent)
        return replace(s.policy, prefill_cost_micros_per_token=s.prefill_cost_per_token,
                       max_price_per_load_micros=s.max_price_per_load, budget_left_micros=left)

    def price_cap(self) -> int | None:
        """The most one purchase may cost now (None: no limit)."""
        p = self._params()
        caps = [c for c in (p.max_price_per_load_micros, p.budget_left_micros) if c is not None]
        return min(caps) if caps else None

    def note_spent(self, amount: int) -> None:
        """Count a purchase made outside ``resolve`` (e.g. a remote generation) against the budget."""
        with self._lock:
            self.spent += amount

    def _dispute(self, source: RegistrySource, handle: Handle, receipt: str, reason: str) -> str:
        try:
            return f"; disputed the purchase ({source.dispute(handle, receipt, reason, 0.0)})"
        except (RegistryError, ArtifactError) as exc:
            log.warning("could not dispute %s… (%s)", handle.key[:16], exc)
            return f"; the dispute failed ({type(exc).__name__})"

    def _remote_lookup(
        self, source: RegistrySource, key: str, ids: tuple[int, ...], document: bool, deadline: float | None
    ) -> tuple[Handle, int] | None:
        """The registry's exact artifact (documents only) or its longest block-hash prefix artifact, asked
        within ``deadline`` seconds in all (None: the client's own timeouts)."""
        t_end = None if deadline is None else time.monotonic() + deadline
        if document:
            handle = source.lookup(key, timeout=deadline)
            if handle is not None:
                return handle, len(ids)
        hashes = block_hashes(self.context, ids, self.settings.block_size)
        left = None if t_end is None else max(0.05, t_end - time.monotonic())
        found = source.lookup_prefix(hashes, timeout=left) if hashes else None
        if found is None:
            return None
        handle, blocks = found
        covered = min(blocks * self.settings.block_size, handle.header.token_count, len(ids))
        return (handle, covered) if covered > 0 else None

    def _check(self, key: str, artifact: art.Artifact) -> str | None:
        """Verify a registry artifact's KV against its token ids (once per process); the failure reason or None."""
        tag = (key, artifact.header.payload_sha256)
        if tag in self._verified:
            return None
        check = verify_kv(self.engine, artifact.kv, self.settings.verify, probes=self.settings.verify_probes,
                          seed=int.from_bytes(os.urandom(4), "little"))
        if not check.ok:
            self._count("poisoned")
            return self._registry_failed(
                f"artifact {key[:16]}… from the registry failed {check.mode} verification",
                ArtifactIntegrityError(check.reason),
            )
        self._verified.add(tag)
        return None

    def _keep_fetched(self, fetched: Fetched) -> None:
        a = fetched.artifact
        assert fetched.blob is not None
        try:
            self.store.put(a.header, bytes(fetched.blob),
                           block_hashes(self.context, a.kv.token_ids.tolist(), self.settings.block_size))
        except StoreError as exc:
            log.warning("could not cache the fetched %s… locally (the answer is unaffected): %s", a.header.key[:16], exc)

    def _registry_failed(self, what: str, exc: KVAgentError) -> str:
        self._count("registry_failures")
        reason = f"{what} ({type(exc).__name__}: {exc}); prefilling locally"
        log.warning("%s", reason)
        return reason

    def note_registry_failure(self, what: str, exc: KVAgentError) -> str:
        """Count and log a registry failure seen by a caller (e.g. a broken remote generation); returns the reason."""
        return self._registry_failed(what, exc)

    # -- predictions checked against costs -------------------------------------------------------
    def _predict_prefill(self, n_new: int, past: int) -> None:
        """Note the prefill this read is about to run and its predicted seconds (unless a decision already did)."""
        clock = stg.current()
        if clock is None or not self._predicts():
            return
        assert self.cost is not None
        p = clock.prediction
        path = "prefix-prefill" if past else "local-prefill"
        if p is not None and p.path == path and (p.n_tokens, p.past) == (n_new, past):
            clock.prediction = replace(p, at=time.perf_counter())
            return
        clock.prediction = None
        stg.predict(path, self.cost.estimate_prefill(n_new, past).value, n_new, past)

    def _predicts(self) -> bool:
        """Whether reads are checked against the cost model: it is calibrated and no rate is fixed by hand."""
        policy = self.settings.policy
        return self.cost is not None and policy.prefill_tokens_per_s is None and policy.bandwidth_bytes_per_s is None

    def record_continuation(self, n_new: int, past: int, seconds: float) -> None:
        """A chat turn's first forward prefilled ``n_new`` prompt tokens after ``past`` cached ones in ``seconds``:
        a continuation sample for the cost model, and an outcome against its prediction (in the background)."""
        cost = self.cost
        if cost is None or n_new <= 0 or not seconds > 0:
            return
        from .calibration import Outcome

        checked = self._predicts()

        def record() -> None:
            if checked:
                predicted = cost.estimate_prefill(n_new, past).value  # before the sample joins the fit
                cost.record_outcome(Outcome("chat", "tail", predicted, seconds, n_new, past))
            cost.record_prefill(n_new, past, seconds)

        threading.Thread(target=record, daemon=True, name="kvagent-calibrate").start()

    def _account(self, res: Resolution, clock: stg.StageClock, document: bool) -> Resolution:
        """Attach the read's stages and prediction to its CacheInfo and record the outcome."""
        info = res.info
        if info.status == "memory":
            return res
        predicted, actual, path = 0.0, 0.0, ""
        p = clock.prediction
        if info.status == "local" and self.cost is not None and self._predicts():
            est = self.cost.estimate_load(info.bytes_read)
            predicted, actual, path = (est.value if est else 0.0), info.load_seconds, pol.LOCAL_HIT
        elif p is not None and p.done is not None and not res.tail and res.remote is None:
            predicted, actual, path = p.seconds, p.done - p.at, p.path
        info = replace(info, stages=clock.breakdown(), predicted_seconds=predicted)
        if self.cost is not None and predicted > 0 and actual > 0:
            from .calibration import Outcome

            n = p.n_tokens if p is not None and path != pol.LOCAL_HIT else info.cached_tokens
            past = p.past if p is not None and path != pol.LOCAL_HIT else 0
            self.cost.record_outcome(Outcome("read" if document else "prompt", path, predicted, actual, n, past))
        return replace(res, info=info)

    # -- computing ------------------------------------------------------------------------------
    def _prefill(self, ids: tuple[int, ...], prefix: KVCache | None, progress: PrefillProgress | None) -> KVCache:
        if prefix is None:
            return self.engine.prefill(ids, progress=progress)
        return self.engine.prefill_from(prefix, ids[prefix.n_tokens :], progress=progress)

    def _save(self, ns: str, key: str, kv: KVCache, ids: tuple[int, ...]) -> str:
        """Store a computed KV locally (and hand it to ``on_saved``); returns a note for the reason."""
        header, parts = self._encode_parts(key, kv, ns or None)  # written as they are: no joined copy for the store
        try:
            self.store.put(header, parts, block_hashes(self._ctx(ns or None), ids, self.settings.block_size))
        except StoreError as exc:
            log.warning("could not cache %s… locally (the answer is unaffected): %s", key[:16], exc)
        if self.on_saved is not None and not ns:
            return self.on_saved(key, lambda: b"".join(parts), len(ids))
        return ""

