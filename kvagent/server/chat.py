"""Hosted chat generation: admission, per-principal cache namespaces, and the prompt turn on the host's
engine.

A request's prompt ids resume through the host's :class:`~kvagent.reuse.resolver.Resolver` (memory → the
host's
prompt cache → this server's published artifacts the caller may see → prefill), by way of the prompt-turn
core (:mod:`kvagent.chat.turn`). Private prompt KVs live in a namespace derived from the caller's identity
with
a server secret (HMAC), never from anything the client sends, so one principal's prompts can never be found
from another's ids (vLLM's ``cache_salt`` lesson, CVE-2025-46570). Generations decode together in the
engine's batch (up to ``--max-batch``); requests queued or running are bounded by ``max_queue``, beyond which
they are refused with 429 and ``Retry-After``.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..chat.turn import Cached, Guide, Guided, PromptTurns
from ..engines import Cancel, Finish, Usage
from ..engines.params import GenerationParams
from ..errors import KVAgentError
from ..reuse.info import CacheInfo, CacheStatus
from .auth import Principal
from .http import ApiError
from .sizing import default_max_queue
from .source import ServerSource
from .state import State

log = logging.getLogger("kvagent.server")


def load_secret(data_dir: Path) -> bytes:
    """The server's secret for deriving cache namespaces (created once, mode 0600, in the data dir)."""
    path = Path(data_dir) / "namespace.secret"
    try:
        raw = path.read_bytes()
        if len(raw) >= 32:
            return raw
    except FileNotFoundError:
        pass
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    try:
        os.link(tmp, path)  # the first writer wins; a concurrent starter reads the winner's secret
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes()


def principal_namespace(secret: bytes, principal: Principal) -> str:
    """The private cache namespace of ``principal``: HMAC of its name under the server's ``secret``."""
    return hmac.new(secret, b"kvagent-ns\0" + principal.name.encode(), hashlib.sha256).hexdigest()


@dataclass
class ChatJob:
    """One generation: the full prompt ids, decoding settings, stop strings, and who asks."""

    ids: list[int]
    params: GenerationParams
    principal: Principal
    started: float = field(default_factory=time.perf_counter)
    #: a guided reply (a forced tool call, a JSON schema): writes the text, asking the model to continue
    #: the prompt (plus what is written so far) for every value; see kvagent.chat.guided
    guide: Guide | None = None
    stops: tuple[str, ...] = ()


class ChatService:
    """Runs chat/completion jobs on the host's engine (batched), with a bounded queue."""

    def __init__(self, st: State, secret: bytes, max_queue: int | None) -> None:
        self.st = st
        self._secret = secret
        host = self.host = st.serving()
        self.max_queue = max(1, max_queue if max_queue is not None else default_max_queue(host.max_batch))
        self._active = 0
        self._lock = threading.Lock()
        self._recent_s = 1.0  # a moving estimate of one job's duration, for Retry-After
        self.saves = QuietSaver(self)
        self.turns = PromptTurns(host.batch, host.agent.resolver, host.agent.tokenizer)

    def namespace(self, principal: Principal) -> str:
        """The private cache namespace of ``principal``: HMAC of its name under the server secret."""
        return principal_namespace(self._secret, principal)

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold a queue slot for a job; 429 with Retry-After when the queue is full."""
        with self._lock:
            if self._active >= self.max_queue:
                batch = max(1, self.host.max_batch)
                wait = max(1, round(self._recent_s * self._active / batch / 2))
                raise ApiError(429, "rate_limit_exceeded",
                               f"the server is busy ({self._active} requests queued or running); retry later",
                               {"Retry-After": str(wait)})
            self._active += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                self._recent_s = 0.8 * self._recent_s + 0.2 * (time.perf_counter() - t0)
            self.saves.poke()

    def busy(self) -> bool:
        """Whether a request is queued or running."""
        return self._active > 0

    def run(self, job: ChatJob, sink: Callable[[Any], None], cancel: Cancel) -> None:
        """Resolve the prompt's KV and start the generation (blocking until it is submitted; a guided reply
        until it is written). Events go to ``sink``: Cached, then Token... (or one Guided), then one
        Finish."""
        if cancel.is_set():
            sink(Finish("cancelled", Usage(len(job.ids), 0, 0)))
            return
        # an engine that resolves the prompt itself says what it reused after the charge: no priced artifact
        source = ServerSource(self.st, job.principal, sell=not self.turns.engine_resolves)
        resolve: dict[str, Any] = {"namespace": self.namespace(job.principal), "registry": source}
        if job.guide is not None:
            reply = self.turns.guided(job.ids, job.params, job.guide, cancel=cancel, **resolve)
            fixed = CacheInfo(CacheStatus.PREFILL, "guided reply fixed by its schema", 0, 0)
            sink(Cached(reply.info or fixed))
            sink(Guided(reply.text, reply.n_tokens))
            sink(Finish("stop", reply.usage))
            return
        turn = self.turns.prepare(job.ids, job.params, stops=job.stops, **resolve)
        sink(Cached(turn.info))
        save = turn.save

        def on_event(ev: Any) -> None:
            sink(ev)
            if isinstance(ev, Finish) and save is not None:  # keep the prompt's KV once the answer went out
                self.saves.submit(save)

        self.turns.submit(turn, on_event, cancel)


class QuietSaver:
    """Writes prompt KVs to the local store on one background thread, when no request is queued or running.

    A prompt's KV is in memory as soon as it is computed, so the next turn finds it at once; the store copy
    (encoding, hashing and writing the whole KV) only has to outlive memory. Writing it while the next request
    runs would slow that request down (an agent often asks its follow-up the moment an answer arrives), so
    a save waits until the server has been quiet for ``quiet_s``, but never longer than ``max_wait_s``.
    At most ``max_pending`` saves wait; beyond that the oldest is dropped, with a log line.
    """

    def __init__(
        self, service: ChatService, quiet_s: float = 0.5, max_wait_s: float = 5.0, max_pending: int = 32
    ):
        self._service, self.quiet_s, self.max_wait_s, self.max_pending = (
            service,
            quiet_s,
            max_wait_s,
            max_pending,
        )
        self._pending: collections.deque[tuple[float, Callable[[], None]]] = collections.deque()
        self._cv = threading.Condition()
        self._quiet_since = time.monotonic()
        self._running = False
        self._thread: threading.Thread | None = None

    def submit(self, save: Callable[[], None]) -> None:
        with self._cv:
            if len(self._pending) >= self.max_pending:
                self._pending.popleft()
                log.warning(
                    "dropped a pending prompt-KV save: %d are waiting for a quiet moment", self.max_pending
                )
            self._pending.append((time.monotonic(), save))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="kvagent-prompt-saver")
                self._thread.start()
            self._cv.notify_all()

    def poke(self) -> None:
        """A request ended: the quiet period starts now."""
        with self._cv:
            self._quiet_since = time.monotonic()
            self._cv.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted save has been written (True) or ``timeout`` passed (False)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.05))
        return True

    def _next(self) -> Callable[[], None]:
        with self._cv:
            while True:
                now = time.monotonic()
                if self._pending:
                    waited = now - self._pending[0][0]
                    quiet = not self._service.busy() and now - self._quiet_since >= self.quiet_s
                    if quiet or waited >= self.max_wait_s:
                        self._running = True
                        return self._pending.popleft()[1]
                    self._cv.wait(min(self.quiet_s, self.max_wait_s - waited))
                else:
                    self._cv.wait()

    def _loop(self) -> None:
        while True:
            save = self._next()
            try:
                save()
            except KVAgentError as exc:  # a cache write: the answer went out already
                log.warning("could not keep the prompt KV (the answer is unaffected): %s", exc)
            except Exception:
                log.exception("saving a prompt KV failed (the answer is unaffected)")
            finally:
                with self._cv:
                    self._running = False
                    self._cv.notify_all()
