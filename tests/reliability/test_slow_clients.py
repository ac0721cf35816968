"""Slow and idle clients against a real server process: 200 connections trickling their headers one byte
per second and 200 uploads that stall never stop /v1/healthz (nor a thread-pool route) answering in
100 ms, and the server closes every one of them at its header / body deadline."""

from __future__ import annotations

import select
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.registry_server import ServerProcess, start_server

pytestmark = pytest.mark.slow
N = 200
HEADER_TIMEOUT, BODY_TIMEOUT = 5, 5
TOKENS = {"alice-token-0001": {"principal": "alice", "publish": True}}
MISSING = "cd" * 32


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(
        tmp_path_factory.mktemp("slow") / "data",
        TOKENS,
        extra_args=["--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT)],
    )
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in srv.log(), srv.log()[-4000:]


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setblocking(False)
    return s


def _closed_by_peer(s: socket.socket) -> bool:
    """True once the server has closed the connection (EOF or reset)."""
    try:
        r, _, _ = select.select([s], [], [], 0)
        if not r:
            return False
        return s.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def _get_ms(port: int, path: str, headers: str = "") -> float:
    """Milliseconds from connecting to the complete answer of one GET on a fresh connection (raw socket: no
    client-library overhead in the figure); asserts a 200 or 404 answer."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    ms = (time.perf_counter() - t0) * 1000
    assert data.startswith((b"HTTP/1.1 200", b"HTTP/1.1 404")), data[:200]
    return ms


def _probe(srv: ServerProcess) -> tuple[float, float]:
    """Latency in ms of /v1/healthz and of a lookup (a route that runs in the worker thread pool)."""
    return (_get_ms(srv.port, "/v1/healthz"),
            _get_ms(srv.port, f"/v1/artifacts/{MISSING}", "Authorization: Bearer alice-token-0001\r\n"))


def test_slowloris_and_stalled_uploads(server: ServerProcess, tmp_path: Path) -> None:
    head = (f"GET /v1/artifacts/{MISSING} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token-0001\r\n"
            "X-Padding: " + "p" * 64 + "\r\n\r\n").encode()
    uploads = [_connect(server.port) for _ in range(N)]
    for s in uploads:  # complete headers, a promised 10 MB body, 1 KB of it, then silence
        s.sendall(
            f"PUT /v1/artifacts/{'ef' * 32} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token-0001\r\n"
            f"Content-Length: {10 << 20}\r\n\r\n".encode()
            + b"x" * 1024
        )
    trickle = [_connect(server.port) for _ in range(N)]
    started = time.monotonic()
    burst_ms = _probe(server)[0]  # answered once the server has taken in the burst of 400 connections
    health, lookup = [], []
    sent = 0
    while time.monotonic() - started < HEADER_TIMEOUT - 1:  # one byte per second per connection
        if sent <= time.monotonic() - started:
            for s in trickle:
                try:
                    s.send(head[sent : sent + 1])
                except (BlockingIOError, ConnectionError):
                    pass
            sent += 1
        h, lk = _probe(server)
        health.append(h)
        lookup.append(lk)
        time.sleep(0.1)
    assert not any(_closed_by_peer(s) for s in trickle), "closed before the header deadline"

    # past both deadlines, every slow connection has been closed by the server
    deadline = time.monotonic() + HEADER_TIMEOUT + BODY_TIMEOUT + 10
    open_trickle, open_uploads = list(trickle), list(uploads)
    while (open_trickle or open_uploads) and time.monotonic() < deadline:
        open_trickle = [s for s in open_trickle if not _closed_by_peer(s)]
        open_uploads = [s for s in open_uploads if not _closed_by_peer(s)]
        time.sleep(0.2)
    closed_after = time.monotonic() - started
    for s in trickle + uploads:
        s.close()
    report = (
        f"first healthz after the burst of {2 * N} connections: {burst_ms:.0f} ms; healthz ms: median "
        f"{statistics.median(health):.1f} max {max(health):.1f} (n={len(health)}); "
        f"lookup ms: median {statistics.median(lookup):.1f} max {max(lookup):.1f}; "
        f"all {2 * N} closed after {closed_after:.1f} s"
    )
    print(report)
    assert not open_trickle and not open_uploads, (
        f"{len(open_trickle)} + {len(open_uploads)} still open; {report}"
    )
    assert len(health) >= 10 and max(health) < 100, report
    assert statistics.median(lookup) < 100, report
    assert _probe(server)[0] < 100
    assert "client disconnected during upload" in server.log()  # the stalled uploads were discarded


def _read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset ends it too)."""
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        return _read_all(s)


def test_oversized_headers_are_refused_and_the_server_keeps_answering(server: ServerProcess) -> None:
    # 64 KB of headers, over the default 32 KB cap, sent in one go and then trickled in pieces
    huge = b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(64)
    )
    assert _raw(server.port, huge + b"\r\n").startswith(b"HTTP/1.1 431"), "a 64 KB header block was accepted"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        for i in range(0, len(huge), 4096):
            try:
                s.sendall(huge[i : i + 4096])
            except (BrokenPipeError, ConnectionResetError):
                break
        reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:100]
    # a request just under the cap, and pipelined requests on one connection, are answered
    ok = (
        b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + b"X-Pad: "
        + b"a" * 30000
        + b"\r\n\r\n"
    )
    assert _raw(server.port, ok).startswith(b"HTTP/1.1 200")
    two = (b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _raw(server.port, two).count(b"HTTP/1.1 200") == 2
