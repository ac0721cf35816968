"""Slow and idle clients: connection limits of the HTTP server and an HTTP protocol with read deadlines.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) and concurrent connections
(``limit_concurrency``, then 503), but never times out a client that sends its headers or body slowly
(slowloris): such a connection is held forever. :class:`GuardedHttpToolsProtocol` (uvicorn's httptools
protocol, the C parser) adds two deadlines:

* **headers**: the request line and headers must be complete ``header_timeout_s`` after the connection
  opened (or the previous response ended) — a fixed deadline that trickling bytes does not extend;
* **body**: while the request body streams in, each chunk must follow the last within ``body_timeout_s``.

A connection that misses either is closed; the app then sees a client disconnect (an upload in progress
is discarded). While the app works on a request (e.g. generation) no deadline runs. It also caps the
request line plus headers at ``max_header_bytes`` (httptools has no limit of its own): beyond it the
connection gets 431 and is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..errors import ConfigError

log = logging.getLogger("kvagent.server")

#: Environment variable carrying the deadlines to the protocol (also in ``--workers`` processes).
LIMITS_ENV = "KVAGENT_CONNECTION_LIMITS"
#: The HTTP protocol class ``kvagent serve`` runs (uvicorn's ``http`` option).
PROTOCOL = "kvagent.server.limits:GuardedHttpToolsProtocol"


@dataclass(frozen=True)
class ConnectionLimits:
    """Timeouts and sizes that bound what one client connection may hold."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: int = 5
    max_connections: int = 1024
    max_header_bytes: int = 32 << 10

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ConfigError(f"{name} must be positive, got {value!r}")

    def uvicorn_options(self) -> dict[str, Any]:
        """The ``uvicorn.Config`` options these limits set (the protocol reads its deadlines from
        LIMITS_ENV)."""
        return {
            "http": PROTOCOL,
            "timeout_keep_alive": self.keep_alive_s,
            "limit_concurrency": self.max_connections,
        }

    def export(self) -> None:
        """Publish the deadlines to the protocol instances of this process and of worker processes."""
        os.environ[LIMITS_ENV] = json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ConnectionLimits:
        raw = os.environ.get(LIMITS_ENV)
        return cls(**json.loads(raw)) if raw else cls()


class _Deadlines:
    """A connection's one pending deadline (headers or body), closing the transport when it expires."""

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: Any, client: Any) -> None:
        self.loop, self.transport, self.client = loop, transport, client
        self.handle: asyncio.TimerHandle | None = None
        self.phase = ""

    def arm(self, phase: str, seconds: float) -> None:
        self.disarm()
        self.phase = phase
        self.handle = self.loop.call_later(seconds, self._expired, phase, seconds)

    def disarm(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _expired(self, phase: str, seconds: float) -> None:
        self.handle = None
        if not self.transport.is_closing():
            log.info("closed a connection from %s: no complete %s within %.0f s", self.client, phase, seconds)
            self.transport.close()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a body idle timeout and a header size cap."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits = ConnectionLimits.from_env()
        self._header_timeout, self._body_timeout = limits.header_timeout_s, limits.body_timeout_s
        self._max_header_bytes = limits.max_header_bytes
        self._header_bytes = 0  # bytes received while the headers are incomplete
        self._parsed_bytes = 0  # request line and headers parsed so far
        self._too_large = False
        self._guard: _Deadlines | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._guard = _Deadlines(self.loop, transport, self.client)
        self._guard.arm("headers", self._header_timeout)

    def data_received(self, data: bytes) -> None:
        guard = self._guard
        reading_headers = guard is not None and guard.phase == "headers"
        super().data_received(data)
        if guard is None or self.transport.is_closing():
            return
        if guard.phase == "headers" and reading_headers:
            self._header_bytes += len(data)
            if self._header_bytes > self._max_header_bytes:  # still no end of headers
                guard.disarm()
                self._reject_headers()
        elif guard.phase == "body":
            guard.arm("body", self._body_timeout)  # an idle timeout: each chunk re-arms it

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._parsed_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        """Headers that arrived complete: over the cap, stop parsing (uvicorn answers, see
        send_400_response)."""
        self._parsed_bytes += n
        if self._parsed_bytes > self._max_header_bytes:
            self._too_large = True
            raise ValueError("request line and headers exceed the limit")

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            self._reject_headers()
        else:
            super().send_400_response(msg)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self._guard is not None:
            self._guard.arm("body", self._body_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._guard is not None:
            self._guard.disarm()
            self._guard.phase = "app"

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.pipeline:  # a pipelined request, already read, runs now
            return
        if self._guard is not None and not self.transport.is_closing():
            self._header_bytes = 0
            # a fixed deadline: trickled bytes do not extend it
            self._guard.arm("headers", self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._guard is not None:
            self._guard.disarm()
        super().connection_lost(exc)

    def _reject_headers(self) -> None:
        body = b'{"error":"headers_too_large","detail":"request line and headers exceed the limit"}'
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        self.transport.close()
