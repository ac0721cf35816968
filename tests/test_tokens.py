"""Tokens as data (kvagent.server.auth, token_store, admin_routes, ``kvagent token``).

Units on SQLite with injected clocks (cache TTL, expiry, rotation, the token-file import); then real server
processes: two nodes on one PostgreSQL (a token issued through node 1 works on node 2 at once, its plaintext
is nowhere in a pg_dump, and once revoked both nodes refuse it within 5 s), and ``kvagent token`` against a
running SQLite server.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from kvagent.errors import ConfigError, StoreError
from kvagent.server.auth import (
    MIN_BITS,
    STALE_FACTOR,
    Principal,
    TokenRecord,
    TokenTable,
    digest,
    estimated_bits,
    token_id,
)
from kvagent.server.meta import SQLiteMeta
from kvagent.server.quotas import Limits
from kvagent.server.token_store import TokenStore, new_token

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
    assert (r.added, r.updated, r.absent) == (2, 0, [])
    alice = table.lookup(bearer("alice-token-0001"))
    assert alice is not None and alice.publish and alice.limits == Limits(rps=3)
    api = store.issue("carol")
    # the file changes: alice loses publish, bob leaves it; a restart imports it again
    file2 = {"alice-token-0001": Principal("alice", admin=True)}
    r = store.import_tokens(file2)
    bob_id = store.list_tokens("bob")[0].id
    assert (r.added, r.updated, r.absent) == (0, 1, [bob_id])
    alice = table.lookup(bearer("alice-token-0001"))
    assert alice is not None and not alice.publish and alice.admin and alice.limits == Limits()
    # removed from the file: still active (an import never revokes), until revoked explicitly
    assert table.lookup(bearer("bob-token-000002")) is not None
    assert [t.id for t in store.revoke(bob_id, by="ops")] == [bob_id]
    assert table.lookup(bearer("bob-token-000002")) is None
    assert table.lookup(bearer(api.token)) is not None  # tokens issued at run time are not the file's
    # a file token revoked at run time stays revoked, even though the file still names it
    store.revoke("alice", by="ops")
    r = store.import_tokens(file2)
    assert len(r.kept_revoked) == 1 and table.lookup(bearer("alice-token-0001")) is None
    # the file's validation is unchanged
    with pytest.raises(ConfigError):
        TokenTable.from_mapping({"short": {"principal": "x"}})


class Outage:
    """A token source in front of ``store`` whose database can be cut (lookups raise StoreError)."""

    def __init__(self, store: TokenStore):
        self.store, self.down, self.asked = store, False, 0

    def by_digest(self, token_digest: str) -> TokenRecord | None:
        self.asked += 1
        if self.down:
            raise StoreError("PostgreSQL is unavailable: couldn't get a connection after 10.00 sec")
        return self.store.by_digest(token_digest)

    def known_principal(self, name: str) -> bool:
        return self.store.known_principal(name)


def test_a_cached_answer_outlives_an_outage_by_stale_for_and_no_longer(store: TokenStore) -> None:
    """A token revoked just before an outage: answered from the cache while the database is down for at
    most ``stale_for`` seconds past the entry's expiry, then the lookup fails closed (StoreError: 503)."""
    mono = Clock()
    src = Outage(store)
    table = TokenTable(src, ttl=2.0, clock=mono, stale_for=6.0)
    a = store.issue("alice")
    assert table.check(bearer(a.token))[1] == "ok"  # cached until 1002
    store.revoke(a.record.id, by="ops")  # on another node: this one's cache does not know
    src.down = True
    mono.t += 2.5  # expired; the database is down: the last answer stands ...
    assert table.check(bearer(a.token))[1] == "ok"
    mono.t += 5.4  # ... up to stale_for past the expiry (1008) ...
    assert table.check(bearer(a.token))[1] == "ok"
    mono.t += 0.1  # ... and not a moment longer: fail closed, on every later request too
    for _ in range(3):
        with pytest.raises(StoreError):
            table.check(bearer(a.token))
        mono.t += 30
    # the database back: the revocation is seen
    src.down = False
    assert table.check(bearer(a.token))[1:] == ("revoked", a.record.id)
    # the default cap is ttl x STALE_FACTOR; with ttl 0 nothing stale is ever served
    assert TokenTable(src, ttl=2.0).stale_for == 2.0 * STALE_FACTOR
    b = store.issue("bob")
    t0 = TokenTable(src, ttl=0, clock=mono)
    assert t0.check(bearer(b.token))[1] == "ok"
    src.down = True
    with pytest.raises(StoreError):
        t0.check(bearer(b.token))


def test_the_stale_cap_counts_the_time_a_failing_lookup_took(store: TokenStore) -> None:
    """A lookup that waits out a pool timeout: the cap is checked when it fails, not when it began."""
    mono = Clock()

    class Slow(Outage):
        def by_digest(self, token_digest: str) -> TokenRecord | None:
            if self.down:
                mono.t += 10  # a pool timeout
            return super().by_digest(token_digest)

    src = Slow(store)
    table = TokenTable(src, ttl=2.0, clock=mono, stale_for=5.0)
    a = store.issue("alice")
    assert table.check(bearer(a.token))[1] == "ok"
    src.down = True
    mono.t += 2.5  # 0.5 s past the expiry when asked; 10.5 s when the database has failed
    with pytest.raises(StoreError):
        table.check(bearer(a.token))


def test_the_stale_cap_is_a_server_setting(tmp_path: Path) -> None:
    from kvagent.server.__main__ import build_parser, settings_from_args
    from kvagent.server.settings import Settings, from_env, to_env

    args = ["--data-dir", str(tmp_path)]
    default = settings_from_args(build_parser().parse_args(args))
    assert default.token_stale_s is None  # ttl x STALE_FACTOR
    s = settings_from_args(build_parser().parse_args([*args, "--token-stale-seconds", "7.5"]))
    assert s.token_stale_s == 7.5 and from_env(to_env(s)).token_stale_s == 7.5  # --workers processes too
    with pytest.raises(ConfigError, match="token_stale_s"):
        Settings(tmp_path, None, token_stale_s=-1)


def test_an_older_token_file_never_revokes_what_a_newer_one_added(store: TokenStore) -> None:
    """Two nodes with two versions of the file start one after the other: the older file's import leaves
    the newer file's tokens active (imports only add; revoking is explicit)."""
    table = TokenTable(store, ttl=0)
    old = {"alice-token-0001": Principal("alice")}
    new = {**old, "carol-token-0003": Principal("carol", publish=True)}
    assert store.import_tokens(new).added == 2  # the node with the newer file starts first
    r = store.import_tokens(old)  # then a node with the older one
    carol = store.list_tokens("carol")
    assert [t.id for t in carol] == r.absent and table.lookup(bearer("carol-token-0003")) is not None
    assert store.import_tokens(new).kept_revoked == []  # nothing to revive: nothing was revoked
    assert table.lookup(bearer("carol-token-0003")) == Principal("carol", True, False, Limits(), carol[0].id)


def test_weak_file_tokens_are_named_by_id_at_import(store: TokenStore,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    strong = "kva_" + "Zx9-" * 8 + "Qw7_pL3mN5vB"
    hex128 = "0123456789abcdef" * 2  # 32 hex characters
    tokens = {"alice-token-0001": Principal("alice"), "short-01": Principal("bob"),
              strong: Principal("carol"), hex128: Principal("dave")}
    assert estimated_bits("alice-token-0001") < MIN_BITS
    assert MIN_BITS <= min(estimated_bits(strong), estimated_bits(hex128))
    with caplog.at_level(logging.WARNING, logger="kvagent.server.auth"):
        r = store.import_tokens(tokens, "token file t.json")
    weak = [token_id(digest("alice-token-0001")), token_id(digest("short-01"))]
    assert r.weak == weak
    warned = [rec.getMessage() for rec in caplog.records if "bits of entropy" in rec.getMessage()]
    assert len(warned) == 2 and all(tid in msg for tid, msg in zip(weak, warned, strict=True))
    assert "kvagent token issue" in warned[0] and "token file t.json" in warned[0]
    for secret in tokens:
        assert secret not in caplog.text  # named by id, never the token
    # a freshly issued token is never weak
    assert estimated_bits(new_token()) >= MIN_BITS


def test_revocation_by_name_works_for_any_principal_name(store: TokenStore, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from kvagent.server.ops_cli import token_main

    table = TokenTable(store, ttl=0)
    bot = [store.issue("tok_bot"), store.issue("tok_bot")]
    other = store.issue("alice")
    assert sorted(r.id for r in store.revoke("tok_bot", by="ops")) == sorted(t.record.id for t in bot)
    assert all(table.lookup(bearer(t.token)) is None for t in bot)
    assert table.lookup(bearer(other.token)) is not None
    # a principal named exactly like an existing token's id: the id wins, unless the name is asked for
    twin = store.issue(other.record.id)
    assert [r.id for r in store.revoke(other.record.id)] == [other.record.id]
    assert table.lookup(bearer(twin.token)) is not None
    assert [r.id for r in store.revoke_principal(other.record.id)] == [twin.record.id]
    # the CLI
    (tmp_path / "data").mkdir()
    meta = SQLiteMeta(tmp_path / "data" / "meta.sqlite3")
    cli = TokenStore(meta).issue("tok_cli")
    meta.close()
    assert token_main(["revoke", "tok_cli", "--json", "--data-dir", str(tmp_path / "data")]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)["revoked"]] == [cli.record.id]
    assert token_main(["revoke", "tok_cli", "--principal", "--data-dir", str(tmp_path / "data")]) == 1


def _race(*calls: Callable[[], object]) -> list[object]:
    """Run ``calls`` at once (threads released together by a barrier); their results in order."""
    barrier = threading.Barrier(len(calls))
    out: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        out[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_rotations_and_revocations_never_leave_two_live_tokens() -> None:
    """On PostgreSQL, threads rotate one token at once, beside a revocation of it (or of its principal):
    at most one rotation wins, a revoked token is never rotated, and a revocation of the principal leaves
    no live token (not even the successor of a rotation that committed while it waited)."""
    from test_server_postgres import fresh_schema

    from kvagent.server.meta import PostgresMeta

    with fresh_schema("kvrace") as dsn:
        meta = PostgresMeta(dsn, max_size=8)
        try:
            store = TokenStore(meta)
            for n in range(12):
                name = f"racer{n}"
                tid = store.issue(name).record.id
                by_principal = n % 2 == 1
                revoke = partial(store.revoke, name if by_principal else tid)
                out = _race(*[partial(store.rotate, tid)] * 4, revoke)
                rotated = [r for r in out[:4] if r is not None]
                live = store.list_tokens(name)
                assert len(rotated) <= 1, f"round {n}: {len(rotated)} rotations of one token won"
                if by_principal:
                    assert live == [], f"round {n}: {[t.id for t in live]} live after revoking {name}"
                else:
                    assert [t.id for t in live] == [r.record.id for r in rotated], f"round {n}"  # type: ignore[union-attr]
                assert store.get(tid).revoked_at is not None  # type: ignore[union-attr]
        finally:
            meta.close()


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
            # a principal whose name starts with tok_ is revoked by name like any other
            r = httpx.post(one.url + "/v1/admin/tokens", json={"principal": "tok_bot"}, headers=admin)
            bot = r.json()
            r = httpx.delete(one.url + "/v1/admin/tokens", params={"principal": "tok_bot"}, headers=admin)
            assert r.status_code == 200 and [t["id"] for t in r.json()["revoked"]] == [bot["id"]], r.text
            assert _status(one.url, bot["token"]) == 401
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
def test_a_token_revoked_before_an_outage_gets_503_past_the_cap(tmp_path: Path) -> None:
    """Two nodes on one PostgreSQL; node two reaches it through a proxy that the test cuts. A token is used
    on node two, revoked through node one, then the database goes away for node two before its cache
    expires: past ttl + stale_for, node two answers 503 for the token (never 200), and 401 once the
    database is back."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from registry_server import start_server
    from test_server_postgres import fresh_schema

    from tests.reliability.faultproxy import FaultProxy

    ttl, stale = 2.0, 3.0
    with fresh_schema("kvstale") as dsn:
        proxy = FaultProxy(int(str(conninfo_to_dict(dsn).get("port", 5432))))
        one = start_server(tmp_path / "one", TOKENS, extra_args=["--postgres-dsn", dsn])
        two = None
        try:
            two = start_server(tmp_path / "two", TOKENS, extra_args=[
                "--postgres-dsn", make_conninfo(dsn, host="127.0.0.1", port=str(proxy.port)),
                "--token-cache-seconds", str(ttl), "--token-stale-seconds", str(stale)])
            admin = {"Authorization": bearer(ADMIN)}
            r = httpx.post(one.url + "/v1/admin/tokens", json={"principal": "dave"}, headers=admin)
            token, tid = r.json()["token"], r.json()["id"]

            def models(url: str) -> int:  # authenticates, and asks the database nothing else
                return httpx.get(url + "/v1/models", headers={"Authorization": bearer(token)},
                                 timeout=60).status_code

            assert models(two.url) == 200  # node two caches the token's answer (for ttl)
            used = time.monotonic()
            assert httpx.delete(one.url + f"/v1/admin/tokens/{tid}", headers=admin).status_code == 200
            proxy.go_down()  # the database, for node two
            assert time.monotonic() - used < ttl  # before node two's cache expires
            time.sleep(max(0.0, used + ttl + stale + 0.5 - time.monotonic()))
            # (each lookup waits out the pool's 10 s timeout first: one request costs 20 s here)
            assert models(two.url) == 503
            assert models(one.url) == 401
            proxy.mode = "pass"  # the database is back for node two: the revocation is seen
            t0 = time.monotonic()
            while (status := models(two.url)) != 401:
                assert status == 503 and time.monotonic() - t0 < 60, status
                time.sleep(0.5)
        finally:
            for node in (two, one):
                if node is not None:
                    node.stop()
            proxy.close()
        assert "Traceback" not in one.log(), one.log()[-3000:]


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
