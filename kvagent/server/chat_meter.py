"""What one chat/completion run counted, and the server's metrics it moves: the cache report, the tokens
generated, the time to the first token, and how the request ended."""

from __future__ import annotations

import time

from ..chat.turn import Cached, Guided, TurnEvent, settled
from ..engines import Finish, Token
from ..reuse.info import CacheInfo
from .metrics import Metrics


class ChatMeter:
    """Observes a run's events in order (``observe``), keeping what its answer, its bill and the metrics
    need; ``kind`` labels the metrics (``chat`` or ``completion``)."""

    def __init__(self, metrics: Metrics, kind: str, n_prompt: int, started: float) -> None:
        self.metrics, self.kind, self.n_prompt, self.started = metrics, kind, n_prompt, started
        self.info: CacheInfo | None = None  # what the cache did (settled once an engine's Finish says)
        self.n_generated = 0
        self.ttft: float | None = None

    @property
    def cached_tokens(self) -> int:
        return self.info.cached_tokens if self.info else 0

    def observe(self, ev: TurnEvent) -> None:
        m = self.metrics
        if isinstance(ev, Cached):
            self.info = ev.info
            m.prompt_tokens.inc(self.n_prompt)
            m.prefix_cache_queries.inc(self.n_prompt)
            if self.info and self.info.cached_tokens and self.info.source:
                m.prefix_cache_hits.labels(self.info.source).inc(self.info.cached_tokens)
        elif isinstance(ev, Token):
            self.n_generated += 1
            m.generation_tokens.inc()
            if self.ttft is None:
                self.ttft = time.perf_counter() - self.started
                m.ttft.labels(self.kind).observe(self.ttft)
        elif isinstance(ev, Guided):
            self.n_generated = ev.n_tokens
            m.generation_tokens.inc(self.n_generated)
            self.ttft = time.perf_counter() - self.started
        elif isinstance(ev, Finish) and ev.reason != "error":
            m.observe_finish(self.kind, ev.usage)
            if self.info is not None and self.info.status == "engine":  # the engine reused what it found
                self.info = settled(self.info, ev.usage)
                if self.info.cached_tokens:
                    m.prefix_cache_hits.labels(self.info.source).inc(self.info.cached_tokens)

    def ended(self, result: str) -> None:
        """Count the request's end: ``ok``, ``error`` or ``cancelled`` (a stream that did not finish)."""
        self.metrics.requests.labels(self.kind, result).inc()
