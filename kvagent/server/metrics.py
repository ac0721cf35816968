"""Prometheus metrics of the server (one registry per app, so several apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.lookups = Counter("kvagent_lookups_total", "Artifact lookups", ["kind", "result"], registry=r)
        self.publishes = Counter("kvagent_publishes_total", "Publish attempts", ["result"], registry=r)
        self.bytes_served = Counter("kvagent_bytes_served_total", "Blob bytes sent", registry=r)
        self.generates = Counter("kvagent_generate_total", "Generate calls", ["result"], registry=r)
        self.tokens = Counter("kvagent_generated_tokens_total", "Tokens generated", registry=r)
        self.latency = Histogram(
            "kvagent_request_seconds", "Request latency (to the end of the body)", ["method", "route"], registry=r
        )

