"""RegistryClient across several registry nodes and presigned downloads, on an in-memory transport:
failover on refused connections and on 5xx, redirects followed without the bearer token, a refused
(expired) presigned URL answered by asking the registry again, and still every byte checked."""

from __future__ import annotations

import httpx
import pytest

from kvagent.artifacts import format as art
from kvagent.client.registry import RegistryClient, parse_handle
from kvagent.errors import ArtifactIntegrityError, RegistryProtocolError
from tests._kvfixtures import make_artifact, make_kv

HEADER, BLOB = make_artifact(make_kv(num_layers=2, heads=2, tokens=24, head_dim=8, seed=3))
HANDLE = {"key": HEADER.key, "header": HEADER.to_json(), "size": len(BLOB), "visibility": "public",
          "owner": "alice", "blob_url": f"/v1/artifacts/{HEADER.key}/blob", "signature": None}
STORE = "http://objects.test:9000/bucket/kv/blobs/x?X-Amz-Expires=300&X-Amz-Signature=ab"


def client(handler: object, urls: object, **kw: object) -> RegistryClient:
    http = httpx.Client(transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
    return RegistryClient(urls, "secret-token-1", client=http, sleep=lambda s: None, **kw)  # type: ignore[arg-type]


def test_node_urls_from_list_or_comma_string() -> None:
    seen: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(str(req.url.host))
        return httpx.Response(200, json=HANDLE)

    for urls in (["http://a.test:1/", "http://b.test:2"], " http://a.test:1 , http://b.test:2/ "):
        c = client(handler, urls)
        assert c.base_urls == ["http://a.test:1", "http://b.test:2"] and c.base_url == "http://a.test:1"
        assert c.lookup(HEADER.key) is not None
    assert seen == ["a.test", "a.test"]
    with pytest.raises(ValueError):
        RegistryClient(" , ")


def test_refused_node_fails_over_at_once_and_stays_on_the_live_one() -> None:
    seen: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(str(req.url.host))
        if req.url.host == "dead.test":
            raise httpx.ConnectError("connection refused", request=req)
        return httpx.Response(200, json=HANDLE)

    c = client(handler, "http://dead.test:1,http://live.test:2")
    assert c.lookup(HEADER.key) is not None
    assert c.lookup(HEADER.key) is not None
    assert seen == ["dead.test", "live.test", "live.test"]


def test_5xx_is_retried_on_the_next_node() -> None:
    seen: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(str(req.url.host))
        if req.url.host == "sick.test":
            return httpx.Response(503, json={"error": "unavailable", "detail": "db down"})
        return httpx.Response(200, json=HANDLE)

    c = client(handler, ["http://sick.test", "http://ok.test"])
    assert c.lookup(HEADER.key) is not None
    assert seen == ["sick.test", "ok.test"]


def test_presigned_redirect_drops_the_token_and_checks_the_bytes() -> None:
    seen: list[tuple[str, str | None]] = []
    body = {"blob": BLOB}

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append((str(req.url.host), req.headers.get("authorization")))
        if req.url.host == "objects.test":
            return httpx.Response(200, content=body["blob"])
        return httpx.Response(307, headers={"Location": STORE, "X-KVAgent-Receipt": "r-1"})

    c = client(handler, "http://reg.test")
    h = parse_handle(HANDLE, key=HEADER.key)
    got = c.download_verified(h, art.Expectation(key=HEADER.key))
    assert got.artifact.header == HEADER and got.receipt == "r-1"
    assert seen == [("reg.test", "Bearer secret-token-1"), ("objects.test", None)]
    tampered = bytearray(BLOB)
    tampered[-5] ^= 1
    body["blob"] = bytes(tampered)
    with pytest.raises(ArtifactIntegrityError):  # the object store is trusted no more than the registry
        c.download(h, art.Expectation(key=HEADER.key))
    body["blob"] = BLOB + b"x"
    with pytest.raises(ArtifactIntegrityError):
        c.download_blob(h)


def test_expired_presigned_url_is_asked_for_again() -> None:
    issued: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.host == "objects.test":
            if req.url.params["n"] == "1":  # S3 refuses a URL past X-Amz-Expires with 403
                return httpx.Response(
                    403, content=b"<Error><Code>AccessDenied</Code>Request has expired</Error>"
                )
            return httpx.Response(200, content=BLOB)
        issued.append(f"{STORE}&n={len(issued) + 1}")
        return httpx.Response(307, headers={"Location": issued[-1]})

    c = client(handler, "http://reg.test")
    assert bytes(c.download_blob(parse_handle(HANDLE, key=HEADER.key)).data) == BLOB
    assert len(issued) == 2


def test_redirect_to_a_non_http_location_is_refused() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(307, headers={"Location": "file:///etc/passwd"})

    with pytest.raises(RegistryProtocolError):
        client(handler, "http://reg.test").download_blob(parse_handle(HANDLE, key=HEADER.key))
