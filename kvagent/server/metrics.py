"""Prometheus metrics of the server (one registry per app, so several apps in one process stay apart)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 51.2, 102.4)
#: actual / predicted seconds: 1.0 is exact; the buckets are symmetric in log space around it
RATIO_BUCKETS = (0.125, 0.25, 0.5, 0.667, 0.8, 0.9, 1.0, 1.111, 1.25, 1.5, 2.0, 4.0, 8.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.lookups = Counter("kvagent_lookups_total", "Artifact lookups", ["kind", "result"], registry=r)
        self.publishes = Counter("kvagent_publishes_total", "Publish attempts", ["result"], registry=r)
        self.bytes_served = Counter("kvagent_bytes_served_total", "Blob bytes sent", registry=r)
        # S3 backend: downloads answered with a presigned object-store URL, and the bytes those URLs cover
        self.presigned = Counter(
            "kvagent_presigned_downloads_total", "Downloads redirected to a presigned URL", registry=r
        )
        self.presigned_bytes = Counter(
            "kvagent_presigned_bytes_total",
            "Blob bytes covered by the presigned URLs issued (metered at issue time)",
            registry=r,
        )
        # requests refused at authentication, by reason: missing, malformed, unknown, expired, revoked,
        # unavailable (the token database could not be asked)
        self.auth_failures = Counter("kvagent_auth_failures_total", "Requests refused for their bearer token",
                                     ["reason"], registry=r)
        self.generates = Counter("kvagent_generate_total", "Generate calls", ["result"], registry=r)
        self.tokens = Counter("kvagent_generated_tokens_total", "Tokens generated", registry=r)
        self.latency = Histogram(
            "kvagent_request_seconds",
            "Request latency (to the end of the body)",
            ["method", "route"],
            registry=r,
        )
        # hosted chat / completions (OpenAI-compatible endpoint); prefix-cache counters in tokens, as vLLM's
        self.prefix_cache_queries = Counter(
            "kvagent_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_cache_hits = Counter(
            "kvagent_prefix_cache_hits", "Prompt tokens served from a cached KV", ["source"], registry=r
        )
        self.ttft = Histogram(
            "kvagent_time_to_first_token_seconds", "Time from request to first generated token", ["endpoint"],
            buckets=(0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 51.2), registry=r,
        )
        self.requests = Counter(
            "kvagent_completion_requests", "Chat/completion requests", ["endpoint", "result"], registry=r
        )
        self.prompt_tokens = Counter("kvagent_prompt_tokens", "Prompt tokens of hosted requests", registry=r)
        self.generation_tokens = Counter("kvagent_generation_tokens", "Tokens generated for hosted requests",
                                         registry=r)
        # the batching engine (as vLLM's num_requests_running/waiting, request_queue/inference_time_seconds)
        self.batch_size = Histogram("kvagent_batch_size", "Sequences decoded together, per decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.step_seconds = Histogram("kvagent_decode_step_seconds", "Duration of one batched decode step",
                                      buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
                                      registry=r)
        self.queue_seconds = Histogram("kvagent_request_queue_time_seconds",
                                       "Time a request waited for a batch slot (after its KV was found)",
                                       ["endpoint"], buckets=_SECONDS, registry=r)
        # observed when a request gets its slot (the one above: when it finishes)
        self.batch_queue_wait = Histogram("kvagent_batch_queue_wait_seconds",
                                          "Time a request waited for a batch slot, observed when it got one",
                                          buckets=_SECONDS, registry=r)
        self.compute_seconds = Histogram("kvagent_request_inference_time_seconds",
                                         "Time from a request's first forward to its last token",
                                         ["endpoint"],
                                         buckets=_SECONDS, registry=r)
        self.shared_prefix = Histogram(
            "kvagent_batch_shared_prefix_size",
            "Sequences of a decode step reading a prefix they share with others in place",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128), registry=r,
        )
        self.running = Gauge("kvagent_num_requests_running", "Requests in the decode batch", registry=r)
        self.waiting = Gauge("kvagent_num_requests_waiting", "Requests waiting for a batch slot",
                             registry=r)
        # every read/prompt/chat of the host checked against the cost model's prediction for the path it took
        self.cost_ratio = Histogram(
            "kvagent_cost_prediction_ratio",
            "Actual over predicted seconds of the path a read, prompt or chat took",
            ["kind", "path"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.cost_actual = Histogram(
            "kvagent_cost_actual_seconds",
            "Actual seconds of the path a read, prompt or chat took",
            ["kind", "path"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60),
            registry=r,
        )

    def watch(self, engine: Any) -> None:
        """Report a batching engine (``TransformersBatchEngine``): steps, running and waiting counts."""
        engine.observer = _StepObserver(self)
        self.running.set_function(lambda: engine.running)
        self.waiting.set_function(lambda: engine.waiting)

    def observe_finish(self, endpoint: str, usage: Any) -> None:
        """A finished request's queue and compute time (``kvagent.engines.Usage``)."""
        self.queue_seconds.labels(endpoint).observe(usage.queue_seconds)
        self.compute_seconds.labels(endpoint).observe(usage.compute_seconds)

    def observe_outcome(self, outcome: Any) -> None:
        """A ``kvagent.costs.calibration.Outcome``: its ratio and actual seconds, by kind and path."""
        self.cost_ratio.labels(outcome.kind, outcome.path).observe(outcome.ratio)
        self.cost_actual.labels(outcome.kind, outcome.path).observe(outcome.actual_s)


class _StepObserver:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def step(self, batch_size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(batch_size)
        self.metrics.step_seconds.observe(seconds)

    def shared_prefix(self, sequences: int) -> None:
        self.metrics.shared_prefix.observe(sequences)

    def queued(self, seconds: float) -> None:
        self.metrics.batch_queue_wait.observe(seconds)
