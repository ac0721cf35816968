"""Tokens as data (kvagent.server.auth, token_store, admin_routes, ``kvagent token``).

Units on SQLite with injected clocks (cache TTL, expiry, rotation, the token-file import); then real server
processes: two nodes on one PostgreSQL (a token issued through node 1 works on node 2 at once, its plaintext
is nowhere in a pg_dump, and once revoked both nodes refuse it within 5 s), and ``kvagent token`` against a
running SQLite server.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kvagent.errors import ConfigError
from kvagent.server.auth import Principal, TokenTable, digest
from kvagent.server.meta import SQLiteMeta
from kvagent.server.quotas import Limits
from kvagent.server.token_store import TokenStore

REPO = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[TokenStore]:
    meta = SQLiteMeta(tmp_path / "meta.sqlite3")
    yield TokenStore(meta)
    meta.close()


def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_only_digest_and_prefix_are_stored(store: TokenStore, tmp_path: Path) -> None:
    issued = store.issue("alice", publish=True, limits=Limits(rps=5), created_by="ops")
    assert issued.token.startswith("kva_") and len(issued.token) >= 40
    rec = issued.record
    assert rec.id.startswith("tok_") and issued.token.startswith(rec.prefix) and len(rec.prefix) == 10
    raw = (tmp_path / "meta.sqlite3").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("meta.sqlite3-*"))
    assert issued.token.encode() not in raw and issued.token[10:].encode() not in raw
    with store.meta.read() as cur:
        cur.execute("SELECT digest FROM auth_tokens")
        assert cur.fetchone()[0] == digest(issued.token)
    assert "token" not in rec.to_json() and "digest" not in rec.to_json()
    p = TokenTable(store).lookup(bearer(issued.token))
    assert p == Principal("alice", True, False, Limits(rps=5), rec.id)


def test_cache_ttl_revocation_and_expiry(store: TokenStore) -> None:
    mono, wall = Clock(), Clock(time.time())
    store = TokenStore(store.meta, clock=wall)
    table = TokenTable(store, ttl=2.0, clock=mono, wall=wall)
    a = store.issue("alice")
    b = store.issue("bob", expires_at=wall.t + 60)
    assert table.check(bearer(a.token))[1:] == ("ok", a.record.id)
    assert table.check(bearer(b.token))[1] == "ok"
    assert table.check(None)[1] == "missing" and table.check("Basic abc")[1] == "malformed"
    assert table.check(bearer("kva_not-a-token"))[1:] == ("unknown", None)

    store.revoke(a.record.id, by="ops")
    mono.t += 1.9  # within the TTL the cached answer stands ...
    assert table.check(bearer(a.token))[1] == "ok"
    mono.t += 0.2  # ... and not a moment longer
    assert table.check(bearer(a.token))[1:] == ("revoked", a.record.id)

    wall.t += 61  # expiry is checked on every request, cached or not
    assert table.check(bearer(b.token))[1:] == ("expired", b.record.id)
    assert not store.known_principal("bob") and not store.known_principal("alice")
    c = store.issue("carol")
    assert store.known_principal("carol") and table.known_principal("carol")
    # an unknown digest asks the database: a token issued elsewhere works at once, despite the cache
    assert table.check(bearer(c.token))[1] == "ok"
    with pytest.raises(ConfigError):
        store.issue("bad name!")
    with pytest.raises(ConfigError):
        store.issue("dave", expires_at=time.time() - 1)


def test_rotate_and_revoke_by_principal(store: TokenStore) -> None:
    table = TokenTable(store, ttl=0)
    old = store.issue("alice", publish=True, admin=True, limits=Limits(stored_bytes=10))
    second = store.issue("alice")
    new = store.rotate(old.record.id, by="ops")
    assert new is not None and new.token != old.token
    assert (new.record.principal, new.record.publish, new.record.admin, new.record.limits) == (
        "alice", True, True, Limits(stored_bytes=10))
    assert table.lookup(bearer(old.token)) is None and table.lookup(bearer(new.token)) is not None
    assert store.get(old.record.id).replaced_by == new.record.id  # type: ignore[union-attr]
    assert store.rotate(old.record.id) is None  # only an active token rotates
    gone = store.revoke("alice", by="ops")
    assert sorted(r.id for r in gone) == sorted([second.record.id, new.record.id])
    assert store.revoke("alice") == [] and store.list_tokens("alice") == []
    assert len(store.list_tokens("alice", include_inactive=True)) == 3


def test_token_file_import_keeps_its_meaning(store: TokenStore) -> None:
    table = TokenTable(store, ttl=0)
    file1 = {"alice-token-0001": Principal("alice", publish=True, limits=Limits(rps=3)),
             "bob-token-000002": Principal("bob")}
    r = store.import_tokens(file1)
    assert (r.added, r.updated, r.revoked) == (2, 0, [])
    alice = table.lookup(bearer("alice-token-0001"))
    assert alice is not None and alice.publish and alice.limits == Limits(rps=3)
    api = store.issue("carol")
    # the file changes: alice loses publish, bob leaves it; a restart imports it again
    file2 = {"alice-token-0001": Principal("alice", admin=True)}
    r = store.import_tokens(file2)
    assert (r.added, r.updated, len(r.revoked)) == (0, 1, 1)
    alice = table.lookup(bearer("alice-token-0001"))
    assert alice is not None and not alice.publish and alice.admin and alice.limits == Limits()
    assert table.lookup(bearer("bob-token-000002")) is None  # removed from the file: revoked
    assert table.lookup(bearer(api.token)) is not None  # tokens issued at run time are not the file's
    # a file token revoked at run time stays revoked, even though the file still names it
    store.revoke("alice", by="ops")
    r = store.import_tokens(file2)
    assert len(r.kept_revoked) == 1 and table.lookup(bearer("alice-token-0001")) is None
    # the file's validation is unchanged
    with pytest.raises(ConfigError):
        TokenTable.from_mapping({"short": {"principal": "x"}})


# -- real servers ------------------------------------------------------------------------------------
ADMIN = "admin-token-0001"
TOKENS = {
    ADMIN: {"principal": "ops", "admin": True},
    "alice-token-0001": {"principal": "alice", "publish": True},
}


def _auth_failures(url: str, reason: str) -> float:
    text = httpx.get(url + "/metrics").text
    line = next((ln for ln in text.splitlines()
                 if ln.startswith("kvagent_auth_failures_total{") and f'reason="{reason}"' in ln), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def _status(url: str, token: str) -> int:
    return httpx.get(url + "/v1/ledger", headers={"Authorization": bearer(token)}, timeout=10).status_code


@pytest.mark.slow
def test_two_nodes_issue_use_dump_revoke(tmp_path: Path) -> None:
    from registry_server import start_server
    from test_server_postgres import _postgres_dsn, fresh_schema

    with fresh_schema("kvtok") as dsn:
        one = start_server(tmp_path / "one", TOKENS, extra_args=["--postgres-dsn", dsn])
        try:
            two = start_server(tmp_path / "two", TOKENS, extra_args=["--postgres-dsn", dsn])
        except BaseException:
            one.stop()
            raise
        try:
            admin = {"Authorization": bearer(ADMIN)}
            # only admins manage tokens
            r = httpx.post(one.url + "/v1/admin/tokens", json={"principal": "x"},
                           headers={"Authorization": bearer("alice-token-0001")})
            assert r.status_code == 403
            r = httpx.post(
                one.url + "/v1/admin/tokens", json={"principal": "dave", "publish": True}, headers=admin
            )
            assert r.status_code == 201, r.text
            issued = r.json()
            token, tid = issued["token"], issued["id"]
            assert r.headers["cache-control"] == "no-store"
            assert _status(two.url, token) == 200  # at once, on the other node

            listed = httpx.get(
                two.url + "/v1/admin/tokens", params={"principal": "dave"}, headers=admin
            ).json()
            assert [t["id"] for t in listed["tokens"]] == [tid] and token not in json.dumps(listed)

            # the plaintext is nowhere in the database (its digest is)
            pg_dump = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_dump"))[-1:] or ["pg_dump"]
            dump = subprocess.run([pg_dump[0], "--dbname", _postgres_dsn()], capture_output=True, text=True,
                                  timeout=120, check=True).stdout
            assert digest(token) in dump and token not in dump and token[10:] not in dump
            assert ADMIN not in dump and "alice-token-0001" not in dump

            before = _auth_failures(two.url, "revoked")
            r = httpx.delete(one.url + f"/v1/admin/tokens/{tid}", headers=admin)
            assert r.status_code == 200 and [t["id"] for t in r.json()["revoked"]] == [tid]
            t0 = time.monotonic()
            refused: dict[str, float] = {}
            while len(refused) < 2 and time.monotonic() - t0 < 10:
                for node in (one, two):
                    if node.url not in refused and _status(node.url, token) == 401:
                        refused[node.url] = time.monotonic() - t0
                time.sleep(0.05)
            assert set(refused) == {one.url, two.url} and max(refused.values()) < 5.0, refused
            r = httpx.get(two.url + "/v1/ledger", headers={"Authorization": bearer(token)})
            assert r.json()["detail"] == "the bearer token was revoked"
            assert _auth_failures(two.url, "revoked") > before
            assert _auth_failures(two.url, "unknown") == 0
            assert _status(two.url, "kva_never-issued-token") == 401
            assert _auth_failures(two.url, "unknown") == 1

            # expiry, and rotation through the API
            r = httpx.post(one.url + "/v1/admin/tokens", json={"principal": "erin", "expires_in": 1.5},
                           headers=admin)
            short = r.json()["token"]
            assert _status(two.url, short) == 200
            time.sleep(1.6)
            assert _status(two.url, short) == 401 and _auth_failures(two.url, "expired") >= 1
            r = httpx.post(one.url + "/v1/admin/tokens", json={"principal": "frank"}, headers=admin)
            old = r.json()
            r = httpx.post(two.url + f"/v1/admin/tokens/{old['id']}/rotate", headers=admin)
            assert r.status_code == 201 and r.json()["replaces"] == old["id"]
            assert _status(two.url, r.json()["token"]) == 200 and _status(two.url, old["token"]) == 401
        finally:
            for node in (two, one):
                assert node.stop() == 0
        for node in (one, two):
            log = node.log()
            assert "Traceback" not in log, log[-3000:]
            assert tid in log  # logs name the token id ...
            for secret in (token, short, ADMIN, "alice-token-0001"):
                assert secret not in log  # ... never a token


@pytest.mark.slow
def test_cli_issues_and_revokes_for_a_running_server(tmp_path: Path) -> None:
    from registry_server import start_server

    srv = start_server(tmp_path / "data", TOKENS, extra_args=["--token-cache-seconds", "1"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def kv(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvagent.cli", "token", *args, "--data-dir",
                               str(tmp_path / "data")], capture_output=True, text=True, env=env, timeout=120)

    try:
        done = kv("issue", "gina", "--publish", "--expires", "1d", "--json")
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["principal"] == "gina" and out["publish"] and out["expires_at"] > time.time() + 86000
        assert _status(srv.url, out["token"]) == 200
        ls = kv("ls")
        assert out["id"] in ls.stdout and out["token"] not in ls.stdout and "ops" in ls.stdout
        assert kv("revoke", "gina").returncode == 0
        t0 = time.monotonic()
        while _status(srv.url, out["token"]) != 401:
            assert time.monotonic() - t0 < 5
            time.sleep(0.05)
        assert kv("revoke", "gina").returncode == 1  # nothing left to revoke
        assert "revoked" in kv("ls", "--all").stdout
    finally:
        assert srv.stop() == 0
