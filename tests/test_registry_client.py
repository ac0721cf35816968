"""RegistryClient against an in-memory transport: retries, Retry-After, 4xx, strict parsing, integrity,
signatures."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from kvagent.artifacts import format as art
from kvagent.client.registry import RegistryClient, sign
from kvagent.engines.params import GenerationParams
from kvagent.errors import (
    ArtifactIntegrityError,
    ArtifactMismatchError,
    RegistryAuthError,
    RegistryConflictError,
    RegistryError,
    RegistryProtocolError,
    RegistryRejectedError,
    RegistryUnavailableError,
)
from tests._kvfixtures import MODEL_FP, make_artifact, make_kv, same_kv, split

KV = make_kv(num_layers=2, heads=2, tokens=9, head_dim=4)
HEADER, BLOB = make_artifact(KV)
KEY = HEADER.key
EXPECT = art.Expectation(key=KEY, model_fingerprint=MODEL_FP)


def handle_json(header: art.ArtifactHeader = HEADER, size: int = len(BLOB), signature: object = None) -> dict:
    return {
        "key": header.key,
        "header": header.to_json(),
        "size": size,
        "visibility": "public",
        "owner": "alice",
        "blob_url": f"/v1/artifacts/{header.key}/blob",
        "signature": signature,
    }


def client_for(
    handler: Callable[[httpx.Request], httpx.Response], **kw
) -> tuple[RegistryClient, list[float]]:
    sleeps: list[float] = []
    http = httpx.Client(transport=httpx.MockTransport(handler))
    return RegistryClient("http://registry.test", "tok", client=http, sleep=sleeps.append, **kw), sleeps


def test_lookup_parses_handle_and_sends_token():
    seen = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, json=handle_json())

    c, _ = client_for(handler)
    h = c.lookup(KEY)
    assert h is not None and h.header == HEADER and h.size == len(BLOB) and h.owner == "alice"
    assert seen[0].headers["authorization"] == "Bearer tok" and seen[0].url.path == f"/v1/artifacts/{KEY}"


def test_404_is_none_and_not_retried():
    calls = []
    c, sleeps = client_for(lambda r: calls.append(r) or httpx.Response(404, json={"error": "not_found"}))
    assert c.lookup(KEY) is None and c.lookup_prefix(["a" * 64]) is None
    assert len(calls) == 2 and sleeps == []


def test_5xx_retried_with_backoff_then_gives_up():
    calls = []
    c, sleeps = client_for(
        lambda r: calls.append(r) or httpx.Response(503, json={"error": "busy"}), retries=4
    )
    with pytest.raises(RegistryUnavailableError, match="503"):
        c.lookup(KEY)
    assert len(calls) == 4 and len(sleeps) == 3
    assert all(s > 0 for s in sleeps) and sleeps[2] > sleeps[0]  # exponential growth dominates the jitter


def test_transient_then_success():
    answers = iter(
        [httpx.ConnectError("refused"), httpx.Response(500), httpx.Response(200, json=handle_json())]
    )

    def handler(req: httpx.Request) -> httpx.Response:
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    c, sleeps = client_for(handler)
    assert c.lookup(KEY) is not None and len(sleeps) == 2


def test_retry_after_is_honoured():
    answers = iter(
        [httpx.Response(429, headers={"Retry-After": "7"}), httpx.Response(200, json=handle_json())]
    )
    c, sleeps = client_for(lambda r: next(answers))
    assert c.lookup(KEY) is not None
    assert sleeps == [7.0]


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (401, RegistryAuthError),
        (403, RegistryAuthError),
        (409, RegistryConflictError),
        (413, RegistryRejectedError),
        (422, RegistryRejectedError),
        (400, RegistryError),
    ],
)
def test_4xx_not_retried_and_mapped(status, exc):
    calls = []
    c, sleeps = client_for(
        lambda r: calls.append(r) or httpx.Response(status, json={"error": "x", "detail": "why"})
    )
    with pytest.raises(exc, match=str(status)):
        c.publish(BLOB)
    assert len(calls) == 1 and sleeps == []


@pytest.mark.parametrize(
    "body",
    [
        b"not json{",
        b"[1, 2]",
        json.dumps({**handle_json(), "size": -1}).encode(),
        json.dumps({**handle_json(), "size": True}).encode(),
        json.dumps({**handle_json(), "key": "b" * 64}).encode(),
        json.dumps({**handle_json(), "blob_url": "http://evil.test/x"}).encode(),
        json.dumps({**handle_json(), "visibility": "everyone"}).encode(),
        json.dumps({**handle_json(), "header": {**HEADER.to_json(), "codec": "zip"}}).encode(),
        json.dumps({k: v for k, v in handle_json().items() if k != "owner"}).encode(),
        json.dumps({**handle_json(), "signature": {"alg": "rsa"}}).encode(),
    ],
)
def test_malformed_answers_are_registry_errors(body):
    c, _ = client_for(lambda r: httpx.Response(200, content=body))
    with pytest.raises(RegistryProtocolError):
        c.lookup(KEY)


def test_prefix_lookup_validates_blocks():
    good = {"key": KEY, "blocks": 2, "handle": handle_json()}
    c, _ = client_for(lambda r: httpx.Response(200, json=good))
    h, blocks = c.lookup_prefix(["a" * 64, "b" * 64, "c" * 64])
    assert h.key == KEY and blocks == 2
    c, _ = client_for(lambda r: httpx.Response(200, json={**good, "blocks": 9}))
    with pytest.raises(RegistryProtocolError):
        c.lookup_prefix(["a" * 64])


def blob_server(blob: bytes, handle: dict) -> Callable[[httpx.Request], httpx.Response]:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/blob"):
            return httpx.Response(200, content=blob)
        return httpx.Response(200, json=handle)

    return handler


def test_download_verifies_and_decodes():
    c, _ = client_for(blob_server(BLOB, handle_json()))
    got = c.download(c.lookup(KEY), EXPECT)
    assert got.header == HEADER and same_kv(got.kv, KV)


def test_lying_checksum_is_rejected():
    st, kvh, data = split(BLOB)
    tampered = BLOB[: -len(data)] + bytes([data[0] ^ 1]) + data[1:]
    c, _ = client_for(blob_server(tampered, handle_json()))
    with pytest.raises(ArtifactIntegrityError, match="checksum"):
        c.download(c.lookup(KEY), EXPECT)


def test_header_other_than_handle_and_wrong_model_rejected():
    other_header, other_blob = make_artifact(KV, created_at=1_700_000_001.25)
    c, _ = client_for(blob_server(other_blob, handle_json()))
    with pytest.raises(ArtifactIntegrityError, match="differs"):
        c.download(c.lookup(KEY), EXPECT)
    c, _ = client_for(blob_server(BLOB, handle_json()))
    with pytest.raises(ArtifactMismatchError):
        c.download(c.lookup(KEY), art.Expectation(model_fingerprint="0" * 64))


def test_oversized_or_truncated_download():
    c, _ = client_for(blob_server(BLOB + b"x" * 10, handle_json()))
    with pytest.raises(ArtifactIntegrityError):
        c.download(c.lookup(KEY), EXPECT)
    c, _ = client_for(blob_server(BLOB[:-5], handle_json()))
    with pytest.raises(
        ArtifactIntegrityError, match="handle says"
    ):  # a Content-Length that contradicts the handle
        c.download(c.lookup(KEY), EXPECT)

    def chunked(req: httpx.Request) -> httpx.Response:  # no Content-Length: the stream just ends early
        if req.url.path.endswith("/blob"):
            return httpx.Response(200, content=iter([BLOB[:100], BLOB[100:-5]]))
        return httpx.Response(200, json=handle_json())

    c, sleeps = client_for(chunked)
    with pytest.raises(RegistryUnavailableError, match="stopped"):
        c.download(c.lookup(KEY), EXPECT)
    assert len(sleeps) == 2  # a short read is transient and retried


def _keypair() -> tuple[Ed25519PrivateKey, str]:
    sk = Ed25519PrivateKey.generate()
    return sk, sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _sig_record(value: str) -> dict:
    alg, pub, sig = value.split(":")
    return {"alg": alg, "public_key": pub, "signature": sig}


def test_signature_verification():
    sk, pub = _keypair()
    good = _sig_record(sign(HEADER, sk))
    c, _ = client_for(blob_server(BLOB, handle_json(signature=good)), trusted_keys={pub})
    assert same_kv(c.download(c.lookup(KEY), EXPECT).kv, KV)
    # unsigned, signed by a stranger, or a signature over another digest: all refused
    other_sk, _ = _keypair()
    for sig in (
        None,
        _sig_record(sign(HEADER, other_sk)),
        _sig_record(sign(dataclasses.replace(HEADER, codec="x"), sk)),
    ):
        c, _ = client_for(blob_server(BLOB, handle_json(signature=sig)), trusted_keys={pub})
        with pytest.raises(ArtifactIntegrityError):
            c.download(c.lookup(KEY), EXPECT)


def test_publish_sends_visibility_and_signature():
    sk, pub = _keypair()
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(201, json=handle_json())

    c, _ = client_for(handler)
    h = c.publish(BLOB, "public", signing_key=sk)
    req = seen[0]
    assert h.key == KEY and req.method == "PUT" and req.content == BLOB
    assert req.headers["x-kvagent-visibility"] == "public"
    assert req.headers["x-kvagent-signature"].startswith(f"ed25519-v3:{pub}:")
    with pytest.raises(ValueError):
        c.publish(BLOB, "everyone")


def ndjson(*lines: object) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def test_generate_stream_parses_tokens():
    seen = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(json.loads(req.content))
        return httpx.Response(
            200, content=ndjson({"token": 5}, {"token": 7}, {"done": True, "finish_reason": "length"})
        )

    c, _ = client_for(handler)
    assert list(c.generate_stream(KEY, [1, 2], GenerationParams(max_new_tokens=2, seed=3))) == [5, 7]
    assert seen[0]["suffix_ids"] == [1, 2] and seen[0]["max_new_tokens"] == 2 and seen[0]["seed"] == 3


@pytest.mark.parametrize(
    ("body", "exc"),
    [
        (ndjson({"token": 5}), RegistryUnavailableError),  # no done line: the stream broke
        (ndjson({"token": "x"}), RegistryProtocolError),
        (b"{garbage\n", RegistryProtocolError),
        (ndjson({"token": 1}, {"token": 2}, {"token": 3}), RegistryProtocolError),  # more than asked for
    ],
)
def test_generate_stream_bad_streams(body, exc):
    c, sleeps = client_for(lambda r: httpx.Response(200, content=body))
    with pytest.raises(exc):
        list(c.generate_stream(KEY, [1], GenerationParams(max_new_tokens=2)))
    assert sleeps == []  # never retried once the stream started


def test_generate_start_retried_but_501_not():
    answers = iter([httpx.Response(503), httpx.Response(200, content=ndjson({"token": 4}, {"done": True}))])
    c, sleeps = client_for(lambda r: next(answers))
    assert list(c.generate_stream(KEY, [1], GenerationParams(max_new_tokens=1))) == [4] and len(sleeps) == 1
    calls = []
    c, sleeps = client_for(lambda r: calls.append(r) or httpx.Response(501, json={"error": "no_model"}))
    with pytest.raises(RegistryError, match="501"):
        list(c.generate_stream(KEY, [1], GenerationParams(max_new_tokens=1)))
    assert len(calls) == 1


def test_closed_port_fails_fast():
    import socket
    import time

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    c = RegistryClient(f"http://127.0.0.1:{port}", sleep=lambda _s: None)
    t0 = time.perf_counter()
    with pytest.raises(RegistryUnavailableError, match="ConnectError"):
        c.lookup(KEY)
    assert time.perf_counter() - t0 < 5
    c.close()
