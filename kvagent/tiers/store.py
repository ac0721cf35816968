"""Local KV store: a size-bounded, multi-process-safe diskcache of artifacts.

Entries (all keys are strings, all values bytes; nothing is ever pickled):

* ``kv:<key>``   the artifact bytes (a file in the cache directory; diskcache writes the file
  first and commits its row after, so a crash never leaves a visible partial entry)
* ``meta:<key>`` a small JSON summary used by ``ls``, with the artifact's local integrity digest
* ``blk:<hash>`` the key of an artifact whose token ids start with that block-hash chain prefix

Every read re-checks the whole artifact file against the xxh3-128 digest (``hashing.local_digest``)
recorded in ``meta:<key>`` when it was written, then decodes it without a second pass (zero-copy:
tensors are views of a private mmap of the file). An entry without a recorded digest (written by an
older kvagent, or its metadata row lost) is checked against its sha256 ``payload_sha256`` instead and
its local digest recorded then. A damaged, truncated or foreign entry is a miss: it is logged,
evicted and reported with a reason, never raised to the reader.
"""

from __future__ import annotations

import io
import json
import logging
import mmap
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache

from ..artifacts import format as art
from ..errors import ArtifactError, ArtifactIntegrityError, StoreError
from ..kvcache.hashing import LOCAL_ALGORITHM, Buffer, local_digest
from ..kvcache.identity import validate_key

log = logging.getLogger("kvagent.store")

DEFAULT_SIZE_LIMIT = 10 * 1024**3
# Linux >= 5.14: map a file's cached pages in one call instead of one fault per 64 KiB
_MADV_POPULATE_READ = 22


class _Slices:
    """A file-like reader of buffers for diskcache: ``read(n)`` returns at most ``n`` bytes of one buffer at a
    time, as a slice of it (never a copy), and an empty view at the end."""

    def __init__(self, parts: Sequence[memoryview]) -> None:
        self._parts = [p.cast("B") for p in parts if p.nbytes]
        self._pos = 0
        self.nbytes = sum(len(p) for p in self._parts)

    def joined(self) -> bytes:
        """All the bytes in one copy (for a value small enough to live inline in SQLite)."""
        return b"".join(self._parts)

    def read(self, n: int = -1) -> memoryview:
        while self._parts:
            part = self._parts[0]
            end = len(part) if n < 0 else min(len(part), self._pos + n)
            out = part[self._pos : end]
            self._pos = end
            if end == len(part):
                self._parts.pop(0)
                self._pos = 0
            if len(out):
                return out
        return memoryview(b"")


class SafeDisk(diskcache.Disk):
    """A diskcache serialiser that only stores ``bytes`` and ``str`` and refuses to unpickle."""

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if read and not isinstance(value, _Slices):
            raise StoreError(
                f"the kvagent store only reads values from its own buffers, not {type(value).__name__}"
            )
        if not read and not isinstance(value, (bytes, str)):
            raise StoreError(f"the kvagent store only holds bytes or str, not {type(value).__name__}")
        if read and value.nbytes < self.min_file_size:  # small enough to live inline in SQLite
            return super().store(value.joined(), False, key=key)
        if not read and type(value) is bytes and len(value) >= self.min_file_size:
            # as a file-like object: diskcache writes it in 4 MiB chunks, where for bytes it iterates a
            # BytesIO,
            # i.e. one write() per b"\n" in the data (80,000 calls and ~150 ms for a 24 MB artifact)
            value, read = _Slices([memoryview(value)]), True
        return super().store(value, read, key=key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode == diskcache.core.MODE_PICKLE:
            raise StoreError("refusing to unpickle a cache entry (the cache directory holds foreign data)")
        return super().fetch(mode, filename, value, read)

    def put(self, key: Any) -> Any:
        if not isinstance(key, str):
            raise StoreError(f"store keys are str, not {type(key).__name__}")
        return super().put(key)


@dataclass(frozen=True)
class StoreEntry:
    key: str
    token_count: int
    nbytes: int
    dtype: str
    created_at: float
    publisher: str | None
    last_used: float = 0.0
    #: "<algorithm>:<hex>" of the whole artifact file, recorded when it was written here (None: unknown)
    check: str | None = None


@dataclass(frozen=True)
class StoreLookup:
    """Result of a store read: the artifact, or None and why it missed."""

    artifact: art.Artifact | None
    reason: str
    nbytes: int = 0


class KVStore:
    """Artifacts on local disk, keyed by document key, with longest-prefix lookup by block hash."""

    def __init__(
        self,
        directory: str | Path,
        size_limit: int = DEFAULT_SIZE_LIMIT,
        limits: art.Limits = art.DEFAULT_LIMITS,
    ):
        self.directory = Path(directory)
        self.limits = limits
        try:
            self._cache = diskcache.Cache(
                str(self.directory),
                size_limit=size_limit,
                # kvagent evicts whole artifacts itself (see _make_room): diskcache's own culling
                # removes rows one at a time, up to ten per write, including the row just written.
                eviction_policy="none",
                cull_limit=0,
                disk=SafeDisk,
                timeout=30,
            )
        except Exception as exc:  # sqlite3/OSError: the directory is unusable
            raise StoreError(f"cannot open the KV store at {self.directory}: {exc}") from exc

    def close(self) -> None:
        self._cache.close()

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ---------------------------------------------------------------------------
    def put(
        self, header: art.ArtifactHeader, blob: Buffer | Sequence[Buffer], block_hashes: Sequence[str] = (),
        derived_from: str | None = None, published: tuple[str, int] | None = None,
    ) -> None:
        """Store an artifact and index its block hashes, then evict least-recently-used artifacts
        (never this one) until the store is within its size limit. The artifact row appears atomically.

        ``blob`` is the artifact's bytes, or the buffers they concatenate (``artifact.encode_parts``).
        ``derived_from``: the published artifact whose KV this one's leading positions copy (a prompt KV kept
        after reading it, a copy staged in a namespace): recorded with it, so that ``drop_derived`` finds it.
        ``published``: (digest, n) when its first ``n`` positions are a bit-for-bit copy of the published
        artifact bytes that ``digest`` names (``KVSource``): recorded, so that a read of this copy still names
        those positions by what they are and may read them in place beside other principals' copies.
        """
        key = validate_key(header.key)
        parts = (
            [memoryview(blob)]
            if isinstance(blob, (bytes, bytearray, memoryview))
            else [memoryview(b) for b in blob]
        )
        value = _Slices(parts)
        nbytes = value.nbytes
        if nbytes > self.size_limit:
            raise StoreError(
                f"artifact of {nbytes} bytes exceeds the store's {self.size_limit}-byte size limit"
            )
        meta = StoreEntry(
            key=key,
            token_count=header.token_count,
            nbytes=nbytes,
            dtype=header.dtype,
            created_at=header.created_at,
            publisher=header.publisher,
            last_used=time.time(),
            check=f"{LOCAL_ALGORITHM}:{local_digest(parts)}",
        )
        try:
            # the file, the digest it is checked against and its block index appear together
            with self._cache.transact():
                self._cache.set(f"kv:{key}", value, read=True)  # SafeDisk: a file, or inline when small
                self._cache.set(f"meta:{key}", json.dumps(meta.__dict__))
                for h in block_hashes:
                    self._cache.set(f"blk:{h}", key)
                if derived_from is not None and derived_from != key:
                    validate_key(derived_from)
                    copies = self._cache.get(f"from:{derived_from}", default=None)
                    keys = json.loads(copies) if isinstance(copies, str) else []
                    if key not in keys:
                        self._cache.set(f"from:{derived_from}", json.dumps([*keys, key]))
                    self._cache.set(f"src:{key}", derived_from)
                if published is not None:
                    self._cache.set(f"pub:{key}", json.dumps([str(published[0]), int(published[1])]))
            self._make_room(keep=key)
        except (OSError, diskcache.Timeout, sqlite3.Error) as exc:
            raise StoreError(f"could not write artifact {key[:16]}… to {self.directory}: {exc}") from exc

    @property
    def size_limit(self) -> int:
        return int(self._cache.size_limit)

    def _make_room(self, keep: str) -> None:
        """Delete whole artifacts, least recently used first and never ``keep``, until under the limit."""
        if self._cache.volume() <= self.size_limit:
            return
        for entry in sorted(self.entries(), key=lambda e: e.last_used):
            if self._cache.volume() <= self.size_limit:
                return
            if entry.key != keep:
                log.info(
                    "evicting %s… (%d bytes) to stay under the %d-byte limit",
                    entry.key[:16],
                    entry.nbytes,
                    self.size_limit,
                )
                self.delete(entry.key)
        self._drop_orphans()

    def _drop_orphans(self) -> None:
        """Remove block-index rows whose artifact is gone."""
        for k in list(self._cache.iterkeys()):
            if isinstance(k, str) and k.startswith("blk:"):
                target = self._cache.get(k, default=None)
                if not isinstance(target, str) or f"kv:{target}" not in self._cache:
                    self._cache.delete(k)

    def _touch(self, key: str, check: str | None = None) -> None:
        """Record a use of ``key`` (for LRU eviction), and its local digest when ``check`` is given."""
        try:
            with self._cache.transact():
                raw = self._cache.get(f"meta:{key}", default=None)
                if not isinstance(raw, str):
                    return
                meta = json.loads(raw)
                meta["last_used"] = time.time()
                if check is not None:
                    meta["check"] = check
                self._cache.set(f"meta:{key}", json.dumps(meta))
        except (ValueError, TypeError, diskcache.Timeout, sqlite3.Error) as exc:
            log.debug("could not record use of %s…: %s", key[:16], exc)

    def delete(self, key: str) -> bool:
        validate_key(key)
        removed = bool(self._cache.delete(f"kv:{key}"))
        self._cache.delete(f"meta:{key}")
        self._cache.delete(f"src:{key}")
        self._cache.delete(f"pub:{key}")
        return removed

    def derived_from(self, key: str) -> str | None:
        """The published artifact whose KV stored artifact ``key`` copies first (``put(derived_from=)``)."""
        src = self._cache.get(f"src:{validate_key(key)}", default=None)
        return src if isinstance(src, str) else None

    def published_prefix(self, key: str) -> tuple[str, int] | None:
        """(digest, n): the published bytes stored artifact ``key``'s first ``n`` positions copy
        (``put(published=)``), or None."""
        raw = self._cache.get(f"pub:{validate_key(key)}", default=None)
        try:
            digest, n = json.loads(raw) if isinstance(raw, str) else (None, None)
        except (ValueError, TypeError):
            return None
        return (digest, n) if isinstance(digest, str) and isinstance(n, int) and n > 0 else None

    def drop_derived(self, source: str) -> list[str]:
        """Delete artifact ``source`` and every stored artifact derived from it, in any namespace, and the
        ones derived from those (copies of copies); returns their keys (deleted or already gone)."""
        todo, done, removed = [validate_key(source)], [], False
        while todo:
            key = todo.pop()
            if key in done:
                continue
            done.append(key)
            try:
                with self._cache.transact():
                    copies = self._cache.get(f"from:{key}", default=None)
                    self._cache.delete(f"from:{key}")
                    removed = self.delete(key) or removed
            except (diskcache.Timeout, sqlite3.Error) as exc:
                why = f"could not delete the copies of {key[:16]}… in {self.directory}: {exc}"
                raise StoreError(why) from exc
            if isinstance(copies, str):
                todo.extend(k for k in json.loads(copies) if isinstance(k, str))
        if removed:
            self._drop_orphans()
        return done

    def clear(self) -> int:
        return int(self._cache.clear())

    # -- reads ----------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return f"kv:{validate_key(key)}" in self._cache

    def get(
        self, key: str, expect: art.Expectation | None = None, timings: dict[str, float] | None = None
    ) -> StoreLookup:
        """Read, verify and decode an artifact; any problem is a logged miss, never an exception.

        ``timings``, if given, receives the seconds spent per stage of a hit: "lookup" (index rows),
        "read" (open and map the file), then ``artifact.decode``'s stages, then "touch" (LRU record).
        """
        validate_key(key)
        t0 = time.perf_counter()
        try:
            meta = self._cache.get(f"meta:{key}", default=None)
            handle = self._cache.get(f"kv:{key}", default=None, read=True)
        except StoreError as exc:
            return self._evict(key, f"unreadable entry: {exc}")
        except (OSError, diskcache.Timeout) as exc:
            log.warning("store read of %s… failed: %s", key[:16], exc)
            return StoreLookup(None, f"store read failed: {exc}")
        if handle is None:
            return StoreLookup(None, "not in the local store")
        if isinstance(handle, bytes):  # values under diskcache's min_file_size live inline in SQLite
            handle = io.BytesIO(handle)
        recorded = _recorded_check(meta)
        t1 = time.perf_counter()
        try:
            buf = _map(handle)
            t2 = time.perf_counter()
            integrity = _local_check(key, recorded) if recorded is not None else None
            result = art.decode(buf, expect=expect, limits=self.limits, integrity=integrity, timings=timings)
        except ArtifactError as exc:
            return self._evict(key, f"{type(exc).__name__}: {exc}")
        except (OSError, ValueError) as exc:
            return self._evict(key, f"unreadable artifact file: {exc}")
        finally:
            handle.close()
        if result.header.key != key:
            return self._evict(
                key, f"entry holds artifact {result.header.key[:16]}…, not the key it is stored under"
            )
        # sha256 just passed on an entry without a local digest: record one, so the next read is fast
        t3 = time.perf_counter()
        self._touch(
            key, None if recorded is not None else f"{LOCAL_ALGORITHM}:{local_digest(memoryview(buf))}"
        )
        if timings is not None:
            timings.update(lookup=t1 - t0, read=t2 - t1, touch=time.perf_counter() - t3)
        return StoreLookup(result, "hit", nbytes=len(buf))

    def header(self, key: str) -> art.ArtifactHeader | None:
        """The header of stored artifact ``key`` (its container and strict JSON header only: no checksum, no
        tensors; ``get`` verifies the whole artifact), or None when it is absent or unreadable."""
        validate_key(key)
        try:
            handle = self._cache.get(f"kv:{key}", default=None, read=True)
        except (StoreError, OSError, diskcache.Timeout) as exc:
            log.warning("store read of %s… failed: %s", key[:16], exc)
            return None
        if handle is None:
            return None
        if isinstance(handle, bytes):
            handle = io.BytesIO(handle)
        try:
            header = art.read_header(memoryview(_map(handle, populate=False)), limits=self.limits)
        except (ArtifactError, OSError, ValueError) as exc:
            log.warning("stored artifact %s… has an unreadable header: %s", key[:16], exc)
            return None
        finally:
            handle.close()
        return header if header.key == key else None

    def _evict(self, key: str, why: str) -> StoreLookup:
        log.warning("evicting local artifact %s…: %s", key[:16], why)
        try:
            self.delete(key)
        except (OSError, diskcache.Timeout) as exc:  # pragma: no cover - disk failure while evicting
            log.warning("could not evict %s…: %s", key[:16], exc)
        return StoreLookup(None, f"local entry rejected ({why}); evicted")

    def find_prefix(self, hashes: Sequence[str]) -> tuple[str, int] | None:
        """The key indexed under the longest of ``hashes`` present, with how many blocks matched.

        An index row the store refuses to read (foreign data) is a miss, logged: a prefix lookup never
        fails."""
        for i in range(len(hashes) - 1, -1, -1):
            try:
                key = self._cache.get(f"blk:{hashes[i]}", default=None)
            except StoreError as exc:
                log.warning("ignoring unreadable block index entry %s…: %s", hashes[i][:16], exc)
                continue
            if isinstance(key, str) and f"kv:{key}" in self._cache:
                return key, i + 1
        return None

    def entries(self) -> Iterator[StoreEntry]:
        for k in list(self._cache.iterkeys()):
            if isinstance(k, str) and k.startswith("meta:"):
                try:
                    raw = self._cache.get(k, default=None)
                except StoreError as exc:
                    log.warning("ignoring unreadable store index entry %s: %s", k[:24], exc)
                    continue
                if raw is None or f"kv:{k[5:]}" not in self._cache:
                    continue
                try:
                    yield StoreEntry(**json.loads(raw))
                except (TypeError, ValueError):
                    log.warning("ignoring malformed store index entry %s", k[:24])

    def volume(self) -> int:
        return int(self._cache.volume())

    def stats(self) -> dict[str, int]:
        entries = list(self.entries())
        return {
            "artifacts": len(entries),
            "artifact_bytes": sum(e.nbytes for e in entries),
            "disk_bytes": self.volume(),
            "size_limit": self.size_limit,
        }


def _recorded_check(meta: Any) -> str | None:
    """The local digest recorded in an entry's metadata, if it is one this kvagent computes."""
    if not isinstance(meta, str):
        return None
    try:
        check = json.loads(meta).get("check")
    except (ValueError, AttributeError):
        return None
    if isinstance(check, str) and check.startswith(f"{LOCAL_ALGORITHM}:"):
        return check[len(LOCAL_ALGORITHM) + 1 :]
    return None


def _local_check(key: str, recorded: str) -> art.IntegrityCheck:
    """An integrity check of a whole artifact file against the local digest recorded when it was written."""

    def check(data: memoryview) -> None:
        got = local_digest(data)
        if got != recorded:
            raise ArtifactIntegrityError(
                f"local checksum mismatch for artifact {key[:16]}…: the store recorded {LOCAL_ALGORITHM} "
                f"{recorded[:16]}…, the {len(data)}-byte file hashes to {got[:16]}… (damaged on disk)"
            )

    return check


def _map(handle: Any, populate: bool = True) -> bytearray | mmap.mmap:
    """A writable private view of an entry: a copy-on-write mmap for files, a bytearray otherwise.

    With ``populate`` the mapping's pages are populated up front (read-only, shared with the page cache until
    written), which is faster than faulting them in one by one while hashing; without it (a header read)
    only the pages touched are read.
    """
    try:
        fileno = handle.fileno()
    except (AttributeError, OSError, ValueError):
        return bytearray(handle.read())
    # the open file's size, not its name's: a process replacing the same key may have unlinked the name
    # since this handle was opened (the handle still reads the old, complete file)
    size = os.fstat(fileno).st_size
    if not size:
        return bytearray(handle.read())
    buf = mmap.mmap(fileno, 0, access=mmap.ACCESS_COPY)
    if not populate:
        return buf
    try:
        buf.madvise(_MADV_POPULATE_READ)
    except (OSError, AttributeError, ValueError):  # older kernel or platform: pages fault in on first touch
        pass
    return buf
