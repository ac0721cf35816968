"""A covering index for the visibility check, so a hidden key and a missing one cost the same time.

``MetaStore.access`` asks for the first row at or after a key (``key >= ? ORDER BY key LIMIT 1``) and
compares the key itself: a row comes back whether the key exists or not, read from this index alone, so
the lookup does the same work either way. An equality lookup did measurably more for an existing key
(reading the row's columns) than for a missing one: an existence oracle for restricted keys
(tests/reliability/test_timing.py).

Revision ID: 0004_artifact_access_index
Revises: 0003_idempotent_requests
"""

from __future__ import annotations

from alembic import op

revision = "0004_artifact_access_index"
down_revision = "0003_idempotent_requests"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_artifacts_access", "artifacts", ["key", "owner", "visibility"])


def downgrade() -> None:
    op.drop_index("ix_artifacts_access", table_name="artifacts")
