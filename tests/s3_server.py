"""An S3-API server on loopback for tests: the one CI started (.ci/s3.sh exports KVAGENT_TEST_S3_URL), or a
``moto_server`` process started here. Under CI=true a missing server fails the test instead of skipping it."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ENV = "KVAGENT_TEST_S3_URL"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _moto_binary() -> str | None:
    beside = Path(sys.executable).with_name("moto_server")
    return str(beside) if beside.exists() else shutil.which("moto_server")


@contextmanager
def s3_endpoint(log_dir: Path) -> Iterator[str]:
    """The URL of a running S3-API server (started here if the environment names none)."""
    url = os.environ.get(ENV)
    if url:
        yield url.rstrip("/")
        return
    binary = _moto_binary()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{ENV} is not set and moto_server is missing under CI=true; run .ci/s3.sh")
        pytest.skip(f"{ENV} not set and moto_server not installed (pip install 'moto[server]')")
    port = _free_port()
    with open(log_dir / "moto.log", "ab") as log:
        proc = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto_server did not start: {(log_dir / 'moto.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _aws() -> dict[str, str]:
    """The credentials: a server the environment names comes with its own AWS_* variables (a real store, e.g.
    Ceph RGW or MinIO); moto_server takes any, so the fixed test ones otherwise."""
    if os.environ.get(ENV):
        return {k: os.environ.get(k) or v for k, v in AWS_ENV.items()}
    return dict(AWS_ENV)


def aws_settings(url: str) -> dict[str, str]:
    """The AWS_* variables (endpoint and credentials) a process needs to use the S3 server at ``url``."""
    return {**_aws(), "AWS_ENDPOINT_URL": url}


@contextmanager
def aws_env(url: str) -> Iterator[None]:
    """The AWS_* variables (endpoint and credentials) set for this process and the servers it starts."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in aws_settings(url).items():
            mp.setenv(k, v)
        yield


def new_bucket(url: str) -> str:
    """A fresh, empty bucket on the server (a signed CreateBucket, as a real object store requires)."""
    import boto3
    from botocore.config import Config

    aws = _aws()
    name = f"kvtest-{secrets.token_hex(6)}"
    s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"], region_name=aws["AWS_REGION"],
                      config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))
    s3.create_bucket(Bucket=name)
    return name


def list_objects(url: str, bucket: str) -> list[str]:
    """Every object key in ``bucket`` (uses the AWS_* variables of ``aws_env``)."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(bucket, endpoint=url, client_options={"allow_http": True}, **_creds())
    return [m["path"] for batch in obstore.list(store) for m in batch]


def _creds() -> dict[str, str]:
    aws = _aws()
    return {"access_key_id": aws["AWS_ACCESS_KEY_ID"], "secret_access_key": aws["AWS_SECRET_ACCESS_KEY"],
            "region": aws["AWS_REGION"]}
