"""Schema versions of the registry's database: the Alembic history in ``kvagent/server/migrations/versions``.

The migrations are the only DDL: no module creates its own tables. :func:`upgrade` applies them in one
transaction that first takes the schema lock — a PostgreSQL advisory lock, or SQLite's write lock
(``BEGIN IMMEDIATE``) — and only then reads the database's version, so any number of nodes (or ``--workers``
processes) may start together: the first migrates, the others wait, then find the schema at head.

A database at a revision this kvagent does not know (written by a newer release) is refused, never served.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SchemaVersionError, StoreError

log = logging.getLogger("kvagent.server.schema")

#: pg_advisory_xact_lock id serialising schema changes across every node of one database ("kvagent schema")
LOCK_ID = 7463531
MIGRATIONS = Path(__file__).with_name("migrations")


@dataclass(frozen=True)
class Database:
    """Where the registry's metadata lives: a PostgreSQL DSN, else a SQLite file."""

    postgres_dsn: str | None = None
    sqlite_path: Path | None = None

    @classmethod
    def of(cls, data_dir: Path | str | None, postgres_dsn: str | None = None) -> Database:
        """The database a server with these settings uses (``<data_dir>/meta.sqlite3`` without a DSN)."""
        if postgres_dsn:
            return cls(postgres_dsn=postgres_dsn)
        if data_dir is None:
            raise StoreError("name the database: --postgres-dsn DSN or --data-dir DIR (SQLite)")
        return cls(sqlite_path=Path(data_dir) / "meta.sqlite3")

    def describe(self) -> str:
        return "PostgreSQL" if self.postgres_dsn else f"SQLite {self.sqlite_path}"


@dataclass(frozen=True)
class Revision:
    revision: str
    down_revision: str | None
    doc: str


def _config() -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


@functools.lru_cache(maxsize=1)
def _scripts() -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config())


def head() -> str:
    """The newest revision this kvagent knows."""
    h = _scripts().get_current_head()
    assert h is not None
    return str(h)


def history() -> list[Revision]:
    """Every revision, oldest first."""
    revs = list(_scripts().walk_revisions())
    revs.reverse()
    return [Revision(r.revision, r.down_revision, " ".join((r.doc or "").strip().split("\n\n")[0].split()))
            for r in revs]


def _engine(db: Database) -> Any:
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    if db.postgres_dsn:
        try:
            import psycopg
        except ImportError as exc:
            raise StoreError(f"PostgreSQL needs its extra: pip install 'kvagent[postgres]' ({exc})") from exc
        dsn = db.postgres_dsn

        def pg() -> Any:
            try:
                return psycopg.connect(dsn, connect_timeout=10)
            except psycopg.Error as exc:
                raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc

        return sa.create_engine("postgresql+psycopg://", creator=pg, poolclass=NullPool)
    assert db.sqlite_path is not None
    path = str(db.sqlite_path)
    db.sqlite_path.parent.mkdir(parents=True, exist_ok=True)

    def lite() -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open metadata database {path}: {exc}") from exc
        return conn

    engine = sa.create_engine("sqlite://", creator=lite, poolclass=NullPool)

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:  # SQLite's write lock, held until commit: the schema lock of one file
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@contextmanager
def _locked(db: Database) -> Iterator[Any]:
    """A connection inside one transaction that holds the schema lock (released at commit or rollback)."""
    import sqlalchemy as sa

    engine = _engine(db)
    quiet = logging.getLogger("alembic")  # its per-connection chatter; upgrade logs one line of what it did
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with engine.connect() as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({LOCK_ID})")
            yield conn
    except sa.exc.DBAPIError as exc:
        raise StoreError(f"{db.describe()}: {exc.orig or exc}") from exc
    finally:
        quiet.setLevel(level)
        engine.dispose()


def _version(conn: Any) -> str | None:
    from alembic.runtime.migration import MigrationContext

    heads = MigrationContext.configure(conn).get_current_heads()
    if len(heads) > 1:
        raise SchemaVersionError(f"the database has several schema versions {sorted(heads)}; expected one")
    return str(heads[0]) if heads else None


def _require_known(version: str | None, db: Database) -> None:
    from alembic.util import CommandError

    if version is None:
        return
    try:
        known = _scripts().get_revision(version)
    except CommandError:
        known = None
    if known is None:
        raise SchemaVersionError(
            f"{db.describe()}: the schema is at version {version!r}, newer than this kvagent knows "
            f"(its newest is {head()!r}); a newer kvagent release migrated it: run that release "
            "(never downgrade a database under a newer schema)"
        )


def current(db: Database) -> str | None:
    """The database's schema version (None: not under migrations yet, e.g. empty or made before them)."""
    with _locked(db) as conn:
        return _version(conn)


def upgrade(db: Database, target: str = "head") -> tuple[str | None, str | None]:
    """Migrate ``db`` to ``target`` under the schema lock; returns (version before, version after)."""
    with _locked(db) as conn:
        from alembic import command  # imported here: its import-time chatter is quieted too

        before = _version(conn)
        _require_known(before, db)
        if before != head() or target != "head":
            cfg = _config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, target)
        after = _version(conn)
    if after != before:
        log.info("%s: schema upgraded %s -> %s", db.describe(), before or "(none)", after)
    return before, after


def check(db: Database) -> str:
    """Refuse unless ``db`` is at exactly this kvagent's head (what a node run with ``--no-migrate``
    needs)."""
    version = current(db)
    _require_known(version, db)
    if version != head():
        raise SchemaVersionError(
            f"{db.describe()}: the schema is at version {version!r}, this kvagent needs {head()!r}; "
            "run `kvagent db upgrade` (or start without --no-migrate)"
        )
    return version


def prepare(db: Database, migrate: bool = True) -> str | None:
    """What a server does at start: upgrade to head (``migrate``), else check that it is at head."""
    return upgrade(db)[1] if migrate else check(db)
