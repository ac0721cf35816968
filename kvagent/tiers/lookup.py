"""The records of a walk through the tiers: its settings (``ResolverSettings``), what is asked (``Lookup``)
and
what a tier found (``Candidate``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from ..config import Config
from ..costs import policy as pol
from ..kvcache.identity import KeyContext, block_hashes, document_key
from ..kvcache.tensors import KVCache
from ..options import derive

#: progress(done, total) while prefilling
PrefillProgress = Callable[[int, int], None]


@dataclass(eq=False)
class Lookup:
    """One resolution's request: its ids and keys, how it may be answered, and its block hashes (computed
    once).

    ``context`` is the (possibly salted) context of the local tiers, ``shared_context`` the registry's
    unsalted one. ``local_tokens`` is set once the local tiers have
    found their best prefix.
    """

    ids: tuple[int, ...]
    namespace: str
    context: KeyContext
    key: str
    shared_context: KeyContext
    block_size: int
    source: Any = None  # the RegistrySource to consult (kvagent.tiers.registry), None for none
    document: bool = True
    remote_generate: bool = False
    min_save_tokens: int = 1
    defer_save: bool = False
    max_tail: int = 0
    progress: PrefillProgress | None = None
    # False: never prefill; answer with the cached prefix (or nothing) and the rest as tail
    compute: bool = True
    started: float = field(default_factory=time.perf_counter)
    local_tokens: int = 0

    @cached_property
    def shared_key(self) -> str:
        """The read's key under ``shared_context`` (its own key unless it is in a private namespace)."""
        return (
            self.key if self.shared_context == self.context else document_key(self.shared_context, self.ids)
        )

    @cached_property
    def hashes(self) -> list[str]:
        """Block hashes of ``ids`` under ``context`` (the local store's index)."""
        return block_hashes(self.context, self.ids, self.block_size)

    @cached_property
    def shared_hashes(self) -> list[str]:
        """Block hashes of ``ids`` under ``shared_context`` (the registry's index)."""
        if self.shared_context == self.context:
            return self.hashes
        return block_hashes(self.shared_context, self.ids, self.block_size)

    @cached_property
    def target(self) -> torch.Tensor:
        """``ids`` as a tensor, for prefix matching."""
        return torch.as_tensor(self.ids, dtype=torch.int64)


@dataclass
class Candidate:
    """A cached KV covering the first ``n`` ids of a lookup (already truncated to them)."""

    kv: KVCache
    n: int
    source: str  # "memory" | "store" | "registry"
    seconds: float = 0.0
    nbytes: int = 0
    origin: str = ""  # the key of the KV / artifact it came from
    charged: int = 0  # micro-units paid for it


@dataclass
class ResolverSettings:
    """What the resolver needs to know besides its components: the values of the same-named
    :class:`~kvagent.config.Config` options, derived from their declarations there (so their defaults are
    Config's; ``kvagent.runtime`` fills them)."""

    block_size: int = derive(Config, "block_size")
    verify: str = derive(Config, "verify")
    verify_probes: int = derive(Config, "verify_probes")
    lock_timeout: float = derive(Config, "lock_timeout")
    allow_context_overflow: bool = derive(Config, "allow_context_overflow")
    policy: pol.PolicyParams = derive(Config, "policy", factory=pol.PolicyParams)
    max_price_per_load: int | None = derive(Config, "max_price_per_load")
    budget: int | None = derive(Config, "budget")
    prefill_cost_per_token: int = derive(Config, "prefill_cost_per_token")
