"""Where a document's KV should come from: a pure cost model, no I/O.

Choices: ``local-hit`` (already here), ``fetch-and-resume`` (download the artifact from the registry,
then decode locally), ``remote-generate`` (the registry continues from its copy; only the answer
crosses the network) and ``local-prefill`` (compute it).

**Time.** A fetch must pay: its estimated time (round trip + transfer + loading + verifying + prefilling
what the remote artifact does not cover) must beat a local prefill of the whole document.

**Money** is a second term in the same comparison, not a separate path. When the registry sells the load
(``Request.price_micros``, integer µUSD), the purchase is refused if it exceeds
``PolicyParams.max_price_per_load_micros`` or ``budget_left_micros``; otherwise a fetch must also be
free or cheaper than prefilling the tokens it covers here (``covered × prefill_cost_micros_per_token``),
*and* still pay in time. Egress (``egress_usd_per_gb``, capped by ``max_egress_usd``) is reported.

**Estimates** are inputs (``kvagent.costs.calibration.CostModel`` measures them), each an ``Estimate`` that
says where it came from: ``measured n times``, ``first-use probe``, ``assumed`` (the built-in constants,
the last resort) or ``fixed``, and how uncertain it is (``Estimate.spread``: a log-space standard deviation,
from the fit's residuals and its extrapolation, else a default per source).

**Near a tie** the uncertainty decides: a fetch predicted slower than the prefill is still taken when the
expected loss of taking it (the mean of ``max(0, fetch - prefill)`` over both estimates' spreads) is at most
``PolicyParams.tie_tolerance`` of the prefill, because reuse also saves the compute and leaves the KV cached
here; the reason then says "near a tie". A free fetch over a link never measured is taken near a tie
(predicted at most twice the prefill) whatever the expected loss: it measures the link, and the registry
tier gives such a download up once the rest would take longer than prefilling, so the loss is bounded and
paid once per link. Setting ``PolicyParams.prefill_tokens_per_s`` or ``bandwidth_bytes_per_s`` fixes
that rate: it replaces every measured estimate (for debugging and benchmarks, e.g.
``bandwidth_bytes_per_s=1e12`` forces fetches, ``min_tokens=10**9`` forces prefill).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .market import DEFAULT_PREFILL_MICROS_PER_TOKEN

LOCAL_HIT = "local-hit"
REMOTE_GENERATE = "remote-generate"
FETCH = "fetch-and-resume"
LOCAL_PREFILL = "local-prefill"
CHOICES = (LOCAL_HIT, REMOTE_GENERATE, FETCH, LOCAL_PREFILL)

MEASURED, PROBE, ASSUMED, FIXED = "measured", "probe", "assumed", "fixed"
SOURCES = (MEASURED, PROBE, ASSUMED, FIXED)

ASSUMED_PREFILL_TOKENS_PER_S = 2000.0  # a small model on CPU: the last resort when nothing was measured
ASSUMED_BANDWIDTH_BYTES_PER_S = 100e6  # ~0.8 Gbit/s
#: log-space standard deviation of an estimate that does not carry its own
DEFAULT_SPREAD = {"measured": 0.3, "probe": 0.5, "assumed": 1.0, "fixed": 0.0}
LOOKUP_DEADLINE_FLOOR_S = 0.5
LOOKUP_DEADLINE_CEILING_S = 20.0  # the registry client's read timeout


@dataclass(frozen=True)
class Estimate:
    """A quantity (seconds or bytes/s) and where it came from."""

    value: float
    source: str = ASSUMED
    n: int = 0  # how many measurements a ``measured`` estimate rests on (0: measured in this process)
    rel_sd: float | None = None  # log-space standard deviation; None: DEFAULT_SPREAD of the source

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"Estimate.source must be one of {SOURCES}, got {self.source!r}")
        if not (math.isfinite(self.value) and self.value >= 0):
            raise ValueError(f"Estimate.value must be finite and >= 0, got {self.value!r}")
        if self.rel_sd is not None and not (math.isfinite(self.rel_sd) and self.rel_sd >= 0):
            raise ValueError(f"Estimate.rel_sd must be finite and >= 0, got {self.rel_sd!r}")

    @property
    def spread(self) -> float:
        """Log-space standard deviation: the estimate's own, else the default of its source."""
        return self.rel_sd if self.rel_sd is not None else DEFAULT_SPREAD[self.source]

    @property
    def sd(self) -> float:
        """The spread in the estimate's own unit (approximately ``value × spread``)."""
        return self.value * self.spread

    @property
    def provenance(self) -> str:
        """``measured 12x``, ``first-use probe``, ``assumed`` or ``fixed by PolicyParams``."""
        if self.source == MEASURED:
            return f"measured {self.n}x" if self.n else "measured in this process"
        if self.source == PROBE:
            return "first-use probe"
        return "fixed by PolicyParams" if self.source == FIXED else "assumed"

    def scaled(self, factor: float) -> Estimate:
        return Estimate(self.value * factor, self.source, self.n, self.rel_sd)


@dataclass(frozen=True)
class PolicyParams:
    """Settings of the cost model. ``prefill_tokens_per_s`` / ``bandwidth_bytes_per_s`` fix a rate
    (replacing measured ones); left None, measured estimates are used, else the assumed constants."""

    min_tokens: int = 256  # below this, nothing is fetched or published
    bandwidth_bytes_per_s: float | None = None  # fixed link rate to the registry
    rtt_s: float = 0.05  # one request round trip, when none was measured
    egress_usd_per_gb: float = 0.09
    max_egress_usd: float | None = None  # refuse fetches that would cost more than this
    prefill_tokens_per_s: float | None = None  # fixed local prefill rate
    reuse_cost_ratio: float = 49.7  # prefill costs this many times more than loading its KV (when unmeasured)
    remote_generate_overhead_s: float = 0.1  # server-side queueing and suffix prefill
    latency_budget_s: float | None = None  # time to first token we aim for
    # a local prefill's cost, µUSD/token
    prefill_cost_micros_per_token: int = DEFAULT_PREFILL_MICROS_PER_TOKEN
    max_price_per_load_micros: int | None = None  # refuse purchases above this (None: no limit)
    budget_left_micros: int | None = None  # refuse purchases above what is left (None: unlimited)
    tie_tolerance: float = 0.05  # take a fetch whose expected loss is at most this share of the prefill

    def __post_init__(self) -> None:
        for name in ("bandwidth_bytes_per_s", "prefill_tokens_per_s", "reuse_cost_ratio"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"PolicyParams.{name} must be positive")
        if (
            self.min_tokens < 0
            or self.rtt_s < 0
            or self.egress_usd_per_gb < 0
            or self.remote_generate_overhead_s < 0
            or self.prefill_cost_micros_per_token < 0
            or (self.max_price_per_load_micros or 0) < 0
            or (self.budget_left_micros or 0) < 0
            or not 0 <= self.tie_tolerance < 1
        ):
            raise ValueError("PolicyParams thresholds, latencies and prices must not be negative")


@dataclass(frozen=True)
class Request:
    """What is known when a document's KV is needed; the estimates are optional inputs."""

    n_tokens: int
    local_hit: bool = False
    remote_artifact: bool = False  # the registry holds an artifact we may fetch
    remote_tokens: int | None = None  # tokens that artifact covers (a prefix may cover fewer); default all
    artifact_bytes: int | None = None  # its size; estimated from bytes_per_token when unknown
    bytes_per_token: int | None = None
    remote_generate: bool = False  # the registry can continue generation from its copy
    bandwidth_bytes_per_s: float | None = None  # measured in this process (prefer ``link_bytes_per_s``)
    prefill_tokens_per_s: float | None = None  # measured in this process (prefer ``prefill_s``)
    price_micros: int | None = None  # what the registry charges for this load, µUSD (None: not sold)
    prefill_s: Estimate | None = None  # prefilling all n_tokens here
    rest_prefill_s: Estimate | None = None  # prefilling what the remote artifact leaves, after its prefix
    load_s: Estimate | None = None  # decoding and checking the artifact's bytes here
    verify_s: Estimate | None = None  # checking the fetched KV against its tokens
    link_rtt_s: Estimate | None = None
    link_bytes_per_s: Estimate | None = None


@dataclass(frozen=True)
class Decision:
    choice: str
    reason: str
    estimates: dict[str, Any] = field(default_factory=dict)


def _prefill_estimates(req: Request, params: PolicyParams, covered: int) -> tuple[Estimate, Estimate]:
    """(whole document, the part a ``covered``-token artifact leaves), by precedence fixed > given >
    assumed."""
    rest = req.n_tokens - covered
    if params.prefill_tokens_per_s is not None:
        rate = params.prefill_tokens_per_s
        return Estimate(req.n_tokens / rate, FIXED), Estimate(rest / rate, FIXED)
    if req.prefill_s is not None:
        whole = req.prefill_s
        share = rest / req.n_tokens if req.n_tokens else 0.0
        return whole, req.rest_prefill_s if req.rest_prefill_s is not None else whole.scaled(share)
    if req.prefill_tokens_per_s is not None:
        rate = req.prefill_tokens_per_s
        return Estimate(req.n_tokens / rate, MEASURED), Estimate(rest / rate, MEASURED)
    rate = ASSUMED_PREFILL_TOKENS_PER_S
    return Estimate(req.n_tokens / rate, ASSUMED), Estimate(rest / rate, ASSUMED)


def _bandwidth(req: Request, params: PolicyParams) -> Estimate:
    if params.bandwidth_bytes_per_s is not None:
        return Estimate(params.bandwidth_bytes_per_s, FIXED)
    if req.link_bytes_per_s is not None and req.link_bytes_per_s.value > 0:
        return req.link_bytes_per_s
    if req.bandwidth_bytes_per_s is not None:
        return Estimate(req.bandwidth_bytes_per_s, MEASURED)
    return Estimate(ASSUMED_BANDWIDTH_BYTES_PER_S, ASSUMED)


def _money_refusal(req: Request, params: PolicyParams, covered: int) -> tuple[str | None, str]:
    """(why the purchase is refused or None, what to say about the price when accepted)."""
    price = req.price_micros
    if price is None:
        return None, ""
    if price <= 0:
        return None, "free; "
    local_cost = covered * params.prefill_cost_micros_per_token
    cap = params.max_price_per_load_micros
    if cap is not None and price > cap:
        return f"price {price} µUSD exceeds the {cap} µUSD limit per load", ""
    budget = params.budget_left_micros
    if budget is not None and price > budget:
        return f"price {price} µUSD exceeds the {budget} µUSD budget left", ""
    if price >= local_cost:
        return f"price {price} µUSD ≥ local prefill cost of {local_cost} µUSD: buying does not pay", ""
    return None, f"bought for {price} µUSD: below local prefill cost of {local_cost} µUSD; "


def expected_excess(mean: float, sd: float) -> float:
    """E[max(0, X)] for X ~ Normal(mean, sd): the expected loss of a choice whose extra cost is X."""
    if sd <= 0:
        return max(0.0, mean)
    z = mean / sd
    return mean * 0.5 * (1 + math.erf(z / math.sqrt(2))) + sd * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def _pm(sd: float) -> str:
    return f" ± {sd:.2f} s" if sd >= 0.005 else ""


def decide(req: Request, params: PolicyParams = PolicyParams()) -> Decision:
    """Pick where the KV of ``req`` should come from, with the reason in words, numbers and provenance."""
    if req.local_hit:
        return Decision(LOCAL_HIT, "the KV is already cached locally", {})
    covered = min(req.n_tokens, req.remote_tokens if req.remote_tokens is not None else req.n_tokens)
    prefill, rest = _prefill_estimates(req, params, covered)
    bw = _bandwidth(req, params)
    prefill_s = prefill.value
    rate = req.n_tokens / prefill_s if prefill_s > 0 else math.inf
    est: dict[str, Any] = {
        "prefill_s": prefill_s, "prefill_sd_s": prefill.sd, "prefill_tokens_per_s": rate,
        "bandwidth_bytes_per_s": bw.value, "sources": {"prefill": prefill.provenance, "link": bw.provenance},
    }
    where = " on this machine" if prefill.source in (MEASURED, PROBE) else ""
    prefill_txt = (
        f"prefill of {req.n_tokens} tokens ≈ {prefill_s:.2f} s{_pm(prefill.sd)} at {rate:.0f} tok/s "
        f"({prefill.provenance}{where})"
    )
    if req.n_tokens < params.min_tokens:
        return Decision(
            LOCAL_PREFILL,
            f"{req.n_tokens} tokens is below the {params.min_tokens}-token threshold; {prefill_txt}",
            est,
        )
    if not req.remote_artifact and not req.remote_generate:
        return Decision(LOCAL_PREFILL, f"the registry has nothing for it; {prefill_txt}", est)

    rtt = req.link_rtt_s if req.link_rtt_s is not None else Estimate(params.rtt_s, ASSUMED)
    notes: list[str] = []
    if req.remote_artifact:
        nbytes = (
            req.artifact_bytes if req.artifact_bytes is not None else covered * (req.bytes_per_token or 0)
        )
        transfer_s = nbytes / bw.value
        covered_share = covered / req.n_tokens if req.n_tokens else 0.0
        load = req.load_s if req.load_s is not None else Estimate(
            prefill_s * covered_share / params.reuse_cost_ratio, ASSUMED
        )
        verify = req.verify_s if req.verify_s is not None else Estimate(0.0, FIXED)
        fetch_s = rtt.value + transfer_s + load.value + verify.value + rest.value
        # the two prefill estimates come from one fit: their shared error cancels in the difference
        gap_sd = (prefill_s - rest.value) * prefill.spread
        rest_extra = rest.value * max(0.0, rest.spread - prefill.spread)
        diff_sd = math.sqrt(rtt.sd ** 2 + (transfer_s * bw.spread) ** 2 + load.sd ** 2 + verify.sd ** 2
                            + gap_sd ** 2 + rest_extra ** 2)
        fetch_sd = math.sqrt(rtt.sd ** 2 + (transfer_s * bw.spread) ** 2 + load.sd ** 2 + verify.sd ** 2
                             + rest.sd ** 2)
        loss = expected_excess(fetch_s - prefill_s, diff_sd)
        usd = nbytes / 1e9 * params.egress_usd_per_gb
        est.update(
            fetch_s=fetch_s,
            fetch_rest_s=rest.value,
            fetch_sd_s=fetch_sd,
            fetch_bytes=nbytes,
            fetch_usd=usd,
            fetch_covered_tokens=covered,
            rtt_s=rtt.value,
            load_s=load.value,
            verify_s=verify.value,
            rest_prefill_s=rest.value,
            difference_sd_s=diff_sd,
            fetch_expected_loss_s=loss,
        )
        est["sources"].update(rtt=rtt.provenance, load=load.provenance)
        fetch_txt = (
            f"fetch {nbytes / 1e6:.1f} MB at {bw.value / 1e6:.0f} MB/s ≈ {fetch_s:.2f} s{_pm(fetch_sd)} "
            f"(link {bw.provenance}, load {load.provenance}; ${usd:.4f} egress)"
        )
        if covered < req.n_tokens:
            fetch_txt += f" + prefill of the other {req.n_tokens - covered} tokens"
        tolerance_s = params.tie_tolerance * prefill_s
        near_tie = abs(fetch_s - prefill_s) < max(diff_sd, tolerance_s)
        est["near_tie"] = near_tie
        refused, bought = _money_refusal(req, params, covered)
        if req.price_micros is not None:
            est["price_micros"] = req.price_micros
            est["local_prefill_cost_micros"] = covered * params.prefill_cost_micros_per_token
        if params.max_egress_usd is not None and usd > params.max_egress_usd:
            notes.append(f"{fetch_txt} exceeds the ${params.max_egress_usd:.4f} egress cap")
        elif refused is not None:
            notes.append(f"not bought: {refused}")
        elif (fetch_s >= prefill_s and near_tie and fetch_s <= 2 * prefill_s and bw.source == ASSUMED
              and not req.price_micros):
            # a free fetch over a link never measured, near a tie (predicted at most twice the prefill):
            # taking it measures the link (and the landing), and the loss is bounded: the registry tier gives
            # such a download up once the rest would take longer than prefilling. Declining would leave every
            # later read of this link on the same assumption.
            return Decision(
                FETCH,
                (
                    f"{bought}near a tie on a link never measured: {fetch_txt} ≈ {prefill_txt}; fetching "
                    f"measures the link (the download is given up once the rest would take longer than "
                    f"prefilling)"
                ),
                est,
            )
        elif fetch_s >= prefill_s and loss > tolerance_s:
            tie = (f" (near a tie, but the expected loss of fetching ≈ {loss:.2f} s exceeds "
                   f"{params.tie_tolerance:.0%} of the prefill)" if near_tie else "")
            notes.append(f"{bought}{fetch_txt} ≥ {prefill_txt}: fetching does not pay{tie}")
        elif (
            params.latency_budget_s is not None and fetch_s > params.latency_budget_s and req.remote_generate
        ):
            notes.append(f"{fetch_txt} exceeds the {params.latency_budget_s:.2f} s latency budget")
        elif fetch_s >= prefill_s:
            return Decision(
                FETCH,
                (
                    f"{bought}near a tie: {fetch_txt} ≈ {prefill_txt}; the expected loss of reusing ≈ "
                    f"{loss:.2f} s is "
                    f"within {params.tie_tolerance:.0%} of the prefill: reusing"
                ),
                est,
            )
        else:
            tie = "; near a tie, within the estimates' spread" if near_tie else ""
            return Decision(FETCH, f"{bought}{fetch_txt} < {prefill_txt}{tie}", est)
    if req.remote_generate:
        gen_s = rtt.value + params.remote_generate_overhead_s
        est["remote_generate_s"] = gen_s
        if gen_s < prefill_s:
            why = "; ".join(notes) or "no artifact to fetch"
            return Decision(
                REMOTE_GENERATE, f"{why}; remote generate starts in ≈ {gen_s:.2f} s < {prefill_txt}", est
            )
        notes.append(f"remote generate ≈ {gen_s:.2f} s does not beat the prefill")
    return Decision(LOCAL_PREFILL, "; ".join(notes) or prefill_txt, est)


def lookup_deadline(
    prefill_estimate_s: float,
    *,
    rtt_s: float | None = None,
    fraction: float = 0.5,
    floor: float = LOOKUP_DEADLINE_FLOOR_S,
    ceiling: float = LOOKUP_DEADLINE_CEILING_S,
) -> float:
    """How long to wait for registry metadata: waiting longer than the prefill it could save is pointless.

    ``fraction`` of the prefill estimate, at least 4 measured round trips (never more than the prefill
    itself), bounded below by ``floor`` and above by ``ceiling`` (the client's own timeout).
    """
    want = fraction * prefill_estimate_s
    if rtt_s is not None:
        want = max(want, min(4 * rtt_s, prefill_estimate_s))
    return min(ceiling, max(floor, want))


def should_publish(n_tokens: int, params: PolicyParams = PolicyParams()) -> tuple[bool, str]:
    """Whether a freshly prefilled document is worth publishing, and why."""
    if n_tokens < params.min_tokens:
        return False, f"{n_tokens} tokens is below the {params.min_tokens}-token publish threshold"
    return True, f"{n_tokens} tokens ≥ the {params.min_tokens}-token threshold"
