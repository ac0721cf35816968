"""The registry server as a real process on loopback: publish, lookup, download, auth, visibility,
validation, crash safety, provider-side generation, ledger, metrics and malformed requests."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from _kvfixtures import make_artifact, make_kv
from registry_server import ServerProcess, download, published_blobs, start_server, upload_temp_files

from kvagent.artifacts import format as art
from kvagent.artifacts import signing
from kvagent.engines.hf import TransformersEngine
from kvagent.engines.params import GenerationParams
from kvagent.kvcache.identity import KeyContext, block_hashes, document_key, sha256_hex
from kvagent.kvcache.tensors import KVCache
from kvagent.models import model_fingerprint

pytestmark = pytest.mark.slow

TOKENS = {
    "alice-token-0001": {"principal": "alice", "publish": True},
    "bob-token-000002": {"principal": "bob", "publish": False},
    "carol-token-0003": {"principal": "carol", "publish": True},
}
ALICE = {"Authorization": "Bearer alice-token-0001"}
BOB = {"Authorization": "Bearer bob-token-000002"}
CAROL = {"Authorization": "Bearer carol-token-0003"}
TOK_FP = sha256_hex(b"server-test-tokenizer")
TEMPLATE = sha256_hex(b"server-test-template")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    d = tmp_path_factory.mktemp("tiny-model")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def local(tiny_dir: Path) -> Any:
    """The same tiny model loaded in the test process, with its engine and key context."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), local_files_only=True).eval()
    engine = TransformersEngine(model)
    ctx = KeyContext(model_fingerprint(model), TOK_FP, art.dtype_name(engine.dtype), template_hash=TEMPLATE)
    return engine, ctx


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("reg") / "data", TOKENS, model=str(tiny_dir),
                       extra_args=["--models-dir", str(tmp_path_factory.mktemp("models"))])
    yield srv
    assert srv.stop() == 0, srv.log()[-2000:]  # SIGTERM shuts down gracefully
    assert "Traceback" not in srv.log(), srv.log()[-4000:]


def doc_artifact(local: Any, n_tokens: int, seed: int) -> tuple[list[int], art.ArtifactHeader, bytes]:
    engine, ctx = local
    ids = torch.randint(0, 512, (n_tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    kv = engine.prefill(ids)
    key = document_key(ctx, ids)
    header, blob = art.encode(
        kv,
        key=key,
        model_fingerprint=ctx.model_fingerprint,
        tokenizer_fingerprint=ctx.tokenizer_fingerprint,
        template_hash=ctx.template_hash,
    )
    return ids, header, blob


def put(srv: ServerProcess, key: str, blob: Any, headers: dict[str, str], visibility: str = "public",
        **extra: str) -> httpx.Response:
    h = {**headers, "X-KVAgent-Visibility": visibility, **extra}
    return httpx.put(f"{srv.url}/v1/artifacts/{key}", content=blob, headers=h, timeout=60)


def get(srv: ServerProcess, path: str, headers: dict[str, str], **kw: Any) -> httpx.Response:
    return httpx.get(srv.url + path, headers=headers, timeout=60, **kw)


def post(srv: ServerProcess, path: str, headers: dict[str, str], **kw: Any) -> httpx.Response:
    return httpx.post(srv.url + path, headers=headers, timeout=60, **kw)


def metric(srv: ServerProcess, name: str, **labels: str) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    lab = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pat = re.escape(name + (f"{{{lab}}}" if lab else "")) + r" ([0-9.e+]+)"
    m = re.search(pat, text)
    return float(m.group(1)) if m else 0.0


def test_publish_lookup_download_round_trip(server: ServerProcess, local: Any) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    _, header, blob = doc_artifact(local, 300, seed=1)
    key = header.key
    sk = Ed25519PrivateKey.generate()
    pub = sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    bad_sig = f"ed25519-v2:{pub}:{sk.sign(b'other').hex()}"
    r = put(server, key, blob, ALICE, **{"X-KVAgent-Signature": bad_sig})
    assert r.status_code == 422, r.text
    assert get(server, f"/v1/artifacts/{key}", ALICE).status_code == 404

    sig = signing.sign(header, sk).header_value()
    r = put(server, key, blob, ALICE, **{"X-KVAgent-Signature": sig})
    assert r.status_code == 201, r.text
    h = r.json()
    assert (h["key"], h["size"], h["owner"], h["visibility"]) == (key, len(blob), "alice", "public")
    assert h["header"] == header.to_json()
    assert h["signature"] == {"alg": "ed25519-v3", "public_key": pub, "signature": sig.split(":")[2]}

    looked_up = get(server, f"/v1/artifacts/{key}", BOB).json()
    assert looked_up == {**h, "price": 0, "currency": "uUSD"}  # a lookup also says what a load costs
    r = download(server, h["blob_url"], BOB)  # S3: through the presigned URL the registry redirects to
    assert r.status_code == 200 and r.content == blob
    assert art.decode(r.content).header == header
    r = download(server, h["blob_url"], {**BOB, "Range": "bytes=100-1099"})
    assert r.status_code == 206 and r.content == blob[100:1100]
    assert r.headers["content-range"] == f"bytes 100-1099/{len(blob)}"
    r = download(server, h["blob_url"], {**BOB, "Range": "bytes=-7"})
    assert r.status_code == 206 and r.content == blob[-7:]
    r = download(server, h["blob_url"], {**BOB, "Range": f"bytes={len(blob)}-"})
    assert r.status_code == 416
    if not server.on_s3:  # the object store words its own refusal
        assert r.headers["content-range"] == f"bytes */{len(blob)}"

    assert put(server, key, blob, ALICE).status_code == 200  # identical re-publish by the owner
    assert put(server, key, blob, CAROL).status_code == 409  # another principal
    assert put(server, key, blob, BOB).status_code == 403  # may not publish at all


def test_prefix_lookup(server: ServerProcess, local: Any) -> None:
    _, ctx = local
    ids, header, blob = doc_artifact(local, 600, seed=2)  # two full 256-token blocks
    assert put(server, header.key, blob, ALICE).status_code == 201
    longer = ids + [5] * 300
    r = post(server, "/v1/lookup/prefix", BOB, json={"block_hashes": block_hashes(ctx, longer, 256)})
    assert r.status_code == 200, r.text
    assert (r.json()["key"], r.json()["blocks"]) == (header.key, 2)
    assert r.json()["handle"]["size"] == len(blob)
    one_block = ids[:256] + [7] * 300  # shares only the first block
    r = post(server, "/v1/lookup/prefix", BOB, json={"block_hashes": block_hashes(ctx, one_block, 256)})
    assert (r.status_code, r.json()["blocks"]) == (200, 1)
    other = KeyContext(sha256_hex(b"another model"), TOK_FP, ctx.dtype, template_hash=TEMPLATE)
    r = post(server, "/v1/lookup/prefix", BOB, json={"block_hashes": block_hashes(other, longer, 256)})
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_auth_and_visibility(server: ServerProcess, local: Any) -> None:
    _, ctx = local
    ids, header, blob = doc_artifact(local, 520, seed=3)
    key = header.key
    assert httpx.get(f"{server.url}/v1/artifacts/{key}", timeout=10).status_code == 401
    r = get(server, f"/v1/artifacts/{key}", {"Authorization": "Bearer wrong-token-123"})
    assert r.status_code == 401 and set(r.json()) == {"error", "detail"}
    assert put(server, key, blob, ALICE, visibility="restricted").status_code == 201

    missing = "f" * 64

    def shape(resp: httpx.Response, k: str) -> tuple[int, str, str]:
        return resp.status_code, resp.json()["error"], resp.json()["detail"].replace(k[:16], "K")

    gen = {"suffix_ids": [1, 2], "max_new_tokens": 2}
    hashes = {"block_hashes": block_hashes(ctx, ids, 256)}
    for who, want in ((BOB, 404), (ALICE, 200)):
        assert get(server, f"/v1/artifacts/{key}", who).status_code == want
        assert download(server, f"/v1/artifacts/{key}/blob", who).status_code == want
        assert post(server, f"/v1/artifacts/{key}/generate", who, json=gen).status_code == want
        assert post(server, "/v1/lookup/prefix", who, json=hashes).status_code == want
    # an invisible artifact and a missing key answer the same
    assert shape(get(server, f"/v1/artifacts/{key}", BOB), key) == shape(
        get(server, f"/v1/artifacts/{missing}", BOB), missing
    )
    assert (
        post(server, f"/v1/artifacts/{key}/entitlements", BOB, json={"principal": "bob"}).status_code == 404
    )
    assert (
        post(server, f"/v1/artifacts/{key}/entitlements", ALICE, json={"principal": "bob"}).status_code == 200
    )
    assert get(server, f"/v1/artifacts/{key}", BOB).status_code == 200
    assert download(server, f"/v1/artifacts/{key}/blob", BOB).content == blob
    assert post(server, f"/v1/artifacts/{key}/generate", BOB, json=gen).status_code == 200
    assert post(server, "/v1/lookup/prefix", BOB, json=hashes).json()["key"] == key
    assert get(server, f"/v1/artifacts/{key}", CAROL).status_code == 404
    # another publisher probing the restricted key with a bogus upload learns what a missing key would tell it
    probe = shape(put(server, key, b"not an artifact", CAROL), key)
    assert probe == shape(put(server, missing, b"not an artifact", CAROL), missing)
    assert 400 <= probe[0] < 500
    # only the owner deletes
    assert httpx.delete(f"{server.url}/v1/artifacts/{key}", headers=BOB).status_code == 403
    assert httpx.delete(f"{server.url}/v1/artifacts/{key}", headers=ALICE).status_code == 204
    assert get(server, f"/v1/artifacts/{key}", ALICE).status_code == 404


def test_invalid_uploads_leave_nothing(server: ServerProcess) -> None:
    kv = make_kv(num_layers=2, heads=2, tokens=40, head_dim=8, seed=11)
    header, blob = make_artifact(kv)
    before = published_blobs(server), upload_temp_files(server.data_dir)
    flipped = bytearray(blob)
    flipped[-3] ^= 0x01
    r = put(server, header.key, bytes(flipped), ALICE)
    assert r.status_code == 422 and r.json()["error"] == "invalid_artifact", r.text
    r = put(server, "a" * 64, blob, ALICE)  # header key differs from the URL key
    assert r.status_code == 422
    assert put(server, header.key, blob[:-10], ALICE).status_code == 422  # truncated
    assert put(server, header.key, b"", ALICE).status_code == 422
    assert get(server, f"/v1/artifacts/{header.key}", ALICE).status_code == 404
    assert (published_blobs(server), upload_temp_files(server.data_dir)) == before


def test_generate_matches_local_full_prefill(server: ServerProcess, local: Any) -> None:
    engine, _ = local
    ids, header, blob = doc_artifact(local, 300, seed=4)
    assert put(server, header.key, blob, ALICE).status_code == 201
    suffix = [17, 99, 3, 250]
    want = engine.generate(None, ids + suffix, GenerationParams(max_new_tokens=12)).token_ids
    r = post(
        server, f"/v1/artifacts/{header.key}/generate", BOB, json={"suffix_ids": suffix, "max_new_tokens": 12}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = [httpx.Response(200, content=x).json() for x in r.content.splitlines()]
    got = [x["token"] for x in lines[:-1]]
    assert got == want
    assert lines[-1] == {"done": True, "finish_reason": "length", "generated": 12}
    # stop token
    r = post(server, f"/v1/artifacts/{header.key}/generate", BOB,
             json={"suffix_ids": suffix, "max_new_tokens": 12, "stop_token_ids": [want[2]]})
    last = httpx.Response(200, content=r.content.splitlines()[-1]).json()
    assert last["finish_reason"] == "stop" and last["generated"] == want.index(want[2]) + 1
    # invalid parameters, ids out of vocabulary, and an artifact of another model
    for bad in ({"suffix_ids": suffix, "temperature": -1}, {"suffix_ids": [10_000]}, {"suffix_ids": []},
                {"suffix_ids": suffix, "max_new_tokens": 0}, {"suffix_ids": suffix, "top_p": 0}):
        r = post(server, f"/v1/artifacts/{header.key}/generate", BOB, json=bad)
        assert r.status_code == 422, (bad, r.text)
    foreign_header, foreign = make_artifact(make_kv(num_layers=2, heads=2, tokens=20, head_dim=16, seed=5))
    assert put(server, foreign_header.key, foreign, ALICE).status_code == 201
    r = post(server, f"/v1/artifacts/{foreign_header.key}/generate", BOB, json={"suffix_ids": suffix})
    assert r.status_code == 409 and r.json()["error"] == "wrong_model"


def _generate_beside(srv: ServerProcess, long: tuple[str, dict[str, str], list[int]],
                     short: tuple[str, dict[str, str], list[int]], n_long: int, n_short: int
                     ) -> tuple[list[int], list[int], float]:
    """Hosted generation of ``short`` (key, caller, suffix) submitted while ``long`` is decoding (its first
    token is out) and answered before it ends (checked): both token lists, and the shared-prefix sequences
    the batch engine counted meanwhile (``kvagent_batch_shared_prefix_size``)."""
    shared0 = metric(srv, "kvagent_batch_shared_prefix_size_sum")
    key, headers, suffix = long
    body = {"suffix_ids": suffix, "max_new_tokens": n_long}
    with httpx.stream("POST", f"{srv.url}/v1/artifacts/{key}/generate", headers=headers, json=body,
                      timeout=300) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got_long = [httpx.Response(200, content=next(lines)).json()["token"]]
        key2, headers2, suffix2 = short
        r2 = post(srv, f"/v1/artifacts/{key2}/generate", headers2,
                  json={"suffix_ids": suffix2, "max_new_tokens": n_short})
        assert r2.status_code == 200, r2.text
        short_done = time.perf_counter()
        rest = [httpx.Response(200, content=x).json() for x in lines if x]
    long_done = time.perf_counter()
    assert rest[-1]["finish_reason"] == "length" and long_done > short_done  # the short one ran inside
    got_long += [x["token"] for x in rest[:-1]]
    got_short = [httpx.Response(200, content=x).json() for x in r2.content.splitlines()]
    shared = metric(srv, "kvagent_batch_shared_prefix_size_sum") - shared0
    return got_long, [x["token"] for x in got_short[:-1]], shared


def test_generate_shares_a_prefix_by_artifact_never_by_token_ids(server: ServerProcess, local: Any) -> None:
    """Issue 34: carol publishes a lookalike of alice's public document (its first 200 ids, then others; K/V
    tampered: another key, publishing checks hashes, not KV) and keeps a long generation running on it; bob's
    generation on the genuine document meanwhile reads only its own artifact's KV (equals a full prefill)
    and the batch engine shares nothing. Two principals on the one genuine artifact do read it together."""
    engine, ctx = local
    ids, header, blob = doc_artifact(local, 300, seed=41)
    assert put(server, header.key, blob, ALICE).status_code == 201
    fake_ids = ids[:200] + [(t * 7 + 3) % 512 for t in range(100)]
    kv = engine.prefill(fake_ids)
    g = torch.Generator().manual_seed(3)
    fake = KVCache(keys=tuple(k * 3 + torch.randn(k.shape, generator=g) for k in kv.keys),
                   values=tuple(-2 * v + torch.randn(v.shape, generator=g) for v in kv.values),
                   token_ids=kv.token_ids)
    fake_header, fake_blob = art.encode(
        fake, key=document_key(ctx, fake_ids), model_fingerprint=ctx.model_fingerprint,
        tokenizer_fingerprint=ctx.tokenizer_fingerprint, template_hash=ctx.template_hash,
    )
    assert put(server, fake_header.key, fake_blob, CAROL).status_code == 201
    s_carol, s_bob, s_alice = [5, 6, 7], [17, 99, 3, 250], [40, 41]
    n_long, n_short = 600, 12
    got_carol, got_bob, shared = _generate_beside(
        server, (fake_header.key, CAROL, s_carol), (header.key, BOB, s_bob), n_long, n_short
    )
    assert got_bob == engine.generate(None, ids + s_bob, GenerationParams(max_new_tokens=n_short)).token_ids
    assert got_carol == engine.generate(fake, s_carol, GenerationParams(max_new_tokens=n_long)).token_ids
    assert shared == 0
    got_alice, got_bob, shared = _generate_beside(
        server, (header.key, ALICE, s_alice), (header.key, BOB, s_bob), n_long, n_short
    )
    assert got_bob == engine.generate(None, ids + s_bob, GenerationParams(max_new_tokens=n_short)).token_ids
    want_alice = engine.generate(None, ids + s_alice, GenerationParams(max_new_tokens=n_long)).token_ids
    assert got_alice == want_alice
    assert shared > 0


def test_ledger_and_metrics(server: ServerProcess, local: Any) -> None:
    _, header, blob = doc_artifact(local, 280, seed=6)
    key = header.key
    assert put(server, key, blob, ALICE).status_code == 201
    served0 = metric(server, "kvagent_bytes_served_total")
    presigned0 = metric(server, "kvagent_presigned_downloads_total")
    presigned_bytes0 = metric(server, "kvagent_presigned_bytes_total")
    hits0 = metric(server, "kvagent_lookups_total", kind="key", result="hit")
    misses0 = metric(server, "kvagent_lookups_total", kind="key", result="miss")
    gens0 = metric(server, "kvagent_generate_total", result="ok")
    assert get(server, f"/v1/artifacts/{key}", CAROL).status_code == 200
    assert get(server, f"/v1/artifacts/{'e' * 64}", CAROL).status_code == 404
    assert download(server, f"/v1/artifacts/{key}/blob", CAROL).content == blob
    ranged = download(server, f"/v1/artifacts/{key}/blob", {**CAROL, "Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.content == blob[:10]
    r = post(server, f"/v1/artifacts/{key}/generate", CAROL, json={"suffix_ids": [1], "max_new_tokens": 3})
    assert r.status_code == 200 and len(r.content.splitlines()) == 4
    time.sleep(0.2)  # the generate ledger row is written as the stream closes
    rows = get(server, f"/v1/ledger?key={key}", ALICE).json()["entries"]
    got = sorted((e["principal"], e["mode"], e["bytes"], e["tokens"]) for e in rows)
    presigned = server.on_s3  # S3: a download is metered whole when its URL is issued
    assert got == sorted(
        [
            ("carol", "download", len(blob), 0),
            ("carol", "download", len(blob) if presigned else 10, 0),
            ("carol", "generate", len(blob), 3),
        ]
    )
    assert get(server, f"/v1/ledger?key={key}", CAROL).json()["entries"] == []  # carol owns nothing
    assert len(get(server, f"/v1/ledger?role=consumer&key={key}", CAROL).json()["entries"]) == 3
    if presigned:  # no byte went through the app
        assert metric(server, "kvagent_bytes_served_total") - served0 == 0
        assert metric(server, "kvagent_presigned_downloads_total") - presigned0 == 2
        assert metric(server, "kvagent_presigned_bytes_total") - presigned_bytes0 == 2 * len(blob)
    else:
        assert metric(server, "kvagent_bytes_served_total") - served0 == len(blob) + 10
        assert metric(server, "kvagent_presigned_downloads_total") - presigned0 == 0
    assert metric(server, "kvagent_lookups_total", kind="key", result="hit") - hits0 == 1
    assert metric(server, "kvagent_lookups_total", kind="key", result="miss") - misses0 == 1
    assert metric(server, "kvagent_generate_total", result="ok") - gens0 == 1
    assert metric(server, "kvagent_request_seconds_count", method="GET", route="/v1/artifacts/{key}") >= 2
    assert '"principal":"carol"' in server.log()  # structured access log


def test_malformed_requests_never_500(server: ServerProcess) -> None:
    cases = [
        post(server, "/v1/lookup/prefix", ALICE, content=b"{not json"),
        post(server, "/v1/lookup/prefix", ALICE, json={"block_hashes": "abc"}),
        post(server, "/v1/lookup/prefix", ALICE, json={"block_hashes": [1, 2]}),
        post(server, "/v1/lookup/prefix", ALICE, json={"block_hashes": ["a" * 64] * 5000}),
        post(server, "/v1/lookup/prefix", ALICE, json={"block_hashes": ["zz"]}),
        post(server, "/v1/lookup/prefix", ALICE, json=[1, 2, 3]),
        post(server, "/v1/lookup/prefix", ALICE, content=b"[" * 100_000),
        post(server, "/v1/lookup/prefix", ALICE, content=b"x" * (2 << 20)),
        get(server, "/v1/artifacts/NOT-A-KEY", ALICE),
        post(server, f"/v1/artifacts/{'a' * 64}/generate", ALICE, json={"suffix_ids": "1,2"}),
        post(server, f"/v1/artifacts/{'a' * 64}/entitlements", ALICE, json={"principal": 5}),
        put(server, "b" * 64, b"abc", ALICE, visibility="everyone"),
        put(server, "b" * 64, b"abc", ALICE, **{"X-KVAgent-Signature": "rsa:1:2"}),
        get(server, "/v1/ledger?limit=abc", ALICE),
        get(server, "/v1/nothing-here", ALICE),
    ]
    for r in cases:
        assert 400 <= r.status_code < 500, (r.request.url, r.status_code, r.text)
        assert set(r.json()) == {"error", "detail"}, r.text
    assert cases[3].status_code == 422 and cases[7].status_code == 413


def test_oversize_and_kill9_during_upload(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data, TOKENS, extra_args=["--max-artifact-bytes", "100000"])
    try:
        big_header, big = make_artifact(make_kv(num_layers=2, heads=2, tokens=2000, head_dim=8, seed=8))
        assert len(big) > 100_000
        r = put(srv, big_header.key, big, ALICE)
        assert r.status_code == 413 and r.json()["error"] == "too_large"

        def chunked() -> Iterator[bytes]:  # no Content-Length: the limit applies while streaming
            for i in range(0, len(big), 8192):
                yield big[i : i + 8192]

        assert put(srv, big_header.key, chunked(), ALICE).status_code == 413
        header, blob = make_artifact(make_kv(num_layers=2, heads=2, tokens=300, head_dim=8, seed=9))
        assert len(blob) < 100_000
        sent = threading.Event()

        def slow() -> Iterator[bytes]:
            for i in range(0, len(blob), 4096):
                yield blob[i : i + 4096]
                if i >= 3 * 4096:
                    sent.set()
                    time.sleep(0.5)

        def upload() -> None:
            try:
                put(srv, header.key, slow(), ALICE)
            except httpx.HTTPError:
                pass  # the server dies mid-upload

        t = threading.Thread(target=upload, daemon=True)
        t.start()
        assert sent.wait(30)
        deadline = time.monotonic() + 10
        while not upload_temp_files(data) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert upload_temp_files(data), "the upload should be streaming into a temp file"
        srv.kill9()
        t.join(30)
    finally:
        srv.stop()
    srv = start_server(data, TOKENS, extra_args=["--max-artifact-bytes", "100000"])
    try:
        assert upload_temp_files(data) == []
        assert published_blobs(srv) == []
        assert get(srv, f"/v1/artifacts/{header.key}", ALICE).status_code == 404
        assert put(srv, header.key, blob, ALICE).status_code == 201  # and the full upload now works
        assert download(srv, f"/v1/artifacts/{header.key}/blob", ALICE).content == blob
    finally:
        assert srv.stop() == 0
