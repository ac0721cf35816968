"""Blob backends (local directory and S3 through a real moto_server on loopback): the BlobStore contract,
crash cleanup with a grace period, presigned downloads that bypass the app, and kill -9 mid-upload."""

from __future__ import annotations

import calendar
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from _kvfixtures import make_artifact, make_kv
from registry_server import published_blobs, start_server, upload_temp_files
from s3_server import aws_env, list_objects, new_bucket, s3_endpoint

from kvagent.artifacts import format as art
from kvagent.client.registry import RegistryClient
from kvagent.server.blobs import BlobStore, LocalBlobs, S3Blobs, open_blobs

pytestmark = pytest.mark.slow  # starts moto_server and registry processes

TOKENS = {"alice-token-0001": {"principal": "alice", "publish": True},
          "bob-token-000002": {"principal": "bob", "publish": False}}
BOB = {"Authorization": "Bearer bob-token-000002"}
EXPIRY = 120


@pytest.fixture(scope="module")
def s3_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with s3_endpoint(tmp_path_factory.mktemp("moto")) as url, aws_env(url):
        yield url


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str | None]:
    """(kind, --blobs value): None for the default local directory, s3://<fresh bucket>/<prefix> for S3."""
    if request.param == "local":
        return "local", None
    url = request.getfixturevalue("s3_url")
    return "s3", f"s3://{new_bucket(url)}/kv"


def stored(kind: str, spec: str | None, data_dir: Path) -> list[str]:
    """Every published blob of the backend (what a reader could ever be pointed at)."""
    if kind == "local":
        root = data_dir / "blobs"
        return sorted(p.name for p in root.rglob("*") if p.is_file() and p.parent.name != "tmp")
    assert spec is not None
    return sorted(list_objects(os.environ["AWS_ENDPOINT_URL"], urlparse(spec).netloc))


def small_artifact(seed: int, tokens: int = 40) -> tuple[art.ArtifactHeader, bytes]:
    return make_artifact(make_kv(num_layers=2, heads=2, tokens=tokens, head_dim=8, seed=seed))


# -- the BlobStore contract -------------------------------------------------------------------------
def test_store_contract(backend: tuple[str, str | None], tmp_path: Path) -> None:
    kind, spec = backend
    blobs: BlobStore = open_blobs(spec, tmp_path)
    assert blobs.kind == kind
    header, blob = small_artifact(1)
    tmp = blobs.new_temp()
    tmp.write_bytes(blob)
    name = blobs.publish(tmp, header.key)
    assert name.startswith(header.key + "-")
    tmp2 = blobs.new_temp()
    tmp2.write_bytes(blob)
    assert blobs.publish(tmp2, header.key) != name  # names are never reused
    assert bytes(blobs.read_bytes(name)) == blob
    with blobs.open_read(name) as f:
        assert f.read() == blob
    url = blobs.presign(name, 60)
    if kind == "local":
        assert url is None
    else:
        assert url is not None
        r = httpx.get(url, timeout=10)  # no credentials, no bearer token: the signature is the permission
        assert r.status_code == 200 and r.content == blob
    blobs.remove(name)
    blobs.remove(name)  # removing twice is fine
    with pytest.raises(FileNotFoundError):
        blobs.read_bytes(name)
    with pytest.raises(ValueError):
        blobs.read_bytes("../escape")


def test_cleanup_keeps_referenced_young_and_in_flight(
    backend: tuple[str, str | None], tmp_path: Path
) -> None:
    kind, spec = backend
    blobs = open_blobs(spec, tmp_path)
    names = []
    for seed in (2, 3):
        header, blob = small_artifact(seed)
        tmp = blobs.new_temp()
        tmp.write_bytes(blob)
        names.append(blobs.publish(tmp, header.key))
    keep, orphan = names
    # an upload in flight in another live process, and one whose process died
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp_dir = blobs.new_temp().parent
    in_flight = tmp_dir / f"{live.pid}-aaaa.part"
    crashed = tmp_dir / f"{dead.pid}-bbbb.part"
    in_flight.write_bytes(b"x")
    crashed.write_bytes(b"y")
    try:
        # young orphans survive (another node may be between publish and commit)
        assert blobs.cleanup(lambda: [keep], grace_s=3600) == 1  # only the dead process's temp file
        assert in_flight.exists() and not crashed.exists()
        assert len(stored(kind, spec, tmp_path)) == 2
        assert blobs.cleanup(lambda: [keep], grace_s=-1) == 1  # now the orphan is old enough
        assert stored(kind, spec, tmp_path) == [keep] if kind == "local" else \
            [p.rsplit("/", 1)[-1] for p in stored(kind, spec, tmp_path)] == [keep]
        assert in_flight.exists()
    finally:
        live.kill()
        live.wait()


def test_open_blobs_rejects_unknown_schemes(tmp_path: Path) -> None:
    from kvagent.errors import ConfigError

    with pytest.raises(ConfigError):
        open_blobs("gs://bucket/x", tmp_path)
    with pytest.raises(ConfigError):
        S3Blobs("s3:///nobucket", tmp_path, store=object())
    assert isinstance(open_blobs(None, tmp_path), LocalBlobs)
    assert open_blobs(str(tmp_path / "elsewhere"), tmp_path).kind == "local"


# -- through the server -------------------------------------------------------------------------------
def test_kill9_mid_upload_leaves_nothing_then_download(
    backend: tuple[str, str | None], tmp_path: Path
) -> None:
    kind, spec = backend
    data = tmp_path / "data"
    extra = [
        "--max-artifact-bytes",
        "200000",
        "--presign-expiry",
        str(EXPIRY),
        "--blobs",
        spec or str(data / "blobs"),
    ]
    header, blob = small_artifact(5, tokens=300)
    srv = start_server(data, TOKENS, extra_args=extra)
    try:
        sent = threading.Event()

        def slow() -> Iterator[bytes]:
            for i in range(0, len(blob), 4096):
                yield blob[i : i + 4096]
                if i >= 3 * 4096:
                    sent.set()
                    time.sleep(0.5)

        def upload() -> None:
            try:
                httpx.put(f"{srv.url}/v1/artifacts/{header.key}", content=slow(), timeout=60,
                          headers={"Authorization": "Bearer alice-token-0001"})
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
    srv = start_server(data, TOKENS, extra_args=extra)  # a restart cleans up after the dead process
    try:
        assert upload_temp_files(data) == []
        assert published_blobs(srv) == []
        r = httpx.get(f"{srv.url}/v1/artifacts/{header.key}", headers=BOB, timeout=10)
        assert r.status_code == 404
        check_download(kind, srv.url, header, blob)  # and the full upload now works
        assert len(published_blobs(srv)) == 1
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
    assert "Traceback" not in srv.log(), srv.log()[-3000:]


def check_download(kind: str, url: str, header: art.ArtifactHeader, blob: bytes) -> None:
    """Publish, then download through the app (local) or a presigned object-store URL (S3); each download
    issued is metered once."""
    with RegistryClient(url, "alice-token-0001") as alice:
        h = alice.publish(blob, visibility="public")
    r = httpx.get(f"{url}{h.blob_url}", headers=BOB, timeout=30)
    if kind == "local":
        assert r.status_code == 200 and r.content == blob
    else:
        assert r.status_code == 307 and r.content == b""  # no byte of the blob went through the app
        loc = r.headers["location"]
        assert loc.startswith(os.environ["AWS_ENDPOINT_URL"] + "/")
        q = parse_qs(urlparse(loc).query)
        # short-lived: S3 refuses it EXPIRY s after X-Amz-Date (moto does not enforce expiry, so the test
        # checks what was signed; the client's answer to a refused URL is tested in test_registry_client)
        assert q["X-Amz-Expires"] == [str(EXPIRY)]
        signed_at = calendar.timegm(time.strptime(q["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
        assert abs(signed_at - time.time()) < 60
        # no credentials needed: the signature is the permission
        assert httpx.get(loc, timeout=30).content == blob
    with RegistryClient(url, "bob-token-000002") as bob:
        got = bob.download(bob.lookup(header.key), art.Expectation(key=header.key))  # type: ignore[arg-type]
        assert got.header == header
    ledger = httpx.get(f"{url}/v1/ledger", params={"role": "owner"},
                       headers={"Authorization": "Bearer alice-token-0001"}, timeout=10).json()["entries"]
    assert [(e["principal"], e["mode"], e["bytes"]) for e in ledger] == [("bob", "download", len(blob))] * 2
