"""Worker side: turn the KV vLLM computed for a prompt into a kvagent artifact, off the forward path.

The copy out of vLLM's blocks happens during the step (the blocks may be reused afterwards); encoding,
hashing, the local-store write and publishing run on one background thread. A failure there is logged and
costs only a future cache hit, never an answer. Nothing here imports vLLM.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kvagent import (
    ArtifactError,
    KeyContext,
    KVCache,
    KVStore,
    RegistryError,
    StoreError,
    block_hashes,
    encode_parts,
    salted,
)

from .settings import ConnectorSettings

log = logging.getLogger("vllm.kvagent")  # under "vllm": shown by vLLM's own log handler


@dataclass(frozen=True)
class SaveRequest:
    """One prompt's KV to keep: under ``context`` salted by ``namespace`` (None: shared, publishable)."""

    kv: KVCache
    context: KeyContext
    namespace: str | None
    index_block_size: int  # kvagent's prefix-index block size (block hashes for the store)
    derived_from: str | None = None  # the artifact its leading KV copies (``KVStore.put(derived_from=)``)


class ArtifactSaver:
    """Encodes KVs as artifacts into the local store and publishes the shared ones when configured."""

    def __init__(self, settings: ConnectorSettings, store_dir: Path, engine: str) -> None:
        self.settings = settings
        self.engine = engine
        self.store = KVStore(store_dir)
        self._registry = None
        if settings.publish != "none" and settings.registry_url:
            from kvagent import RegistryClient

            self._registry = RegistryClient(settings.registry_url, settings.token)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvagent-save")
        self._pending: list[Future[str]] = []
        self._lock = threading.Lock()
        self.saved: list[str] = []  # keys written, in order (for logs and tests)

    def submit(self, req: SaveRequest) -> Future[str]:
        fut = self._pool.submit(self._save, req)
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()] + [fut]
        return fut

    def flush(self, timeout: float | None = None) -> None:
        """Wait for the saves submitted so far."""
        with self._lock:
            pending = list(self._pending)
        for f in pending:
            f.exception(timeout)

    def close(self) -> None:
        self.flush(60)
        self._pool.shutdown(wait=True)
        if self._registry is not None:
            self._registry.close()
        self.store.close()

    def _save(self, req: SaveRequest) -> str:
        ctx = salted(req.context, req.namespace) if req.namespace else req.context
        ids = req.kv.token_ids.tolist()
        try:
            header, parts = encode_parts(
                req.kv,
                model_fingerprint=ctx.model_fingerprint,
                tokenizer_fingerprint=ctx.tokenizer_fingerprint,
                template_hash=ctx.template_hash,
                position_offset=ctx.position_offset,
                publisher=self.settings.publisher,
                engine=self.engine,
            )
            self.store.put(header, parts, block_hashes(ctx, ids, req.index_block_size),
                           derived_from=req.derived_from)
        except (ArtifactError, StoreError) as exc:
            log.warning(
                "could not keep the KV of a %d-token prompt (answers are unaffected): %s", len(ids), exc
            )
            return ""
        with self._lock:
            self.saved.append(header.key)
        note = "private (salted)" if req.namespace else "shared"
        if self._registry is not None and not req.namespace:
            try:
                self._registry.publish(b"".join(parts), self.settings.publish, price=self.settings.price)
                note += f", published ({self.settings.publish}"
                note += f", {self.settings.price} µ-units a load)" if self.settings.price else ")"
            except (RegistryError, ArtifactError) as exc:
                log.warning(
                    "publishing %s… failed (kept locally; answers are unaffected): %s", header.key[:16], exc
                )
                note += f", publishing failed ({type(exc).__name__})"
        log.info("kvagent: saved the KV of %d prompt tokens as %s… (%s)", len(ids), header.key[:16], note)
        return header.key
