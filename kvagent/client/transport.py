"""The transport under every registry client: one ``httpx.Client``, the registry's nodes, the retry policy.

- Nodes: ``base_url`` may name several stateless nodes of one registry. The active node is an index under a
  lock; an attempt that failed on node ``i`` moves the client on only while ``i`` is still the active node,
  so many threads failing on one dead node switch it once (never back and forth), and every request is
  built from one consistent read of it.
- The ``httpx.Client``: ours, or the caller's, which is never changed: every request carries its absolute
  URL and our ``Authorization`` header itself (the caller's base URL, headers and event hooks stay theirs).
- Retries: on ``RegistryUnavailableError`` (unreachable, timed out, 5xx, 429, honouring ``Retry-After``)
  with exponential backoff and jitter, a bounded number of attempts and a bounded total delay, never on a
  ``RegistryDeadlineError`` (the call's own deadline passed). Decisions are on types, never message text.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from ..errors import RegistryDeadlineError, RegistryUnavailableError

T = TypeVar("T")
DEFAULT_TIMEOUT = httpx.Timeout(connect=3.0, read=20.0, write=20.0, pool=3.0)
_MAX_BACKOFF_S = 5.0


def node_urls(base_url: str | Sequence[str]) -> tuple[str, ...]:
    """The registry node URLs of ``base_url`` (a list, or one comma-separated string)."""
    raw = base_url.split(",") if isinstance(base_url, str) else list(base_url)
    urls = tuple(u.strip().rstrip("/") for u in raw if u.strip())
    if not urls:
        raise ValueError("RegistryClient needs at least one registry URL")
    return urls


@dataclass(frozen=True)
class RetryPolicy:
    """How a call is retried: ``attempts`` in all, within ``max_seconds``; backoff from ``backoff_initial``
    seconds; ``sleep`` is injectable so tests do not wait."""

    attempts: int = 3
    max_seconds: float = 20.0
    backoff_initial: float = 0.2
    sleep: Callable[[float], None] | None = None

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("retries counts attempts and must be at least 1")


class Deadline:
    """A limit on one call's total time, every attempt and back-off included (None: the client's timeouts)."""

    def __init__(self, seconds: float | None) -> None:
        if seconds is not None and not seconds > 0:
            raise ValueError(f"a registry call timeout must be positive, got {seconds!r}")
        self.seconds = seconds
        self._end = time.monotonic() + seconds if seconds is not None else None
        self.last_error = ""  # what the last attempt failed with, named when the deadline passes

    def left(self) -> float:
        return max(0.0, self._end - time.monotonic()) if self._end is not None else float("inf")

    def kw(self, what: str, base: httpx.Timeout) -> dict[str, Any]:
        """The per-request ``timeout``: the client's own, shortened to what is left; RegistryDeadlineError
        once it has passed."""
        if self._end is None:
            return {}
        left = self.left()
        if left <= 0.001:
            after = f" after {self.last_error}" if self.last_error else ""
            raise RegistryDeadlineError(
                f"registry {what} gave up: its {self.seconds:.2f} s deadline passed{after}", self.last_error
            )

        def cap(t: float | None) -> float:
            return left if t is None else min(left, t)

        return {
            "timeout": httpx.Timeout(
                connect=cap(base.connect), read=cap(base.read), write=cap(base.write), pool=cap(base.pool)
            )
        }

    def cap(self, wait: Callable[[RetryCallState], float]) -> Callable[[RetryCallState], float]:
        """``wait``, never sleeping past the deadline."""
        return lambda state: min(float(wait(state)), self.left())


class _Wait:
    """Retry-After when the server sent one, else exponential backoff with jitter."""

    def __init__(self, initial: float, maximum: float):
        self._backoff = wait_exponential(multiplier=initial, max=maximum) + wait_random(0, initial)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RegistryUnavailableError) and exc.retry_after is not None:
            return exc.retry_after
        return float(self._backoff(state))


# retried: transient failures; not retried: a call whose own deadline has passed
RETRYABLE = retry_if_exception_type(RegistryUnavailableError) & retry_if_not_exception_type(
    RegistryDeadlineError
)


class Transport:
    """Requests to one registry's nodes through one ``httpx.Client``, with failover and retries."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        token: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        client: httpx.Client | None = None,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        self.nodes = node_urls(base_url)
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._owns_client = client is None
        self.http = client if client is not None else httpx.Client(timeout=timeout)
        self._lock = threading.Lock()
        self._active = 0
        self._failovers = 0
        self._last = threading.local()  # the node this thread's last request went to
        self._retry_kw: dict[str, Any] = dict(
            stop=stop_after_attempt(retry.attempts) | stop_after_delay(retry.max_seconds),
            wait=_Wait(retry.backoff_initial, _MAX_BACKOFF_S),
            retry=RETRYABLE,
            reraise=True,
        )
        if len(self.nodes) > 1:
            self._retry_kw["before_sleep"] = lambda _state: self._failed(getattr(self._last, "node", None))
        if retry.sleep is not None:
            self._retry_kw["sleep"] = retry.sleep

    # -- nodes --------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """The node that requests go to now."""
        with self._lock:
            return self.nodes[self._active]

    @property
    def failovers(self) -> int:
        """How many times the active node has moved on."""
        with self._lock:
            return self._failovers

    def _node(self) -> int:
        with self._lock:
            i = self._active
        self._last.node = i
        return i

    def _failed(self, node: int | None) -> None:
        """An attempt on ``node`` failed: move on to the next node, unless another thread already did."""
        with self._lock:
            if node is not None and node == self._active and len(self.nodes) > 1:
                self._active = (node + 1) % len(self.nodes)
                self._failovers += 1

    def _url(self, node: int, path: str) -> str:
        return self.nodes[node] + path

    def _headers(self, headers: dict[str, str] | None) -> dict[str, str]:
        return {**self._auth, **headers} if headers else dict(self._auth)

    # -- requests -----------------------------------------------------------------------------
    @property
    def timeout(self) -> httpx.Timeout:
        """The ``httpx.Client``'s own timeouts (a deadline shortens them per request)."""
        return self.http.timeout

    def request(self, method: str, path: str, what: str, *, headers: dict[str, str] | None = None,
                **kw: Any) -> httpx.Response:
        """One attempt of ``method path`` (read). A refused connection never reached the node, so it is
        sent to the next node at once; any other transport failure is a RegistryUnavailableError."""
        err: httpx.TransportError | None = None
        node = 0
        for _ in range(len(self.nodes)):
            node = self._node()
            try:
                return self.http.request(method, self._url(node, path), headers=self._headers(headers), **kw)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                err = exc
                self._failed(node)
            except httpx.TransportError as exc:
                err = exc
                break
        assert err is not None
        raise RegistryUnavailableError(
            f"registry {what} at {self.nodes[node]} failed: {type(err).__name__}: {err}"
        ) from err

    @contextmanager
    def stream(self, method: str, path: str, *, headers: dict[str, str] | None = None
               ) -> Iterator[httpx.Response]:
        """``method path`` on the active node, its body unread (httpx errors pass through)."""
        node = self._node()
        with self.http.stream(method, self._url(node, path), headers=self._headers(headers)) as resp:
            yield resp

    def open(self, method: str, path: str, *, headers: dict[str, str] | None = None,
             **kw: Any) -> httpx.Response:
        """``method path`` on the active node, its body unread: the caller closes it (httpx errors pass
        through)."""
        node = self._node()
        req = self.http.build_request(method, self._url(node, path), headers=self._headers(headers), **kw)
        return self.http.send(req, stream=True)

    def open_elsewhere(self, url: str) -> httpx.Response:
        """GET an absolute URL off the registry (a presigned object-store URL), body unread; never with a
        bearer token, ours or the ``httpx.Client``'s."""
        req = self.http.build_request("GET", url)
        req.headers.pop("authorization", None)
        return self.http.send(req, stream=True)

    def healthy(self) -> bool:
        """The active node answers its health check."""
        try:
            return self.http.get(self._url(self._node(), "/v1/healthz"), headers=self._headers(None)
                                 ).status_code == 200
        except httpx.TransportError:
            return False

    # -- retries ------------------------------------------------------------------------------
    def retrying(self, fn: Callable[[], T], deadline: Deadline | None = None) -> T:
        """``fn()`` under the retry policy (and ``deadline``, which also bounds the attempts and waits)."""
        kw = self._retry_kw
        if deadline is None or deadline.seconds is None:
            return Retrying(**kw)(fn)
        kw = {**kw, "stop": kw["stop"] | stop_after_delay(deadline.seconds), "wait": deadline.cap(kw["wait"])}

        def attempt() -> T:
            try:
                return fn()
            except RegistryDeadlineError:
                raise
            except RegistryUnavailableError as exc:
                deadline.last_error = str(exc)[:300]
                raise

        return Retrying(**kw)(attempt)

    def close(self) -> None:
        """Close the ``httpx.Client`` if it is ours (a caller's stays open)."""
        if self._owns_client:
            self.http.close()
