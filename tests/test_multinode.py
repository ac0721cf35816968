"""Stateless nodes: two registry processes (one of them running 2 workers) share one PostgreSQL database and
one S3 bucket (moto_server on loopback). Agent A publishes through node 1, agent B reads and generates
through node 2; node 2 is killed with kill -9 and B fails over to node 1 with the same answers.

Needs KVAGENT_TEST_POSTGRES_DSN (.ci/postgres.sh); skips without it, except under CI=true where it fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from registry_server import ServerProcess, start_server
from s3_server import aws_env, list_objects, new_bucket, s3_endpoint

from kvagent import KVAgent
from kvagent.costs.policy import PolicyParams
from tests.conftest import save_tiny_llama
from tests.test_server_postgres import fresh_schema

pytestmark = pytest.mark.slow

TOKENS = {
    "alice-token-0001": {"principal": "alice", "publish": True},
    "bob-token-000002": {"principal": "bob", "publish": False},
}
SUFFIX = [11, 22, 33, 44]


@pytest.fixture(scope="module")
def pg_dsn() -> Iterator[str]:
    """A DSN on a fresh schema of the test PostgreSQL, dropped afterwards."""
    with fresh_schema("kvnodes") as dsn:
        yield dsn


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=99)


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory, pg_dsn: str, model_dir: Path
) -> Iterator[tuple[Any, ...]]:
    with s3_endpoint(tmp_path_factory.mktemp("moto")) as url, aws_env(url):
        bucket = new_bucket(url)
        shared = ["--postgres-dsn", pg_dsn, "--blobs", f"s3://{bucket}/kv",
                  "--models-dir", str(tmp_path_factory.mktemp("models"))]
        base = tmp_path_factory.mktemp("nodes")
        one = start_server(base / "one", TOKENS, model=str(model_dir), extra_args=[*shared, "--workers", "2"])
        try:
            two = start_server(base / "two", TOKENS, model=str(model_dir), extra_args=shared)
        except BaseException:
            one.kill9()
            raise
        try:
            yield one, two, url, bucket
        finally:
            for n in (two, one):
                n.stop()
            for n in (one, two):
                assert "Traceback" not in n.log(), n.log()[-3000:]


def agent(model_dir: Path, cache: Path, **kw: Any) -> KVAgent:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    return KVAgent(
        model, cache_dir=cache, policy=PolicyParams(min_tokens=256, prefill_tokens_per_s=50.0), **kw
    )


def test_publish_on_one_read_on_two_then_fail_over(
    nodes: tuple[Any, ...], model_dir: Path, tmp_path: Path
) -> None:
    one, two, s3_url, bucket = nodes
    one_: ServerProcess = one
    two_: ServerProcess = two
    ids = torch.randint(0, 512, (600,), generator=torch.Generator().manual_seed(5)).tolist()

    a = agent(model_dir, tmp_path / "a", registry_url=one_.url, token="alice-token-0001", publish="public")
    doc_a = a.read_ids(ids)
    assert doc_a.cache.status == "prefill" and "published (public)" in doc_a.cache.reason
    assert len(list_objects(s3_url, bucket)) == 1  # the blob is in the shared bucket, not on node 1
    full = a.generate_full(ids + SUFFIX, max_new_tokens=12, stop_token_ids=()).token_ids

    urls = f"{two_.url},{one_.url}"  # B prefers node 2
    b = agent(model_dir, tmp_path / "b", registry_url=urls, token="bob-token-000002")
    doc_b = b.read_ids(ids)
    assert doc_b.key == doc_a.key and doc_b.cache.status == "remote", doc_b.cache.reason
    assert b.ask_ids(doc_b, SUFFIX, mode="local", max_new_tokens=12, stop_token_ids=()).token_ids == full
    remote = b.ask_ids(doc_b, SUFFIX, mode="remote", max_new_tokens=12, stop_token_ids=())
    assert remote.cache.status == "remote-generate" and remote.token_ids == full  # node 2 reads the bucket
    # node 1 sees what node 2 recorded: the ledger lives in the shared database
    entries = httpx.get(f"{one_.url}/v1/ledger", headers={"Authorization": "Bearer alice-token-0001"},
                        timeout=10).json()["entries"]
    assert ("bob", "download") in {(e["principal"], e["mode"]) for e in entries}

    two_.kill9()
    c = agent(model_dir, tmp_path / "c", registry_url=urls, token="bob-token-000002")  # empty cache
    doc_c = c.read_ids(ids)
    assert doc_c.cache.status == "remote", doc_c.cache.reason  # served by node 1
    remote = c.ask_ids(doc_c, SUFFIX, mode="remote", max_new_tokens=12, stop_token_ids=())
    assert remote.token_ids == full
    for x in (a, b, c):
        x.close()
