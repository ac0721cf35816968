"""Keeping a computed KV: its artifact bytes under a (possibly salted) context, the local store, and the
publish hook (``on_saved``) for the shared namespace."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..artifacts import format as art
from ..errors import StoreError
from ..kvcache.identity import KeyContext
from ..kvcache.tensors import KVCache
from .store import KVStore

log = logging.getLogger("kvagent")

#: called with (key, artifact_bytes, n_tokens) after a computed KV is stored (publishing); returns a note
OnSaved = Callable[[str, Callable[[], bytes], int], str]


class KVSaver:
    """Encodes computed KVs as artifacts, writes them to the local store and hands shared ones to
    ``on_saved``."""

    def __init__(
        self,
        store: KVStore,
        *,
        publisher: str | None = None,
        codec: str = "raw",
        on_saved: OnSaved | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.codec = codec
        # artifact_bytes() joins the artifact's bytes only when asked, so a reader that does not publish
        # never copies them
        self.on_saved = on_saved

    def encode_parts(
        self, key: str, kv: KVCache, ctx: KeyContext
    ) -> tuple[art.ArtifactHeader, list[memoryview]]:
        """The artifact of ``kv`` under ``ctx``: its header and its bytes in parts (not joined)."""
        return art.encode_parts(
            kv,
            key=key,
            model_fingerprint=ctx.model_fingerprint,
            tokenizer_fingerprint=ctx.tokenizer_fingerprint,
            template_hash=ctx.template_hash,
            position_offset=ctx.position_offset,
            publisher=self.publisher,
            codec=self.codec,
        )

    def save(self, ns: str, key: str, kv: KVCache, hashes: list[str], ctx: KeyContext) -> str:
        """Store a computed KV locally, indexed by ``hashes`` (and hand it to ``on_saved`` unless it is in a
        private namespace ``ns``); returns a note for the read's reason."""
        # written as they are: no joined copy for the store
        header, parts = self.encode_parts(key, kv, ctx)
        try:
            src = kv.source
            derived = src.artifact if src is not None else None
            pub = src.published_part() if src is not None else None
            published = (pub.digest, min(pub.n, kv.n_tokens)) if pub is not None else None
            self.store.put(header, parts, hashes, derived_from=derived, published=published)
        except StoreError as exc:
            log.warning("could not cache %s… locally (the answer is unaffected): %s", key[:16], exc)
        if self.on_saved is not None and not ns:
            return self.on_saved(key, lambda: b"".join(parts), kv.n_tokens)
        return ""
