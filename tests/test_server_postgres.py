"""Metadata-backend contract tests, run on SQLite and on PostgreSQL, plus one end-to-end publish/lookup
through the server on PostgreSQL.

PostgreSQL tests need KVAGENT_TEST_POSTGRES_DSN (``.ci/postgres.sh`` starts a throwaway cluster and
writes it to ``.ci/postgres.env``). Without it they skip, except under ``CI=true`` where they fail, so
CI cannot silently skip them.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from _kvfixtures import MODEL_FP, TEMPLATE_HASH, TOKENIZER_FP, make_artifact, make_kv

from kvagent.kvcache.identity import KeyContext, block_hashes, sha256_hex
from kvagent.server.meta import ArtifactRow, LedgerEntry, MetaStore, PostgresMeta, SQLiteMeta, can_see

ENV = "KVAGENT_TEST_POSTGRES_DSN"


def _postgres_dsn() -> str:
    dsn = os.environ.get(ENV)
    if not dsn:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{ENV} is not set under CI=true; run .ci/postgres.sh and source .ci/postgres.env")
        pytest.skip(f"{ENV} not set (run .ci/postgres.sh and source .ci/postgres.env)")
    return dsn


@contextmanager
def fresh_schema(prefix: str = "kvtest") -> Iterator[str]:
    """A DSN whose search_path is a fresh schema of the test PostgreSQL, dropped afterwards."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    dsn = _postgres_dsn()
    schema = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield make_conninfo(dsn, options=f"-c search_path={schema}")
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture()
def pg_schema_dsn() -> Iterator[str]:
    """A DSN on a fresh schema (tests never see each other's rows)."""
    with fresh_schema() as dsn:
        yield dsn


@pytest.fixture(params=["sqlite", "postgres"])
def meta(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MetaStore]:
    store: MetaStore
    if request.param == "sqlite":
        store = SQLiteMeta(tmp_path / "meta.sqlite3")
    else:
        store = PostgresMeta(request.getfixturevalue("pg_schema_dsn"))
    yield store
    store.close()


def row(n: int, owner: str = "alice", visibility: str = "public") -> ArtifactRow:
    key = sha256_hex(b"key", bytes([n]))
    return ArtifactRow(key, owner, visibility, 1000 + n, sha256_hex(b"payload", bytes([n])),
                       json.dumps({"n": n}), None, f"{key}-blob{n}", 1_700_000_000.0 + n)


def chain(tag: bytes, n: int) -> list[str]:
    return [sha256_hex(tag, i.to_bytes(4, "little")) for i in range(n)]


def test_insert_get_conflict_delete(meta: MetaStore) -> None:
    r = row(1)
    assert meta.get(r.key) is None
    assert meta.insert(r, chain(b"a", 3)) is None
    assert meta.get(r.key) == r
    other = ArtifactRow(**{**r.__dict__, "owner": "carol", "blob": "x"})
    assert meta.insert(other, chain(b"z", 2)) == r  # key taken: the existing row comes back, nothing changes
    assert meta.get(r.key) == r
    assert meta.longest_prefix(chain(b"z", 2), "carol") is None
    assert meta.blob_names() == [r.blob]
    meta.grant(r.key, "bob")
    assert meta.delete(r.key) == r
    assert meta.get(r.key) is None and meta.delete(r.key) is None
    assert not meta.is_entitled(r.key, "bob")
    assert meta.longest_prefix(chain(b"a", 3), "alice") is None
    assert meta.blob_names() == []


def test_visibility_and_entitlements(meta: MetaStore) -> None:
    pub, res = row(1, visibility="public"), row(2, visibility="restricted")
    meta.insert(pub, [])
    meta.insert(res, [])
    assert can_see(meta, pub, "anyone")
    assert can_see(meta, res, "alice") and not can_see(meta, res, "bob")
    meta.grant(res.key, "bob")
    meta.grant(res.key, "bob")  # idempotent
    assert can_see(meta, res, "bob") and not can_see(meta, res, "carol")


def test_longest_prefix_respects_position_and_visibility(meta: MetaStore) -> None:
    full = chain(b"doc", 6)
    short, long_restricted = row(1), row(2, visibility="restricted")
    meta.insert(short, full[:2])
    meta.insert(long_restricted, full[:5])
    assert meta.longest_prefix(full, "bob") == (short.key, 2)
    assert meta.longest_prefix(full, "alice") == (long_restricted.key, 5)  # the owner sees it
    meta.grant(long_restricted.key, "bob")
    assert meta.longest_prefix(full, "bob") == (long_restricted.key, 5)
    assert meta.longest_prefix(full[:3], "bob") == (long_restricted.key, 3)
    # a hash at the wrong position is not a prefix match
    assert meta.longest_prefix([full[1], sha256_hex(b"other")], "bob") is None
    assert meta.longest_prefix([], "bob") is None
    many = chain(b"noise", 4095) + [full[0]]
    assert meta.longest_prefix(many, "bob") is None  # 4096 hashes are accepted; full[0] is at index 4095


def test_ledger_roles_filters_and_order(meta: MetaStore) -> None:
    a, c = row(1, owner="alice"), row(2, owner="carol")
    meta.insert(a, [])
    meta.insert(c, [])
    meta.record(LedgerEntry("bob", a.key, "alice", 10, "download", 0, 1.0))
    meta.record(LedgerEntry("bob", c.key, "carol", 20, "generate", 5, 2.0))
    meta.record(LedgerEntry("carol", a.key, "alice", 30, "download", 0, 3.0))
    assert [e.bytes for e in meta.ledger("alice")] == [30, 10]  # newest first
    assert [e.bytes for e in meta.ledger("carol")] == [20]
    assert [e.bytes for e in meta.ledger("bob", role="consumer")] == [20, 10]
    assert [e.bytes for e in meta.ledger("alice", key=a.key, limit=1)] == [30]
    assert meta.ledger("bob") == []
    assert meta.ledger("bob", role="consumer")[0] == LedgerEntry(
        "bob", c.key, "carol", 20, "generate", 5, 2.0
    )


def test_reopen_keeps_rows(tmp_path: Path) -> None:
    db = tmp_path / "meta.sqlite3"
    s = SQLiteMeta(db)
    s.insert(row(3), chain(b"q", 1))
    s.close()
    s = SQLiteMeta(db)
    assert s.get(row(3).key) == row(3) and s.longest_prefix(chain(b"q", 1), "x") == (row(3).key, 1)
    s.close()


@pytest.mark.slow
def test_server_end_to_end_on_postgres(pg_schema_dsn: str, tmp_path: Path) -> None:
    from registry_server import download, start_server

    tokens = {"alice-token-0001": {"principal": "alice", "publish": True}}
    auth = {"Authorization": "Bearer alice-token-0001"}
    srv = start_server(tmp_path / "data", tokens, extra_args=["--postgres-dsn", pg_schema_dsn])
    try:
        kv = make_kv(num_layers=2, heads=1, tokens=300, head_dim=4, seed=21)
        header, blob = make_artifact(kv)
        r = httpx.put(f"{srv.url}/v1/artifacts/{header.key}", content=blob, headers=auth, timeout=30)
        assert r.status_code == 201, r.text
        assert httpx.get(f"{srv.url}/v1/artifacts/{header.key}", headers=auth).json()["size"] == len(blob)
        ctx = KeyContext(MODEL_FP, TOKENIZER_FP, "float32", template_hash=TEMPLATE_HASH)
        hashes = block_hashes(ctx, kv.token_ids.numpy(), 256)
        r = httpx.post(f"{srv.url}/v1/lookup/prefix", json={"block_hashes": hashes}, headers=auth)
        assert (r.status_code, r.json()["key"], r.json()["blocks"]) == (200, header.key, 1)
        assert download(srv, f"/v1/artifacts/{header.key}/blob", auth).content == blob
        assert (tmp_path / "data" / "meta.sqlite3").exists() is False  # metadata went to PostgreSQL
    finally:
        assert srv.stop() == 0
