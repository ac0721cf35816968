"""What the cache did for one read (``CacheInfo``): the record every front door shows (a leaf)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["CacheInfo"]


@dataclass(frozen=True)
class CacheInfo:
    """What the cache did for one read or prompt, and why (shown to users; never silent).

    ``status``: "memory" | "local" | "prefix" | "remote" | "remote-generate" | "prefill".
    ``source``: where the reused tokens came from: "memory", "store", "registry", or "" (none);
    ``origin``: the key of the cached KV (or published artifact) that supplied them;
    ``lookup_seconds``: when tokens were computed (a prefill, or a prefix extended), what finding the best
    cached start cost first (local store, prefix index, registry lookup and any download), i.e. the read's
    time over the computing alone;
    ``charged``: integer micro-units this read paid the registry (a bought artifact or a remote generation);
    ``stages``: seconds per stage of the read (``kvagent.costs.stages.STAGES``: lookup, wait, probe, download,
    verification, store_write, resume), the stages that took time only; ``predicted_seconds``: what the cost
    model predicted for the path the read took (0.0: no prediction, e.g. a memory hit).
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
    charged: int = 0
    stages: Mapping[str, float] = field(default_factory=dict)
    predicted_seconds: float = 0.0

    @property
    def hit(self) -> bool:
        return self.status in ("memory", "local", "prefix", "remote", "remote-generate")
