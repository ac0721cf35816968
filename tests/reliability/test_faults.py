"""Faults: corrupt and truncated artifacts, a full disk, a slow registry, a download cut mid-stream.
After each, the agent still answers, exactly as a full prefill would, and nothing partial is kept."""

from __future__ import annotations

import errno
import logging
import random
import time
from pathlib import Path

import pytest
import torch

from kvagent import KVAgent
from kvagent.policy import PolicyParams
from kvagent.registry import RegistryClient
from tests.conftest import tiny_config
from tests.registry_server import start_server
from tests.reliability.faultproxy import FaultProxy

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


@pytest.fixture(scope="module")
def published(tmp_path_factory, model):
    """A registry process holding one public artifact, and the document's ids."""
    server = start_server(tmp_path_factory.mktemp("registry") / "data", TOKENS)
    ids = _ids(600, 3)
    a = KVAgent(model, cache_dir=tmp_path_factory.mktemp("a"), registry_url=server.url, token="alice-token-0001",
                publish="public", policy=PolicyParams(min_tokens=256, prefill_tokens_per_s=50.0))
    assert "published" in a.read_ids(ids).cache.reason
    a.close()
    yield server, ids
    server.stop()


def _bob(model, cache: Path, url: str, timeout: float) -> KVAgent:
    """A reader whose policy fetches (a fixed slow prefill estimate: the tiny model would rightly prefill)."""
    client = RegistryClient(url, "bob-token-000002", timeout=timeout, retries=2, backoff_initial=0.05)
    return KVAgent(model, cache_dir=cache, registry_client=client, policy=PolicyParams(min_tokens=256, prefill_tokens_per_s=50.0))


def test_a_slow_registry_falls_back_in_bounded_time(published, model, tmp_path, caplog):
    server, ids = published
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
    server, ids = published
    with RegistryClient(server.url, "bob-token-000002") as c:
        handle = c.lookup(_key(model, ids))
        assert handle is not None
    proxy = FaultProxy(server.port, mode="cut", cut_after=handle.size // 2)  # lookups fit; the blob is cut in half
    try:
        bob = _bob(model, tmp_path, proxy.url, timeout=5)
        doc = bob.read_ids(ids)
        assert doc.cache.status == "prefill", doc.cache
        assert "from the registry failed" in doc.cache.reason, doc.cache.reason  # the fetch was tried and cut
        stored = list(bob.store.entries())
        assert [e.key for e in stored] == [doc.key]  # only the locally computed artifact
        assert bob.store.get(doc.key).artifact is not None
        assert bob.ask_ids(doc, SUFFIX, max_new_tokens=8, stop_token_ids=()).token_ids == \
            bob.generate_full(ids + SUFFIX, max_new_tokens=8, stop_token_ids=()).token_ids
        bob.close()
    finally:
        proxy.close()


def _key(model, ids: list[int]) -> str:
    probe = KVAgent(model, cache_dir=Path("/tmp") / f"kvagent-probe-{time.time_ns()}")
    try:
        return probe.key_of(ids)
    finally:
        probe.close()


def test_the_server_killed_mid_download_leaves_nothing_partial(model, tmp_path):
    """kill -9 of the registry process while an agent downloads: local prefill, an exact answer, nothing
    partial stored; after a restart the registry serves the whole artifact again."""
    data = tmp_path / "data"
    server = start_server(data, TOKENS)
    ids = _ids(600, 4)
    a = KVAgent(model, cache_dir=tmp_path / "a", registry_url=server.url, token="alice-token-0001",
                publish="public", policy=PolicyParams(min_tokens=256, prefill_tokens_per_s=50.0))
    assert "published" in a.read_ids(ids).cache.reason
    a.close()
    with RegistryClient(server.url, "bob-token-000002") as c:
        handle = c.lookup(_key(model, ids))
        assert handle is not None
    proxy = FaultProxy(server.port, mode="cut", cut_after=handle.size // 3, on_cut=server.kill9)
    try:
        bob = _bob(model, tmp_path / "bob", proxy.url, timeout=5)
        doc = bob.read_ids(ids)
        assert doc.cache.status == "prefill" and "from the registry failed" in doc.cache.reason, doc.cache
        assert server.proc.poll() is not None, "the server should have been killed mid-download"
        assert [e.key for e in bob.store.entries()] == [doc.key]
        assert bob.ask_ids(doc, SUFFIX, max_new_tokens=8, stop_token_ids=()).token_ids == \
            bob.generate_full(ids + SUFFIX, max_new_tokens=8, stop_token_ids=()).token_ids
        bob.close()
    finally:
        proxy.close()
        server.stop()
    server = start_server(data, TOKENS)
    try:
        carol = _bob(model, tmp_path / "carol", server.url, timeout=5)
        again = carol.read_ids(ids)
        assert again.cache.status == "remote", again.cache
        carol.close()
    finally:
        server.stop()
