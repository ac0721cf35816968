"""Baseline: the schema as it stood before migrations (artifacts, owner copies, quotas, market).

Every statement is ``IF NOT EXISTS``, so a database that kvagent created before it had migrations (the same
statements, run by each module at start) is adopted as it is: nothing is rebuilt and no row moves.

Revision ID: 0001_baseline
Revises:
"""

from __future__ import annotations

from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None

_SERIAL = {"postgresql": "BIGSERIAL PRIMARY KEY", "sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT"}

_STATEMENTS = [
    # artifacts, their prefix block index, entitlements and the usage ledger (kvagent.server.meta)
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
    # later publishers' own records of hidden keys (kvagent.server.records)
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
    # rate limits and quotas (kvagent.server.quotas)
    """CREATE TABLE IF NOT EXISTS quota_rate (
        principal TEXT NOT NULL, win BIGINT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (principal, win))""",
    """CREATE TABLE IF NOT EXISTS quota_upload (
        principal TEXT NOT NULL, day BIGINT NOT NULL, bytes BIGINT NOT NULL, PRIMARY KEY (principal, day))""",
    """CREATE TABLE IF NOT EXISTS quota_leases (
        id TEXT PRIMARY KEY, principal TEXT NOT NULL, kind TEXT NOT NULL, expires DOUBLE PRECISION NOT
        NULL)""",
    "CREATE INDEX IF NOT EXISTS quota_leases_principal ON quota_leases (principal, kind)",
    "CREATE TABLE IF NOT EXISTS quota_locks (principal TEXT PRIMARY KEY, touched DOUBLE PRECISION NOT NULL)",
    # the market's double-entry ledger (kvagent.server.ledger)
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

_TABLES = [
    "artifacts",
    "blocks",
    "entitlements",
    "ledger",
    "owner_copies",
    "owner_copy_blocks",
    "owner_copy_grants",
    "quota_rate",
    "quota_upload",
    "quota_leases",
    "quota_locks",
    "market_accounts",
    "market_transactions",
    "market_postings",
    "market_idempotency",
    "market_prices",
    "market_disputes",
    "market_quarantine",
]


def upgrade() -> None:
    serial = _SERIAL[op.get_bind().dialect.name]
    for stmt in _STATEMENTS:
        op.execute(stmt.replace("{serial}", serial))


def downgrade() -> None:
    for table in reversed(_TABLES):
        op.execute(f"DROP TABLE IF EXISTS {table}")
