"""The model host: one model loaded once (with its tokenizer and resolver), its batching engine, and an LRU of
decoded published KVs."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..artifacts import format as art
from ..engines import Cancel, GenerationRequest, Sink
from ..engines.params import GenerationParams
from ..errors import ModelLoadError, StoreError
from ..kvcache.tensors import KVCache
from ..models import EMBEDDED_NAMES, ensure_embedded, load_model
from ..options import option_of
from ..plugins import EngineContext, EngineFactory, transformers_engine
from ..runtime import Runtime, build_runtime

log = logging.getLogger("kvagent.server")


def load_host_agent(spec: str, models_dir: Path, cache_dir: Path, *, prompt_cache_bytes: int | None = None,
                    **options: Any) -> Runtime:
    """The host's model, tokenizer and resolver: a local-only runtime, built as an SDK agent's is, so its
    keys, block hashes and chat rendering are exactly those of an SDK agent on the same model (published
    artifacts match).

    ``cache_dir`` holds the host's own prompt cache (private prompt KVs, salted per principal), of
    ``prompt_cache_bytes`` (None: ``Settings.prompt_cache_bytes``'s default). ``options``: further Config
    options (``Settings.host_options``: ``memory_slots``, ``calibrate_at_start``, ``dtype``...), None taking
    the Config's (its KVAGENT_* variable or default); see ``ModelHost.warm_up``. The model is loaded in the
    Config's dtype, and every engine of the host runs in the model's dtype.
    """
    if spec.lower() not in EMBEDDED_NAMES and not Path(spec).expanduser().is_dir():
        raise ModelLoadError(f"--model {spec!r} is neither 'smollm2' nor a local model directory")
    from ..config import Config
    from .settings import Settings

    if prompt_cache_bytes is None:
        prompt_cache_bytes = option_of(Settings, "prompt_cache_bytes").default
    config = Config.from_env(models_dir=models_dir, cache_dir=cache_dir, local_only=True,
                             cache_size_bytes=prompt_cache_bytes, **options)
    loaded = load_model(spec, models_dir, dtype=config.dtype, require_tokenizer=False)
    log.info("host model %s in %s (dtype %s)", loaded.name, _dtype_of(loaded.model), config.dtype)
    return build_runtime(config.with_options(model=loaded.name), model=loaded)


def _dtype_of(model: object) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")  # type: ignore[attr-defined]


def model_path(spec: str, models_dir: Path) -> Path:
    """The Hugging Face directory of the host's model (the embedded one's converted copy), for engines that
    load the weights themselves."""
    if spec.lower() in EMBEDDED_NAMES:
        return ensure_embedded(models_dir)
    return Path(spec).expanduser()


class ModelHost:
    """One model loaded once: its agent (tokenizer, resolver), its generation engine (``batch``, up to
    ``max_batch`` sequences decoding together; built by ``engine_factory``, transformers by default) and an
    LRU of decoded published KVs. ``lock`` is the transformers model's lock: held, no forward of it runs
    (dispute verification uses that model, whichever engine generates)."""

    def __init__(self, agent: Runtime, name: str, kv_cache_items: int = 2, max_batch: int = 8,
                 engine_factory: EngineFactory = transformers_engine, model_path: Path | None = None,
                 prefill_chunk: int | None = None):
        self.agent = agent
        self.engine = agent.engine
        self.batch = engine_factory(EngineContext(agent, model_path, max_batch, prefill_chunk))
        self.max_batch = max_batch
        self.fingerprint = agent.context.model_fingerprint
        self.name = name
        self.lock = agent.engine.lock
        self._kv_lock = threading.Lock()
        self._kvs: OrderedDict[str, KVCache] = OrderedDict()
        self._capacity = kv_cache_items

    @property
    def max_positions(self) -> int | None:
        """The longest prompt plus reply the generating engine takes (vLLM's ``max_model_len`` under it)."""
        return self.batch.max_positions

    def kv_for(self, key: str, blob: str, read: Callable[[str], memoryview]) -> KVCache:
        """The decoded KV of published blob ``blob`` (checksum verified), from the LRU when possible;
        ``read`` is the blob store's ``read_bytes``."""
        cache_id = f"{key}:{blob}"
        with self._kv_lock:
            kv = self._kvs.get(cache_id)
            if kv is not None:
                self._kvs.move_to_end(cache_id)
                return kv
        decoded = art.decode(read(blob), expect=art.Expectation(key=key))
        # named by its checked bytes: every principal entitled to it reads the same KV, so the batching engine
        # may let their sequences read one copy (never another artifact with the same ids)
        kv = decoded.kv.with_source(art.published_source(decoded.header))
        if self._capacity:
            with self._kv_lock:
                self._kvs[cache_id] = kv
                while len(self._kvs) > self._capacity:
                    self._kvs.popitem(last=False)
        return kv

    def forget(self, key: str) -> None:
        """Drop every copy of published artifact ``key`` this host keeps (it was deleted or quarantined): the
        decoded one, and through the resolver every copy derived from it in any namespace (memory entries,
        prompt saves and staged copies in the local store), and whatever the engine keeps of it (its
        ``forget``, when it has one: vLLM's prefix cache)."""
        with self._kv_lock:
            for cid in [c for c in self._kvs if c.startswith(key + ":")]:
                del self._kvs[cid]
        try:
            self.agent.resolver.purge(key)
        except StoreError:  # the artifact is gone already; its stored copies stay until the next purge
            log.exception("could not drop the stored copies of %s…", key[:16])
        forget = getattr(self.batch, "forget", None)
        if callable(forget):
            forget(key)

    def generate(self, kv: KVCache, suffix_ids: Sequence[int], params: GenerationParams, sink: Sink,
                 cancel: Cancel, namespace: str | None = None) -> None:
        """Continue from a published artifact's ``kv`` with ``suffix_ids``: Token events, then one Finish, to
        ``sink``. ``namespace``: the caller's private cache namespace, carried by the request (an engine that
        resolves prompts itself keeps the caller's suffix in it; the batching engine shares ``kv`` only as the
        published bytes it is). Raises EngineError for a request the model cannot run."""
        if getattr(self.batch, "resolves_prefix", False):
            # such an engine takes whole prompts: it recomputes the artifact's tokens (or finds them in
            # its own cache), see docs/server.md
            ids = (*(int(t) for t in kv.token_ids.tolist()), *suffix_ids)
            request = GenerationRequest(ids, None, params, namespace=namespace)
        else:
            request = GenerationRequest(tuple(suffix_ids), kv, params, namespace=namespace)
        cancel.attach(self.batch.submit(request, sink))

    def warm_up(self) -> None:
        """Before serving: measure a few short forwards when the calibration has no measured prefill for this
        machine + model (``kvagent.costs.calibration.warm_up``), unless ``calibrate_at_start`` is off. The
        server
        calls this before it listens, so ``/v1/healthz`` answers only once it is done."""
        cost = self.agent.cost
        if cost is None:
            return
        if not self.agent.config.calibrate_at_start:
            if cost.needs_warm_up():
                log.info("not calibrating at start (--no-calibrate-at-start): the first decisions use the "
                         "assumed prefill rate")
            return
        from ..costs.calibration import warm_up

        warm_up(cost, self.engine)

    def close(self) -> None:
        """Stop the engine, when it has anything to stop (an engine in another process), and write the
        outcomes not yet written."""
        if self.agent.cost is not None:
            self.agent.cost.flush_outcomes()
        close = getattr(self.batch, "close", None)
        if callable(close):
            close()
