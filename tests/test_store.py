"""The local KV store: round trips, misses with reasons, eviction, safety and several processes."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache
import pytest
import torch
from _kvfixtures import MODEL_FP, TOKENIZER_FP, key_for, make_artifact, make_kv, same_kv, store_worker

from kvagent.artifacts import format as art
from kvagent.errors import InvalidKeyError, StoreError
from kvagent.kvcache.hashing import CHUNK_SIZE, LOCAL_ALGORITHM, local_digest
from kvagent.kvcache.identity import KeyContext, block_hashes, sha256_hex
from kvagent.tiers.store import KVStore, SafeDisk

# diskcache keeps values under 32 KiB inside SQLite and larger ones as files: test both paths.
SMALL: dict[str, Any] = {"num_layers": 3, "heads": 2, "tokens": 17, "head_dim": 8}  # ~8 KiB
LARGE: dict[str, Any] = {"num_layers": 2, "heads": 2, "tokens": 300, "head_dim": 16}  # ~80 KiB


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KVStore]:
    with KVStore(tmp_path / "kv") as s:
        yield s


def _val_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.val"))


@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["inline", "file"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_put_get_round_trip(store: KVStore, shape: dict, dtype: torch.dtype) -> None:
    kv = make_kv(dtype=dtype, seed=1, **shape)
    header, blob = make_artifact(kv)
    store.put(header, blob)
    assert header.key in store
    found = store.get(header.key, expect=art.Expectation(key=header.key, model_fingerprint=MODEL_FP))
    assert found.reason == "hit"
    assert found.artifact is not None and same_kv(found.artifact.kv, kv)
    assert found.artifact.header == header
    assert found.nbytes == len(blob)
    assert (len(_val_files(store.directory)) == 1) == (shape is LARGE)


def test_unknown_key_is_a_miss(store: KVStore) -> None:
    found = store.get(sha256_hex(b"nothing"))
    assert found.artifact is None
    assert found.reason == "not in the local store"
    assert sha256_hex(b"nothing") not in store


def test_invalid_keys_are_refused(store: KVStore) -> None:
    for bad in ["../../etc/passwd", "A" * 64, "a" * 64 + "\n"]:
        with pytest.raises(InvalidKeyError):
            store.get(bad)
        with pytest.raises(InvalidKeyError):
            store.delete(bad)


def test_corrupted_file_is_a_logged_miss_and_evicted(
    store: KVStore, caplog: pytest.LogCaptureFixture
) -> None:
    kv = make_kv(seed=2, **LARGE)
    header, blob = make_artifact(kv)
    store.put(header, blob)
    (path,) = _val_files(store.directory)
    raw = bytearray(path.read_bytes())
    assert raw == blob
    raw[-100] ^= 0x04
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="kvagent.store"):
        found = store.get(header.key)
    assert found.artifact is None
    assert "ArtifactIntegrityError" in found.reason and "evicted" in found.reason
    assert any(r.levelno == logging.WARNING and header.key[:16] in r.getMessage() for r in caplog.records)
    assert header.key not in store
    assert store.get(header.key).reason == "not in the local store"
    assert not path.exists()
    assert list(store.entries()) == []


@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["inline", "file"])
def test_header_reads_the_header_alone(store: KVStore, shape: dict) -> None:
    """``header`` is the stored artifact's header without a checksum pass or a decode (the vLLM connector
    asks it for the engine on every lookup); absent or garbled entries are None, never an exception."""
    header, blob = make_artifact(make_kv(seed=9, **shape))
    store.put(header, blob)
    assert store.header(header.key) == header
    assert store.header(sha256_hex(b"nothing")) is None
    with pytest.raises(InvalidKeyError):
        store.header("../../etc/passwd")
    if shape is LARGE:
        (path,) = _val_files(store.directory)
        path.write_bytes(b"not an artifact" * 10)
        assert store.header(header.key) is None


def test_truncated_file_is_a_miss(store: KVStore) -> None:
    header, blob = make_artifact(make_kv(seed=3, **LARGE))
    store.put(header, blob)
    (path,) = _val_files(store.directory)
    path.write_bytes(blob[: len(blob) // 2])
    found = store.get(header.key)
    assert found.artifact is None and "ArtifactFormatError" in found.reason


def test_artifact_under_the_wrong_key_is_a_miss(store: KVStore) -> None:
    header, blob = make_artifact(make_kv(seed=4, **SMALL))
    other = sha256_hex(b"other key")
    store.put(art.restamp(header, key=other), blob)  # the index says `other`, the bytes say header.key
    found = store.get(other)
    assert found.artifact is None and "not the key it is stored under" in found.reason
    assert other not in store


def test_wrong_model_expectation_is_a_miss(store: KVStore) -> None:
    header, blob = make_artifact(make_kv(seed=5, **SMALL))
    store.put(header, blob)
    found = store.get(header.key, expect=art.Expectation(model_fingerprint=sha256_hex(b"another model")))
    assert found.artifact is None
    assert "ArtifactMismatchError" in found.reason


# ~12 MiB: three 4 MiB leaves of the local digest, on the file path with the mmap.
BIG: dict[str, Any] = {"num_layers": 4, "heads": 4, "tokens": 1536, "head_dim": 64}


def test_local_digest_is_recorded_and_replaces_the_sha256_pass(
    store: KVStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    header, blob = make_artifact(make_kv(seed=6, **BIG))
    store.put(header, blob)
    (entry,) = store.entries()
    assert entry.check == f"{LOCAL_ALGORITHM}:{local_digest(blob)}"

    def no_sha256(*_: Any) -> str:
        raise AssertionError("the payload sha256 was recomputed on a local read")

    monkeypatch.setattr(art, "payload_digest", no_sha256)
    found = store.get(header.key)
    assert found.reason == "hit" and found.artifact is not None and found.artifact.header == header


@pytest.mark.parametrize("where", ["first", "middle", "chunk boundary", "last"])
def test_bit_flip_in_a_large_artifact_is_caught_by_the_local_digest(
    store: KVStore, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    header, blob = make_artifact(make_kv(seed=7, **BIG))
    store.put(header, blob)
    (path,) = _val_files(store.directory)
    data_start = 8 + int.from_bytes(blob[:8], "little")
    pos = {
        "first": data_start,
        "middle": len(blob) // 2,
        "chunk boundary": CHUNK_SIZE,
        "last": len(blob) - 1,
    }[where]
    monkeypatch.setattr(art, "payload_digest", lambda *_: "0" * 64)  # only the local digest can catch it
    raw = bytearray(path.read_bytes())
    raw[pos] ^= 0x20
    path.write_bytes(bytes(raw))
    found = store.get(header.key)
    assert found.artifact is None
    assert "local checksum mismatch" in found.reason and "evicted" in found.reason
    assert header.key not in store and not path.exists()


def test_truncation_at_a_chunk_boundary_is_caught(store: KVStore) -> None:
    header, blob = make_artifact(make_kv(seed=8, **BIG))
    store.put(header, blob)
    (path,) = _val_files(store.directory)
    path.write_bytes(blob[: 2 * CHUNK_SIZE])
    found = store.get(header.key)
    assert found.artifact is None and "evicted" in found.reason


def test_entry_without_a_local_digest_is_checked_with_sha256_then_upgraded(store: KVStore) -> None:
    header, blob = make_artifact(make_kv(seed=9, **LARGE))
    store.put(header, blob)
    meta_key = f"meta:{header.key}"
    legacy = {k: v for k, v in json.loads(store._cache.get(meta_key)).items() if k != "check"}
    store._cache.set(meta_key, json.dumps(legacy))  # as an older kvagent wrote it
    assert next(iter(store.entries())).check is None
    assert store.get(header.key).reason == "hit"
    assert next(iter(store.entries())).check == f"{LOCAL_ALGORITHM}:{local_digest(blob)}"
    # and a damaged legacy entry is still caught, by the payload sha256
    store._cache.set(meta_key, json.dumps(legacy))
    (path,) = _val_files(store.directory)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01
    path.write_bytes(bytes(raw))
    found = store.get(header.key)
    assert found.artifact is None and "payload checksum mismatch" in found.reason


def test_entries_and_stats(tmp_path: Path) -> None:
    with KVStore(tmp_path / "kv", size_limit=50 * 1024**2) as store:
        assert store.stats()["artifacts"] == 0
        kvs = [make_kv(seed=10, **SMALL), make_kv(seed=11, dtype=torch.float16, **LARGE)]
        blobs = {}
        for kv, publisher in zip(kvs, ["alice", None], strict=True):
            header, blob = make_artifact(kv, publisher=publisher)
            store.put(header, blob)
            blobs[header.key] = (header, blob)
        entries = {e.key: e for e in store.entries()}
        assert set(entries) == set(blobs)
        for key, (header, blob) in blobs.items():
            e = entries[key]
            assert (e.token_count, e.nbytes, e.dtype, e.created_at, e.publisher) == (
                header.token_count,
                len(blob),
                header.dtype,
                header.created_at,
                header.publisher,
            )
        stats = store.stats()
        assert stats["artifacts"] == 2
        assert stats["artifact_bytes"] == sum(len(b) for _, b in blobs.values())
        assert stats["disk_bytes"] >= len(blobs[key_for(kvs[1])][1])
        assert stats["size_limit"] == 50 * 1024**2


def test_delete_and_clear(store: KVStore) -> None:
    headers = []
    for seed in range(3):
        header, blob = make_artifact(make_kv(seed=20 + seed, **SMALL))
        store.put(header, blob)
        headers.append(header)
    assert store.delete(headers[0].key) is True
    assert store.delete(headers[0].key) is False
    assert store.get(headers[0].key).reason == "not in the local store"
    assert {e.key for e in store.entries()} == {h.key for h in headers[1:]}
    assert store.clear() >= 2
    assert list(store.entries()) == []
    assert all(h.key not in store for h in headers)


def test_find_prefix_returns_the_longest_indexed_prefix(store: KVStore) -> None:
    ctx = KeyContext(MODEL_FP, TOKENIZER_FP, "float32")
    bs = 4
    a_ids = list(range(100, 114))  # 3 full blocks
    b_ids = a_ids[:4] + [1, 2, 3, 4]  # shares block 0 with a, 2 full blocks
    kv_a = make_kv(num_layers=1, heads=1, tokens=len(a_ids), head_dim=4, seed=30)
    kv_b = make_kv(num_layers=1, heads=1, tokens=len(b_ids), head_dim=4, seed=31)
    kv_a = type(kv_a)(kv_a.keys, kv_a.values, torch.tensor(a_ids))
    kv_b = type(kv_b)(kv_b.keys, kv_b.values, torch.tensor(b_ids))
    ha, blob_a = make_artifact(kv_a)
    hb, blob_b = make_artifact(kv_b)
    store.put(ha, blob_a, block_hashes(ctx, a_ids, bs))
    store.put(hb, blob_b, block_hashes(ctx, b_ids, bs))

    query = a_ids[:8] + [9, 9, 9, 9, 9]  # shares blocks 0 and 1 with a
    assert store.find_prefix(block_hashes(ctx, query, bs)) == (ha.key, 2)
    assert store.find_prefix(block_hashes(ctx, a_ids + [5] * 6, bs)) == (ha.key, 3)
    assert store.find_prefix(block_hashes(ctx, b_ids, bs)) == (hb.key, 2)
    assert store.find_prefix(block_hashes(ctx, [7] * 12, bs)) is None
    assert store.find_prefix([]) is None
    other_ctx = KeyContext(sha256_hex(b"another model"), TOKENIZER_FP, "float32")
    assert store.find_prefix(block_hashes(other_ctx, a_ids, bs)) is None
    # once a is gone its blocks no longer count; block 0 still leads to b, which shares it
    store.delete(ha.key)
    assert store.find_prefix(block_hashes(ctx, query, bs)) == (hb.key, 1)


def test_size_limit_bounds_the_volume(tmp_path: Path) -> None:
    blob_size = len(make_artifact(make_kv(seed=0, **LARGE))[1])
    limit = 4 * blob_size
    with KVStore(tmp_path / "kv", size_limit=limit) as store:
        keys = []
        for seed in range(12):
            header, blob = make_artifact(make_kv(seed=40 + seed, **LARGE))
            store.put(header, blob)
            keys.append(header.key)
            assert store.volume() <= limit + blob_size + 256 * 1024  # one set may overshoot; SQLite pages
        present = [k for k in keys if k in store]
        assert len(present) <= 4
        assert len(_val_files(store.directory)) == len(present)
        assert all(store.get(k).artifact is not None for k in present)


def test_a_put_that_fits_keeps_its_artifact(tmp_path: Path) -> None:
    """Eviction removes whole artifacts, least recently used first, never the one just written."""
    blob_size = len(make_artifact(make_kv(seed=0, **LARGE))[1])
    with KVStore(tmp_path / "kv", size_limit=4 * blob_size) as store:
        keys = []
        for seed in range(8):
            header, blob = make_artifact(make_kv(seed=40 + seed, **LARGE))
            store.put(header, blob)
            keys.append(header.key)
            assert header.key in store, f"put #{seed} evicted its own artifact"
            if seed == 2:
                assert store.get(keys[0]).artifact is not None  # used: keys[1] is now the oldest
        present = {e.key for e in store.entries()}
        assert keys[1] not in present  # least recently used when the first eviction happened
        assert len(present) >= 3 and store.volume() <= 4 * blob_size + 65536
        assert all(f"kv:{k}" in store._cache for k in present)  # no metadata without its artifact


def test_an_artifact_larger_than_the_store_is_refused(tmp_path: Path) -> None:
    header, blob = make_artifact(make_kv(seed=1, **LARGE))
    with KVStore(tmp_path / "kv", size_limit=len(blob) // 2) as store, pytest.raises(StoreError):
        store.put(header, blob)


def test_safe_disk_refuses_non_bytes_values(tmp_path: Path) -> None:
    with diskcache.Cache(str(tmp_path / "c"), disk=SafeDisk) as cache:
        for value in [{"a": 1}, 5, 1.5, None, [b"x"], torch.zeros(2)]:
            with pytest.raises(StoreError):
                cache.set("x", value)
        with pytest.raises(StoreError):
            cache.set(("tuple", "key"), b"v")
        cache.set("ok", b"bytes")
        cache.set("text", "str")
        assert cache.get("ok") == b"bytes" and cache.get("text") == "str"


class _Trap:
    """Unpickling this creates a directory: a visible side effect if anything unpickles it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("size", [10, 100_000], ids=["inline", "file"])
def test_foreign_pickled_entry_is_never_unpickled(tmp_path: Path, size: int) -> None:
    directory = tmp_path / "kv"
    marker = tmp_path / "unpickled"
    key = sha256_hex(b"foreign")
    with diskcache.Cache(str(directory)) as raw:
        raw.set("kv:" + key, [_Trap(str(marker)), b"x" * size])
        raw.set("meta:" + key, _Trap(str(marker)))
        raw.set("blk:" + "0" * 64, _Trap(str(marker)))
    assert not marker.exists()
    with KVStore(directory) as store:
        found = store.get(key)
        assert found.artifact is None
        assert "unpickle" in found.reason
        assert not marker.exists()
        assert store.get(key).reason == "not in the local store"
        assert list(store.entries()) == []  # the foreign rows are skipped (and logged), never unpickled
        assert store.find_prefix(["0" * 64]) is None  # a prefix lookup over them is a miss, not an error
    assert not marker.exists()


def test_unusable_directory_is_a_store_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"x")
    with pytest.raises(StoreError):
        KVStore(not_a_dir)


@pytest.mark.slow
def test_concurrent_processes(tmp_path: Path) -> None:
    directory = tmp_path / "kv"
    n_workers, rounds = 4, 4
    started = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(n_workers) as pool:
        results = pool.map(store_worker, [(str(directory), w, n_workers, rounds) for w in range(n_workers)])
    elapsed = time.monotonic() - started
    problems = [p for _, _, ps in results for p in ps]
    assert problems == []
    assert sum(h for h, _, _ in results) >= n_workers * rounds  # every worker reads at least its own writes
    with KVStore(directory) as store:
        entries = list(store.entries())
        assert len(entries) == n_workers * rounds + 1
        for e in entries:
            found = store.get(e.key)
            assert found.artifact is not None, found.reason
    assert elapsed < 60


def test_an_entry_replaced_while_it_is_read_still_reads_whole(tmp_path: Path) -> None:
    """Another process putting the same key unlinks the old file while a reader holds it open: the reader
    maps what it opened (its size from the open file, not from the name), never a miss that evicts the new
    entry (seen once in ``test_concurrent_processes``)."""
    from kvagent.tiers.store import _map

    path = tmp_path / "entry.val"
    data = os.urandom(300_000)
    path.write_bytes(data)
    with open(path, "rb") as fh:
        path.unlink()
        assert bytes(_map(fh)) == data


def test_drop_derived_deletes_an_artifact_and_its_copies_and_theirs_across_reopens(tmp_path: Path) -> None:
    """Copies recorded as derived from a published artifact (and copies of those) are deleted with it, also
    by a store opened later on the same directory; an unrelated artifact stays."""
    headers = [make_artifact(make_kv(tokens=8 + i, seed=i)) for i in range(4)]
    src, copy, copy2, other = (h.key for h, _ in headers)
    with KVStore(tmp_path / "s") as store:
        store.put(*headers[0])
        store.put(*headers[1], derived_from=src)
        store.put(*headers[2], derived_from=copy)
        store.put(*headers[3])
        assert store.derived_from(copy) == src and store.derived_from(other) is None
    with KVStore(tmp_path / "s") as store:
        assert sorted(store.drop_derived(src)) == sorted([src, copy, copy2])
        assert [k in store for k in (src, copy, copy2, other)] == [False, False, False, True]
        assert store.derived_from(copy) is None and store.drop_derived(src) == [src]
