"""What the cache did for one read (``CacheInfo``): the record every front door shows (a leaf)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..modes import StrMode

__all__ = ["CacheInfo", "CacheStatus"]


class CacheStatus(StrMode):
    """What a read found (``CacheInfo.status``); a ``str``, so ``status == "prefix"`` and JSON keep working.

    Hits (:attr:`CacheInfo.hit`): ``memory`` (this process's memory), ``local`` (the whole KV in the local
    store), ``prefix`` (a cached prefix, the rest computed), ``remote`` (a registry copy, the rest computed),
    ``remote-generate`` (the registry decodes from its copy), and ``engine`` when the engine, which resolves
    the prompt's KV itself (vLLM behind kvagent's connector), reused some of it (``cached_tokens`` > 0: known
    once its Finish came, see :func:`kvagent.chat.turn.settled`). Not hits: ``prefill`` (nothing cached: all
    computed) and ``disabled`` (reuse turned off for the request)."""

    MEMORY = "memory"
    LOCAL = "local"
    PREFIX = "prefix"
    REMOTE = "remote"
    REMOTE_GENERATE = "remote-generate"
    ENGINE = "engine"
    PREFILL = "prefill"
    DISABLED = "disabled"


#: statuses that reused cached KV whatever their token counts (``engine`` counts when it reused tokens)
_HITS = frozenset({CacheStatus.MEMORY, CacheStatus.LOCAL, CacheStatus.PREFIX, CacheStatus.REMOTE,
                   CacheStatus.REMOTE_GENERATE})


@dataclass(frozen=True)
class CacheInfo:
    """What the cache did for one read or prompt, and why (shown to users; never silent).

    ``status``: a :class:`CacheStatus` ("memory", "local", "prefix", "remote", "remote-generate", "engine",
    "prefill" or "disabled"; a string given is taken as its member, an unknown one is a ValueError);
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

    status: CacheStatus
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

    def __post_init__(self) -> None:
        if not isinstance(self.status, CacheStatus):
            object.__setattr__(self, "status", CacheStatus(self.status))

    @property
    def hit(self) -> bool:
        """Whether cached KV was reused: a hit status, or the engine's own reuse of some prompt tokens."""
        if self.status is CacheStatus.ENGINE:
            return self.cached_tokens > 0
        return self.status in _HITS
