"""No existence oracle: for a caller without entitlement, a key another principal holds restricted answers
exactly like a key nobody published, on every route — including publishing a valid artifact for it, which
gives the caller its own record (and nothing of the first publisher's)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from kvagent.artifacts import format as art
from kvagent.kvcache.identity import block_hashes
from tests._kvfixtures import make_artifact, make_kv
from tests.registry_server import ServerProcess, download

pytestmark = pytest.mark.slow
ALICE, MALLORY, DAVE = ({"Authorization": f"Bearer {t}"}
                        for t in ("alice-token-0001", "mallory-token-01", "dave-token-00001"))


@pytest.fixture()
def server(trust_server: ServerProcess) -> ServerProcess:
    return trust_server


class Doc:
    def __init__(self, seed: int, publisher: str) -> None:
        kv = make_kv(tokens=600, num_layers=2, heads=1, head_dim=4, seed=seed)  # two full 256-token blocks
        self.header, self.blob = make_artifact(kv, publisher=publisher)
        self.key = self.header.key
        self.hashes = block_hashes(art.context_of(self.header), kv.token_ids.tolist(), 256)


def _answer(r: httpx.Response, key: str) -> tuple[int, Any]:
    """Status and body with the key (whole or abbreviated) and the per-document header taken out (artifact
    bytes: their length, as each record serves its own document)."""
    if r.headers.get("content-type") == "application/octet-stream":
        return r.status_code, len(r.content)
    text = r.text.replace(key, "<key>").replace(key[:16], "<key>")
    try:
        body = json.loads(text) if text else None
    except ValueError:
        return r.status_code, text
    if isinstance(body, dict) and "entries" in body:  # ledger rows: their times differ
        body["entries"] = [{k: v for k, v in e.items() if k != "ts"} for e in body["entries"]]
    for obj in (body, body.get("handle") if isinstance(body, dict) else None):
        if isinstance(obj, dict) and "header" in obj:
            assert obj.pop("header")["key"] == "<key>"
    return r.status_code, body


def _routes(http: httpx.Client, d: Doc, other: Doc, who: dict[str, str]) -> dict[str, httpx.Response]:
    k = d.key
    return {
        "lookup": http.get(f"/v1/artifacts/{k}", headers=who),
        "blob": http.get(f"/v1/artifacts/{k}/blob", headers=who),
        "blob range": http.get(f"/v1/artifacts/{k}/blob", headers={**who, "Range": "bytes=0-9"}),
        "prefix": http.post("/v1/lookup/prefix", json={"block_hashes": d.hashes}, headers=who),
        "generate": http.post(f"/v1/artifacts/{k}/generate", json={"suffix_ids": [1]}, headers=who),
        "grant": http.post(f"/v1/artifacts/{k}/entitlements", json={"principal": "dave"}, headers=who),
        "ledger": http.get("/v1/ledger", params={"key": k, "role": "consumer"}, headers=who),
        "publish garbage": http.put(f"/v1/artifacts/{k}", content=b"x" * 100, headers=who),
        "publish another key's artifact": http.put(f"/v1/artifacts/{k}", content=other.blob, headers=who),
        "delete": http.delete(f"/v1/artifacts/{k}", headers=who),
    }


def _same(http: httpx.Client, hidden: Doc, missing: Doc, other: Doc, who: dict[str, str]) -> dict[str, Any]:
    a, b = _routes(http, hidden, other, who), _routes(http, missing, other, who)
    for name in a:
        assert _answer(a[name], hidden.key) == _answer(b[name], missing.key), name
    return {name: r.status_code for name, r in a.items()}


def test_hidden_keys_answer_like_missing_ones_on_every_route(server: ServerProcess) -> None:
    hidden, missing, other = Doc(1, "p"), Doc(2, "p"), Doc(3, "p")
    assert hidden.blob != missing.blob and len(hidden.blob) == len(missing.blob)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        r = http.put(f"/v1/artifacts/{hidden.key}", content=hidden.blob,
                     headers={**ALICE, "X-KVAgent-Visibility": "restricted"})
        assert r.status_code == 201, r.text
        before = _same(http, hidden, missing, other, MALLORY)
        assert set(before.values()) == {200, 404, 413, 422}, before  # ledger 200 (empty), bad uploads 413/422

        # a valid upload: a fresh record for both, then the same answers for the mallory's own records
        for vis in ("restricted", "restricted"):  # the second is an identical re-publish (200)
            answers = [_answer(http.put(f"/v1/artifacts/{d.key}", content=d.blob,
                                        headers={**MALLORY, "X-KVAgent-Visibility": vis}), d.key)
                       for d in (hidden, missing)]
            assert answers[0] == answers[1] and answers[0][1]["owner"] == "mallory", answers
        assert [a[0] for a in answers] == [200, 200]
        for d in (hidden, missing):
            assert download(server, f"/v1/artifacts/{d.key}/blob", MALLORY).content == d.blob  # its own bytes
            r = http.post("/v1/lookup/prefix", json={"block_hashes": d.hashes}, headers=MALLORY)
            assert (r.status_code, r.json()["blocks"], r.json()["handle"]["owner"]) == (200, 2, "mallory")
        after = _same(http, hidden, missing, other, MALLORY)  # grant, delete included: both succeed alike
        assert after["lookup"] == 200 and after["grant"] == 200 and after["delete"] == 204, after

        # alice's record was never touched, and mallory's grant to dave never reached it
        r = http.get(f"/v1/artifacts/{hidden.key}", headers=ALICE)
        assert (r.status_code, r.json()["owner"]) == (200, "alice")
        assert download(server, f"/v1/artifacts/{hidden.key}/blob", ALICE).content == hidden.blob
        assert http.get(f"/v1/artifacts/{hidden.key}", headers=DAVE).status_code == 404
        assert http.get(f"/v1/artifacts/{hidden.key}", headers=MALLORY).status_code == 404  # deleted her own


def test_the_callers_own_record_wins_and_grants_stay_per_owner(tmp_path: Any) -> None:
    import time

    from kvagent.server.meta import ArtifactRow, open_meta
    from kvagent.server.records import OwnerCopies, delete_owned, grant_owned, visible_row

    meta = open_meta(tmp_path)
    copies = OwnerCopies(meta)
    key = "a" * 64

    def row(owner: str, blob: str) -> ArtifactRow:
        return ArtifactRow(key, owner, "restricted", 10, "d" * 64, "{}", None, blob, time.time())

    assert meta.insert(row("alice", "blob-a"), ["h1"]) is None
    assert copies.insert(row("mallory", "blob-m"), ["h1"]) is None
    assert copies.insert(row("mallory", "blob-x"), ["h1"]).blob == "blob-m"  # one copy per owner
    grant_owned(meta, copies, key, "alice", "mallory")  # later, alice lets mallory see hers
    assert visible_row(meta, copies, key, "mallory").blob == "blob-m"  # mallory still reaches (and owns) hers
    grant_owned(meta, copies, key, "mallory", "dave")
    assert (
        visible_row(meta, copies, key, "dave").blob == "blob-m"
        and visible_row(meta, copies, key, "bob") is None
    )
    assert delete_owned(meta, copies, key, "mallory").blob == "blob-m"
    assert (
        visible_row(meta, copies, key, "mallory").blob == "blob-a"
        and visible_row(meta, copies, key, "dave") is None
    )
    meta.close()
