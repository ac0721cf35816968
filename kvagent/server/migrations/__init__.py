"""Alembic migrations of the registry's database (SQLite and PostgreSQL): ``versions/`` is the one history of
every table. Applied by :mod:`kvagent.server.schema` (``kvagent db upgrade``, and ``kvagent serve`` at
start)."""
