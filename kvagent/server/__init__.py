"""The kvagent registry/host server (``kvagent serve``): a FastAPI app over a blob directory and a
metadata database (SQLite or PostgreSQL). See docs/registry-api.md for the HTTP API."""

from __future__ import annotations

from .settings import Settings

__all__ = ["Settings", "create_app"]


def create_app(settings: Settings):  # type: ignore[no-untyped-def]
    """Build the FastAPI app (imported lazily so ``import kvagent.server`` stays light)."""
    from .app import create_app as _create

    return _create(settings)
