"""Alembic environment: runs on the connection :mod:`kvagent.server.schema` hands over (already inside one
transaction holding the schema lock), never on a URL of its own."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only through kvagent.server.schema
    raise RuntimeError("run kvagent's migrations with `kvagent db upgrade`, not the alembic command")
context.configure(connection=connection, target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
