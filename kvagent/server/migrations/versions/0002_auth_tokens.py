"""Bearer tokens as data: ``auth_tokens`` keeps a sha256 digest and a short display prefix per token, never
the token itself (kvagent.server.auth).

Revision ID: 0002_auth_tokens
Revises: 0001_baseline
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_auth_tokens"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "auth_tokens",
        sa.Column("id", sa.Text, primary_key=True),  # tok_<16 hex>: what logs, lists and revocations name
        sa.Column("digest", sa.Text, nullable=False, unique=True),  # sha256 hex of the token
        sa.Column("prefix", sa.Text, nullable=False),  # the token's first characters, to recognise it
        sa.Column("principal", sa.Text, nullable=False),
        sa.Column("publish", sa.Integer, nullable=False),  # 0 / 1
        sa.Column("admin", sa.Integer, nullable=False),  # 0 / 1
        sa.Column("limits", sa.Text),  # JSON object of kvagent.server.quotas.Limits; NULL: unlimited
        sa.Column("source", sa.Text, nullable=False),  # "file" (bootstrap import) or "api"
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("created_by", sa.Text),  # the admin principal (or "token-file", "cli")
        sa.Column("expires_at", sa.Double),  # unix seconds; NULL: never
        sa.Column("revoked_at", sa.Double),
        sa.Column("revoked_by", sa.Text),
        sa.Column("replaced_by", sa.Text),  # the id of the token a rotation issued in its place
    )
    op.create_index("auth_tokens_principal", "auth_tokens", ["principal"])


def downgrade() -> None:
    op.drop_index("auth_tokens_principal", "auth_tokens")
    op.drop_table("auth_tokens")
