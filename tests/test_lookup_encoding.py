"""The lookup hot path answers pre-encoded JSON: it must be the same document ``handle()`` describes."""

from __future__ import annotations

import json

import pytest
from _kvfixtures import make_artifact, make_kv

from kvagent.client.registry import parse_handle
from kvagent.server.meta import ArtifactRow
from kvagent.server.state import handle, handle_json

HEADER, BLOB = make_artifact(make_kv(num_layers=2, heads=2, tokens=24, head_dim=8, seed=2))
SIG = json.dumps({"alg": "ed25519", "public_key": "ab" * 32, "signature": "cd" * 64})


@pytest.mark.parametrize("signature", [None, SIG])
def test_handle_json_is_handle(signature: str | None) -> None:
    row = ArtifactRow(HEADER.key, "alice@example.com", "restricted", len(BLOB), HEADER.payload_sha256,
                      json.dumps(HEADER.to_json(), sort_keys=True), signature, f"{HEADER.key}-0011", 1.0)
    raw = handle_json(row)
    assert json.loads(raw) == handle(row)
    assert parse_handle(json.loads(raw), key=HEADER.key).header == HEADER  # what the client accepts
