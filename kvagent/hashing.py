"""sha256 tree hash of large payloads, computed on several threads.

``payload_digest(data) = sha256("kvagent-tree-v1" || chunk_size || sha256(chunk_0) || sha256(chunk_1) || ...)``
over fixed-size chunks. It is as collision-resistant as sha256 itself, and unlike one sha256 stream
its chunks can be hashed in parallel (hashlib releases the GIL) and verified independently.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

#: Bytes per leaf of the tree hash. Part of the artifact format: changing it changes every digest.
CHUNK_SIZE = 4 * 1024 * 1024
_TAG = b"kvagent-tree-v1\0"

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="kvagent-hash")
    return _pool


def _leaf(view: memoryview) -> bytes:
    return hashlib.sha256(view).digest()


def chunk_digests(data: bytes | bytearray | memoryview, chunk_size: int = CHUNK_SIZE) -> list[bytes]:
    """sha256 of each ``chunk_size`` slice of ``data`` (the last may be shorter), in order."""
    view = memoryview(data).cast("B")
    n = len(view)
    slices = [view[i : i + chunk_size] for i in range(0, n, chunk_size)] or [view[0:0]]
    if len(slices) == 1:
        return [_leaf(slices[0])]
    return list(_executor().map(_leaf, slices))


def payload_digest(data: bytes | bytearray | memoryview, chunk_size: int = CHUNK_SIZE) -> str:
    """The tree hash of ``data`` as 64 lowercase hex characters."""
    root = hashlib.sha256(_TAG + chunk_size.to_bytes(8, "little"))
    for d in chunk_digests(data, chunk_size):
        root.update(d)
    return root.hexdigest()
