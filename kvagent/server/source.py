"""The server's own registry as a resolver source: published artifacts a principal may see, read in-process.

The chat endpoint resumes through the same :class:`kvagent.reuse.resolver.Resolver` as the SDK; on the server
its
registry tier is this source: lookups by key and by block-hash prefix go to the metadata database with the
caller's entitlements (a restricted artifact the caller may not see is never a candidate), and a fetch reads
the blob from the blob store and decodes it (checksum verified) through the host's LRU of decoded KVs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..artifacts import format as art
from ..artifacts.source import Fetched, GiveUp, Handle
from ..client.registry import parse_handle
from ..errors import ArtifactMismatchError
from .auth import Principal
from .http import ApiError
from .meta import ArtifactRow
from .state import State, handle


class ServerSource:
    """Published artifacts visible to ``principal`` on this server (never generates: the caller is the
    host)."""

    label = "this server's registry"
    remote = False
    can_generate = False
    bandwidth_hint = 1e9  # a local read: the decode, not a network link, is what it costs

    def __init__(self, st: State, principal: Principal, *, sell: bool = True) -> None:
        """``sell=False`` offers only what the caller may use without owing a royalty (its own artifacts and
        unpriced ones): for an engine that says what it reused only after the request was charged."""
        self.st, self.principal, self.sell = st, principal, sell
        self._blobs: dict[str, str] = {}  # key -> blob name of the rows looked up

    def _offered(self, row: ArtifactRow) -> bool:
        return self.sell or row.owner == self.principal.name or not self.st.market.price(row.key, row.owner)

    def _handle(self, row: object) -> Handle:
        h = parse_handle(handle(row))  # type: ignore[arg-type]
        self._blobs[h.key] = row.blob  # type: ignore[attr-defined]
        return h

    def lookup(self, key: str, *, timeout: float | None = None) -> Handle | None:
        try:
            row = self.st.visible(key, self.principal)
        except ApiError:
            return None
        return self._handle(row) if self._offered(row) else None

    def lookup_prefix(
        self, hashes: Sequence[str], *, timeout: float | None = None
    ) -> tuple[Handle, int] | None:
        found = self.st.meta.longest_prefix(list(hashes), self.principal.name)
        if found is None:
            return None
        key, blocks = found
        try:
            row = self.st.visible(key, self.principal)
        except ApiError:
            return None
        return (self._handle(row), blocks) if self._offered(row) else None

    def fetch(self, h: Handle, expect: art.Expectation, *, max_price: int | None = None,
              give_up: GiveUp | None = None) -> Fetched:
        """The decoded KV (hosted use is charged per token by the chat endpoint, not per load; a local read,
        so ``give_up`` is never asked)."""
        blob = self._blobs.get(h.key)
        if blob is None:
            raise ArtifactMismatchError(f"artifact {h.key[:16]}… was not looked up through this source")
        art.check_expectation(h.header, expect)
        t0 = time.perf_counter()
        host = self.st.model_host
        assert host is not None  # a ServerSource is made only by a node that serves a model
        kv = host.kv_for(h.key, blob, self.st.blobs.read_bytes)
        return Fetched(art.Artifact(h.header, kv), h.size, time.perf_counter() - t0)

    def dispute(self, handle: Handle, receipt: str, reason: str, difference: float) -> str:
        return "not applicable: nothing was bought"
