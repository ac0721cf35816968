"""Two agents and a real registry process on loopback: publish, remote hit, remote generate, fallbacks."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import httpx
import pytest
import torch

from kvagent import KVAgent
from kvagent.client.registry import RegistryClient
from kvagent.costs.policy import PolicyParams
from tests.conftest import save_tiny_llama
from tests.registry_server import free_port, start_server

pytestmark = pytest.mark.slow

TOKENS = {
    "alice-token-0001": {"principal": "alice", "publish": True},
    "bob-token-000002": {"principal": "bob", "publish": False},
}
N_DOC = 600
SUFFIX = [11, 22, 33, 44]
# The tiny model prefills faster than any fetch pays, so the calibrated policy would (rightly) prefill: a
# fixed slow prefill estimate (a documented override) makes it fetch, so these tests exercise the registry
# path.
POLICY = PolicyParams(min_tokens=256, prefill_tokens_per_s=50.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=99)


@pytest.fixture(scope="module")
def model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):
    srv = start_server(tmp_path_factory.mktemp("registry") / "data", TOKENS, model=str(model_dir))
    yield srv
    srv.stop()


def doc_ids(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (N_DOC,), generator=g).tolist()


def agent(model, cache: Path, **kw) -> KVAgent:
    return KVAgent(model, cache_dir=cache, policy=POLICY, **kw)


def test_publish_then_remote_hit_is_token_exact(server, model, tmp_path):
    ids = doc_ids(1)
    a = agent(model, tmp_path / "a", registry_url=server.url, token="alice-token-0001", publish="public")
    doc_a = a.read_ids(ids)
    assert doc_a.cache.status == "prefill" and "published (public)" in doc_a.cache.reason
    assert a.stats()["publishes"] == 1

    b = agent(model, tmp_path / "b", registry_url=server.url, token="bob-token-000002")
    doc_b = b.read_ids(ids)
    assert doc_b.key == doc_a.key
    assert doc_b.cache.status == "remote" and doc_b.cache.bytes_read > 0 and "fetch" in doc_b.cache.reason
    assert doc_b.key in b.store  # stored locally: the next agent on this cache dir gets a local hit
    # how long fetched bytes took to land (checksum, decode, verify, store write) prices the next fetch
    cost = b.resolver.cost
    assert cost is not None
    deadline = time.monotonic() + 30  # recorded in the background
    while cost.estimate_landing(doc_b.cache.bytes_read) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    landing = cost.estimate_landing(doc_b.cache.bytes_read)
    stages = doc_b.cache.stages
    assert landing is not None and landing.value == pytest.approx(
        stages["verification"] + stages["store_write"], rel=0.5), (landing, stages)
    full = a.generate_full(ids + SUFFIX, max_new_tokens=16, stop_token_ids=()).token_ids
    local = b.ask_ids(doc_b, SUFFIX, mode="local", max_new_tokens=16, stop_token_ids=())
    assert len(full) == 16 and local.token_ids == full

    remote = b.ask_ids(doc_b, SUFFIX, mode="remote", max_new_tokens=16, stop_token_ids=())
    assert remote.cache.status == "remote-generate" and remote.token_ids == full
    c = agent(model, tmp_path / "b", registry_url=server.url, token="bob-token-000002")
    assert c.read_ids(ids).cache.status == "local"
    for x in (a, b, c):
        x.close()


def test_remote_prefix_hit(server, model, tmp_path):
    ids = doc_ids(2)
    a = agent(model, tmp_path / "a", registry_url=server.url, token="alice-token-0001", publish="public")
    a.read_ids(ids)
    longer = ids + doc_ids(3)[:200]
    b = agent(model, tmp_path / "b", registry_url=server.url, token="bob-token-000002")
    doc = b.read_ids(longer)
    assert (
        doc.cache.status == "remote"
        and doc.cache.cached_tokens == N_DOC
        and doc.cache.prefilled_tokens == 200
    )
    full = a.generate_full(longer + SUFFIX, max_new_tokens=12, stop_token_ids=()).token_ids
    assert b.ask_ids(doc, SUFFIX, mode="local", max_new_tokens=12, stop_token_ids=()).token_ids == full
    a.close()
    b.close()


def test_registry_down_falls_back_quickly(model, tmp_path, caplog):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    b = agent(model, tmp_path / "b", registry_url=url, token="bob-token-000002", publish=True)
    caplog.set_level(logging.WARNING, logger="kvagent")
    t0 = time.perf_counter()
    doc = b.read_ids(doc_ids(4))
    assert time.perf_counter() - t0 < 15
    assert doc.cache.status == "prefill" and "ConnectError" in doc.cache.reason
    assert any(
        "registry lookup" in r.getMessage() and "ConnectError" in r.getMessage() for r in caplog.records
    )
    assert any("publishing" in r.getMessage() for r in caplog.records)
    full = b.generate_full(doc_ids(4) + SUFFIX, max_new_tokens=8, stop_token_ids=()).token_ids
    ans = b.ask_ids(doc, SUFFIX, mode="remote", max_new_tokens=8, stop_token_ids=())
    assert ans.token_ids == full  # remote asked for, registry down: answered locally
    b.close()


def _stub_client(handler) -> RegistryClient:
    return RegistryClient(
        "http://stub.test",
        "t",
        client=httpx.Client(transport=httpx.MockTransport(handler)),
        sleep=lambda _s: None,
    )


@pytest.mark.parametrize("failure", ["500", "garbage", "lying-checksum", "generate-breaks"])
def test_misbehaving_registry_falls_back(failure, model, tmp_path, caplog):
    ids = doc_ids(5)
    honest = agent(model, tmp_path / "honest")
    doc0 = honest.read_ids(ids)
    blob = honest.artifact_bytes(doc0)
    hdr = json.loads(json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])["__metadata__"]["kvagent"])
    handle = {
        "key": doc0.key,
        "header": hdr,
        "size": len(blob),
        "visibility": "public",
        "owner": "x",
        "blob_url": f"/v1/artifacts/{doc0.key}/blob",
        "signature": None,
    }
    tampered = blob[:-1] + bytes([blob[-1] ^ 0xFF])

    def handler(req: httpx.Request) -> httpx.Response:
        if failure == "500":
            return httpx.Response(500)
        if failure == "garbage":
            return httpx.Response(200, content=b"<html>oops")
        if req.url.path.endswith("/blob"):
            return httpx.Response(200, content=tampered)
        if req.url.path.endswith("/generate"):
            return httpx.Response(
                200, content=b'{"token": %d}\n{"tok' % full[0]
            )  # breaks after one true token
        return httpx.Response(200, json=handle)

    caplog.set_level(logging.WARNING, logger="kvagent")
    b = agent(model, tmp_path / "b", registry_client=_stub_client(handler))
    full = honest.generate_full(ids + SUFFIX, max_new_tokens=8, stop_token_ids=()).token_ids
    if failure == "generate-breaks":
        doc = b.read_ids(ids)  # the blob lies: fetch rejected, prefilled locally
        assert doc.cache.status == "prefill" and "ArtifactIntegrityError" in doc.cache.reason
        b.forget_memory()
        b.store.clear()
        ans = b.ask_ids(doc, SUFFIX, mode="remote", max_new_tokens=8, stop_token_ids=())
        assert ans.token_ids == full and "remote generate" in ans.cache.reason
    else:
        doc = b.read_ids(ids)
        assert doc.cache.status == "prefill"
        ans = b.ask_ids(doc, SUFFIX, max_new_tokens=8, stop_token_ids=())
        assert ans.token_ids == full
    assert b.stats()["registry_failures"] >= 1
    assert any("prefilling locally" in r.getMessage() for r in caplog.records)
    honest.close()
    b.close()
