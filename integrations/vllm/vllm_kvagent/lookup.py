"""Scheduler side: the longest cached prefix of a prompt, found through kvagent's resolver off vLLM's loop.

vLLM's scheduler asks the connector for every waiting request on every step, and waits for the answer. A
lookup goes through kvagent's tiers (memory, local store, then the registry with its policy, price caps,
verification and circuit breaker), which can take a network round trip and a download, so it runs on a
worker thread: until it is done the connector answers "not known yet" (vLLM asks again on a later step)
and the request simply waits while others run. Nothing here imports vLLM.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

from kvagent import KVAgent, KVAgentError

log = logging.getLogger("vllm.kvagent")  # under "vllm": shown by vLLM's own log handler


@dataclass(frozen=True)
class Match:
    """A cached prefix: ``n`` tokens of the prompt, in the local store under ``key`` (0: nothing usable)."""

    n: int
    key: str
    source: str  # "store" | "registry" | "memory" | ""
    reason: str
    engine: str | None = None  # the engine the artifact's header names, when known


NO_MATCH = Match(0, "", "", "")


class PrefixLookups:
    """Background lookups per request id, answered from the finished ones (thread-safe)."""

    def __init__(
        self,
        agent: KVAgent,
        *,
        engine: str,
        same_engine_only: bool,
        shared_reads: bool = False,
        workers: int = 1,
        first_wait_s: float = 0.02,
    ) -> None:
        self.agent = agent
        #: how long the first poll of a request waits for its lookup: a local lookup (memory, the store's
        #: index) answers within it, in the step that asked, instead of a later one. Returning at once left
        #: the lookup thread to win the GIL from vLLM's busy scheduler loop (which polls again every step),
        #: and a lookup of a few ms took up to ~1 s of one agent's TTFT; a slow one (the registry) still
        #: runs on while the request waits and others decode.
        self.first_wait_s = first_wait_s
        self.engine = engine
        self.same_engine_only = same_engine_only
        self.shared_reads = shared_reads
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvagent-lookup")
        self._running: dict[str, Future[Match]] = {}
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """Measure kvagent's prefill in the background when this machine has no measured sample for the model
        (``KVAgent.warm_up``, about 2 s), as ``kvagent serve`` does before it listens: the first registry
        decision then does not probe on a request's time (it cost a first request ~0.5 s). Off with
        ``calibrate_at_start`` false. Lookups queue behind it on the one worker; a poll meanwhile answers
        "not yet"."""
        if not self.agent.config.calibrate_at_start:
            return

        def run() -> None:
            try:
                self.agent.warm_up()
            except Exception:  # noqa: BLE001 - a failed measurement leaves the first decision to probe
                log.exception("kvagent could not calibrate at start; the first registry decision probes")

        self._pool.submit(run)

    def poll(self, req_id: str, token_ids: Sequence[int], namespace: str | None) -> Match | None:
        """The lookup's result for ``req_id``, starting it on first call (and waiting up to ``first_wait_s``
        for it then); None while it runs."""
        first = False
        with self._lock:
            fut = self._running.get(req_id)
            if fut is None:
                ids = tuple(token_ids)
                fut = self._pool.submit(self._find, ids, namespace)
                self._running[req_id] = fut
                first = True
        if first and self.first_wait_s > 0:
            wait([fut], timeout=self.first_wait_s)  # releases the GIL to the lookup meanwhile
        if not fut.done():
            return None
        return fut.result()

    def forget(self, req_id: str) -> None:
        with self._lock:
            fut = self._running.pop(req_id, None)
        if fut is not None:
            fut.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _find(self, ids: tuple[int, ...], namespace: str | None) -> Match:
        try:
            return self.find(ids, namespace)
        except KVAgentError as exc:  # a lookup failure is a miss: vLLM computes the prompt itself
            log.warning(
                "kvagent lookup of %d tokens failed, vLLM computes them: %s: %s",
                len(ids),
                type(exc).__name__,
                exc,
            )
            return Match(0, "", "", f"lookup failed ({type(exc).__name__}: {exc})")
        except Exception as exc:  # noqa: BLE001 - never let a lookup take the scheduler down; logged, then a miss
            log.exception("kvagent lookup of %d tokens failed unexpectedly, vLLM computes them", len(ids))
            return Match(0, "", "", f"lookup failed ({type(exc).__name__}: {exc})")

    def find(self, ids: tuple[int, ...], namespace: str | None) -> Match:
        """The longest prefix of ``ids`` kvagent holds or can fetch (blocking). A salted request
        (``namespace`` set) looks in its own namespace of this machine's cache, never at the registry; with
        ``shared_reads`` it then also looks at unsalted KV (local store and registry) when its own falls
        short."""
        own = self._find_in(ids, namespace)
        if namespace is None or not self.shared_reads or own.n >= len(ids):
            return own
        shared = self._find_in(ids, None)
        if shared.n > own.n:
            return shared
        return replace(own, reason=f"{own.reason}; unsalted KV: {shared.reason}") if not own.n else own

    def _find_in(self, ids: tuple[int, ...], namespace: str | None) -> Match:
        resolver = self.agent.resolver
        kwargs: dict[str, object] = {"registry": None} if namespace else {}
        res = resolver.resolve(ids, namespace=namespace, document=False, compute=False, **kwargs)  # type: ignore[arg-type]
        n = res.kv.n_tokens if res.kv is not None else 0
        origin = res.info.origin or res.key
        if n == 0:
            return Match(0, "", "", res.info.reason)
        engine = self._engine_of(origin)
        if self.same_engine_only and engine != self.engine:
            why = (
                f"the cached KV was computed by {engine or 'an engine its header does not name (kvagent)'}, "
                f"not {self.engine} (engines='same')"
            )
            return Match(0, "", "", why, engine)
        return Match(n, origin, res.info.source, res.info.reason, engine)

    def _engine_of(self, key: str) -> str | None:
        """The engine the stored artifact's header names: its header alone (the worker verifies the whole
        artifact when it loads it), not a second read, checksum and decode of tens of MB per lookup."""
        header = self.agent.store.header(key)
        if header is None:
            raise KVAgentError(f"the cached prefix {key[:16]}… is not in the local store")
        return header.engine


def aligned(n: int, block_size: int) -> int:
    """``n`` rounded down to whole blocks of ``block_size`` tokens."""
    return n // block_size * block_size


#: builds the kvagent facade the scheduler side resolves with (tests inject their own)
AgentFactory = Callable[[], KVAgent]
