"""Metadata backends: artifact rows, prefix block index, entitlements and the usage ledger.

One small protocol (:class:`MetaStore`) with two implementations sharing the same SQL:
SQLite (default; WAL, in the data dir) and PostgreSQL (psycopg 3). Every write is one transaction.
The tables are made by the migrations (kvagent.server.schema), which opening a store applies (or checks).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import StoreError
from .schema import Database, prepare

VISIBILITIES = ("public", "restricted")


@dataclass(frozen=True)
class ArtifactRow:
    key: str
    owner: str
    visibility: str
    size: int
    payload_sha256: str
    header_json: str
    signature_json: str | None
    blob: str
    created_at: float


@dataclass(frozen=True)
class LedgerEntry:
    principal: str
    key: str
    owner: str
    bytes: int
    mode: str
    tokens: int = 0
    ts: float = 0.0


class MetaStore(Protocol):
    """What the server needs from its metadata database."""

    #: reads take microseconds and never wait on the network (a local SQLite file): the lookup routes run them
    #: on the event loop instead of handing each to a worker thread (the hand-off costs more than the query)
    inline_reads: bool

    def transaction(self) -> AbstractContextManager[Any]:
        """One transaction yielding a DB-API cursor; commit on success, roll back on error."""

    def read(self) -> AbstractContextManager[Any]:
        """A cursor for read-only statements: no write lock (a lookup must never queue behind writers)."""

    def q(self, sql: str) -> str:
        """``sql`` with ``?`` placeholders rewritten for this backend."""

    def get(self, key: str) -> ArtifactRow | None: ...

    def access(self, key: str) -> tuple[str, str] | None:
        """``(owner, visibility)`` of ``key``'s first row, or None: what deciding visibility needs, and no
        more,
        so that a hidden key and a missing one cost the same (the full row is read only once it is
        visible)."""

    def insert(self, row: ArtifactRow, block_hashes: Sequence[str]) -> ArtifactRow | None:
        """Insert ``row`` and its block index atomically; returns the existing row instead if the key is
        taken."""

    def delete(self, key: str) -> ArtifactRow | None: ...

    def grant(self, key: str, principal: str) -> None: ...

    def is_entitled(self, key: str, principal: str) -> bool: ...

    def longest_prefix(self, block_hashes: Sequence[str], principal: str) -> tuple[str, int] | None:
        """The visible artifact sharing the most leading blocks with ``block_hashes``: (key, n_blocks)."""

    def record(self, entry: LedgerEntry) -> None: ...

    def ledger(
        self, principal: str, *, role: str = "owner", key: str | None = None, limit: int = 100
    ) -> list[LedgerEntry]:
        """Ledger rows of artifacts ``principal`` owns (role "owner") or of their own use (role
        "consumer")."""

    def blob_names(self) -> list[str]: ...

    def close(self) -> None: ...


def can_see(meta: MetaStore, row: ArtifactRow, principal: str) -> bool:
    """Visibility rule: public, or owned by, or granted to ``principal``."""
    return row.visibility == "public" or row.owner == principal or meta.is_entitled(row.key, principal)


_COLS = "key, owner, visibility, size, payload_sha256, header, signature, blob, created_at"


class _SQLMeta:
    """The SQL shared by both backends; subclasses supply connections, placeholders and transactions."""

    ph = "?"
    inline_reads = False

    def __init__(self, migrate: bool = True) -> None:
        prepare(self.database, migrate)

    @property
    def database(self) -> Database:
        """Where this store's tables live (what kvagent.server.schema migrates)."""
        raise NotImplementedError

    # -- subclass hooks ------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """One database transaction: yields a DB-API cursor (``?`` placeholders go through ``q``); commits on
        success, rolls back on any exception. Other server modules (ledger, quotas) use it for their own
        tables."""
        raise NotImplementedError
        yield

    @contextmanager
    def _read(self) -> Iterator[Any]:
        """A cursor for read-only statements (no write lock taken); defaults to a transaction."""
        with self.transaction() as cur:
            yield cur

    def read(self) -> AbstractContextManager[Any]:
        """A cursor for read-only statements: no write lock (a lookup must never queue behind writers)."""
        return self._read()

    def q(self, sql: str) -> str:
        """``sql`` with ``?`` placeholders rewritten for this backend."""
        return self._q(sql)

    def _q(self, sql: str) -> str:
        return sql.replace("?", self.ph)

    def _in(self, values: Sequence[str]) -> tuple[str, list[Any]]:
        return "IN (" + ",".join("?" * len(values)) + ")", list(values)

    # -- protocol ------------------------------------------------------------------------
    def get(self, key: str) -> ArtifactRow | None:
        with self._read() as cur:
            cur.execute(self._q(f"SELECT {_COLS} FROM artifacts WHERE key = ?"), (key,))
            r = cur.fetchone()
        return ArtifactRow(*r) if r else None

    def access(self, key: str) -> tuple[str, str] | None:
        # the first row at or after ``key``, from the covering index ix_artifacts_access: a row comes back
        # (and is read) whether ``key`` exists or not, so both cost the same; an equality lookup read the
        # row only when it existed, which timing showed (tests/reliability/test_timing.py)
        with self._read() as cur:
            cur.execute(self._q("SELECT key, owner, visibility FROM artifacts WHERE key >= ? ORDER BY key "
                                "LIMIT 1"), (key,))
            r = cur.fetchone()
        return (r[1], r[2]) if r is not None and r[0] == key else None

    def insert(self, row: ArtifactRow, block_hashes: Sequence[str]) -> ArtifactRow | None:
        with self.transaction() as cur:
            cur.execute(
                self._q(
                    f"INSERT INTO artifacts ({_COLS}) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (key) DO NOTHING"
                ),
                (
                    row.key,
                    row.owner,
                    row.visibility,
                    row.size,
                    row.payload_sha256,
                    row.header_json,
                    row.signature_json,
                    row.blob,
                    row.created_at,
                ),
            )
            if cur.rowcount != 1:
                cur.execute(self._q(f"SELECT {_COLS} FROM artifacts WHERE key = ?"), (row.key,))
                r = cur.fetchone()
                return ArtifactRow(*r) if r else row
            if block_hashes:
                cur.executemany(
                    self._q("INSERT INTO blocks (hash, key, idx) VALUES (?,?,?) ON CONFLICT DO NOTHING"),
                    [(h, row.key, i) for i, h in enumerate(block_hashes)],
                )
        return None

    def delete(self, key: str) -> ArtifactRow | None:
        with self.transaction() as cur:
            cur.execute(self._q(f"SELECT {_COLS} FROM artifacts WHERE key = ?"), (key,))
            r = cur.fetchone()
            if r is None:
                return None
            for table in ("blocks", "entitlements", "artifacts"):
                cur.execute(self._q(f"DELETE FROM {table} WHERE key = ?"), (key,))
        return ArtifactRow(*r)

    def grant(self, key: str, principal: str) -> None:
        with self.transaction() as cur:
            cur.execute(
                self._q("INSERT INTO entitlements (key, principal) VALUES (?,?) ON CONFLICT DO NOTHING"),
                (key, principal),
            )

    def is_entitled(self, key: str, principal: str) -> bool:
        with self._read() as cur:
            cur.execute(
                self._q("SELECT 1 FROM entitlements WHERE key = ? AND principal = ?"), (key, principal)
            )
            return cur.fetchone() is not None

    def longest_prefix(self, block_hashes: Sequence[str], principal: str) -> tuple[str, int] | None:
        if not block_hashes:
            return None
        pos = {h: i for i, h in reversed(list(enumerate(block_hashes)))}
        frag, params = self._in(list(pos))
        sql = (
            "SELECT b.hash, b.key, b.idx FROM blocks b JOIN artifacts a ON a.key = b.key "
            f"WHERE b.hash {frag} AND (a.visibility = 'public' OR a.owner = ? OR EXISTS "
            "(SELECT 1 FROM entitlements e WHERE e.key = a.key AND e.principal = ?))"
        )
        with self._read() as cur:
            cur.execute(self._q(sql), (*params, principal, principal))
            rows = cur.fetchall()
        best: tuple[int, str] | None = None
        for h, key, idx in rows:
            if pos[h] != idx:  # a chained hash commits to its position; anything else is not a prefix match
                continue
            cand = (idx + 1, key)
            if best is None or cand[0] > best[0] or (cand[0] == best[0] and key < best[1]):
                best = cand
        return (best[1], best[0]) if best else None

    def record(self, entry: LedgerEntry) -> None:
        with self.transaction() as cur:
            cur.execute(
                self._q(
                    "INSERT INTO ledger (ts, principal, key, owner, bytes, mode, tokens) VALUES "
                    "(?,?,?,?,?,?,?)"
                ),
                (
                    entry.ts or time.time(),
                    entry.principal,
                    entry.key,
                    entry.owner,
                    entry.bytes,
                    entry.mode,
                    entry.tokens,
                ),
            )

    def ledger(
        self, principal: str, *, role: str = "owner", key: str | None = None, limit: int = 100
    ) -> list[LedgerEntry]:
        col = "owner" if role == "owner" else "principal"
        sql = f"SELECT principal, key, owner, bytes, mode, tokens, ts FROM ledger WHERE {col} = ?"
        params: list[Any] = [principal]
        if key is not None:
            sql += " AND key = ?"
            params.append(key)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(int(limit))
        with self._read() as cur:
            cur.execute(self._q(sql), params)
            return [LedgerEntry(*r) for r in cur.fetchall()]

    def blob_names(self) -> list[str]:
        with self._read() as cur:
            cur.execute("SELECT blob FROM artifacts")
            return [r[0] for r in cur.fetchall()]


class SQLiteMeta(_SQLMeta):
    """SQLite in WAL mode, one connection per thread: reads run concurrently without a lock, writes are
    serialised by ``BEGIN IMMEDIATE`` (across threads and across ``--workers`` processes alike)."""

    inline_reads = True

    def __init__(self, path: Path, migrate: bool = True):
        self._path = str(path)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._conn()
        try:
            super().__init__(migrate)
        except BaseException:
            self.close()
            raise

    @property
    def database(self) -> Database:
        return Database(sqlite_path=Path(self._path))

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=30)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open metadata database {self._path}: {exc}") from exc
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        cur = self._conn().cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        else:
            cur.execute("COMMIT")
        finally:
            cur.close()

    @contextmanager
    def _read(self) -> Iterator[Any]:
        cur = self._conn().cursor()
        try:
            yield cur
        finally:
            cur.close()

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()


class PostgresMeta(_SQLMeta):
    """PostgreSQL via psycopg 3 and a connection pool (broken connections are replaced by the pool)."""

    ph = "%s"

    def __init__(self, dsn: str, min_size: int = 1, max_size: int = 16, migrate: bool = True):
        import psycopg
        from psycopg_pool import ConnectionPool, PoolTimeout

        self._errors: tuple[type[BaseException], ...] = (psycopg.OperationalError, PoolTimeout)
        try:
            self._pool = ConnectionPool(
                dsn, min_size=min_size, max_size=max_size, kwargs={"autocommit": True}, timeout=10,
                check=ConnectionPool.check_connection, open=True, name="kvagent-meta",
            )
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            self._pool.wait(timeout=10)
        except PoolTimeout as exc:
            self._pool.close()
            raise StoreError(f"cannot connect to PostgreSQL within 10 s: {exc}") from exc
        self._dsn = dsn
        try:
            super().__init__(migrate)
        except BaseException:
            self._pool.close()
            raise

    @property
    def database(self) -> Database:
        return Database(postgres_dsn=self._dsn)

    def _in(self, values: Sequence[str]) -> tuple[str, list[Any]]:
        return "= ANY(?)", [list(values)]

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur
        except self._errors as exc:
            raise StoreError(f"PostgreSQL is unavailable: {exc}") from exc

    def close(self) -> None:
        self._pool.close()


def open_meta(data_dir: Path, postgres_dsn: str | None = None, migrate: bool = True) -> MetaStore:
    """The backend chosen by the settings: PostgreSQL when a DSN is given, else SQLite in ``data_dir``.

    Its schema is migrated to this kvagent's head first (kvagent.server.schema), or, with ``migrate=False``,
    checked to be there already (SchemaVersionError otherwise)."""
    db = Database.of(data_dir, postgres_dsn)
    if db.postgres_dsn:
        return PostgresMeta(db.postgres_dsn, migrate=migrate)
    data_dir.mkdir(parents=True, exist_ok=True)
    assert db.sqlite_path is not None
    return SQLiteMeta(db.sqlite_path, migrate=migrate)
