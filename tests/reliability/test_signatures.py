"""Signatures bind the whole artifact identity (ed25519-v3, engine included; v2 still verifies): the
header-swap attack — a trusted
publisher's signed payload re-served under a header claiming another model or key — is refused by a
reader that trusts keys and skips recomputation (``verify="none"``), end to end against a real server."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvagent.artifacts import format as art
from kvagent.artifacts import signing
from kvagent.client.registry import RegistryClient
from kvagent.errors import ArtifactFormatError, ArtifactIntegrityError
from kvagent.kvcache.identity import sha256_hex
from tests._kvfixtures import MODEL_FP, make_artifact, make_kv
from tests.registry_server import ServerProcess

OTHER_MODEL_FP = sha256_hex(b"another model")


def _legacy_v1(header: art.ArtifactHeader, sk: Ed25519PrivateKey) -> signing.Signature:
    """What kvagent signed before v2: the 32 bytes of the payload digest, nothing else."""
    return signing.Signature(signing.LEGACY_ALG, signing.public_key_hex(sk),
                             sk.sign(bytes.fromhex(header.payload_sha256)).hex())


def test_every_identity_field_is_bound_and_metadata_is_not() -> None:
    sk = Ed25519PrivateKey.generate()
    header, _ = make_artifact(make_kv())
    sig = signing.sign(header, sk)
    signing.verify(sig, header, {signing.public_key_hex(sk)})
    changes = {
        "format_version": header.format_version + 1, "key": "0" * 64, "model_fingerprint": OTHER_MODEL_FP,
        "tokenizer_fingerprint": "1" * 64, "dtype": "float16", "token_count": header.token_count + 1,
        "position_offset": 1, "template_hash": "2" * 64, "codec": "bplane-zstd", "payload_sha256": "3" * 64,
        "payload_bytes": header.payload_bytes + 1, "content_sha256": "4" * 64, "format": "other",
        "layout": dataclasses.replace(header.layout, num_layers=header.layout.num_layers + 1),
        "engine": "vllm 0.32.0",
    }
    assert sig.alg == "ed25519-v3" and set(changes) == set(signing.SIGNED_FIELDS)
    for name, value in changes.items():
        with pytest.raises(ArtifactIntegrityError, match="does not verify"):
            signing.verify(sig, dataclasses.replace(header, **{name: value}))
    # informational only
    signing.verify(sig, dataclasses.replace(header, created_at=1.0, publisher="someone"))
    with pytest.raises(ArtifactIntegrityError, match="not a trusted key"):
        signing.verify(sig, header, {signing.public_key_hex(Ed25519PrivateKey.generate())})
    # the old payload-only form: refused on the wire and when verified
    legacy = _legacy_v1(header, sk)
    with pytest.raises(ArtifactFormatError, match="no longer accepted"):
        signing.parse(legacy.header_value())
    with pytest.raises(ArtifactIntegrityError, match="payload digest only"):
        signing.verify(legacy, header)
    assert signing.parse(sig.header_value().upper()) == sig


def _v2(header: art.ArtifactHeader, sk: Ed25519PrivateKey) -> signing.Signature:
    """What kvagent signed before v3: the header's identity fields, the engine not among them."""
    fields = {k: v for k, v in header.to_json().items() if k in signing.V2_FIELDS}
    raw = b"kvagent-artifact-signature-v2\n" + json.dumps(fields, sort_keys=True,
                                                         separators=(",", ":")).encode()
    return signing.Signature("ed25519-v2", signing.public_key_hex(sk), sk.sign(raw).hex())


def test_the_engine_is_signed_and_v2_signatures_still_verify() -> None:
    """A publisher cannot get past a reader's engines="same" by editing the header's engine: v3 binds it
    (absent and named alike); v2 signatures, made before v3, still verify over their fields."""
    sk = Ed25519PrivateKey.generate()
    header, _ = make_artifact(make_kv())
    vllm = dataclasses.replace(header, engine="vllm 0.32.0")
    for signed, tampered in ((vllm, dataclasses.replace(vllm, engine="vllm 0.33.0")),
                             (vllm, header), (header, vllm)):
        sig = signing.sign(signed, sk)
        signing.verify(sig, signed, {signing.public_key_hex(sk)})
        with pytest.raises(ArtifactIntegrityError, match="does not verify"):
            signing.verify(sig, tampered, {signing.public_key_hex(sk)})
    old = _v2(vllm, sk)
    assert signing.parse(old.header_value()) == old  # accepted on the wire ...
    signing.verify(old, vllm, {signing.public_key_hex(sk)})  # ... and verified over its own fields
    signing.verify(old, header)
    with pytest.raises(ArtifactIntegrityError, match="does not verify"):
        signing.verify(old, dataclasses.replace(vllm, model_fingerprint=OTHER_MODEL_FP))
    # a v2 signature presented as v3 (or the reverse) does not verify
    with pytest.raises(ArtifactIntegrityError, match="does not verify"):
        signing.verify(dataclasses.replace(old, alg=signing.ALG), vllm)
    with pytest.raises(ArtifactIntegrityError, match="does not verify"):
        signing.verify(dataclasses.replace(signing.sign(vllm, sk), alg=signing.V2_ALG), vllm)


@pytest.fixture()
def server(trust_server: ServerProcess) -> ServerProcess:
    return trust_server


def _put(srv: ServerProcess, blob: bytes, key: str, token: str, sig: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", "X-KVAgent-Visibility": "public"}
    if sig is not None:
        headers["X-KVAgent-Signature"] = sig
    return httpx.put(f"{srv.url}/v1/artifacts/{key}", content=blob, headers=headers, timeout=30)


def _attach_signature(srv: ServerProcess, key: str, sig: signing.Signature) -> None:
    """Play a compromised (or legacy) registry: attach ``sig`` to ``key``'s record behind the server's
    back."""
    with sqlite3.connect(Path(srv.data_dir) / "meta.sqlite3") as db:
        n = db.execute(
            "UPDATE artifacts SET signature = ? WHERE key = ?", (json.dumps(sig.to_json()), key)
        ).rowcount
    assert n == 1


@pytest.mark.slow
def test_header_swap_attack_is_refused_end_to_end(server: ServerProcess) -> None:
    alice_sk = Ed25519PrivateKey.generate()
    alice_pub = signing.public_key_hex(alice_sk)
    kv = make_kv(tokens=40, seed=3)
    header_x, blob_x = make_artifact(kv)  # alice's document, computed by MODEL_FP
    # the swap: the same payload bytes under a header claiming another model, hence another key
    header_y, blob_y = make_artifact(kv, model_fingerprint=OTHER_MODEL_FP)
    assert header_y.payload_sha256 == header_x.payload_sha256 and header_y.key != header_x.key
    assert header_x.model_fingerprint == MODEL_FP

    alice_sig = signing.sign(header_x, alice_sk)
    assert _put(server, blob_x, header_x.key, "alice-token-0001", alice_sig.header_value()).status_code == 201
    # the server refuses alice's signature copied onto the swapped header, and any payload-only signature
    r = _put(server, blob_y, header_y.key, "mallory-token-01", alice_sig.header_value())
    assert (r.status_code, r.json()["error"]) == (422, "invalid_artifact"), r.text
    r = _put(server, blob_y, header_y.key, "mallory-token-01", _legacy_v1(header_y, alice_sk).header_value())
    assert (r.status_code, r.json()["error"]) == (422, "invalid_artifact"), r.text
    assert "no longer accepted" in r.json()["detail"]
    assert _put(server, blob_y, header_y.key, "mallory-token-01").status_code == 201  # unsigned is allowed

    expect_y = art.Expectation(key=header_y.key, model_fingerprint=OTHER_MODEL_FP)
    trusting = RegistryClient(server.url, "bob-token-000002", trusted_keys={alice_pub}, retries=1)
    naive = RegistryClient(server.url, "bob-token-000002", retries=1)
    with trusting, naive:
        # alice's own artifact verifies; the reader skips recomputation (what verify="none" does)
        assert (
            trusting.download(trusting.lookup(header_x.key), art.Expectation(key=header_x.key)).header
            == header_x
        )
        # unsigned swap: refused by the trusting reader
        with pytest.raises(ArtifactIntegrityError, match="unsigned"):
            trusting.download(trusting.lookup(header_y.key), expect_y)
        # a registry that attaches alice's signature to the swapped record: the signature binds the header
        _attach_signature(server, header_y.key, alice_sig)
        with pytest.raises(ArtifactIntegrityError, match="does not verify over its header"):
            trusting.download(trusting.lookup(header_y.key), expect_y)
        # ... or alice's old payload-only signature, which *does* verify over the swapped payload
        _attach_signature(server, header_y.key, _legacy_v1(header_x, alice_sk))
        with pytest.raises(ArtifactIntegrityError, match="payload digest only"):
            trusting.download(trusting.lookup(header_y.key), expect_y)
        # without trusted keys (and without recomputation) the swapped KV would load: the attack is real
        assert naive.download(naive.lookup(header_y.key), expect_y).header.model_fingerprint == OTHER_MODEL_FP
