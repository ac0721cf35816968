"""The KVAgent facade: read a document once, answer many questions from its cached KV.

It only composes the parts: a model (``models``), an engine (``engine``), a prompt template
(``prompt``), content keys (``identity``), artifacts (``artifact``) and the local store
(``store``). Tiers, fastest first: this process's memory, the local store, the registry (when
configured; ``policy`` decides whether fetching pays, and any registry failure is a logged fallback),
then prefill.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import artifact as art
from . import policy as pol
from .config import Config
from .engine import Generation, GenerationParams, TransformersEngine
from .errors import (
    ArtifactError,
    ArtifactIntegrityError,
    ConfigError,
    EngineError,
    KVAgentError,
    RegistryError,
    StoreError,
)
from .identity import KeyContext, block_hashes, document_key
from .kv import KVCache
from .models import LoadedModel, load_model, model_fingerprint
from .prompt import PromptTemplate, build_template
from .singleflight import single_flight
from .store import KVStore, StoreLookup
from .verification import verify_kv

if TYPE_CHECKING:  # the registry client is imported only when a registry is configured
    from .registry import Handle, RegistryClient

log = logging.getLogger("kvagent")

#: progress(task, done, total): task is "prefill" or a message shown while loading.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CacheInfo:
    """What the cache did for one read or ask, and why (shown to users; never silent)."""

    status: str  # "memory" | "local" | "prefix" | "remote" | "remote-generate" | "prefill"
    reason: str
    cached_tokens: int
    prefilled_tokens: int
    load_seconds: float = 0.0
    prefill_seconds: float = 0.0
    bytes_read: int = 0

    @property
    def hit(self) -> bool:
        return self.status in ("memory", "local", "prefix", "remote", "remote-generate")


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
    directory, or a hub id already cached) or an already-loaded transformers model, in which case
    ``tokenizer`` must be given for the text APIs.
    """

    def __init__(
        self,
        model: str | Any | None = None,
        *,
        tokenizer: Any | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_size_bytes: int | None = None,
        dtype: str | None = None,
        block_size: int | None = None,
        local_only: bool | None = None,
        memory_slots: int | None = None,
        system_prompt: str | None = None,
        publisher: str | None = None,
        progress: Progress | None = None,
        prefill_chunk_size: int | None = None,
        registry_url: str | None = None,
        token: str | None = None,
        publish: bool | str = False,
        policy: pol.PolicyParams | None = None,
        trusted_keys: Sequence[str] | None = None,
        registry_client: RegistryClient | None = None,
        models_dir: str | os.PathLike[str] | None = None,
        codec: str | None = None,
        verify: str | None = None,
        verify_probes: int | None = None,
    ) -> None:
        spec = model if isinstance(model, str) or model is None else None
        self.config = Config.resolve(
            model=spec,
            cache_dir=cache_dir,
            models_dir=models_dir,
            codec=codec,
            verify=verify,
            verify_probes=verify_probes,
            cache_size_bytes=cache_size_bytes,
            dtype=dtype,
            block_size=block_size,
            local_only=local_only,
            memory_slots=memory_slots,
            publisher=publisher,
            registry_url=registry_url or (registry_client.base_url if registry_client is not None else None),
            registry_token=token,
        )
        if publish not in (False, True, "public", "restricted"):
            raise ConfigError(f"publish must be False, True, 'public' or 'restricted', got {publish!r}")
        self.publish_visibility: str | None = "restricted" if publish is True else (publish or None)
        self.policy = policy if policy is not None else pol.PolicyParams()
        self.registry: RegistryClient | None = None
        if not self.config.local_only:
            from .registry import RegistryClient

            self.registry = registry_client or RegistryClient(
                self.config.registry_url or "", self.config.registry_token, trusted_keys=trusted_keys
            )
        self._remote: dict[str, Handle] = {}  # documents whose questions the registry answers
        self._remote_generate_ok = True
        self._prefill_rate: float | None = None  # measured tokens/s
        self._bandwidth: float | None = None  # measured bytes/s
        self._progress = progress
        if spec is None and model is not None:
            mfp = model_fingerprint(model)
            from .identity import sha256_hex, tokenizer_fingerprint

            tfp = tokenizer_fingerprint(tokenizer) if tokenizer is not None else sha256_hex(b"no-tokenizer")
            self.loaded = LoadedModel(model, tokenizer, type(model).__name__, mfp, tfp, 0.0)
        else:
            notify = (lambda msg: progress(msg, 0, 0)) if progress else None
            self.loaded = load_model(self.config.model, self.config.models_dir, dtype=self.config.dtype, notify=notify)
        self.engine = TransformersEngine(self.loaded.model, chunk_size=prefill_chunk_size)
        self.tokenizer = self.loaded.tokenizer
        self.template: PromptTemplate | None = (
            build_template(self.tokenizer, system_prompt) if self.tokenizer is not None else None
        )
        self.context = KeyContext(
            model_fingerprint=self.loaded.model_fingerprint,
            tokenizer_fingerprint=self.loaded.tokenizer_fingerprint,
            dtype=art.dtype_name(self.engine.dtype),
            template_hash=self.template.hash if self.template else KeyContext.template_hash,
        )
        self.expect = art.Expectation(
            model_fingerprint=self.context.model_fingerprint,
            tokenizer_fingerprint=self.context.tokenizer_fingerprint,
            dtype=self.context.dtype,
            layout=self.engine.layout,
        )
        self.store = KVStore(self.config.store_dir, size_limit=self.config.cache_size_bytes)
        self._memory: OrderedDict[str, KVCache] = OrderedDict()
        self._lock = threading.RLock()
        self.counters = {
            "memory_hits": 0, "local_hits": 0, "prefix_hits": 0, "prefills": 0, "tokens_saved": 0,
            "remote_hits": 0, "remote_generates": 0, "publishes": 0, "registry_failures": 0, "poisoned": 0,
        }

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
        return document_key(self.context, token_ids)

    def read_file(self, path: str | os.PathLike[str]) -> DocumentHandle:
        return self.read(Path(path))

    def read_ids(self, token_ids: Sequence[int], *, source: str = "<ids>") -> DocumentHandle:
        """Make sure the KV of exactly ``token_ids`` is cached (memory and local store)."""
        ids = tuple(int(t) for t in token_ids)
        if not ids:
            raise EngineError("cannot read an empty document")
        key = document_key(self.context, ids)
        _, info = self._kv_for(key, ids)
        return DocumentHandle(key=key, token_ids=ids, source=source, cache=info)

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

    def _kv_for(self, key: str, ids: tuple[int, ...]) -> tuple[KVCache, CacheInfo]:
        """The KV of ``ids`` from memory, the local store, the registry, a cached prefix, or a prefill."""
        kv, info = self._resolve(key, ids, remote_generate=False)
        assert kv is not None
        return kv, info

    def _resolve(self, key: str, ids: tuple[int, ...], *, remote_generate: bool) -> tuple[KVCache | None, CacheInfo]:
        """Like ``_kv_for``; with ``remote_generate`` the answer may be "let the registry generate" (kv None)."""
        with self._lock:
            kv = self._memory.get(key)
            if kv is not None:
                self._memory.move_to_end(key)
                self.counters["memory_hits"] += 1
                return kv, CacheInfo("memory", "in this process's memory", len(ids), 0)
        t0 = time.perf_counter()
        found = self.store.get(key, expect=self.expect)
        if found.artifact is not None:
            return self._local_hit(key, ids, found, t0, "found in the local store")
        with single_flight(self.config.store_dir / "locks", key, self.config.lock_timeout) as flight:
            if flight.waited:  # another process was computing this key: it is probably stored now
                again = self.store.get(key, expect=self.expect)
                if again.artifact is not None:
                    why = f"computed by another process while we waited {flight.seconds:.1f} s"
                    return self._local_hit(key, ids, again, t0, why)
            return self._resolve_miss(key, ids, found.reason, t0, remote_generate=remote_generate)

    def _local_hit(
        self, key: str, ids: tuple[int, ...], found: StoreLookup, t0: float, why: str
    ) -> tuple[KVCache, CacheInfo]:
        assert found.artifact is not None
        kv = found.artifact.kv
        self._remember(key, kv)
        self.counters["local_hits"] += 1
        self.counters["tokens_saved"] += len(ids)
        return kv, CacheInfo("local", why, len(ids), 0, load_seconds=time.perf_counter() - t0, bytes_read=found.nbytes)

    def _resolve_miss(
        self, key: str, ids: tuple[int, ...], miss_reason: str, t0: float, *, remote_generate: bool
    ) -> tuple[KVCache | None, CacheInfo]:
        """Registry, cached prefix, or prefill, for a key the local store does not hold (under its lock)."""
        if self.registry is not None:
            kv_remote, info, remote_reason = self._from_registry(key, ids, remote_generate=remote_generate)
            if info is not None:
                return kv_remote, info
            miss_reason = f"{miss_reason}; {remote_reason}"
        prefix_kv, prefix_reason = self._cached_prefix(ids)
        t1 = time.perf_counter()
        kv = self._prefill(ids, prefix_kv)
        prefill_s = time.perf_counter() - t1
        if prefill_s > 0 and len(ids) - (prefix_kv.n_tokens if prefix_kv is not None else 0) >= 32:
            self._prefill_rate = (len(ids) - (prefix_kv.n_tokens if prefix_kv is not None else 0)) / prefill_s
        blob = self._save(key, kv, ids)
        self._remember(key, kv)
        self.counters["prefills"] += 1
        publish_note = self._maybe_publish(key, blob, len(ids))
        if prefix_kv is not None:
            self.counters["prefix_hits"] += 1
            self.counters["tokens_saved"] += prefix_kv.n_tokens
            return kv, CacheInfo(
                "prefix", f"{miss_reason}; {prefix_reason}{publish_note}", prefix_kv.n_tokens,
                len(ids) - prefix_kv.n_tokens, load_seconds=t1 - t0, prefill_seconds=prefill_s,
            )
        log.info("prefilling %d tokens of %s…: %s; %s", len(ids), key[:16], miss_reason, prefix_reason)
        return kv, CacheInfo(
            "prefill", f"{miss_reason}; {prefix_reason}{publish_note}", 0, len(ids), prefill_seconds=prefill_s
        )

    # -- the registry ----------------------------------------------------------------------
    def _from_registry(
        self, key: str, ids: tuple[int, ...], *, remote_generate: bool
    ) -> tuple[KVCache | None, CacheInfo | None, str]:
        """Consult the registry and the policy. Returns (kv, info, "") on success, else (None, None, why)."""
        assert self.registry is not None
        if len(ids) < self.policy.min_tokens:
            return None, None, f"registry not consulted ({len(ids)} tokens < {self.policy.min_tokens}-token threshold)"
        t0 = time.perf_counter()
        try:
            hit = self._remote_lookup(key, ids)
        except (RegistryError, ArtifactError) as exc:
            return None, None, self._registry_failed(f"registry lookup of {key[:16]}… failed", exc)
        handle, covered = hit if hit is not None else (None, 0)
        decision = pol.decide(
            pol.Request(
                n_tokens=len(ids),
                remote_artifact=handle is not None,
                remote_tokens=covered,
                artifact_bytes=handle.size if handle is not None else None,
                bytes_per_token=self.engine.layout.bytes_per_token(self.engine.dtype),
                remote_generate=remote_generate and self._remote_generate_ok and covered == len(ids),
                bandwidth_bytes_per_s=self._bandwidth,
                prefill_tokens_per_s=self._prefill_rate,
            ),
            self.policy,
        )
        log.info("registry policy for %s…: %s (%s)", key[:16], decision.choice, decision.reason)
        if decision.choice == pol.REMOTE_GENERATE and handle is not None:
            self._remote[key] = handle
            return None, CacheInfo("remote-generate", f"policy: {decision.reason}", len(ids), 0,
                                   load_seconds=time.perf_counter() - t0), ""
        if decision.choice != pol.FETCH or handle is None:
            return None, None, f"policy: {decision.reason}"
        try:
            artifact, blob = self.registry.download_verified(handle, replace(self.expect, key=handle.key))
        except (RegistryError, ArtifactError) as exc:
            return None, None, self._registry_failed(f"fetching {handle.key[:16]}… from the registry failed", exc)
        seconds = self.registry.last_download_seconds
        if seconds > 0:
            self._bandwidth = len(blob) / seconds
        remote_kv = artifact.kv
        check = verify_kv(self.engine, remote_kv, self.config.verify, probes=self.config.verify_probes,
                          seed=int.from_bytes(os.urandom(4), "little"))
        if not check.ok:
            self.counters["poisoned"] += 1
            return None, None, self._registry_failed(
                f"artifact {handle.key[:16]}… from the registry failed {check.mode} verification",
                ArtifactIntegrityError(check.reason),
            )
        try:
            self.store.put(artifact.header, bytes(blob), block_hashes(self.context, remote_kv.token_ids.tolist(),
                                                                       self.config.block_size))
        except StoreError as exc:
            log.warning("could not cache the fetched %s… locally (the answer is unaffected): %s", handle.key[:16], exc)
        self.counters["remote_hits"] += 1
        if handle.key == key:
            self._remember(key, remote_kv)
            self.counters["tokens_saved"] += len(ids)
            return remote_kv, CacheInfo(
                "remote", f"fetched from the registry, checksum verified, KV {check.mode}-verified against its "
                f"tokens ({check.seconds * 1000:.0f} ms); policy: {decision.reason}", len(ids), 0,
                load_seconds=time.perf_counter() - t0, bytes_read=len(blob),
            ), ""
        n = _common_prefix(remote_kv.token_ids.tolist(), ids)
        if n == 0:
            return None, None, "the registry's prefix artifact shares no tokens"
        t1 = time.perf_counter()
        kv = self._prefill(ids, remote_kv.truncate(n))
        prefill_s = time.perf_counter() - t1
        self._save(key, kv, ids)
        self._remember(key, kv)
        self.counters["tokens_saved"] += n
        return kv, CacheInfo(
            "remote", f"fetched a {n}-token prefix from the registry; policy: {decision.reason}", n, len(ids) - n,
            load_seconds=t1 - t0, prefill_seconds=prefill_s, bytes_read=len(blob),
        ), ""

    def _remote_lookup(self, key: str, ids: tuple[int, ...]) -> tuple[Handle, int] | None:
        """The registry's exact artifact (covering every token) or its longest usable prefix artifact."""
        assert self.registry is not None
        handle = self.registry.lookup(key)
        if handle is not None:
            return handle, len(ids)
        hashes = block_hashes(self.context, ids, self.config.block_size)
        found = self.registry.lookup_prefix(hashes) if hashes else None
        if found is None:
            return None
        handle, blocks = found
        covered = min(blocks * self.config.block_size, handle.header.token_count, len(ids) - 1)
        return (handle, covered) if covered > 0 else None

    def _registry_failed(self, what: str, exc: KVAgentError) -> str:
        self.counters["registry_failures"] += 1
        reason = f"{what} ({type(exc).__name__}: {exc}); prefilling locally"
        log.warning("%s", reason)
        return reason

    def _maybe_publish(self, key: str, blob: bytes | None, n_tokens: int) -> str:
        if self.registry is None or self.publish_visibility is None or blob is None:
            return ""
        ok, why = pol.should_publish(n_tokens, self.policy)
        if not ok:
            return f"; not published ({why})"
        try:
            self.registry.publish(blob, self.publish_visibility)
        except (RegistryError, ArtifactError) as exc:
            log.warning("publishing %s… to the registry failed (the answer is unaffected): %s", key[:16], exc)
            return f"; publishing failed ({type(exc).__name__})"
        self.counters["publishes"] += 1
        return f"; published ({self.publish_visibility})"

    def publish(self, handle: DocumentHandle, visibility: str = "restricted", signing_key: Any = None) -> Handle:
        """Publish a read document's KV to the registry (regardless of the publish threshold)."""
        if self.registry is None:
            raise ConfigError("no registry configured: pass registry_url= or set KVAGENT_REGISTRY_URL")
        kv, _info = self._kv_for(handle.key, handle.token_ids)
        _header, blob = self._encode(handle.key, kv)
        result = self.registry.publish(blob, visibility, signing_key=signing_key)
        self.counters["publishes"] += 1
        return result

    def _cached_prefix(self, ids: tuple[int, ...]) -> tuple[KVCache | None, str]:
        """The longest cached KV whose tokens are a prefix of ``ids`` (at least one block, leaving one token)."""
        hashes = block_hashes(self.context, ids, self.config.block_size)
        if not hashes:
            return None, f"no prefix lookup (document shorter than one {self.config.block_size}-token block)"
        hit = self.store.find_prefix(hashes)
        if hit is None:
            return None, "no cached document shares its first block"
        key, _blocks = hit
        found = self.store.get(key, expect=self.expect)
        if found.artifact is None:
            return None, f"prefix candidate unusable: {found.reason}"
        cached = found.artifact.kv.token_ids.tolist()
        n = 0
        limit = min(len(cached), len(ids) - 1)
        while n < limit and cached[n] == ids[n]:
            n += 1
        if n == 0:
            return None, "prefix candidate shares no tokens"
        return found.artifact.kv.truncate(n), f"reused a cached prefix of {n} tokens"

    def _prefill(self, ids: tuple[int, ...], prefix: KVCache | None) -> KVCache:
        progress = (lambda done, total: self._progress("prefill", done, total)) if self._progress else None
        if prefix is None:
            return self.engine.prefill(ids, progress=progress)
        return self.engine.prefill_from(prefix, ids[prefix.n_tokens :], progress=progress)

    def _encode(self, key: str, kv: KVCache) -> tuple[art.ArtifactHeader, bytes]:
        return art.encode(
            kv,
            key=key,
            model_fingerprint=self.context.model_fingerprint,
            tokenizer_fingerprint=self.context.tokenizer_fingerprint,
            template_hash=self.context.template_hash,
            position_offset=self.context.position_offset,
            publisher=self.config.publisher,
            codec=self.config.codec,
        )

    def _save(self, key: str, kv: KVCache, ids: tuple[int, ...]) -> bytes:
        header, blob = self._encode(key, kv)
        try:
            self.store.put(header, blob, block_hashes(self.context, ids, self.config.block_size))
        except StoreError as exc:
            log.warning("could not cache %s… locally (the answer is unaffected): %s", key[:16], exc)
        return blob

    def _remember(self, key: str, kv: KVCache) -> None:
        with self._lock:
            self._memory[key] = kv
            self._memory.move_to_end(key)
            while len(self._memory) > max(0, self.config.memory_slots):
                self._memory.popitem(last=False)

    def forget_memory(self) -> None:
        """Drop this process's in-memory KV copies (the local store keeps them)."""
        with self._lock:
            self._memory.clear()

    # -- asking ----------------------------------------------------------------------------
    def ask(self, handle: DocumentHandle, question: str, *, mode: str = "auto", **gen: Any) -> Answer:
        """Answer ``question`` about a read document, resuming from its cached KV.

        ``mode``: "local" always decodes here; "remote" asks the registry to generate from its copy;
        "auto" lets the policy choose. Registry failures fall back to local decoding.
        """
        pieces: list[int] = []
        t0 = time.perf_counter()
        first = None
        run, suffix, params = self._prepare(handle, question, gen, mode)
        for tok in run.tokens():
            if first is None:
                first = time.perf_counter() - t0
            pieces.append(tok)
        return self._answer(handle, pieces, params, run.info, len(suffix), t0, first)

    def ask_ids(self, handle: DocumentHandle, suffix_ids: Sequence[int], *, mode: str = "auto", **gen: Any) -> Answer:
        """Continue a read document with ``suffix_ids`` (no tokenizer needed); ``mode`` as in ``ask``."""
        t0 = time.perf_counter()
        params = self.params(**gen)
        suffix = [int(t) for t in suffix_ids]
        run = self._run(handle, suffix, params, mode)
        ids = list(run.tokens())
        return self._answer(handle, ids, params, run.info, len(suffix), t0, None)

    def ask_many(self, handle: DocumentHandle, questions: Sequence[str], **gen: Any) -> list[Answer]:
        """Answer several questions over one document; its KV is loaded or prefilled once."""
        return [self.ask(handle, q, **gen) for q in questions]

    def stream(self, handle: DocumentHandle, question: str, *, mode: str = "auto", **gen: Any) -> Iterator[str]:
        """Yield the answer's text as it is generated (stop tokens are not shown)."""
        run, _suffix, params = self._prepare(handle, question, gen, mode)
        ids: list[int] = []
        shown = ""
        stops = set(params.stop_token_ids)
        for tok in run.tokens():
            if tok in stops:
                break
            ids.append(tok)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                continue
            if len(text) > len(shown):
                yield text[len(shown) :]
                shown = text

    def _prepare(
        self, handle: DocumentHandle, question: str, gen: dict[str, Any], mode: str
    ) -> tuple[_Run, list[int], GenerationParams]:
        if not isinstance(question, str) or not question.strip():
            raise EngineError("the question must be a non-empty string")
        params = self.params(**gen)
        suffix = self._template().question_ids(self.tokenizer, question)
        return self._run(handle, suffix, params, mode), suffix, params

    def _run(self, handle: DocumentHandle, suffix: list[int], params: GenerationParams, mode: str) -> _Run:
        """Where the answer's tokens will come from: the local engine, or the registry (with local fallback)."""
        if mode not in ("auto", "local", "remote"):
            raise ConfigError(f"mode must be 'auto', 'local' or 'remote', got {mode!r}")
        if self.registry is None or mode == "local":
            kv, info = self._kv_for(handle.key, handle.token_ids)
            return _Run(self, handle, suffix, params, kv, info)
        if mode == "remote":
            with self._lock:
                local = self._memory.get(handle.key)
            if handle.key not in self._remote:
                try:
                    found = self.registry.lookup(handle.key)
                except (RegistryError, ArtifactError) as exc:
                    found = None
                    self._registry_failed(f"registry lookup of {handle.key[:16]}… failed", exc)
                if found is not None:
                    self._remote[handle.key] = found
            if handle.key in self._remote:
                info = CacheInfo("remote-generate", "mode='remote': the registry generates from its copy",
                                 handle.n_tokens, 0)
                return _Run(self, handle, suffix, params, None, info)
            log.warning("mode='remote' but the registry has no artifact %s…; answering locally", handle.key[:16])
            if local is not None:
                return _Run(self, handle, suffix, params, local, CacheInfo("memory", "in this process's memory",
                                                                           handle.n_tokens, 0))
        kv_or_none, info = self._resolve(handle.key, handle.token_ids, remote_generate=mode == "auto")
        return _Run(self, handle, suffix, params, kv_or_none, info)

    def _remote_tokens(self, run: _Run) -> Iterator[int]:
        """Tokens from the registry; on any failure, the rest from a local KV (exact for greedy decoding)."""
        assert self.registry is not None
        key = run.handle.key
        produced: list[int] = []
        try:
            for tok in self.registry.generate_stream(key, run.suffix, run.params):
                produced.append(tok)
                yield tok
            self.counters["remote_generates"] += 1
            return
        except RegistryError as exc:
            self._remote.pop(key, None)
            if "HTTP 501" in str(exc):
                self._remote_generate_ok = False
            reason = self._registry_failed(f"remote generate for {key[:16]}… failed after {len(produced)} tokens", exc)
        kv, info = self._kv_for(key, run.handle.token_ids)
        run.info = replace(info, reason=f"{reason}; {info.reason}")
        left = run.params.max_new_tokens - len(produced)
        if left > 0:
            yield from self.engine.stream(kv, run.suffix + produced, replace(run.params, max_new_tokens=left))

    def params(self, **gen: Any) -> GenerationParams:
        """GenerationParams with this model's stop tokens unless ``stop_token_ids`` is given."""
        if "stop_token_ids" not in gen and self.template is not None:
            gen["stop_token_ids"] = self.template.stop_token_ids
        try:
            return GenerationParams(**gen)
        except TypeError as exc:
            raise EngineError(f"unknown generation parameter: {exc}") from exc

    def _answer(
        self, handle: DocumentHandle, ids: list[int], params: GenerationParams, info: CacheInfo,
        n_suffix: int, t0: float, first: float | None,
    ) -> Answer:
        stops = set(params.stop_token_ids)
        finish = "stop" if ids and ids[-1] in stops else "length"
        shown = ids[:-1] if finish == "stop" else ids
        text = self.tokenizer.decode(shown, skip_special_tokens=True) if self.tokenizer is not None else ""
        return Answer(
            text=text.strip(),
            token_ids=ids,
            finish_reason=finish,
            key=handle.key,
            cache=info,
            prompt_tokens=handle.n_tokens + n_suffix,
            seconds=time.perf_counter() - t0,
            first_token_seconds=first if first is not None else 0.0,
        )

    # -- checking --------------------------------------------------------------------------
    def verify(self, handle: DocumentHandle, question: str = "Summarise the document.", max_new_tokens: int = 32) -> VerifyReport:
        """Greedy answer after reuse vs a full prefill of the same ids, with ``max_new_tokens`` forced."""
        params = GenerationParams(max_new_tokens=max_new_tokens, stop_token_ids=())
        kv, _info = self._kv_for(handle.key, handle.token_ids)
        suffix = self._template().question_ids(self.tokenizer, question)
        t0 = time.perf_counter()
        reused = self.engine.generate(kv, suffix, params).token_ids
        t1 = time.perf_counter()
        full = self.engine.generate(None, list(handle.token_ids) + suffix, params).token_ids
        t2 = time.perf_counter()
        div = next((i for i, (a, b) in enumerate(zip(reused, full, strict=True)) if a != b), None)
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
        return {**self.counters, "memory_entries": len(self._memory), **self.store.stats()}

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> KVAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _template(self) -> PromptTemplate:
        if self.template is None or self.tokenizer is None:
            raise ConfigError("this agent has no tokenizer; pass tokenizer= or use read_ids()/engine APIs")
        return self.template


class _Run:
    """One answer's token source; ``info`` is updated if a remote run falls back to local decoding."""

    def __init__(self, agent: KVAgent, handle: DocumentHandle, suffix: list[int], params: GenerationParams,
                 kv: KVCache | None, info: CacheInfo) -> None:
        self.agent, self.handle, self.suffix, self.params, self.kv, self.info = agent, handle, suffix, params, kv, info

    def tokens(self) -> Iterator[int]:
        if self.kv is not None:
            return self.agent.engine.stream(self.kv, self.suffix, self.params)
        return self.agent._remote_tokens(self)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share, leaving at least one token of ``b`` to prefill."""
    n, limit = 0, min(len(a), len(b) - 1)
    while n < limit and a[n] == b[n]:
        n += 1
    return n
