"""Hosted chat generation: admission, per-principal cache namespaces, and the generation thread.

A request's prompt ids resume through the host's :class:`~kvagent.resolver.Resolver` (memory → the host's
prompt cache → this server's published artifacts the caller may see → prefill). Private prompt KVs live in
a namespace derived from the caller's identity with a server secret (HMAC), never from anything the
client sends, so one principal's prompts can never be found from another's ids (vLLM's ``cache_salt``
lesson, CVE-2025-46570). The model runs one generation at a time; requests queue up to ``max_queue``
and beyond that are refused with 429 and ``Retry-After``.
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

from ..engine import GenerationParams
from ..errors import KVAgentError
from ..kv import KVCache
from ..resolver import MAX_TAIL, CacheInfo, Resolver
from ..textstream import TextStream
from .auth import Principal
from .http import ApiError
from .source import ServerSource
from .state import State

log = logging.getLogger("kvagent.server")

#: ("cache", CacheInfo) first, then ("token", id)..., then ("done", reason, n) or ("error", exc)
Event = tuple[Any, ...]


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


@dataclass
class ChatJob:
    """One generation: the full prompt ids, decoding settings, and who asks."""

    ids: list[int]
    params: GenerationParams
    principal: Principal
    started: float = field(default_factory=time.perf_counter)
    #: a guided reply (a forced tool call, a JSON schema): writes the text, asking the model to continue
    #: the prompt (plus what is written so far) for every value; see kvagent.guided
    guide: Callable[[Callable[[str], Iterator[str]]], str] | None = None


class ChatService:
    """Runs chat/completion jobs on the host's model, one at a time, with a bounded queue."""

    def __init__(self, st: State, secret: bytes, max_queue: int) -> None:
        self.st = st
        self._secret = secret
        self.max_queue = max(1, max_queue)
        self._active = 0
        self._lock = threading.Lock()
        self._recent_s = 1.0  # a moving estimate of one job's duration, for Retry-After
        self.saves = QuietSaver(self)

    def namespace(self, principal: Principal) -> str:
        """The private cache namespace of ``principal``: HMAC of its name under the server secret."""
        return hmac.new(self._secret, b"kvagent-ns\0" + principal.name.encode(), hashlib.sha256).hexdigest()

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold a queue slot for a job; 429 with Retry-After when the queue is full."""
        with self._lock:
            if self._active >= self.max_queue:
                wait = max(1, round(self._recent_s * self._active / 2))
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

    def run(self, job: ChatJob, emit: Callable[[Event], None], cancelled: threading.Event) -> None:
        """Resolve the prompt's KV and generate, emitting events; never raises (errors are emitted)."""
        host = self.st.host
        n, reason = 0, "length"
        save: Callable[[], None] | None = None
        try:
            with host.lock:
                if cancelled.is_set():
                    emit(("done", "cancelled", 0))
                    return
                if job.guide is not None:
                    n = self._guided(job, emit, cancelled)
                    emit(("done", "stop", n))
                    return
                kv = None
                info = CacheInfo("prefill", "one-token prompt", 0, len(job.ids))
                feed = job.ids
                on_prompt: Callable[[KVCache], None] | None = None
                if len(job.ids) > 1:
                    resolver = host.agent.resolver
                    ns = self.namespace(job.principal)
                    res = resolver.resolve(
                        job.ids[:-1], namespace=ns, registry=ServerSource(self.st, job.principal),
                        document=False, defer_save=True, max_tail=MAX_TAIL,
                    )
                    kv, save, info = res.kv, res.save, res.info
                    if kv is not None:
                        feed = [*res.tail, job.ids[-1]]
                    if res.tail:  # the reply's first forward computes the rest of the prompt: keep its KV
                        on_prompt, save = _keeper(resolver, ns, (len(feed), kv.n_tokens if kv is not None else 0))
                emit(("cache", info))
                stops = set(job.params.stop_token_ids)
                it = host.engine.stream(kv, feed, job.params, on_prompt=on_prompt)
                try:
                    for tok in it:
                        if cancelled.is_set():
                            reason = "cancelled"
                            break
                        n += 1
                        emit(("token", tok))
                        if tok in stops:
                            reason = "stop"
                            break
                finally:
                    it.close()
            emit(("done", reason, n))
        except KVAgentError as exc:
            emit(("error", exc))
        except Exception as exc:  # reported to the client as a generic 500, logged here
            log.exception("chat generation failed")
            emit(("error", exc))
        if save is not None:  # keep the prompt's KV for the next turn, once the answer went out
            self.saves.submit(save)

    def _guided(self, job: ChatJob, emit: Callable[[Event], None], cancelled: threading.Event) -> int:
        """Run a guided reply (under the model lock): every continuation resumes through the resolver, so each
        value's prompt reuses the previous one's KV. Emits ("cache", info) then ("guided", text, n_tokens)."""
        host = self.st.host
        tokenizer = host.agent.tokenizer
        guide = job.guide
        assert guide is not None
        infos: list[CacheInfo] = []
        generated = [0]

        def continue_(forced: str) -> Iterator[str]:
            ids = job.ids + list(tokenizer.encode(forced, add_special_tokens=False)) if forced else job.ids
            res = host.agent.resolver.resolve(
                ids[:-1], namespace=self.namespace(job.principal), registry=ServerSource(self.st, job.principal),
                document=False, defer_save=True,
            )
            infos.append(res.info)
            def tokens() -> Iterator[int]:
                for tok in host.engine.stream(res.kv, ids[-1:], job.params):
                    if cancelled.is_set():
                        return
                    generated[0] += 1
                    yield tok

            yield from TextStream(tokenizer, job.params.stop_token_ids).deltas(tokens())

        out = guide(continue_)
        emit(("cache", infos[0] if infos else CacheInfo("prefill", "guided reply fixed by its schema", 0, 0)))
        emit(("guided", out, generated[0]))
        return generated[0]


class QuietSaver:
    """Writes prompt KVs to the local store on one background thread, when no request is queued or running.

    A prompt's KV is in memory as soon as it is computed, so the next turn finds it at once; the store copy
    (encoding, hashing and writing the whole KV) only has to outlive memory. Writing it while the next request
    runs would slow that request down (an agent often asks its follow-up the moment an answer arrives), so
    a save waits until the server has been quiet for ``quiet_s``, but never longer than ``max_wait_s``.
    At most ``max_pending`` saves wait; beyond that the oldest is dropped, with a log line.
    """

    def __init__(self, service: ChatService, quiet_s: float = 0.5, max_wait_s: float = 5.0, max_pending: int = 32):
        self._service, self.quiet_s, self.max_wait_s, self.max_pending = service, quiet_s, max_wait_s, max_pending
        self._pending: collections.deque[tuple[float, Callable[[], None]]] = collections.deque()
        self._cv = threading.Condition()
        self._quiet_since = time.monotonic()
        self._running = False
        self._thread: threading.Thread | None = None

    def submit(self, save: Callable[[], None]) -> None:
        with self._cv:
            if len(self._pending) >= self.max_pending:
                self._pending.popleft()
                log.warning("dropped a pending prompt-KV save: %d are waiting for a quiet moment", self.max_pending)
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


def _keeper(resolver: Resolver, namespace: str, timed: tuple[int, int] = (0, 0),
            ) -> tuple[Callable[[KVCache], None], Callable[[], None]]:
    """(on_prompt, save) for a prompt whose tail the reply computes: the prompt's KV goes to memory as soon as
    the first forward has it (for the next turn), and to the local store once the answer has been sent.
    ``timed`` = (tokens the first forward feeds, tokens cached before them): that forward is a continuation
    prefill, recorded for the cost model."""
    kept: list[KVCache] = []
    t0 = time.perf_counter()

    def on_prompt(kv: KVCache) -> None:
        resolver.record_continuation(timed[0], timed[1], time.perf_counter() - t0)
        kept.append(kv)
        resolver.keep(kv, namespace=namespace, store=False)

    def save() -> None:
        if kept:
            resolver.keep(kept[0], namespace=namespace)

    return on_prompt, save
