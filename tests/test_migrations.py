"""Schema migrations (kvagent.server.schema, kvagent/server/migrations) on SQLite and PostgreSQL.

A database made by the DDL kvagent ran before it had migrations (copied below, as the modules ran it) and
holding a row in every table is upgraded in place with every row kept; a database written by a newer
kvagent is refused; ``kvagent db current`` names the version; four real ``kvagent serve`` processes started
together on an emptied PostgreSQL all come up, five rounds in a row.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvagent import cli
from kvagent.errors import SchemaVersionError
from kvagent.server import schema
from kvagent.server.meta import PostgresMeta, SQLiteMeta, open_meta
from tests.test_server_postgres import fresh_schema

REPO = Path(__file__).resolve().parents[1]

# -- the schema as it stood before migrations: the statements meta.py, records.py, quotas.py and ledger.py ran
# at start (commit e1c43f2), verbatim; "{serial}" was INTEGER PRIMARY KEY AUTOINCREMENT / BIGSERIAL PRIMARY
# KEY
LEGACY_DDL = [
    """CREATE TABLE IF NOT EXISTS artifacts (
        key TEXT PRIMARY KEY, owner TEXT NOT NULL, visibility TEXT NOT NULL, size BIGINT NOT NULL,
        payload_sha256 TEXT NOT NULL, header TEXT NOT NULL, signature TEXT, blob TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS blocks (
        hash TEXT NOT NULL, key TEXT NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY (hash, key))""",
    "CREATE INDEX IF NOT EXISTS blocks_key ON blocks (key)",
    """CREATE TABLE IF NOT EXISTS entitlements (
        key TEXT NOT NULL, principal TEXT NOT NULL, PRIMARY KEY (key, principal))""",
    """CREATE TABLE IF NOT EXISTS ledger (
        id {serial}, ts DOUBLE PRECISION NOT NULL, principal TEXT NOT NULL, key TEXT NOT NULL,
        owner TEXT NOT NULL, bytes BIGINT NOT NULL, mode TEXT NOT NULL, tokens INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS ledger_owner ON ledger (owner, ts)",
    "CREATE INDEX IF NOT EXISTS ledger_principal ON ledger (principal, ts)",
    """CREATE TABLE IF NOT EXISTS owner_copies (
        key TEXT NOT NULL, owner TEXT NOT NULL, visibility TEXT NOT NULL, size BIGINT NOT NULL,
        payload_sha256 TEXT NOT NULL, header TEXT NOT NULL, signature TEXT, blob TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (key, owner))""",
    """CREATE TABLE IF NOT EXISTS owner_copy_blocks (
        hash TEXT NOT NULL, key TEXT NOT NULL, owner TEXT NOT NULL, idx INTEGER NOT NULL,
        PRIMARY KEY (hash, key, owner))""",
    """CREATE TABLE IF NOT EXISTS owner_copy_grants (
        key TEXT NOT NULL, owner TEXT NOT NULL, principal TEXT NOT NULL, PRIMARY KEY (key, owner,
        principal))""",
    """CREATE TABLE IF NOT EXISTS quota_rate (
        principal TEXT NOT NULL, win BIGINT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (principal, win))""",
    """CREATE TABLE IF NOT EXISTS quota_upload (
        principal TEXT NOT NULL, day BIGINT NOT NULL, bytes BIGINT NOT NULL, PRIMARY KEY (principal, day))""",
    """CREATE TABLE IF NOT EXISTS quota_leases (
        id TEXT PRIMARY KEY, principal TEXT NOT NULL, kind TEXT NOT NULL, expires DOUBLE PRECISION NOT
        NULL)""",
    "CREATE INDEX IF NOT EXISTS quota_leases_principal ON quota_leases (principal, kind)",
    "CREATE TABLE IF NOT EXISTS quota_locks (principal TEXT PRIMARY KEY, touched DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS market_accounts (principal TEXT PRIMARY KEY, balance BIGINT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS market_transactions (
        id {serial}, receipt TEXT NOT NULL UNIQUE, ts DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL,
        buyer TEXT, key TEXT, publisher TEXT, amount BIGINT NOT NULL, ref BIGINT, memo TEXT)""",
    "CREATE INDEX IF NOT EXISTS market_transactions_ref ON market_transactions (ref)",
    """CREATE TABLE IF NOT EXISTS market_postings (
        txn BIGINT NOT NULL, account TEXT NOT NULL, amount BIGINT NOT NULL, PRIMARY KEY (txn, account))""",
    "CREATE INDEX IF NOT EXISTS market_postings_account ON market_postings (account, txn)",
    """CREATE TABLE IF NOT EXISTS market_idempotency (
        principal TEXT NOT NULL, idem_key TEXT NOT NULL, key TEXT NOT NULL, txn BIGINT,
        created_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (principal, idem_key))""",
    """CREATE TABLE IF NOT EXISTS market_prices (
        key TEXT NOT NULL, owner TEXT NOT NULL, price BIGINT NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (key, owner))""",
    """CREATE TABLE IF NOT EXISTS market_disputes (
        id {serial}, ts DOUBLE PRECISION NOT NULL, receipt TEXT NOT NULL, buyer TEXT NOT NULL, key TEXT NOT
        NULL,
        evidence TEXT NOT NULL, status TEXT NOT NULL, outcome TEXT, refund_receipt TEXT)""",
    """CREATE TABLE IF NOT EXISTS market_quarantine (
        key TEXT NOT NULL, owner TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, dispute BIGINT, reason TEXT
        NOT NULL,
        visibility TEXT NOT NULL, entitlements TEXT NOT NULL, PRIMARY KEY (key, owner))""",
]
SERIAL = {"sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT", "postgres": "BIGSERIAL PRIMARY KEY"}
K = "ab" * 32
# one row for every table of the legacy schema (values of the right types; ids of serial columns explicit)
ROWS: dict[str, list[tuple[Any, ...]]] = {
    "artifacts": [(K, "alice", "restricted", 1234, "cd" * 32, '{"v":1}', None, "ab/" + K, 1700000000.5)],
    "blocks": [("ef" * 32, K, 0), ("01" * 32, K, 1)],
    "entitlements": [(K, "bob")],
    "ledger": [(1, 1700000001.0, "bob", K, "alice", 1234, "download", 0)],
    "owner_copies": [(K, "carol", "public", 99, "dd" * 32, '{"v":2}', '{"sig":1}', "cc/" + K, 1700000002.0)],
    "owner_copy_blocks": [("ef" * 32, K, "carol", 0)],
    "owner_copy_grants": [(K, "carol", "dave")],
    "quota_rate": [("bob", 1700000003, 4)],
    "quota_upload": [("alice", 19675, 5000)],
    "quota_leases": [("lease1", "bob", "generate", 1700000600.0)],
    "quota_locks": [("bob", 1700000004.0)],
    "market_accounts": [("bob", 900), ("alice", 90), ("#host", 10), ("#mint", -1000)],
    "market_transactions": [
        (1, "rcpt_1", 1700000005.0, "credit", "bob", None, None, 1000, None, "seed"),
        (2, "rcpt_2", 1700000006.0, "sale", "bob", K, "alice", 100, None, ""),
    ],
    "market_postings": [
        (1, "#mint", -1000),
        (1, "bob", 1000),
        (2, "bob", -100),
        (2, "alice", 90),
        (2, "#host", 10),
    ],
    "market_idempotency": [("bob", "idem-1", "sale:" + K, 2, 1700000006.0)],
    "market_prices": [(K, "alice", 100, 1700000000.0)],
    "market_disputes": [(1, 1700000007.0, "rcpt_2", "bob", K, '{"why":"x"}', "open", None, None)],
    "market_quarantine": [(K, "carol", 1700000008.0, 1, "bad", "public", "[]")],
}


@contextmanager
def _sqlite_cursor(path: Path) -> Iterator[Any]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn.cursor()
    finally:
        conn.close()


@contextmanager
def _pg_cursor(dsn: str) -> Iterator[Any]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        yield cur


def build_legacy(cur: Any, backend: str) -> None:
    """The pre-migration schema, made by its own DDL, with every row of ROWS."""
    ph = "?" if backend == "sqlite" else "%s"
    for stmt in LEGACY_DDL:
        cur.execute(stmt.replace("{serial}", SERIAL[backend]))
    for table, rows in ROWS.items():
        for r in rows:
            cur.execute(f"INSERT INTO {table} VALUES ({','.join([ph] * len(r))})", r)
    # as if the sequences had numbered these rows (SQLite's AUTOINCREMENT follows itself)
    if backend == "postgres":
        for table in ("ledger", "market_transactions", "market_disputes"):
            cur.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT MAX(id) FROM {table}))"
            )


def dump_rows(cur: Any) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    for table in ROWS:
        cur.execute(f"SELECT * FROM {table}")
        out[table] = sorted(tuple(r) for r in cur.fetchall())
    return out


def shape(db: schema.Database) -> dict[str, Any]:
    """Tables -> (columns with types and nullability, primary key, unique sets, indexes): what a schema is."""
    import sqlalchemy as sa

    engine = schema._engine(db)
    try:
        insp = sa.inspect(engine)
        out = {}
        for t in sorted(insp.get_table_names()):
            cols = [(c["name"], str(c["type"]).upper(), c["nullable"]) for c in insp.get_columns(t)]
            pk = tuple(insp.get_pk_constraint(t)["constrained_columns"])
            uniq = sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(t))
            idx = sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in insp.get_indexes(t)
            )
            out[t] = (cols, pk, uniq, idx)
        return out
    finally:
        engine.dispose()


@contextmanager
def _fresh_database(name: str, tmp_path: Path) -> Iterator[schema.Database]:
    if name == "sqlite":
        yield schema.Database(sqlite_path=tmp_path / "fresh" / "meta.sqlite3")
    else:
        with fresh_schema("kvmigb") as dsn:
            yield schema.Database(postgres_dsn=dsn)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Any, Callable[[], Any]]]:
    """(name, Database, a cursor factory) on a fresh empty database of each kind."""
    if request.param == "sqlite":
        path = tmp_path / "meta.sqlite3"
        yield "sqlite", schema.Database(sqlite_path=path), lambda: _sqlite_cursor(path)
    else:
        with fresh_schema("kvmig") as dsn:
            yield "postgres", schema.Database(postgres_dsn=dsn), lambda: _pg_cursor(dsn)


def test_upgrade_in_place_keeps_every_row(
    backend: tuple[str, Any, Callable[[], Any]], tmp_path: Path
) -> None:
    name, db, cursor = backend
    with cursor() as cur:
        build_legacy(cur, name)
        before = dump_rows(cur)
    assert all(before[t] for t in ROWS)  # a row in every table
    assert schema.current(db) is None  # made before migrations
    legacy_shape = shape(db)

    assert schema.upgrade(db) == (None, schema.head())
    with cursor() as cur:
        assert dump_rows(cur) == before  # every row kept, unchanged
        cur.execute("SELECT COUNT(*) FROM auth_tokens")
        assert cur.fetchone()[0] == 0
    upgraded = shape(db)
    # nothing rebuilt: the legacy tables keep their shape, the artifacts table gains one index (0004)
    cols, pk, uniq, idx = upgraded["artifacts"]
    assert ("ix_artifacts_access", ("key", "owner", "visibility"), False) in idx
    upgraded_legacy = {t: s for t, s in upgraded.items() if t in legacy_shape}
    upgraded_legacy["artifacts"] = (cols, pk, uniq, [i for i in idx if i[0] != "ix_artifacts_access"])
    assert upgraded_legacy == legacy_shape
    assert set(upgraded) - set(legacy_shape) == {"alembic_version", "auth_tokens", "market_requests",
                                                 "market_refunds"}

    # the baseline revision is exactly the legacy schema: a fresh database migrated to it has the same shape
    with _fresh_database(name, tmp_path) as fresh:
        schema.upgrade(fresh, "0001_baseline")
        assert {t: s for t, s in shape(fresh).items() if t != "alembic_version"} == legacy_shape
        schema.upgrade(fresh)
        assert shape(fresh) == upgraded

    # the server's modules work on the upgraded rows (the serial columns continue after the kept ids)
    from kvagent.server.ledger import Ledger

    meta = open_meta(tmp_path, db.postgres_dsn) if name == "postgres" else SQLiteMeta(db.sqlite_path)
    try:
        assert meta.get(K) is not None and meta.is_entitled(K, "bob")
        ledger = Ledger(meta)
        assert ledger.balance("bob") == 900
        rec = ledger.credit("bob", 5)
        assert rec.txn == 3 and ledger.balance("bob") == 905 and ledger.audit().total == 0
    finally:
        meta.close()


def test_refunds_posted_before_0003_stay_the_only_ones(
    backend: tuple[str, Any, Callable[[], Any]], tmp_path: Path
) -> None:
    """0003 records the refunds already posted (the first of each transaction, also where the old race
    posted two), so no transaction refunded before the upgrade can be refunded again after it."""
    name, db, cursor = backend
    schema.upgrade(db, "0002_auth_tokens")
    ph = "?" if name == "sqlite" else "%s"
    with cursor() as cur:
        for r in [(1, "rcpt_1", 1.0, "credit", "bob", None, None, 1000, None, ""),
                  (2, "rcpt_2", 2.0, "sale", "bob", K, "alice", 100, None, ""),
                  (3, "rcpt_3", 3.0, "refund", "bob", K, "alice", 100, 2, ""),
                  (4, "rcpt_4", 4.0, "refund", "bob", K, "alice", 100, 2, ""),  # the old race's second
                  (5, "rcpt_5", 5.0, "sale", "bob", K, "alice", 100, None, "")]:
            cur.execute(f"INSERT INTO market_transactions VALUES ({','.join([ph] * len(r))})", r)
        if name == "postgres":
            cur.execute("SELECT setval(pg_get_serial_sequence('market_transactions', 'id'), 5)")
    schema.upgrade(db)
    with cursor() as cur:
        cur.execute("SELECT txn, refund FROM market_refunds")
        assert [tuple(r) for r in cur.fetchall()] == [(2, 3)]
    from kvagent.server.ledger import Ledger

    meta = open_meta(tmp_path, db.postgres_dsn) if name == "postgres" else SQLiteMeta(db.sqlite_path)
    try:
        ledger = Ledger(meta)
        assert ledger.refund("rcpt_2") is None  # refunded before the upgrade
        rec = ledger.refund("rcpt_5")
        assert rec is not None and rec.txn == 6 and ledger.refund("rcpt_5") is None
    finally:
        meta.close()


def test_newer_schema_is_refused(backend: tuple[str, Any, Callable[[], Any]], tmp_path: Path) -> None:
    name, db, cursor = backend
    schema.upgrade(db)
    with cursor() as cur:
        cur.execute("UPDATE alembic_version SET version_num = '0099_from_the_future'")
    with pytest.raises(SchemaVersionError, match="0099_from_the_future.*newer than this kvagent knows"):
        schema.upgrade(db)
    with pytest.raises(SchemaVersionError, match="newer than this kvagent knows"):
        schema.check(db)
    # a real `kvagent serve` refuses to start, with the message, and touches nothing
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"alice-token-0001": {"principal": "alice"}}')
    args = [
        "--data-dir",
        str(db.sqlite_path.parent if db.sqlite_path else tmp_path / "d"),
        "--token-file",
        str(tokens),
    ]
    if db.postgres_dsn:
        args += ["--postgres-dsn", db.postgres_dsn]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "kvagent.cli", "serve", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "newer than this kvagent knows" in done.stderr and "Traceback" not in done.stderr
    with cursor() as cur:
        cur.execute("SELECT version_num FROM alembic_version")
        assert cur.fetchone()[0] == "0099_from_the_future"


def test_no_migrate_refuses_an_old_schema_and_db_current_names_the_version(
    backend: tuple[str, Any, Callable[[], Any]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    name, db, cursor = backend
    schema.upgrade(db, "0001_baseline")
    opt = (
        ["--postgres-dsn", db.postgres_dsn] if db.postgres_dsn else ["--data-dir", str(db.sqlite_path.parent)]
    )
    assert cli.main(["db", "current", *opt]) == 0
    assert capsys.readouterr().out.strip() == f"0001_baseline (behind {schema.head()})"
    with pytest.raises(SchemaVersionError, match="run `kvagent db upgrade`"):
        schema.prepare(db, migrate=False)
    # a real `kvagent serve --no-migrate` refuses the old schema and leaves it as it is
    data = ["--data-dir", str(tmp_path / "d"), *opt] if db.postgres_dsn else opt
    done = subprocess.run(
        [sys.executable, "-m", "kvagent.cli", "serve", "--no-migrate", *data],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert done.returncode == 2 and "run `kvagent db upgrade`" in done.stderr, done.stderr[-2000:]
    assert schema.current(db) == "0001_baseline"
    assert cli.main(["db", "upgrade", *opt]) == 0
    assert capsys.readouterr().out.strip() == f"upgraded 0001_baseline -> {schema.head()}"
    assert schema.prepare(db, migrate=False) == schema.head()
    assert cli.main(["db", "current", *opt]) == 0
    assert capsys.readouterr().out.strip() == "0004_artifact_access_index (head)"
    assert cli.main(["db", "history"]) == 0
    out = capsys.readouterr().out
    assert out.index("0001_baseline") < out.index("0002_auth_tokens") < out.index(
        "0004_artifact_access_index (head)")


def test_postgres_meta_checks_without_migrating() -> None:
    with fresh_schema("kvmigc") as dsn:
        with pytest.raises(SchemaVersionError, match="needs '0004_artifact_access_index'"):
            PostgresMeta(dsn, migrate=False)
        PostgresMeta(dsn).close()
        PostgresMeta(dsn, migrate=False).close()


def test_no_ddl_outside_the_migrations() -> None:
    """The schema in code is what the migrations produce: no module of the server writes DDL of its own."""
    root = Path(__file__).resolve().parents[1] / "kvagent"
    ddl = re.compile(r"\b(CREATE|ALTER|DROP)\s+(TABLE|INDEX)\b", re.I)
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "migrations" not in p.parts and ddl.search(p.read_text())]
    assert offenders == []


def start_together(
    n: int, base: Path, tokens: dict[str, Any], dsn: str
) -> tuple[list[Any], list[BaseException]]:
    """Start ``n`` registry processes on ``dsn`` at the same moment (a barrier releases all the spawns)."""
    from registry_server import start_server

    started: list[Any] = [None] * n
    errors: list[BaseException] = []
    go = threading.Barrier(n)

    def run(i: int) -> None:
        go.wait()
        try:
            started[i] = start_server(base / f"n{i}", tokens, timeout=180, extra_args=["--postgres-dsn", dsn])
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return started, errors


@pytest.mark.slow
def test_four_nodes_start_together_on_an_emptied_postgres(tmp_path: Path) -> None:
    """Four real ``kvagent serve`` processes (registry only) on one empty PostgreSQL schema, started at the
    same moment, five rounds in a row: every node comes up every time, on the head schema."""
    tokens = {"alice-token-0001": {"principal": "alice", "publish": True},
              "admin-token-0001": {"principal": "ops", "admin": True}}
    for rnd in range(5):
        with fresh_schema(f"kvstart{rnd}") as dsn:
            started, errors = start_together(4, tmp_path / f"round{rnd}", tokens, dsn)
            try:
                assert not errors, f"round {rnd}: {errors[0]}"
                for node in started:
                    r = httpx.get(
                        node.url + "/v1/ledger", headers={"Authorization": "Bearer alice-token-0001"}
                    )
                    assert r.status_code == 200, (rnd, r.text)
                assert schema.current(schema.Database(postgres_dsn=dsn)) == schema.head()
            finally:
                for node in started:
                    if node is not None:
                        assert node.stop() == 0
                        assert "Traceback" not in node.log(), node.log()[-3000:]
