"""The resolver's tier walk with fakes for the engine, the store and the registry source: no model, no files
but the single-flight locks, milliseconds per test. Memory, then the local store (exact key, then block-hash
prefix), then the registry (exact key or prefix, bought and counted), then a prefill of what is left."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import kvagent.tiers.lookup
from kvagent.artifacts import format as art
from kvagent.artifacts.source import Fetched, Handle
from kvagent.costs.policy import PolicyParams
from kvagent.errors import RegistryPaymentRequiredError, RegistryUnavailableError
from kvagent.kvcache.identity import KeyContext, sha256_hex
from kvagent.kvcache.tensors import KVCache, extended_source
from kvagent.reuse.resolver import Resolver, ResolverSettings
from kvagent.tiers.store import KVStore, StoreLookup

BLOCK = 4
LAYERS, HEADS, DIM = 2, 1, 4
CTX = KeyContext(sha256_hex(b"fake-model"), sha256_hex(b"fake-tokenizer"), "float32")


def kv_of(ids: Sequence[int]) -> KVCache:
    """The fake model's KV: a function of each token and its position, so a prefix's KV is a prefix of it."""
    t = (
        torch.tensor([float(i) * 1000 + p for p, i in enumerate(ids)])
        .view(1, 1, -1, 1)
        .expand(1, HEADS, -1, DIM)
    )
    keys = tuple(t.clone() + layer for layer in range(LAYERS))
    return KVCache(keys=keys, values=tuple(k * 2 for k in keys), token_ids=torch.tensor(list(ids)))


class FakeEngine:
    dtype = torch.float32
    max_positions = 4096
    layout = kv_of([1]).layout

    def __init__(self) -> None:
        self.prefilled: list[int] = []  # tokens computed per call

    def prefill(self, ids: Sequence[int], progress: Any = None) -> KVCache:
        self.prefilled.append(len(ids))
        return kv_of(list(ids))

    def prefill_from(self, prefix: KVCache, rest: Sequence[int], progress: Any = None) -> KVCache:
        self.prefilled.append(len(rest))
        ids = prefix.token_ids.tolist() + list(rest)
        return kv_of(ids).with_source(extended_source(prefix, len(ids)))  # as the real engine names it


class FakeStore:
    """Artifacts by key and a block-hash index, in memory (the real one is tested in test_store.py)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.artifacts: dict[str, art.Artifact] = {}
        self.blocks: dict[str, str] = {}
        self.sources: dict[str, str] = {}  # key -> the published artifact it was derived from
        self.published: dict[str, tuple[str, int]] = {}  # key -> (digest, n) of the published bytes it copies

    def get(self, key: str, expect: art.Expectation | None = None) -> StoreLookup:
        a = self.artifacts.get(key)
        return StoreLookup(a, "" if a else "not in the local store", 100 if a else 0)

    def put(self, header: art.ArtifactHeader, blob: Any, block_hashes: Sequence[str] = (),
            derived_from: str | None = None, published: tuple[str, int] | None = None) -> None:
        data = blob if isinstance(blob, (bytes, bytearray)) else b"".join(blob)
        self.artifacts[header.key] = art.decode(data)
        for h in block_hashes:
            self.blocks[h] = header.key
        if derived_from is not None:
            self.sources[header.key] = derived_from
        if published is not None:
            self.published[header.key] = published

    def derived_from(self, key: str) -> str | None:
        return self.sources.get(key)

    def published_prefix(self, key: str) -> tuple[str, int] | None:
        return self.published.get(key)

    def drop_derived(self, source: str) -> list[str]:
        gone = [source, *(k for k, s in self.sources.items() if s == source)]
        for k in gone:
            self.artifacts.pop(k, None)
            self.sources.pop(k, None)
        return gone

    def find_prefix(self, hashes: Sequence[str]) -> tuple[str, int] | None:
        for i in range(len(hashes) - 1, -1, -1):
            if hashes[i] in self.blocks:
                return self.blocks[hashes[i]], i + 1
        return None


class FakeSource:
    """A registry source holding published artifacts, optionally priced; ``fail`` makes every lookup raise."""

    label, remote, can_generate, bandwidth_hint = "fake-registry", False, False, 1e12

    def __init__(self) -> None:
        self.published: dict[str, tuple[Handle, art.Artifact, list[str]]] = {}
        self.fail: Exception | None = None
        self.refuse_payment = False
        self.fetches = 0

    def publish(self, resolver: Resolver, ids: Sequence[int], price: int | None = None) -> Handle:
        kv = kv_of(ids)
        key = resolver.key_of(ids)
        header, blob = resolver.encode(key, kv)
        handle = Handle(key, header, len(blob), "public", "pub", f"/v1/artifacts/{key}/blob", None, price)
        hashes = kvagent.tiers.lookup.block_hashes(CTX, list(ids), BLOCK)
        self.published[key] = (handle, art.decode(blob), hashes)
        return handle

    def lookup(self, key: str, *, timeout: float | None = None) -> Handle | None:
        if self.fail:
            raise self.fail
        return self.published[key][0] if key in self.published else None

    def lookup_prefix(
        self, hashes: Sequence[str], *, timeout: float | None = None
    ) -> tuple[Handle, int] | None:
        if self.fail:
            raise self.fail
        best = None
        for handle, _a, own in self.published.values():
            n = next(
                (i for i, (x, y) in enumerate(zip(own, hashes, strict=False)) if x != y),
                min(len(own), len(hashes)),
            )
            if n and (best is None or n > best[1]):
                best = (handle, n)
        return best

    def fetch(self, handle: Handle, expect: art.Expectation, *, max_price: int | None = None,
              give_up: Any = None) -> Fetched:
        self.fetches += 1
        price = handle.price or 0
        if self.refuse_payment or (max_price is not None and price > max_price):
            raise RegistryPaymentRequiredError("402", {"price": price, "currency": "uUSD", "balance": 0,
                                                       "reason": "insufficient_balance"})
        _h, artifact, _ = self.published[handle.key]
        return Fetched(artifact, handle.size, 0.001, charged=price, receipt="r-1" if price else None)

    def dispute(self, handle: Handle, receipt: str, reason: str, difference: float) -> str:
        return "open"


def make(tmp_path: Path, source: FakeSource | None = None, store: FakeStore | None = None, **settings: Any
         ) -> tuple[Resolver, FakeEngine, FakeStore]:
    engine, store = FakeEngine(), store or FakeStore(tmp_path)
    s = ResolverSettings(
        block_size=BLOCK,
        verify="none",
        policy=PolicyParams(min_tokens=4, prefill_tokens_per_s=1.0),
        **settings,
    )
    return Resolver(engine, CTX, store, registry=source, settings=s), engine, store  # type: ignore[arg-type]


IDS = list(range(10, 30))  # 20 tokens: 5 blocks


def test_memory_then_store_then_prefix(tmp_path: Path) -> None:
    r, engine, store = make(tmp_path)
    first = r.resolve(IDS)
    assert first.info.status == "prefill" and engine.prefilled == [20]
    assert r.resolve(IDS).info.status == "memory"
    r2, engine2, _ = make(tmp_path, store=store)  # another process: same store, empty memory
    again = r2.resolve(IDS)
    assert again.info.status == "local" and engine2.prefilled == []
    longer = r2.resolve(IDS + [7, 8, 9])
    assert longer.info.status == "prefix" and longer.info.cached_tokens == 20 and engine2.prefilled == [3]
    assert torch.equal(longer.kv.keys[1], kv_of(IDS + [7, 8, 9]).keys[1])  # type: ignore[union-attr]


def test_a_stored_prefix_is_found_by_block_hash(tmp_path: Path) -> None:
    r, engine, store = make(tmp_path)
    r.resolve(IDS)
    r2, engine2, _ = make(tmp_path, store=store)
    other = IDS[:13] + [99] * 7  # shares 3 full blocks and one more token
    res = r2.resolve(other)
    assert res.info.status == "prefix" and res.info.source == "store" and res.info.cached_tokens == 13
    assert engine2.prefilled == [7]


def test_registry_exact_key_is_bought_and_its_charge_reported(tmp_path: Path) -> None:
    src = FakeSource()
    r, engine, _ = make(tmp_path, source=src)
    src.publish(r, IDS, price=60)
    res = r.resolve(IDS)
    assert res.info.status == "remote" and res.info.cached_tokens == 20 and engine.prefilled == []
    assert res.info.charged == 60 and r.registry_tier.spent == 60 and "bought for 60" in res.info.reason
    assert r.resolve(IDS).info.charged == 0  # from memory now: nothing bought again


def test_registry_prefix_then_prefill_of_the_rest(tmp_path: Path) -> None:
    src = FakeSource()
    r, engine, _ = make(tmp_path, source=src)
    src.publish(r, IDS[:12])
    res = r.resolve(IDS, document=False)
    assert res.info.status == "remote" and res.info.cached_tokens == 12 and engine.prefilled == [8]
    assert torch.equal(res.kv.values[0], kv_of(IDS).values[0])  # type: ignore[union-attr]


def test_too_few_uncached_tokens_do_not_consult_the_registry(tmp_path: Path) -> None:
    src = FakeSource()
    src.fail = AssertionError("must not be asked")
    r, _, _ = make(tmp_path, source=src)
    res = r.resolve(IDS[:3])
    assert res.info.status == "prefill" and "registry not consulted (3 uncached tokens < 4" in res.info.reason


def test_a_failing_registry_is_a_prefill_with_the_reason(tmp_path: Path) -> None:
    src = FakeSource()
    src.fail = RegistryUnavailableError("connection refused")
    r, engine, _ = make(tmp_path, source=src)
    res = r.resolve(IDS)
    assert res.info.status == "prefill" and engine.prefilled == [20]
    assert "connection refused" in res.info.reason and "prefilling locally" in res.info.reason
    assert r.counters["registry_failures"] == 1


def test_a_refused_purchase_and_the_price_cap(tmp_path: Path) -> None:
    src = FakeSource()
    r, engine, _ = make(tmp_path, source=src, max_price_per_load=50)
    src.publish(r, IDS, price=60)
    res = r.resolve(IDS)
    assert res.info.status == "prefill" and "not bought" in res.info.reason and r.registry_tier.spent == 0
    assert r.registry_tier.price_cap() == 50


def test_block_hashes_are_computed_once_per_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = FakeSource()
    r, _, _ = make(tmp_path, source=src)
    calls: list[int] = []
    real = kvagent.tiers.lookup.block_hashes

    def counted(ctx: KeyContext, ids: Sequence[int], block: int) -> list[str]:
        calls.append(len(ids))
        return real(ctx, ids, block)

    monkeypatch.setattr(kvagent.tiers.lookup, "block_hashes", counted)
    r.resolve(IDS)  # store prefix lookup, registry prefix lookup and the save all use them
    assert calls == [20]


def test_a_namespace_never_sees_another_namespaces_entries(tmp_path: Path) -> None:
    r, engine, _ = make(tmp_path)
    r.resolve(IDS, namespace="alice")
    assert r.resolve(IDS, namespace="alice").info.status == "memory"
    bob = r.resolve(IDS, namespace="bob")
    assert bob.info.status == "prefill" and engine.prefilled == [20, 20]
    assert r.key_of(IDS, "alice") != r.key_of(IDS, "bob") != r.key_of(IDS)


def test_max_tail_leaves_a_short_rest_to_the_caller(tmp_path: Path) -> None:
    r, engine, _ = make(tmp_path)
    r.resolve(IDS)
    res = r.resolve(IDS + [5, 6], document=False, max_tail=4)
    assert res.tail == (5, 6) and res.kv is not None and res.kv.n_tokens == 20 and engine.prefilled == [20]
    assert res.info.cached_tokens == 20 and "run with the reply" in res.info.reason


def test_deferred_save_writes_only_when_called(tmp_path: Path) -> None:
    r, _, store = make(tmp_path)
    res = r.resolve(IDS, defer_save=True)
    assert res.save is not None and res.key not in store.artifacts
    res.save()
    assert res.key in store.artifacts


def test_a_download_is_given_up_only_when_its_rest_would_cost_more_than_prefilling() -> None:
    from kvagent.tiers.registry import _give_up_past

    give_up = _give_up_past(1.0)  # prefilling what the fetch covers: 1 s
    assert give_up(100_000, 10_000_000, 0.1) is None  # too early to judge the link
    why = give_up(1_000_000, 10_000_000, 0.5)  # 4.5 s to go at this speed
    assert why is not None and "more than prefilling here ≈ 1.00 s" in why and "2.0 MB/s" in why
    assert give_up(9_000_000, 10_000_000, 0.5) is None  # 0.06 s to go: finishing is cheaper
    assert give_up(0, 10_000_000, 0.3) is not None  # nothing came at all
    assert give_up(10_000_000, 10_000_000, 5.0) is None  # done
    assert _give_up_past(0.05)(1_000, 10_000_000, 0.06) is not None  # a short prefill is judged sooner


def test_purge_drops_every_copy_of_a_published_artifact_in_every_namespace(tmp_path: Path) -> None:
    """Issue 34: a published artifact read by alice (her prompt's KV, kept in memory and stored in her
    namespace) and staged in bob's namespace (as the vLLM stager keeps it) is forgotten everywhere by
    ``purge``; an unrelated entry stays; once the artifact is gone, alice's next read reuses none of it."""
    src = FakeSource()
    r, engine, store = make(tmp_path, source=src)
    handle = src.publish(r, IDS[:12])
    alice = r.resolve(IDS, namespace="alice", document=False)
    assert alice.info.source == "registry" and alice.kv is not None
    assert alice.kv.source is not None and alice.kv.source.artifact == handle.key
    staged = r.resolve(IDS[:12] + [3, 4], namespace="bob", document=False, compute=False)
    assert staged.kv is not None and staged.info.source == "registry"
    bob_key = r.keep(staged.kv, namespace="bob")
    other = r.resolve([7] * 16, namespace="alice")
    assert {alice.key, bob_key} <= set(store.artifacts) and other.key in store.artifacts
    assert r.purge(handle.key) >= 4  # alice's and bob's entries in memory and in the store
    assert alice.key not in store.artifacts and bob_key not in store.artifacts
    assert other.key in store.artifacts and r.resolve([7] * 16, namespace="alice").info.status == "memory"
    del src.published[handle.key]  # deleted at the registry too
    engine.prefilled.clear()
    again = r.resolve(IDS, namespace="alice", document=False)
    assert again.info.status == "prefill" and engine.prefilled == [20]
    assert r.resolve(IDS[:12] + [3, 4], namespace="bob", document=False, compute=False).kv is None


def test_a_stored_copy_of_a_published_artifact_is_still_named_by_its_bytes(tmp_path: Path) -> None:
    """Issue 34: alice's prompt KV that begins with a published artifact, read back from the local store by
    a process with an empty memory (as a host reads it once its memory has moved on), still names its leading
    positions by the published bytes (and so may be read in place beside other principals on the same
    artifact); a KV stored from a private computation stays private. Before, every store read was private."""
    src = FakeSource()
    with KVStore(tmp_path / "kv") as store:
        r, _, _ = make(tmp_path, source=src, store=store)  # type: ignore[arg-type]
        handle = src.publish(r, IDS[:12])
        alice = r.resolve(IDS, namespace="alice", document=False)
        assert alice.kv is not None and alice.kv.source is not None
        first = alice.kv.source.published_part()  # its first 12 positions: the artifact's bytes
        assert first is not None and first.n == 12 and alice.kv.source.n == len(IDS)
        private = r.resolve([7] * 16, namespace="alice")
        r2, _, _ = make(tmp_path, source=src, store=store)  # type: ignore[arg-type]  # empty memory
        again = r2.resolve(IDS, namespace="alice", document=False)
        assert again.info.status == "local" and again.kv is not None and again.kv.source is not None
        pub = again.kv.source.published_part()
        assert pub is not None and pub.digest == first.digest and pub.n == 12 and pub.artifact == handle.key
        assert again.kv.source.n == len(IDS) and not again.kv.source.published  # the rest: alice's own
        mine = r2.resolve([7] * 16, namespace="alice")
        assert mine.info.status == "local" and mine.kv is not None and mine.kv.source is not None
        assert mine.kv.source.published_part() is None and private.key == mine.key
        assert r2.purge(handle.key) >= 1 and store.published_prefix(alice.key) is None
