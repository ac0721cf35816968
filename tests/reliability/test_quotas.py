"""Per-principal rate limits and quotas: kept in the database (so two server processes share them), answered
with 429 + Retry-After (413 for the storage quota), and honoured by the client's retry policy."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kvagent.client.registry import RegistryClient
from kvagent.errors import ConfigError
from kvagent.server.http import ApiError
from kvagent.server.meta import open_meta
from kvagent.server.quotas import DAY, LEASE_SECONDS, Limits, Quotas
from tests._kvfixtures import make_artifact, make_kv
from tests.registry_server import ServerProcess, start_server

PG_DSN = os.environ.get("KVAGENT_TEST_POSTGRES_DSN")


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["sqlite", "postgres"])
def two_quotas(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Quotas, Quotas, Clock]]:
    """Two Quotas on two connections to one database (as two server processes have) and their shared clock."""
    if request.param == "postgres" and not PG_DSN:
        pytest.skip("KVAGENT_TEST_POSTGRES_DSN is not set")
    metas = [open_meta(tmp_path, PG_DSN if request.param == "postgres" else None) for _ in range(2)]
    if request.param == "postgres":  # a clean slate for the quota tables
        with metas[0].transaction() as cur:
            for t in ("quota_rate", "quota_upload", "quota_leases", "quota_locks"):
                cur.execute(f"DELETE FROM {t}")  # the tables are the migrations' (kvagent.server.schema)
    clock = Clock(10 * DAY + 0.25)
    a, b = Quotas(metas[0], clock), Quotas(metas[1], clock)
    yield a, b, clock
    for m in metas:
        m.close()


def _refused(fn, *args) -> ApiError:  # type: ignore[no-untyped-def]
    with pytest.raises(ApiError) as e:
        fn(*args)
    return e.value


def test_rate_limit_is_shared_across_connections(two_quotas: tuple[Quotas, Quotas, Clock]) -> None:
    a, b, clock = two_quotas
    lim = Limits(rps=3)
    a.hit("alice", lim)
    b.hit("alice", lim)
    a.hit("alice", lim)
    err = _refused(b.hit, "alice", lim)
    assert (err.status, err.code, err.headers) == (429, "rate_limited", {"Retry-After": "1"})
    a.hit("bob", lim)  # per principal
    a.hit("alice", Limits())  # no limit: not counted
    clock.t += 1.0  # the next window
    b.hit("alice", lim)


def test_upload_quota_per_utc_day(two_quotas: tuple[Quotas, Quotas, Clock]) -> None:
    a, b, clock = two_quotas
    lim = Limits(upload_bytes_per_day=1000)
    a.check_upload("alice", lim, a.uploaded_today("alice"), 600)
    a.charge_upload("alice", lim, 600)
    assert b.uploaded_today("alice") == 600
    err = _refused(b.check_upload, "alice", lim, b.uploaded_today("alice"), 401)
    # ceil(86399.75 s)
    assert (err.status, err.code, err.headers) == (429, "upload_quota", {"Retry-After": "86400"})
    b.check_upload("alice", lim, b.uploaded_today("alice"), 400)
    clock.t += DAY
    assert a.uploaded_today("alice") == 0


def test_concurrent_generates_lease_and_expire(two_quotas: tuple[Quotas, Quotas, Clock]) -> None:
    a, b, clock = two_quotas
    lim = Limits(concurrent_generates=2)
    first = a.acquire("alice", lim)
    b.acquire("alice", lim)
    err = _refused(a.acquire, "alice", lim)
    assert (err.status, err.code, err.headers) == (429, "too_many_generates", {"Retry-After": "1"})
    b.release(first)
    third = a.acquire("alice", lim)
    assert third is not None and a.acquire("alice", Limits()) is None
    clock.t += LEASE_SECONDS + 1  # leases of a process that died expire
    a.acquire("alice", lim)
    b.acquire("alice", lim)


def test_limits_are_validated() -> None:
    assert Limits.from_mapping({"rps": 20, "stored_bytes": None}) == Limits(rps=20)
    for bad in ({"rps": 0}, {"rps": 1.5}, {"rps": True}, {"burst": 3}, [1]):
        with pytest.raises(ConfigError):
            Limits.from_mapping(bad)


TOKENS = {
    "rate-token-00001": {"principal": "rate", "publish": True, "limits": {"rps": 2}},
    "upload-token-001": {"principal": "up", "publish": True, "limits": {"upload_bytes_per_day": 0}},
    "store-token-0001": {"principal": "store", "publish": True, "limits": {"stored_bytes": 0}},
    "free-token-00001": {"principal": "free", "publish": True},
}
MISSING = "ab" * 32


def _blob(seed: int) -> bytes:
    return make_artifact(make_kv(tokens=20, seed=seed))[1]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two server processes over one data dir (one SQLite database), as several nodes share PostgreSQL."""
    size = len(_blob(1))
    tokens = dict(TOKENS)
    tokens["upload-token-001"] = {
        **TOKENS["upload-token-001"],
        "limits": {"upload_bytes_per_day": size * 3 // 2},
    }
    tokens["store-token-0001"] = {**TOKENS["store-token-0001"], "limits": {"stored_bytes": size * 3 // 2}}
    data = tmp_path_factory.mktemp("quota") / "data"
    one = start_server(data, tokens)
    two = start_server(data, tokens)
    yield one, two
    for s in (one, two):
        assert s.stop() == 0
        assert "Traceback" not in s.log(), s.log()[-4000:]


def _put(srv: ServerProcess, blob: bytes, token: str) -> httpx.Response:
    key = make_artifact_key(blob)
    return httpx.put(f"{srv.url}/v1/artifacts/{key}", content=blob, timeout=30,
                     headers={"Authorization": f"Bearer {token}", "X-KVAgent-Visibility": "restricted"})


def make_artifact_key(blob: bytes) -> str:
    from kvagent.artifacts import format as art

    return art.read_header(blob).key


@pytest.mark.slow
def test_rate_limit_holds_across_two_server_processes(servers: tuple[ServerProcess, ServerProcess]) -> None:
    one, two = servers
    auth = {"Authorization": "Bearer rate-token-00001"}
    with httpx.Client(timeout=10) as http:
        seen: list[tuple[int, int, str | None]] = []  # (window, status, Retry-After)
        for i in range(12):
            srv = (one, two)[i % 2]
            t0 = time.time()
            r = http.get(f"{srv.url}/v1/artifacts/{MISSING}", headers=auth)
            if int(t0) == int(time.time()):  # the request sat in one one-second window
                seen.append((int(t0), r.status_code, r.headers.get("retry-after")))
        free = http.get(
            f"{one.url}/v1/artifacts/{MISSING}", headers={"Authorization": "Bearer free-token-00001"}
        )
    assert free.status_code == 404  # another principal is not limited
    by_window: dict[int, list[int]] = {}
    for w, status, retry in seen:
        by_window.setdefault(w, []).append(status)
        assert status in (404, 429) and (status == 404 or retry == "1")
    assert all(s.count(404) <= 2 for s in by_window.values()), by_window  # rps=2 over both processes together
    assert any(429 in s for s in by_window.values()), by_window


@pytest.mark.slow
def test_client_honours_retry_after(servers: tuple[ServerProcess, ServerProcess]) -> None:
    one, _ = servers
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        time.sleep(s)

    with RegistryClient(one.url, "rate-token-00001", sleep=sleep, retries=4, max_retry_seconds=30) as c:
        for _ in range(6):
            assert c.lookup(MISSING) is None  # every call ends in an answer, never a RegistryUnavailableError
    assert slept and set(slept) == {1.0}, slept  # each wait was the server's Retry-After, not our own backoff


@pytest.mark.slow
def test_upload_and_storage_quotas(servers: tuple[ServerProcess, ServerProcess]) -> None:
    one, two = servers
    assert _put(one, _blob(1), "upload-token-001").status_code == 201
    r = _put(two, _blob(2), "upload-token-001")  # the other process knows what was uploaded today
    assert (r.status_code, r.json()["error"]) == (429, "upload_quota"), r.text
    assert 0 < int(r.headers["retry-after"]) <= DAY

    assert _put(one, _blob(3), "store-token-0001").status_code == 201
    r = _put(two, _blob(4), "store-token-0001")
    assert (r.status_code, r.json()["error"]) == (413, "storage_quota"), r.text
    key3 = make_artifact_key(_blob(3))
    auth = {"Authorization": "Bearer store-token-0001"}
    assert httpx.delete(f"{one.url}/v1/artifacts/{key3}", headers=auth, timeout=10).status_code == 204
    assert _put(two, _blob(4), "store-token-0001").status_code == 201  # room again after a delete
