"""The server's state shared by every route module: settings, tokens, metadata, blobs, metrics and the model host."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request

from ..identity import validate_key
from .auth import Principal, TokenTable
from .blobs import BlobDir
from .http import ApiError, not_found
from .meta import ArtifactRow, MetaStore, can_see, open_meta
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("kvagent.server")


@dataclass
class State:
    settings: Settings
    tokens: TokenTable
    meta: MetaStore
    blobs: BlobDir
    metrics: Metrics
    host: Any = None  # ModelHost | None

    def principal(self, request: Request) -> Principal:
        p = self.tokens.resolve(request.headers.get("authorization"))
        if p is None:
            raise ApiError(401, "unauthorized", "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
        request.state.principal = p.name
        return p

    def visible(self, key: str, principal: Principal) -> ArtifactRow:
        validate_key(key)
        row = self.meta.get(key)
        if row is None or not can_see(self.meta, row, principal.name):
            raise not_found(key)
        return row

    def owned(self, key: str, principal: Principal) -> ArtifactRow:
        row = self.visible(key, principal)
        if row.owner != principal.name:
            raise ApiError(403, "forbidden", "only the artifact's owner may do this")
        return row



def handle(row: ArtifactRow) -> dict[str, Any]:
    return {
        "key": row.key,
        "header": json.loads(row.header_json),
        "size": row.size,
        "visibility": row.visibility,
        "owner": row.owner,
        "blob_url": f"/v1/artifacts/{row.key}/blob",
        "signature": json.loads(row.signature_json) if row.signature_json else None,
    }


def build_state(settings: Settings) -> State:
    """Open the data dir and database, clean up after crashes, and load the model (if any)."""
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    tokens = TokenTable.from_file(settings.token_file)
    meta = open_meta(data_dir, settings.postgres_dsn)
    blobs = BlobDir(data_dir / "blobs")
    stale = blobs.clean_temp()
    if stale:
        log.info("removed %d stale upload temp file(s)", stale)
    blobs.reconcile(meta.blob_names())
    host = None
    if settings.model:
        from ..config import Config
        from .host import ModelHost, load_server_model

        models_dir = Path(settings.models_dir) if settings.models_dir else Config.resolve().models_dir
        host = ModelHost(load_server_model(settings.model, models_dir), settings.kv_cache_items)
        log.info("serving model %s (fingerprint %s…)", settings.model, host.fingerprint[:16])
    return State(settings, tokens, meta, blobs, Metrics(), host)
