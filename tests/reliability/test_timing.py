"""Timing side channels: does response time tell a caller without entitlement whether a restricted key
exists? 200+ interleaved samples per route (lookup, prefix lookup, blob) against a real server, on one
keep-alive connection (the attacker's best case); AUC of "existing is slower than missing" must stay
within 0.5 ± 0.1. A control (a 2 MB download vs a 404) shows the measurement does see real differences."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from kvagent.artifacts import format as art
from kvagent.kvcache.identity import block_hashes
from kvagent.server.meta import ArtifactRow, SQLiteMeta
from tests._kvfixtures import make_artifact, make_kv
from tests.registry_server import ServerProcess

pytestmark = pytest.mark.slow
SAMPLES = 200


def auc(slow: list[float], fast: list[float]) -> float:
    """P(a sample of ``slow`` exceeds one of ``fast``), ties counting half (the Mann-Whitney U / n·m)."""
    wins = sum((a > b) + 0.5 * (a == b) for a in slow for b in fast)
    return wins / (len(slow) * len(fast))


def test_the_visibility_check_reads_a_row_whether_the_key_exists_or_not(tmp_path: Path) -> None:
    """The cause, not the symptom: ``access`` reads the first index entry at or after the key, so an existing
    key and a missing one do the same work (an equality lookup read the row only when it existed: blob route
    AUC 0.548 at n=1500 before, 0.501 after)."""
    meta = SQLiteMeta(tmp_path / "meta.db")
    try:
        for i in (2, 4):
            k = f"{i:064x}"
            meta.insert(ArtifactRow(k, "alice", "restricted", 1, "0" * 64, "{}", None, k, 0.0), [])
        with meta.read() as cur:
            cur.execute("EXPLAIN QUERY PLAN SELECT key, owner, visibility FROM artifacts WHERE key >= ? "
                        "ORDER BY key LIMIT 1", (f"{3:064x}",))
            plan = " ".join(str(r[-1]) for r in cur.fetchall())
        assert "COVERING INDEX ix_artifacts_access" in plan, plan
        assert meta.access(f"{2:064x}") == ("alice", "restricted")
        assert meta.access(f"{3:064x}") is None and meta.access(f"{5:064x}") is None
    finally:
        meta.close()


def test_auc() -> None:
    assert auc([2, 3], [0, 1]) == 1.0 and auc([0, 1], [2, 3]) == 0.0 and auc([1, 2], [1, 2]) == 0.5


@pytest.fixture()
def server(trust_server: ServerProcess) -> ServerProcess:
    return trust_server


def _measure(http: httpx.Client, exists: Callable[[], httpx.Response], missing: Callable[[], httpx.Response],
             expect: tuple[int, int], n: int = SAMPLES) -> tuple[list[float], list[float]]:
    """Interleave ``n`` timed calls of each in random order; returns (existing, missing) seconds."""
    order = [True] * n + [False] * n
    random.Random(7).shuffle(order)
    for call in (exists, missing) * 10:  # warm up connection, caches and the JIT-free paths alike
        call()
    out: dict[bool, list[float]] = {True: [], False: []}
    for is_existing in order:
        t0 = time.perf_counter()
        r = (exists if is_existing else missing)()
        out[is_existing].append(time.perf_counter() - t0)
        assert r.status_code == (expect[0] if is_existing else expect[1]), r.text
    return out[True], out[False]


def test_restricted_keys_do_not_show_in_response_time(server: ServerProcess) -> None:
    kv = make_kv(tokens=600, num_layers=2, heads=2, head_dim=8, seed=5)  # three 256-token blocks... two full
    header, blob = make_artifact(kv)
    alice = {"Authorization": "Bearer alice-token-0001"}
    bob = {"Authorization": "Bearer bob-token-000002"}
    r = httpx.put(f"{server.url}/v1/artifacts/{header.key}", content=blob, timeout=30,
                  headers={**alice, "X-KVAgent-Visibility": "restricted"})
    assert r.status_code == 201, r.text
    ids = kv.token_ids.tolist()
    hashes = block_hashes(art.context_of(header), ids, 256)
    other = block_hashes(art.context_of(header), [(t + 1) % 50_000 for t in ids], 256)
    missing_key = "0" * 63 + "1"
    results: dict[str, float] = {}
    with httpx.Client(base_url=server.url, timeout=10) as http:
        routes: dict[str, tuple[Callable[[], httpx.Response], Callable[[], httpx.Response]]] = {
            "lookup": (
                lambda: http.get(f"/v1/artifacts/{header.key}", headers=bob),
                lambda: http.get(f"/v1/artifacts/{missing_key}", headers=bob),
            ),
            "prefix lookup": (
                lambda: http.post("/v1/lookup/prefix", json={"block_hashes": hashes}, headers=bob),
                lambda: http.post("/v1/lookup/prefix", json={"block_hashes": other}, headers=bob),
            ),
            "blob": (
                lambda: http.get(f"/v1/artifacts/{header.key}/blob", headers=bob),
                lambda: http.get(f"/v1/artifacts/{missing_key}/blob", headers=bob),
            ),
        }
        for name, (exists, missing) in routes.items():
            results[name] = auc(*_measure(http, exists, missing, (404, 404)))
        # control: a 2 MB download vs a 404 is visible in time even on a busy machine, so the method can tell
        big_header, big_blob = make_artifact(make_kv(tokens=1000, num_layers=2, heads=4, head_dim=32, seed=6))
        r = http.put(f"/v1/artifacts/{big_header.key}", content=big_blob, headers=alice)
        assert r.status_code == 201, r.text
        hit, miss = _measure(
            http,
            lambda: http.get(f"/v1/artifacts/{big_header.key}/blob", headers=alice),
            lambda: http.get(f"/v1/artifacts/{missing_key}/blob", headers=alice),
            (200, 404),
            50,
        )
        results["control: 2 MB blob vs 404"] = auc(hit, miss)
    figures = ", ".join(f"{k} {v:.3f}" for k, v in results.items())
    print(f"AUC (existing restricted slower than missing), n={SAMPLES} each: {figures}")
    for name in routes:
        assert abs(results[name] - 0.5) <= 0.1, results
    assert results["control: 2 MB blob vs 404"] > 0.8, results
