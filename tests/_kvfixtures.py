"""Helpers shared by the identity/hashing/artifact/store tests: small random KV caches,
artifacts built from them, and hand-editing of the safetensors container."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kvagent.artifacts import format as art
from kvagent.kvcache.identity import KeyContext, document_key, sha256_hex
from kvagent.kvcache.tensors import KVCache

MODEL_FP = sha256_hex(b"test-model")
TOKENIZER_FP = sha256_hex(b"test-tokenizer")
TEMPLATE_HASH = sha256_hex(b"test-template")
CREATED_AT = 1_700_000_000.25


def make_kv(
    num_layers: int = 3,
    heads: int = 2,
    tokens: int = 17,
    head_dim: int = 8,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> KVCache:
    """A deterministic random KV; the first key tensor also holds -0.0, inf, nan and a subnormal."""
    g = torch.Generator().manual_seed(seed)

    def one() -> torch.Tensor:
        return torch.randn(1, heads, tokens, head_dim, generator=g).to(dtype)

    keys = [one() for _ in range(num_layers)]
    values = [one() for _ in range(num_layers)]
    flat = keys[0].view(-1)
    specials = [-0.0, float("inf"), float("nan"), float(torch.finfo(dtype).smallest_normal) / 4]
    for i, v in enumerate(specials[: flat.numel()]):
        flat[i] = v
    token_ids = torch.randint(0, 50_000, (tokens,), generator=g, dtype=torch.int64)
    return KVCache(keys=tuple(keys), values=tuple(values), token_ids=token_ids)


def key_for(kv: KVCache) -> str:
    ctx = KeyContext(MODEL_FP, TOKENIZER_FP, art.dtype_name(kv.dtype), template_hash=TEMPLATE_HASH)
    return document_key(ctx, kv.token_ids.numpy())


def make_artifact(kv: KVCache, **overrides: Any) -> tuple[art.ArtifactHeader, bytes]:
    kw: dict[str, Any] = {
        "model_fingerprint": MODEL_FP,
        "tokenizer_fingerprint": TOKENIZER_FP,
        "template_hash": TEMPLATE_HASH,
        "publisher": "tests",
        "created_at": CREATED_AT,
    }
    kw.update(overrides)
    return art.encode(kv, **kw)


def raw_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw_bits(a), raw_bits(b))


def same_kv(a: KVCache, b: KVCache) -> bool:
    return (
        len(a.keys) == len(b.keys)
        and all(same_bits(x, y) for x, y in zip(a.keys, b.keys, strict=True))
        and all(same_bits(x, y) for x, y in zip(a.values, b.values, strict=True))
        and same_bits(a.token_ids, b.token_ids)
    )


def split(blob: bytes) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """The safetensors header (without __metadata__), the kvagent header and the data section."""
    n = int.from_bytes(blob[:8], "little")
    st = json.loads(blob[8 : 8 + n])
    kvh = json.loads(st.pop("__metadata__")["kvagent"])
    return st, kvh, blob[8 + n :]


def container(header_json: bytes, data: bytes) -> bytes:
    """8-byte LE length + JSON padded with spaces to a multiple of 8 + data."""
    header_json += b" " * (-len(header_json) % 8)
    return len(header_json).to_bytes(8, "little") + header_json + data


def build(st: dict[str, Any], kvh: dict[str, Any] | str, data: bytes) -> bytes:
    """Reassemble a container from (possibly edited) parts; ``kvh`` may be raw header JSON text."""
    raw = kvh if isinstance(kvh, str) else json.dumps(kvh)
    full = {**st, "__metadata__": {"kvagent": raw}}
    return container(json.dumps(full).encode(), data)


def store_worker(args: tuple[str, int, int, int]) -> tuple[int, int, list[str]]:
    """One process of the concurrency test: write its own and a shared artifact, read everything.

    Returns (hits, misses, problems); a problem is a read that was neither a miss nor bit-exact.
    """
    from kvagent.tiers.store import KVStore

    directory, me, n_workers, rounds = args
    shared_kv = make_kv(num_layers=2, heads=2, tokens=300, head_dim=16, seed=1000)  # > 32 KiB: a file
    expected = {key_for(shared_kv): shared_kv}
    mine = []
    for w in range(n_workers):
        for r in range(rounds):
            kv = make_kv(num_layers=2, heads=1, tokens=5 + r, head_dim=4, seed=10 * w + r + 1)
            expected[key_for(kv)] = kv
            if w == me:
                mine.append(kv)
    hits = misses = 0
    problems: list[str] = []
    with KVStore(Path(directory)) as store:
        for r in range(rounds):
            store.put(*make_artifact(mine[r]))
            store.put(*make_artifact(shared_kv))
            for key, kv in expected.items():
                found = store.get(key)
                if found.artifact is None:
                    misses += 1
                    if "not in the local store" not in found.reason:
                        problems.append(f"worker {me}: miss with reason {found.reason}")
                elif same_kv(found.artifact.kv, kv):
                    hits += 1
                else:
                    problems.append(f"worker {me}: artifact {key[:12]} differs from what was written")
    return hits, misses, problems
