"""Faults: corrupt and truncated artifacts, a full disk, a slow registry, a download cut mid-stream.
After each, the agent still answers, exactly as a full prefill would, and nothing partial is kept.

With ``KVAGENT_TEST_BLOBS=s3`` the registry keeps its blobs in S3 and downloads are presigned URLs straight
to the object store, so a download is cut there: a fault proxy sits between the S3 server and everyone
who uses it (the registry and its presigned URLs point at the proxy)."""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from kvagent import KVAgent
from kvagent.client.registry import RegistryClient
from kvagent.costs.calibration.estimates import link_estimates
from kvagent.costs.policy import PolicyParams
from tests.conftest import tiny_config
from tests.registry_server import ServerProcess, blob_backend, start_server
from tests.reliability.faultproxy import FaultProxy
from tests.s3_server import ENV as S3_ENV

pytestmark = pytest.mark.slow
SUFFIX = [7, 8, 9]
TOKENS = {"alice-token-0001": {"principal": "alice", "publish": True},
          "bob-token-000002": {"principal": "bob", "publish": False}}


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(11)
    d = tmp_path_factory.mktemp("model")
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()


def _artifact_file(agent: KVAgent) -> Path:
    return max(agent.config.store_dir.rglob("*.val"), key=lambda p: p.stat().st_size)


def test_bit_flips_and_truncations_anywhere_are_detected(model, tmp_path):
    ids = _ids(300, 1)
    rng = random.Random(5)
    agent = KVAgent(model, cache_dir=tmp_path)
    reference = agent.generate_full(ids + SUFFIX, max_new_tokens=8, stop_token_ids=()).token_ids
    tried = 0
    for trial in range(24):
        agent.forget_memory()
        doc = agent.read_ids(ids)  # (re)stores a good artifact
        path = _artifact_file(agent)
        data = bytearray(path.read_bytes())
        if trial % 3 == 2:
            data = data[: rng.randrange(0, len(data))]
        else:
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        agent.forget_memory()
        again = agent.read_ids(ids)
        tried += 1
        assert again.cache.status == "prefill", (trial, again.cache)  # detected: a miss, never a wrong load
        assert "evicted" in again.cache.reason
        assert agent.ask_ids(again, SUFFIX, max_new_tokens=8, stop_token_ids=()).token_ids == reference
        assert doc.key == again.key
    assert tried == 24
    agent.close()


def test_a_full_disk_does_not_break_a_read(model, tmp_path, monkeypatch, caplog):
    agent = KVAgent(model, cache_dir=tmp_path)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(agent.store._cache, "set", full)
    ids = _ids(300, 2)
    with caplog.at_level(logging.WARNING, logger="kvagent"):
        doc = agent.read_ids(ids)
    assert doc.cache.status == "prefill"
    assert any("No space left" in r.getMessage() for r in caplog.records)
    assert agent.ask_ids(doc, SUFFIX, max_new_tokens=8, stop_token_ids=()).token_ids == \
        agent.generate_full(ids + SUFFIX, max_new_tokens=8, stop_token_ids=()).token_ids
    agent.close()


@contextmanager
def _object_store() -> Iterator[FaultProxy | None]:
    """In S3 mode, a fault proxy (passing everything for now) in front of the S3 server; None for local
    blobs."""
    if blob_backend() != "s3":
        yield None
        return
    proxy = FaultProxy(int(urlparse(os.environ[S3_ENV]).port or 80))
    try:
        yield proxy
    finally:
        proxy.close()


def _registry(data: Path, store: FaultProxy | None) -> ServerProcess:
    return start_server(data, TOKENS, s3_endpoint=store.url if store is not None else None)


@contextmanager
def _cut_downloads(server: ServerProcess, store: FaultProxy | None, cut_after: int,
                   on_cut: Callable[[], None] | None = None) -> Iterator[str]:
    """The registry URL a reader should use while every blob download is cut after ``cut_after`` bytes: a
    proxy in front of the registry (local blobs), or the object store's own proxy (S3: presigned URLs)."""
    if store is None:
        proxy = FaultProxy(server.port, mode="cut", cut_after=cut_after, on_cut=on_cut)
        try:
            yield proxy.url
        finally:
            proxy.close()
        return
    store.cut_after, store.on_cut, store.mode = cut_after, on_cut, "cut"
    try:
        yield server.url
    finally:
        store.mode, store.on_cut = "pass", None


@pytest.fixture(scope="module")
def published(tmp_path_factory, model):
    """A registry process holding one public artifact, its object store's proxy (S3 mode), and the document's
    ids."""
    with _object_store() as store:
        server = _registry(tmp_path_factory.mktemp("registry") / "data", store)
        ids = _ids(600, 3)
        a = KVAgent(
            model,
            cache_dir=tmp_path_factory.mktemp("a"),
            registry_url=server.url,
            token="alice-token-0001",
            publish="public",
            policy=PolicyParams(min_tokens=256, prefill_tokens_per_s=50.0),
        )
        assert "published" in a.read_ids(ids).cache.reason
        a.close()
        yield server, store, ids
        server.stop()


def _bob(model, cache: Path, url: str, timeout: float) -> KVAgent:
    """A reader whose policy fetches (a fixed slow prefill estimate: the tiny model would rightly prefill)."""
    client = RegistryClient(url, "bob-token-000002", timeout=timeout, retries=2, backoff_initial=0.05)
    return KVAgent(
        model,
        cache_dir=cache,
        registry_client=client,
        policy=PolicyParams(min_tokens=256, prefill_tokens_per_s=50.0),
    )


def test_a_slow_registry_falls_back_in_bounded_time(published, model, tmp_path, caplog):
    server, _, ids = published
    proxy = FaultProxy(server.port, mode="delay", delay=3.0)
    try:
        bob = _bob(model, tmp_path, proxy.url, timeout=0.5)
        with caplog.at_level(logging.WARNING, logger="kvagent"):
            t0 = time.perf_counter()
            doc = bob.read_ids(ids)
            elapsed = time.perf_counter() - t0
        assert doc.cache.status == "prefill" and "Timeout" in doc.cache.reason
        assert elapsed < 10, elapsed
        assert bob.stats()["registry_failures"] >= 1
        bob.close()
    finally:
        proxy.close()


def test_a_download_cut_mid_stream_leaves_nothing_partial(published, model, tmp_path):
    server, store, ids = published
    with RegistryClient(server.url, "bob-token-000002") as c:
        handle = c.lookup(_key(model, ids))
        assert handle is not None
    # lookups fit; the blob is cut in half
    with _cut_downloads(server, store, cut_after=handle.size // 2) as url:
        bob = _bob(model, tmp_path, url, timeout=5)
        doc = bob.read_ids(ids)
        assert doc.cache.status == "prefill", doc.cache
        assert "from the registry failed" in doc.cache.reason, doc.cache.reason  # the fetch was tried and cut
        stored = list(bob.store.entries())
        assert [e.key for e in stored] == [doc.key]  # only the locally computed artifact
        assert bob.store.get(doc.key).artifact is not None
        assert bob.ask_ids(doc, SUFFIX, max_new_tokens=8, stop_token_ids=()).token_ids == \
            bob.generate_full(ids + SUFFIX, max_new_tokens=8, stop_token_ids=()).token_ids
        bob.close()


@contextmanager
def _slow_downloads(server: ServerProcess, store: FaultProxy | None, rate: float) -> Iterator[str]:
    """The registry URL a reader should use while every response past its first 8 KiB comes at ``rate``
    bytes/s: a proxy in front of the registry (local blobs), or the object store's own proxy (S3)."""
    if store is None:
        proxy = FaultProxy(server.port, mode="throttle", rate=rate)
        try:
            yield proxy.url
        finally:
            proxy.close()
        return
    store.rate, store.mode = rate, "throttle"
    try:
        yield server.url
    finally:
        store.mode = "pass"


def test_a_slow_download_over_a_link_never_measured_is_given_up_for_a_prefill(published, model, tmp_path):
    """A fetch chosen on the assumed link speed (nobody measured this registry yet) is given up as soon as the
    download shows that the rest would take longer than prefilling here; the read prefills, exactly, keeps
    nothing partial, and the link is now measured for the next decision."""
    server, store, ids = published
    with RegistryClient(server.url, "bob-token-000002") as c:
        handle = c.lookup(_key(model, ids))
        assert handle is not None
    with _slow_downloads(server, store, rate=handle.size / 60) as url:  # the whole blob: a minute
        bob = _bob(model, tmp_path, url, timeout=90)  # prefill estimated at 12 s (600 tokens at 50/s)
        t0 = time.perf_counter()
        doc = bob.read_ids(ids)
        elapsed = time.perf_counter() - t0
        assert doc.cache.status == "prefill" and "gave up the download" in doc.cache.reason, doc.cache.reason
        assert "never measured" in doc.cache.reason and doc.cache.stages.get("download", 0) > 0
        assert elapsed < 12, elapsed  # given up early: not the minute the download would take
        cost = bob.resolver.cost
        assert cost is not None
        _rtt, bps = link_estimates(cost.calibration.read(), url)
        assert bps is not None and bps.value < 1e8  # measured now (not the assumed 1 GB/s)
        assert [e.key for e in bob.store.entries()] == [doc.key]  # only the locally computed artifact
        assert bob.ask_ids(doc, SUFFIX, max_new_tokens=8, stop_token_ids=()).token_ids == \
            bob.generate_full(ids + SUFFIX, max_new_tokens=8, stop_token_ids=()).token_ids
        bob.close()


def _key(model, ids: list[int]) -> str:
    probe = KVAgent(model, cache_dir=Path("/tmp") / f"kvagent-probe-{time.time_ns()}")
    try:
        return probe.key_of(ids)
    finally:
        probe.close()


def test_the_server_killed_mid_download_leaves_nothing_partial(model, tmp_path):
    """kill -9 of the registry process while an agent downloads: local prefill, an exact answer, nothing
    partial stored; after a restart the registry serves the whole artifact again. (S3: the download from the
    object store is cut at the moment the registry dies.)"""
    data = tmp_path / "data"
    with _object_store() as store:
        server = _registry(data, store)
        ids = _ids(600, 4)
        a = KVAgent(model, cache_dir=tmp_path / "a", registry_url=server.url, token="alice-token-0001",
                    publish="public", policy=PolicyParams(min_tokens=256, prefill_tokens_per_s=50.0))
        assert "published" in a.read_ids(ids).cache.reason
        a.close()
        with RegistryClient(server.url, "bob-token-000002") as c:
            handle = c.lookup(_key(model, ids))
            assert handle is not None
        try:
            with _cut_downloads(server, store, cut_after=handle.size // 3, on_cut=server.kill9) as url:
                bob = _bob(model, tmp_path / "bob", url, timeout=5)
                doc = bob.read_ids(ids)
                assert doc.cache.status == "prefill" and "from the registry failed" in doc.cache.reason, (
                    doc.cache
                )
                assert server.proc.poll() is not None, "the server should have been killed mid-download"
                assert [e.key for e in bob.store.entries()] == [doc.key]
                assert bob.ask_ids(doc, SUFFIX, max_new_tokens=8, stop_token_ids=()).token_ids == \
                    bob.generate_full(ids + SUFFIX, max_new_tokens=8, stop_token_ids=()).token_ids
                bob.close()
        finally:
            server.stop()
        server = _registry(data, store)
        try:
            carol = _bob(model, tmp_path / "carol", server.url, timeout=5)
            again = carol.read_ids(ids)
            assert again.cache.status == "remote", again.cache
            carol.close()
        finally:
            server.stop()
