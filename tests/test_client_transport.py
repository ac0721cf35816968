"""The registry client's transport (kvagent/client/transport.py): node failover under many threads, a
caller's ``httpx.Client`` left as it was, and retry decisions taken on types, never on message text."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from kvagent.client.registry import RegistryClient
from kvagent.errors import RegistryUnavailableError
from tests._kvfixtures import make_artifact, make_kv

HEADER, BLOB = make_artifact(make_kv(num_layers=2, heads=2, tokens=8, head_dim=4, seed=5))
HANDLE = {"key": HEADER.key, "header": HEADER.to_json(), "size": len(BLOB), "visibility": "public",
          "owner": "alice", "blob_url": f"/v1/artifacts/{HEADER.key}/blob", "signature": None}
DEAD, LIVE = "http://dead.test:1", "http://live.test:2"


def test_a_callers_http_client_is_used_as_it_is_never_changed() -> None:
    seen: list[httpx.Request] = []
    hooked: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        if req.url.host == "dead.test":
            raise httpx.ConnectError("connection refused", request=req)
        return httpx.Response(200, json=HANDLE)

    def hook(req: httpx.Request) -> None:
        hooked.append(str(req.url.host))

    http = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://mine.test/api",
                        headers={"X-Mine": "1"}, event_hooks={"request": [hook]})
    before = (http.base_url, dict(http.headers), {k: list(v) for k, v in http.event_hooks.items()})
    c = RegistryClient([DEAD, LIVE], "secret-token-2", client=http, sleep=lambda _s: None)
    assert c.lookup(HEADER.key) is not None  # through a failover, which moves the client on, not `http`
    c.close()
    assert (http.base_url, dict(http.headers), {k: list(v) for k, v in http.event_hooks.items()}) == before
    assert "authorization" not in http.headers and not http.is_closed
    # what was sent: our node and token, the caller's own headers and hooks as well
    assert [r.url.host for r in seen] == ["dead.test", "live.test"] == hooked
    assert all(r.headers["authorization"] == "Bearer secret-token-2" and r.headers["x-mine"] == "1"
               for r in seen)
    assert str(seen[-1].url) == f"{LIVE}/v1/artifacts/{HEADER.key}"
    assert http.get("/x").request.url == "http://mine.test/api/x"  # the caller's client still works as theirs


def test_two_requests_failing_on_one_node_switch_it_once_not_back() -> None:
    """A and B are both in flight on the dead node; A fails over and is answered by the live one before B's
    failure is handled. B's failure is about the node A already left: the client stays on the live node
    (moving on again would send it back to the dead one)."""
    b_on_dead, a_on_live = threading.Event(), threading.Event()
    seen: list[tuple[str, str]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        who = threading.current_thread().name
        seen.append((who, str(req.url.host)))
        if req.url.host == "dead.test":
            if who == "A" and not b_on_dead.is_set():
                assert b_on_dead.wait(10)
            elif who == "B" and not a_on_live.is_set():
                b_on_dead.set()
                assert a_on_live.wait(10)
            raise httpx.ConnectError("connection refused", request=req)
        if who == "A":
            a_on_live.set()
        return httpx.Response(200, json=HANDLE)

    http = httpx.Client(transport=httpx.MockTransport(handler))
    c = RegistryClient([DEAD, LIVE], "tok", client=http, sleep=lambda _s: None)
    found: dict[str, object] = {}

    def call() -> None:
        found[threading.current_thread().name] = c.lookup(HEADER.key)

    threads = [threading.Thread(target=call, name=n) for n in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert found.keys() == {"A", "B"} and all(h is not None for h in found.values())
    assert sorted(seen) == [("A", "dead.test"), ("A", "live.test"), ("B", "dead.test"), ("B", "live.test")]
    assert c.base_url == LIVE
    assert c.lookup(HEADER.key) is not None and seen[-1][1] == "live.test"


def test_many_threads_through_a_dead_first_node_switch_it_once() -> None:
    threads_n, calls_n = 16, 10
    first_round = threading.Barrier(threads_n)
    lock = threading.Lock()
    dead_hits: list[str] = []
    torn: list[str] = []
    c: RegistryClient

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.host == "dead.test":
            with lock:
                dead_hits.append(threading.current_thread().name)
                waits = len(dead_hits) <= threads_n
            if waits:  # every thread's first request is in flight on the dead node at once
                first_round.wait(10)
            raise httpx.ConnectError("connection refused", request=req)
        if c.base_url != LIVE:  # a request on the live node while the client says it is elsewhere
            torn.append(c.base_url)
        return httpx.Response(200, json=HANDLE)

    http = httpx.Client(transport=httpx.MockTransport(handler))
    c = RegistryClient([DEAD, LIVE], "tok", client=http, sleep=lambda _s: None)
    results: list[object] = []
    errors: list[BaseException] = []

    def work() -> None:
        for _ in range(calls_n):
            try:
                results.append(c.lookup(HEADER.key))
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=work, name=f"t{i}") for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(results) == threads_n * calls_n and all(r is not None for r in results)
    assert sorted(dead_hits) == sorted(f"t{i}" for i in range(threads_n))  # each thread's first try only
    assert torn == [] and c.base_url == LIVE
    assert c.transport.failovers == 1


def test_an_error_text_naming_the_deadline_is_still_the_last_error_when_the_deadline_passes() -> None:
    """The registry's 503 says "deadline passed" (its own upstream's): that text must not change what the
    client does. When the call's own deadline then passes, its error names the 503 as the last failure."""
    calls: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req)
        return httpx.Response(503, json={"error": "unavailable", "detail": "upstream deadline passed"})

    http = httpx.Client(transport=httpx.MockTransport(handler))
    # a long backoff: the one wait is cut to the deadline, so the second attempt finds it passed
    c = RegistryClient("http://reg.test", "tok", client=http, retries=50, backoff_initial=30.0)
    t0 = time.monotonic()
    with pytest.raises(RegistryUnavailableError) as info:
        c.lookup(HEADER.key, timeout=0.2)
    assert time.monotonic() - t0 < 5 and len(calls) == 1
    assert "deadline passed after registry lookup failed with HTTP 503" in str(info.value)
    from kvagent.errors import RegistryDeadlineError

    assert isinstance(info.value, RegistryDeadlineError)
    assert "upstream deadline passed" in info.value.last_error


def test_retries_follow_the_error_type_not_its_text() -> None:
    from kvagent.client.transport import Deadline, RetryPolicy, Transport
    from kvagent.errors import RegistryDeadlineError, RegistryError

    t = Transport("http://reg.test", retry=RetryPolicy(attempts=4, sleep=lambda _s: None))

    def failing(exc: Exception) -> list[int]:
        n = [0]

        def fn() -> None:
            n[0] += 1
            raise exc

        with pytest.raises(type(exc)):
            t.retrying(fn)
        return n

    assert failing(RegistryUnavailableError("HTTP 503")) == [4]  # transient: every attempt
    assert failing(RegistryUnavailableError("its deadline passed, says the upstream")) == [4]  # text: moot
    assert failing(RegistryDeadlineError("registry lookup gave up: its 1 s deadline passed")) == [1]
    assert failing(RegistryError("the registry has deadline passed in its detail, and it is HTTP 400")) == [1]
    d = Deadline(30.0)
    n = [0]

    def once() -> None:
        n[0] += 1
        raise RegistryUnavailableError("a registry 503 about a deadline passed upstream")

    with pytest.raises(RegistryUnavailableError):
        t.retrying(once, d)
    assert n == [4] and d.last_error == "a registry 503 about a deadline passed upstream"
    t.close()
