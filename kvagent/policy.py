"""Where a document's KV should come from: a pure cost model, no I/O.

Choices: ``local-hit`` (already here), ``fetch-and-resume`` (download the artifact from the registry,
then decode locally), ``remote-generate`` (the registry continues from its copy; only the answer
crosses the network) and ``local-prefill`` (compute it). A fetch must pay: its estimated time
(round trip + transfer + loading, which costs 1/``reuse_cost_ratio`` of a prefill, + prefilling what
the remote artifact does not cover) must beat a local prefill. Defaults follow the paper's figures
(egress $0.09/GB, reuse 49.7x cheaper than re-prefill); measured rates override the assumed ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LOCAL_HIT = "local-hit"
REMOTE_GENERATE = "remote-generate"
FETCH = "fetch-and-resume"
LOCAL_PREFILL = "local-prefill"
CHOICES = (LOCAL_HIT, REMOTE_GENERATE, FETCH, LOCAL_PREFILL)


@dataclass(frozen=True)
class PolicyParams:
    """Assumptions of the cost model; every field can be overridden."""

    min_tokens: int = 256  # below this, nothing is fetched or published
    bandwidth_bytes_per_s: float = 100e6  # assumed link to the registry (~0.8 Gbit/s)
    rtt_s: float = 0.05  # one request round trip
    egress_usd_per_gb: float = 0.09
    max_egress_usd: float | None = None  # refuse fetches that would cost more than this
    prefill_tokens_per_s: float = 2000.0  # assumed local prefill rate (a small model on CPU)
    reuse_cost_ratio: float = 49.7  # prefill costs this many times more than loading its KV
    remote_generate_overhead_s: float = 0.1  # server-side queueing and suffix prefill
    latency_budget_s: float | None = None  # time to first token we aim for

    def __post_init__(self) -> None:
        for name in ("bandwidth_bytes_per_s", "prefill_tokens_per_s", "reuse_cost_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PolicyParams.{name} must be positive")
        if (
            self.min_tokens < 0
            or self.rtt_s < 0
            or self.egress_usd_per_gb < 0
            or self.remote_generate_overhead_s < 0
        ):
            raise ValueError("PolicyParams thresholds, latencies and prices must not be negative")


@dataclass(frozen=True)
class Request:
    """What is known when a document's KV is needed."""

    n_tokens: int
    local_hit: bool = False
    remote_artifact: bool = False  # the registry holds an artifact we may fetch
    remote_tokens: int | None = None  # tokens that artifact covers (a prefix may cover fewer); default all
    artifact_bytes: int | None = None  # its size; estimated from bytes_per_token when unknown
    bytes_per_token: int | None = None
    remote_generate: bool = False  # the registry can continue generation from its copy
    bandwidth_bytes_per_s: float | None = None  # measured; overrides the assumed bandwidth
    prefill_tokens_per_s: float | None = None  # measured; overrides the assumed rate


@dataclass(frozen=True)
class Decision:
    choice: str
    reason: str
    estimates: dict[str, Any] = field(default_factory=dict)


def decide(req: Request, params: PolicyParams = PolicyParams()) -> Decision:
    """Pick where the KV of ``req`` should come from, with the reason in words and numbers."""
    if req.local_hit:
        return Decision(LOCAL_HIT, "the KV is already cached locally", {})
    rate = req.prefill_tokens_per_s or params.prefill_tokens_per_s
    bw = req.bandwidth_bytes_per_s or params.bandwidth_bytes_per_s
    prefill_s = req.n_tokens / rate
    est: dict[str, Any] = {"prefill_s": prefill_s, "prefill_tokens_per_s": rate, "bandwidth_bytes_per_s": bw}
    prefill_txt = f"prefill of {req.n_tokens} tokens ≈ {prefill_s:.2f} s at {rate:.0f} tok/s"
    if req.n_tokens < params.min_tokens:
        return Decision(
            LOCAL_PREFILL,
            f"{req.n_tokens} tokens is below the {params.min_tokens}-token threshold; {prefill_txt}",
            est,
        )
    if not req.remote_artifact and not req.remote_generate:
        return Decision(LOCAL_PREFILL, f"the registry has nothing for it; {prefill_txt}", est)

    notes: list[str] = []
    fetch_s: float | None = None
    if req.remote_artifact:
        covered = min(req.n_tokens, req.remote_tokens if req.remote_tokens is not None else req.n_tokens)
        nbytes = (
            req.artifact_bytes if req.artifact_bytes is not None else covered * (req.bytes_per_token or 0)
        )
        transfer_s = nbytes / bw
        fetch_s = (
            params.rtt_s
            + transfer_s
            + covered / rate / params.reuse_cost_ratio
            + (req.n_tokens - covered) / rate
        )
        usd = nbytes / 1e9 * params.egress_usd_per_gb
        est.update(fetch_s=fetch_s, fetch_bytes=nbytes, fetch_usd=usd, fetch_covered_tokens=covered)
        fetch_txt = (
            f"fetch {nbytes / 1e6:.1f} MB at {bw / 1e6:.0f} MB/s ≈ {fetch_s:.2f} s (${usd:.4f} egress)"
        )
        if covered < req.n_tokens:
            fetch_txt += f" + prefill of the other {req.n_tokens - covered} tokens"
        if params.max_egress_usd is not None and usd > params.max_egress_usd:
            notes.append(f"{fetch_txt} exceeds the ${params.max_egress_usd:.4f} egress cap")
            fetch_s = None
        elif fetch_s >= prefill_s:
            notes.append(f"{fetch_txt} ≥ {prefill_txt}: fetching does not pay")
            fetch_s = None
        elif (
            params.latency_budget_s is not None and fetch_s > params.latency_budget_s and req.remote_generate
        ):
            notes.append(f"{fetch_txt} exceeds the {params.latency_budget_s:.2f} s latency budget")
            fetch_s = None
        else:
            return Decision(FETCH, f"{fetch_txt} < {prefill_txt}", est)
    if req.remote_generate:
        gen_s = params.rtt_s + params.remote_generate_overhead_s
        est["remote_generate_s"] = gen_s
        if gen_s < prefill_s:
            why = "; ".join(notes) or "no artifact to fetch"
            return Decision(
                REMOTE_GENERATE, f"{why}; remote generate starts in ≈ {gen_s:.2f} s < {prefill_txt}", est
            )
        notes.append(f"remote generate ≈ {gen_s:.2f} s does not beat the prefill")
    return Decision(LOCAL_PREFILL, "; ".join(notes) or prefill_txt, est)


def should_publish(n_tokens: int, params: PolicyParams = PolicyParams()) -> tuple[bool, str]:
    """Whether a freshly prefilled document is worth publishing, and why."""
    if n_tokens < params.min_tokens:
        return False, f"{n_tokens} tokens is below the {params.min_tokens}-token publish threshold"
    return True, f"{n_tokens} tokens ≥ the {params.min_tokens}-token threshold"
