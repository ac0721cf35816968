"""Idempotency as payment APIs define it, and one refund per transaction.

``market_requests`` binds each claimed Idempotency-Key (``market_idempotency``'s principal + key) to a
digest of the request it was claimed for (route, artifact, canonical body), and keeps the stored answer of
a paid request that cannot be served twice (a non-streamed chat completion), so a repeat replays it or is
refused, never served anew (kvagent.server.ledger). Keys claimed before this revision have no row here and
are compared by their scope alone.

``market_refunds`` has one row per refunded transaction: its primary key is what makes a refund unique per
transaction, however many refunds race. It is filled with the refunds already posted (the first of each).

Revision ID: 0003_idempotent_requests
Revises: 0002_auth_tokens
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_idempotent_requests"
down_revision = "0002_auth_tokens"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "market_requests",
        sa.Column("principal", sa.Text, primary_key=True),
        sa.Column("idem_key", sa.Text, primary_key=True),
        sa.Column("request", sa.Text, nullable=False),  # sha256 hex of the canonical request
        sa.Column("answer", sa.Text),  # the stored answer (JSON) a repeat replays; NULL: none kept
    )
    op.create_table(
        "market_refunds",
        sa.Column("txn", sa.BigInteger, primary_key=True, autoincrement=False),  # the refunded transaction
        sa.Column("refund", sa.BigInteger),  # the refund's transaction (set in the same database transaction)
    )
    op.execute(
        "INSERT INTO market_refunds (txn, refund) SELECT ref, MIN(id) FROM market_transactions "
        "WHERE kind = 'refund' AND ref IS NOT NULL GROUP BY ref"
    )


def downgrade() -> None:
    op.drop_table("market_refunds")
    op.drop_table("market_requests")
