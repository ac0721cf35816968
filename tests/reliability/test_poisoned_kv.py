"""Poisoned KV: an artifact whose tensors are not the KV of the token ids it claims is caught."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kvagent import KVAgent
from kvagent.artifacts import format as art
from kvagent.client.registry import RegistryClient
from kvagent.costs.policy import PolicyParams
from kvagent.engines.hf import TransformersEngine
from kvagent.kvcache.tensors import KVCache
from kvagent.tiers.verification import verify_kv
from tests.conftest import tiny_config
from tests.registry_server import start_server


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _tampered(engine: TransformersEngine, ids: list[int], kind: str) -> KVCache:
    honest = engine.prefill(ids)
    if kind == "changed-token":
        alt = list(ids)
        alt[len(ids) // 2] = (alt[len(ids) // 2] + 1) % 512
        bad = engine.prefill(alt)
    elif kind == "swapped-document":
        bad = engine.prefill(_ids(len(ids), 999))
    elif kind == "perturbed-layer":
        keys = [k.clone() for k in honest.keys]
        keys[0][:, :, 40:60] += 0.05 * keys[0].abs().max()
        values = [v.clone() for v in honest.values]
        values[-2][:, :, 100:120] *= 1.1
        return KVCache(tuple(keys), tuple(values), honest.token_ids)
    else:
        raise ValueError(kind)
    return KVCache(bad.keys, bad.values, honest.token_ids)  # claims the original ids


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_sample_verification_passes_honest_kv_and_catches_tampering(tiny_model, arch):
    engine = TransformersEngine(tiny_model(arch))
    ids = _ids(400, 1)
    honest = verify_kv(engine, engine.prefill(ids), "sample", seed=3)
    assert honest.ok and honest.checked_positions > len(ids), honest
    for kind in ("changed-token", "swapped-document", "perturbed-layer"):
        rep = verify_kv(engine, _tampered(engine, ids, kind), "sample", seed=3)
        assert not rep.ok, (kind, rep)
        assert "does not match" in rep.reason
    assert verify_kv(engine, _tampered(engine, ids, "perturbed-layer"), "full").ok is False
    assert verify_kv(engine, engine.prefill(ids), "full").ok


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2", "mistral", "gpt2"])
def test_probes_recompute_every_layer_and_catch_a_last_layer_span(tiny_model, arch, monkeypatch):
    engine = TransformersEngine(tiny_model(arch))
    ids = _ids(300, 2)
    honest = engine.prefill(ids)
    # layer 0 comes from the cut-short forward pass, never from the full-prefill fallback
    monkeypatch.setattr(engine, "prefill", lambda *_a, **_k: pytest.fail("layer-0 check ran a full prefill"))
    rep = verify_kv(engine, honest, "sample", probes=300, seed=1)
    assert rep.ok and rep.checked_layers == len(honest.keys) and rep.checked_positions == 600, rep
    assert rep.max_rel_diff < rep.tolerance / 4, rep  # honest noise sits well inside the tolerance
    values = [v.clone() for v in honest.values]
    values[-1][:, :, 150] += 0.05 * values[-1].abs().max()  # one position, last layer only
    last = KVCache(honest.keys, tuple(values), honest.token_ids)
    assert verify_kv(engine, last, "sample", probes=0).ok  # invisible to the layer-0 check alone...
    bad = verify_kv(engine, last, "sample", probes=300, seed=1)  # ...seen by a probe at that position
    assert not bad.ok and f"layer {len(values) - 1} values" in bad.reason, bad


def test_probe_positions_are_distinct_sorted_and_include_the_last():
    from kvagent.tiers.verification import probe_positions

    assert probe_positions(0, 5, 1) == [] and probe_positions(10, 0, 1) == []
    assert probe_positions(10, 100, 1) == list(range(10))
    picked = probe_positions(1000, 64, 7)
    assert len(picked) == 64 and picked == sorted(set(picked)) and picked[-1] == 999
    assert picked == probe_positions(1000, 64, 7) != probe_positions(1000, 64, 8)


@pytest.mark.slow
def test_an_agent_refuses_a_poisoned_artifact_from_the_registry(tmp_path: Path, caplog):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model_dir = tmp_path / "model"
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tokens = {"mallory-token-01": {"principal": "mallory", "publish": True},
              "bob-token-000002": {"principal": "bob", "publish": False}}
    server = start_server(tmp_path / "data", tokens)
    try:
        policy = PolicyParams(min_tokens=256, prefill_tokens_per_s=50.0)
        bob = KVAgent(model, cache_dir=tmp_path / "bob", registry_url=server.url, token="bob-token-000002",
                      policy=policy)
        ids = _ids(600, 2)
        poisoned = _tampered(bob.engine, ids, "swapped-document")
        _, blob = art.encode(poisoned, model_fingerprint=bob.context.model_fingerprint,
                             tokenizer_fingerprint=bob.context.tokenizer_fingerprint,
                             template_hash=bob.context.template_hash)
        with RegistryClient(server.url, token="mallory-token-01") as mallory:
            mallory.publish(blob, visibility="public")  # checksum and key are valid: only the KV lies
        with caplog.at_level(logging.WARNING):
            doc = bob.read_ids(ids)
        assert doc.cache.status == "prefill", doc.cache
        assert "verification" in doc.cache.reason and bob.stats()["poisoned"] == 1
        assert doc.key not in bob.store or bob.store.get(doc.key).artifact.kv.keys[0].equal(
            bob.engine.prefill(ids).keys[0])  # only the honest, locally computed KV was stored
        got = bob.ask_ids(doc, [1, 2, 3], mode="local", max_new_tokens=12, stop_token_ids=()).token_ids
        assert got == bob.generate_full(ids + [1, 2, 3], max_new_tokens=12, stop_token_ids=()).token_ids
        bob.close()
        # Without verification the same artifact is accepted: the check above is what stops it.
        trusting = KVAgent(model, cache_dir=tmp_path / "trusting", registry_url=server.url,
                           token="bob-token-000002", policy=policy, verify="none")
        assert trusting.read_ids(ids).cache.status == "remote"
        trusting.close()
        # A last-layer-only tampering: the agent's verify_probes decide whether it is seen.
        other = _ids(600, 5)
        honest = bob.engine.prefill(other)
        values = [v.clone() for v in honest.values]
        values[-1][:, :, 300:] *= 1.5
        _, blob = art.encode(KVCache(honest.keys, tuple(values), honest.token_ids),
                             model_fingerprint=bob.context.model_fingerprint,
                             tokenizer_fingerprint=bob.context.tokenizer_fingerprint,
                             template_hash=bob.context.template_hash)
        with RegistryClient(server.url, token="mallory-token-01") as mallory:
            mallory.publish(blob, visibility="public")
        for probes, status in ((0, "remote"), (16, "prefill")):
            agent = KVAgent(model, cache_dir=tmp_path / f"probes{probes}", registry_url=server.url,
                            token="bob-token-000002", policy=policy, verify_probes=probes)
            assert agent.read_ids(other).cache.status == status, (probes, agent.read_ids(other).cache)
            agent.close()
    finally:
        server.stop()


def test_honest_bf16_kv_of_a_long_document_passes_and_a_swapped_one_does_not(tmp_path: Path):
    """bf16 products round with the shape of their call, so honest KV recomputed at the probes differs by
    a few percent of a tensor's largest value (up to 0.068 at 1,600 tokens on an AMX CPU, where the old 3e-2
    tolerance rejected half of such checks); a swapped document differs by far more (>= 1.5)."""
    from tests.conftest import long_text

    agent = KVAgent(cache_dir=tmp_path, dtype="bfloat16")
    try:
        ids = agent.document_ids(long_text(3300, agent.tokenizer))
        kv = agent.engine.prefill(ids[:1600])
        chunked = agent.engine.prefill(ids[:256])
        for start in range(256, 1600, 256):  # as a host's batching engine computes it
            chunked = agent.engine.prefill_from(chunked, ids[start : start + 256])
        for honest in (kv, chunked):
            for seed in range(4):
                report = verify_kv(agent.engine, honest, "sample", probes=64, seed=seed)
                assert report.ok, report.reason
        other = agent.engine.prefill(ids[1600:3200])
        swapped = KVCache(other.keys, other.values, kv.token_ids)
        report = verify_kv(agent.engine, swapped, "sample", probes=64, seed=0)
        assert not report.ok and report.max_rel_diff > 1.0
    finally:
        agent.close()
