"""The sha256 tree hash and the local xxh3-128 tree: equal to plain single-threaded recomputations of the
documented trees."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
import xxhash

from kvagent.kvcache.hashing import CHUNK_SIZE, chunk_digests, local_digest, payload_digest, tree_digests


def reference_digest(data: bytes, chunk_size: int = CHUNK_SIZE) -> str:
    """sha256("kvagent-tree-v1\\0" || chunk_size as u64 LE || sha256(chunk_0) || sha256(chunk_1) || ...)."""
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
    leaves = b"".join(hashlib.sha256(c).digest() for c in chunks)
    return hashlib.sha256(b"kvagent-tree-v1\0" + chunk_size.to_bytes(8, "little") + leaves).hexdigest()


def _data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def test_chunk_size_is_the_documented_4_mib() -> None:
    assert CHUNK_SIZE == 4 * 1024 * 1024


@pytest.mark.parametrize("n", [0, 1, 6, 7, 8, 70, 100, 1000])
def test_matches_reference_for_many_chunks(n: int) -> None:
    data = _data(n)
    assert payload_digest(data, chunk_size=7) == reference_digest(data, chunk_size=7)


def test_matches_reference_with_default_chunk_size() -> None:
    data = _data(CHUNK_SIZE + 12345, seed=1)  # two leaves of the real format
    assert payload_digest(data) == reference_digest(data)
    assert len(chunk_digests(data)) == 2


def test_empty_input_is_one_empty_leaf() -> None:
    assert chunk_digests(b"") == [hashlib.sha256(b"").digest()]
    assert payload_digest(b"") == reference_digest(b"")
    assert payload_digest(b"") != payload_digest(b"\0")


def test_leaves_are_in_order() -> None:
    data = _data(50, seed=2)
    assert chunk_digests(data, chunk_size=8) == [
        hashlib.sha256(data[i : i + 8]).digest() for i in range(0, 50, 8)
    ]


def test_input_types_agree() -> None:
    data = _data(123, seed=3)
    arr = np.frombuffer(data[:120], dtype=np.float32).reshape(5, 6)
    want = payload_digest(data, chunk_size=16)
    assert payload_digest(bytearray(data), chunk_size=16) == want
    assert payload_digest(memoryview(data), chunk_size=16) == want
    assert payload_digest(arr.data, chunk_size=16) == reference_digest(data[:120], chunk_size=16)


def test_every_single_bit_flip_changes_the_digest() -> None:
    data = bytearray(_data(40, seed=4))
    base = payload_digest(data, chunk_size=9)
    seen = {base}
    for i in range(len(data)):
        for bit in range(8):
            data[i] ^= 1 << bit
            seen.add(payload_digest(data, chunk_size=9))
            data[i] ^= 1 << bit
    assert len(seen) == 1 + 8 * len(data)
    assert payload_digest(data, chunk_size=9) == base


def test_chunk_size_is_part_of_the_digest() -> None:
    data = _data(10, seed=5)  # a single leaf either way; only the chunk_size prefix differs
    assert payload_digest(data, chunk_size=16) != payload_digest(data, chunk_size=32)


def test_not_a_plain_sha256() -> None:
    data = _data(64, seed=6)
    assert payload_digest(data) != hashlib.sha256(data).hexdigest()


# -- the local store's xxh3-128 tree ----------------------------------------------------------


def reference_local(data: bytes, chunk_size: int = CHUNK_SIZE) -> str:
    """xxh3_128("kvagent-local-v1\\0" || chunk_size u64 LE || len u64 LE || xxh3_128(chunk_0) || ...)."""
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
    head = b"kvagent-local-v1\0" + chunk_size.to_bytes(8, "little") + len(data).to_bytes(8, "little")
    return xxhash.xxh3_128(head + b"".join(xxhash.xxh3_128_digest(c) for c in chunks)).hexdigest()


@pytest.mark.parametrize("n", [0, 1, 7, 8, 70, 1000])
def test_local_digest_matches_reference(n: int) -> None:
    data = _data(n, seed=7)
    assert local_digest(data, chunk_size=7) == reference_local(data, chunk_size=7)
    assert local_digest(memoryview(bytearray(data)), chunk_size=7) == reference_local(data, chunk_size=7)


def test_local_digest_default_chunks_and_typed_views() -> None:
    data = _data(CHUNK_SIZE + 4096, seed=8)
    assert local_digest(data) == reference_local(data)
    floats = np.frombuffer(data[:4096], dtype=np.float32)
    assert local_digest(floats.data) == reference_local(data[:4096])  # bytes, not elements, are counted


def test_local_digest_catches_every_bit_flip_and_every_truncation() -> None:
    data = bytearray(_data(48, seed=9))
    base = local_digest(data, chunk_size=8)
    seen = {base}
    for i in range(len(data)):
        for bit in range(8):
            data[i] ^= 1 << bit
            seen.add(local_digest(data, chunk_size=8))
            data[i] ^= 1 << bit
    assert len(seen) == 1 + 8 * len(data)
    truncated = {local_digest(data[:n], chunk_size=8) for n in range(len(data))}
    assert len(truncated) == len(data) and base not in truncated  # chunk boundaries (8, 16, ...) included
    assert local_digest(data, chunk_size=8) == base


def test_local_digest_is_not_the_content_address() -> None:
    data = _data(100, seed=10)
    assert len(local_digest(data)) == 32 and local_digest(data) != payload_digest(data)[:32]


SPLITS = [
    [0],
    [1],
    [5, 0, 7],
    [CHUNK_SIZE],
    [CHUNK_SIZE + 1],
    [3 << 20, 3 << 20, 5 << 20],
    [CHUNK_SIZE - 1, 1, 1],
    [1] * 9,
]


@pytest.mark.parametrize("sizes", SPLITS, ids=str)
def test_digests_of_buffers_are_those_of_their_concatenation(sizes: list[int]) -> None:
    """tree_digests and local_digest over several buffers hash what one joined buffer would, for any split
    (leaves spanning buffers, buffers spanning leaves, empty buffers)."""
    rng = random.Random(sum(sizes))
    parts = [rng.randbytes(n) for n in sizes]
    joined = b"".join(parts)
    assert tree_digests([parts] + [[p] for p in parts]) == [payload_digest(joined)] + [
        payload_digest(p) for p in parts
    ]
    assert local_digest([memoryview(p) for p in parts]) == local_digest(joined)
    if joined:
        flipped = bytearray(joined)
        flipped[len(joined) // 2] ^= 0x10
        assert local_digest(parts) != local_digest(bytes(flipped))
