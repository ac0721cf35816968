"""The memory tier: this process's LRU of KVs per namespace, and the token-level prefix match every tier
uses."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from ..kvcache.prefix import shared_prefix
from ..kvcache.tensors import KVCache

__all__ = ["KVMemory", "shared_prefix"]


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

    def drop(self, doomed: Callable[[str, KVCache], bool]) -> int:
        """Remove every entry, in every namespace, for which ``doomed(key, kv)`` holds; how many."""
        with self._lock:
            gone = [k for k, kv in self._entries.items() if doomed(k[1], kv)]
            for k in gone:
                del self._entries[k]
        return len(gone)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
