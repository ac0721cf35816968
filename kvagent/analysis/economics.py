"""Cost model of one document read by N agents: re-prefill vs KV reuse vs shipping vs provider hosting.

Pure arithmetic on a frozen `CostParams`; the defaults reproduce the figures of "Can I Buy Your KV
Cache?" (arXiv 2606.13361) for Qwen3-4B fp16 and a 3774-token document.

Strategies, each with a one-off publish cost (one prefill by whoever makes the KV) and a per-load cost:

- re-prefill: every agent prefills the document itself (no publish cost).
- reuse: every agent continues from a resident KV; costs prefill / r compute (the paper's "reuse").
- shipping: the artifact crosses the network per load: egress of the (compressed) artifact + reuse compute.
- hosting: the provider keeps the KV next to its accelerators: reuse compute + storage for the hosting period.

Break-even: reuse wins once N * C_prefill > publish + N * C_load, i.e. N* = publish / (C_prefill - C_load);
with publish = C_prefill and C_load = C_prefill / r this is the paper's N* = 1 / (1 - 1/r).

`main` is the `kvagent economics` command; it is the only function here that does I/O.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..errors import ConfigError

TOKENS_PER_MTOK = 1_000_000
SECONDS_PER_HOUR = 3600.0

#: Bytes in the paper's "GB": a decimal MB (1e6 B) times 1024. Only this reproduces every published figure:
#: 147456 B x 3774 = 556,498,944 B -> 0.543 "GB" -> $0.0489 egress = 2.59x the prefill ($0.049, 2.6x).
#: GiB (1024**3) gives 0.518 GB, $0.047, 2.47x; SI GB (1e9) gives 0.556 GB, $0.050, 2.65x.
PAPER_BYTES_PER_GB = 1_024_000_000.0

#: Agents reading the document in the paper's headline example.
PAPER_AGENTS = 80_000_000


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of K and V one token occupies across all layers: 2 x layers x kv_heads x head_dim x dtype."""
    for name, value in (
        ("num_layers", num_layers),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
        ("dtype_bytes", dtype_bytes),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


@dataclass(frozen=True)
class CostParams:
    """Inputs of the cost model; the defaults are the paper's (source in each field's comment)."""

    # Paper's headline document (abstract: "3774-token document").
    document_tokens: int = 3774
    # $/1M input tokens; inferred: 3774 x $5e-6 x 80M = $1.51M, the abstract's "~$1.5M re-prefill".
    prefill_usd_per_mtok: float = 5.0
    # Prefill / reuse compute ratio r at 3774 tokens (abstract: "49.7x"); measured ones via
    # params_from_measurement.
    reuse_ratio: float = 49.7
    # Qwen3-4B fp16: 2 x 36 layers x 8 KV heads x 128 dims x 2 B = 147,456 B ("0.148 MB/token", summaries).
    kv_bytes_per_token: int = 147_456
    # Egress $/GB (summaries: $0.049 per 0.54 GB load), a typical cloud internet egress list price.
    egress_usd_per_gb: float = 0.09
    # Bytes in a "GB" for egress and storage; see PAPER_BYTES_PER_GB for why not 1024**3.
    bytes_per_gb: float = PAPER_BYTES_PER_GB
    # Cache-read price as a fraction of the prefill price (abstract: "a 0.1x cache-read tariff").
    cache_read_tariff: float = 0.1
    # Provider storage $/GB-month for hosting (not in the paper: 0 by default; S3 standard is ~0.023).
    storage_usd_per_gb_month: float = 0.0
    # Months the provider keeps the KV hosted; the storage bill is shared by all loads in that period.
    storage_months: float = 1.0
    # Artifact size reduction for shipping (summaries: fp16 KV "nearly incompressible", so 1.0).
    compression_ratio: float = 1.0

    def __post_init__(self) -> None:
        positive = (
            "document_tokens",
            "kv_bytes_per_token",
            "bytes_per_gb",
            "reuse_ratio",
            "compression_ratio",
        )
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
            if f.name in positive and value <= 0:
                raise ConfigError(f"{f.name} must be > 0, got {value!r}")
            if value < 0:
                raise ConfigError(f"{f.name} must not be negative, got {value!r}")


def qwen3_4b(**overrides: Any) -> CostParams:
    """The paper's setting: Qwen3-4B fp16 (36 layers, 8 KV heads, head_dim 128), fields overridable."""
    base = CostParams(kv_bytes_per_token=kv_bytes_per_token(36, 8, 128, 2))
    return replace(base, **overrides)


def params_from_measurement(
    bytes_per_token: int,
    prefill_seconds: float,
    reuse_seconds: float,
    tokens: int,
    gpu_dollars_per_hour: float,
    **overrides: Any,
) -> CostParams:
    """Parameters from measured timings: r = prefill / reuse time, prefill price = GPU time x hourly rate.

    The prefill price assumes the accelerator is billed only for the prefill's wall time (full utilisation).
    """
    for name, value in (
        ("prefill_seconds", prefill_seconds),
        ("reuse_seconds", reuse_seconds),
        ("tokens", tokens),
        ("gpu_dollars_per_hour", gpu_dollars_per_hour),
    ):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a positive number, got {value!r}")
    usd_per_prefill = gpu_dollars_per_hour * prefill_seconds / SECONDS_PER_HOUR
    return CostParams(
        document_tokens=int(tokens),
        prefill_usd_per_mtok=usd_per_prefill / tokens * TOKENS_PER_MTOK,
        reuse_ratio=prefill_seconds / reuse_seconds,
        kv_bytes_per_token=int(bytes_per_token),
        **overrides,
    )


# -- per-artifact and per-load figures -------------------------------------------------------------
def artifact_bytes(p: CostParams, compressed: bool = False) -> float:
    """Size of the document's KV; `compressed` divides by the compression ratio (what shipping moves)."""
    raw = float(p.document_tokens * p.kv_bytes_per_token)
    return raw / p.compression_ratio if compressed else raw


def artifact_gb(p: CostParams, compressed: bool = False) -> float:
    """Artifact size in the model's GB (`bytes_per_gb`)."""
    return artifact_bytes(p, compressed) / p.bytes_per_gb


def prefill_cost(p: CostParams) -> float:
    """$ of one full prefill of the document."""
    return p.document_tokens * p.prefill_usd_per_mtok / TOKENS_PER_MTOK


def reuse_compute_cost(p: CostParams) -> float:
    """$ of continuing from a resident KV: prefill / r."""
    return prefill_cost(p) / p.reuse_ratio


def egress_cost(p: CostParams) -> float:
    """$ of moving the (compressed) artifact once over the network."""
    return artifact_gb(p, compressed=True) * p.egress_usd_per_gb


def shipping_cost(p: CostParams) -> float:
    """$ per load when the artifact is shipped to the agent: egress + reuse compute."""
    return egress_cost(p) + reuse_compute_cost(p)


def storage_cost(p: CostParams) -> float:
    """$ of keeping the (uncompressed) KV hosted for `storage_months`."""
    return artifact_gb(p) * p.storage_usd_per_gb_month * p.storage_months


def hosting_cost(p: CostParams, n_agents: int) -> float:
    """$ per load when the provider hosts the KV: reuse compute + this load's share of storage."""
    _check_agents(n_agents)
    return reuse_compute_cost(p) + storage_cost(p) / n_agents


def break_even(publish_cost: float, load_cost: float, prefill_cost: float) -> float:
    """Smallest N at which publish_cost + N * load_cost <= N * prefill_cost; inf if never."""
    if publish_cost < 0 or load_cost < 0 or prefill_cost < 0:
        raise ConfigError("costs must not be negative")
    saving = prefill_cost - load_cost
    if saving <= 0:
        return math.inf
    return publish_cost / saving


def paper_break_even(reuse_ratio: float) -> float:
    """The paper's closed form N* = 1 / (1 - 1/r); inf for r <= 1."""
    if reuse_ratio <= 1:
        return math.inf
    return 1.0 / (1.0 - 1.0 / reuse_ratio)


def _check_agents(n_agents: int) -> None:
    if isinstance(n_agents, bool) or not isinstance(n_agents, int) or n_agents < 1:
        raise ConfigError(f"the number of agents must be a positive integer, got {n_agents!r}")


# -- report ------------------------------------------------------------------------------------------
STRATEGIES = ("re_prefill", "reuse", "shipping", "hosting")
STRATEGY_LABELS = {
    "re_prefill": "re-prefill",
    "reuse": "reuse (resident KV)",
    "shipping": "ship KV (egress)",
    "hosting": "provider hosting",
}


@dataclass(frozen=True)
class StrategyCost:
    """One strategy for N agents: one-off $ (publish prefill, storage), marginal $ per load, total, N*."""

    name: str
    publish_usd: float
    per_load_usd: float
    total_usd: float
    break_even_agents: float


@dataclass(frozen=True)
class TariffOutcome:
    """A provider selling cache reads at `tariff` x the prefill price."""

    tariff: float
    user_price_per_load: float
    user_discount: float  # prefill price / what the user pays
    provider_cost_per_load: float  # reuse compute + storage share
    provider_margin_per_load: float
    provider_margin_fraction: float  # margin / revenue
    physical_saving: float  # prefill / reuse compute, i.e. r


@dataclass(frozen=True)
class CostReport:
    """Every figure of the model for one parameter set and N agents."""

    params: CostParams
    n_agents: int
    artifact_bytes: float
    artifact_gb: float
    shipped_gb: float
    prefill_per_load: float
    reuse_compute_per_load: float
    egress_per_load: float
    storage_usd: float
    ship_vs_prefill: float  # egress / prefill cost: > 1 means shipping a KV costs more than recomputing it
    paper_break_even: float
    strategies: tuple[StrategyCost, ...]
    tariff: TariffOutcome

    def strategy(self, name: str) -> StrategyCost:
        """The strategy called `name` (one of STRATEGIES)."""
        for s in self.strategies:
            if s.name == name:
                return s
        raise KeyError(name)


def tariff_outcome(p: CostParams, n_agents: int) -> TariffOutcome:
    """What the user saves and the provider earns per load under the cache-read tariff."""
    prefill = prefill_cost(p)
    price = p.cache_read_tariff * prefill
    cost = hosting_cost(p, n_agents)
    margin = price - cost
    return TariffOutcome(
        tariff=p.cache_read_tariff,
        user_price_per_load=price,
        user_discount=prefill / price if price > 0 else math.inf,
        provider_cost_per_load=cost,
        provider_margin_per_load=margin,
        provider_margin_fraction=margin / price if price > 0 else -math.inf,
        physical_saving=p.reuse_ratio,
    )


def strategy_costs(p: CostParams, n_agents: int) -> tuple[StrategyCost, ...]:
    """Totals for N agents of the four strategies, in STRATEGIES order."""
    _check_agents(n_agents)
    prefill = prefill_cost(p)
    storage = storage_cost(p)
    rows = (
        ("re_prefill", 0.0, prefill, 0.0),
        ("reuse", prefill, reuse_compute_cost(p), 0.0),
        ("shipping", prefill, shipping_cost(p), 0.0),
        ("hosting", prefill, reuse_compute_cost(p), storage),
    )
    out = []
    for name, publish, per_load, fixed in rows:
        one_off = publish + fixed
        total = one_off + n_agents * per_load
        if name == "re_prefill":
            n_star = math.inf  # the baseline never "breaks even" against itself
        else:
            n_star = break_even(one_off, per_load, prefill)
        out.append(StrategyCost(name, one_off, per_load, total, n_star))
    return tuple(out)


def report(params: CostParams, n_agents: int = PAPER_AGENTS) -> CostReport:
    """All figures for `params` and `n_agents` agents reading the document."""
    _check_agents(n_agents)
    prefill = prefill_cost(params)
    return CostReport(
        params=params,
        n_agents=n_agents,
        artifact_bytes=artifact_bytes(params),
        artifact_gb=artifact_gb(params),
        shipped_gb=artifact_gb(params, compressed=True),
        prefill_per_load=prefill,
        reuse_compute_per_load=reuse_compute_cost(params),
        egress_per_load=egress_cost(params),
        storage_usd=storage_cost(params),
        ship_vs_prefill=egress_cost(params) / prefill if prefill > 0 else math.inf,
        paper_break_even=paper_break_even(params.reuse_ratio),
        strategies=strategy_costs(params, n_agents),
        tariff=tariff_outcome(params, n_agents),
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def to_dict(result: CostReport) -> dict[str, Any]:
    """A strict-JSON-safe dict of the report; infinities (never breaks even) become null."""
    return _json_safe(asdict(result))


def _usd(x: float) -> str:
    if not math.isfinite(x):
        return "never" if x > 0 else "-inf"
    sign, x = ("-" if x < 0 else ""), abs(x)
    if x >= 1e6:
        return f"{sign}${x / 1e6:,.4g}M"
    if x >= 1:
        return f"{sign}${x:,.2f}"
    return f"{sign}${x:.4g}"


def _count(x: float) -> str:
    return "never" if not math.isfinite(x) else f"{x:,.3g}"


def _versus(name: str, ratio: float) -> str:
    if name == "re_prefill":
        return "1x"
    return f"{ratio:,.3g}x cheaper" if ratio >= 1 else f"{1 / ratio:,.3g}x dearer"


def format_table(result: CostReport) -> str:
    """A plain-text summary: one row per strategy, then the headline ratios."""
    p = result.params
    baseline = result.strategy("re_prefill").total_usd
    header = (
        "strategy",
        "one-off",
        "per load",
        f"total (N={result.n_agents:,})",
        "vs re-prefill",
        "break-even N*",
    )
    rows = [header]
    for s in result.strategies:
        ratio = baseline / s.total_usd if s.total_usd > 0 else math.inf
        rows.append(
            (
                STRATEGY_LABELS[s.name],
                _usd(s.publish_usd),
                _usd(s.per_load_usd),
                _usd(s.total_usd),
                _versus(s.name, ratio),
                "-" if s.name == "re_prefill" else _count(s.break_even_agents),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t = result.tariff
    lines += [
        "",
        f"document: {p.document_tokens:,} tokens, KV {p.kv_bytes_per_token:,} B/token "
        f"= {result.artifact_gb:.3g} GB (shipped {result.shipped_gb:.3g} GB at {p.compression_ratio:g}x "
        "compression)",
        f"prefill {_usd(result.prefill_per_load)}/load; reuse compute "
        f"{_usd(result.reuse_compute_per_load)}/load "
        f"(r = {p.reuse_ratio:.3g}x); egress {_usd(result.egress_per_load)}/load "
        f"= {result.ship_vs_prefill:.3g}x the prefill",
        f"break-even N* = 1/(1 - 1/r) = {_count(result.paper_break_even)}",
        f"cache-read tariff {t.tariff:g}x: user pays {_usd(t.user_price_per_load)}/load "
        f"({t.user_discount:.3g}x cheaper), "
        f"provider cost {_usd(t.provider_cost_per_load)}, margin {_usd(t.provider_margin_per_load)}/load "
        f"({t.provider_margin_fraction:.1%}); physical saving {t.physical_saving:.3g}x",
        f"(GB = {p.bytes_per_gb:,.0f} bytes)",
    ]
    return "\n".join(lines)


# -- the market: a price both sides gain from ---------------------------------------------------------
MICROS_PER_USD = 1_000_000
DELIVERIES = ("shipped", "hosted")


@dataclass(frozen=True)
class MarketBand:
    """Selling one document's KV per load, delivered ``shipped`` (the buyer downloads it and pays its own
    reuse compute; the seller pays egress) or ``hosted`` (the seller generates next to the KV: reuse compute
    and storage are the seller's). The publisher made the KV once (one prefill).

    Both sides gain at a price P with ``floor < P < ceiling``: the floor is the seller's per-load cost plus
    the production cost spread over ``n_sales``; the ceiling is what the buyer saves against prefilling.
    """

    delivery: str
    n_sales: int
    production_usd: float  # one prefill, made once by the publisher
    serve_usd: float  # seller's cost per load
    floor_usd: float  # serve + production / n_sales
    ceiling_usd: float  # buyer's prefill cost minus the buyer's own cost of using the KV
    band_open: bool
    min_sales: float  # the fewest sales for which some price lets both sides gain (inf: none)
    tariff_price_usd: float  # the cache-read tariff x the prefill price
    tariff_break_even_sales: float  # the publisher's break-even number of sales at the tariff price
    tariff_buyer_saving_usd: float  # per load, at the tariff price
    tariff_buyer_savings_total_usd: float  # over n_sales loads

    def micros(self, usd: float) -> int:
        """``usd`` as integer micro-units (rounded to nearest), the unit the registry charges in."""
        return round(usd * MICROS_PER_USD)


def market_band(p: CostParams, delivery: str, n_sales: int) -> MarketBand:
    """The price band of one delivery mode for ``n_sales`` loads (see MarketBand)."""
    _check_agents(n_sales)
    prefill, reuse = prefill_cost(p), reuse_compute_cost(p)
    if delivery == "shipped":
        serve, ceiling = egress_cost(p), prefill - reuse
    elif delivery == "hosted":
        serve, ceiling = reuse + storage_cost(p) / n_sales, prefill
    else:
        raise ConfigError(f"delivery must be one of {DELIVERIES}, got {delivery!r}")
    floor = serve + prefill / n_sales
    price = p.cache_read_tariff * prefill
    return MarketBand(
        delivery=delivery, n_sales=n_sales, production_usd=prefill, serve_usd=serve, floor_usd=floor,
        ceiling_usd=ceiling, band_open=floor < ceiling,
        min_sales=break_even(prefill, serve, ceiling),
        tariff_price_usd=price, tariff_break_even_sales=break_even(prefill, serve, price),
        tariff_buyer_saving_usd=ceiling - price, tariff_buyer_savings_total_usd=n_sales * (ceiling - price),
    )


def market_report(p: CostParams, n_sales: int) -> tuple[MarketBand, ...]:
    return tuple(market_band(p, d, n_sales) for d in DELIVERIES)


def _uusd(x: float) -> str:
    return "never" if not math.isfinite(x) else f"{round(x * MICROS_PER_USD):,} uUSD"


def format_market(bands: tuple[MarketBand, ...], p: CostParams) -> str:
    """Plain-text market summary: per delivery, the band, the break-even sales and the buyer's saving."""
    lines = [
        f"market for one {p.document_tokens:,}-token document (prices in uUSD = 1e-6 USD, as the registry "
        "charges)"
    ]
    for b in bands:
        band = (f"{_uusd(b.floor_usd)} < price < {_uusd(b.ceiling_usd)}" if b.band_open
                else f"empty (floor {_uusd(b.floor_usd)} >= ceiling {_uusd(b.ceiling_usd)})")
        lines += [
            f"{b.delivery}: seller's cost {_uusd(b.serve_usd)}/load + production {_uusd(b.production_usd)} "
            "once",
            f"  band at {b.n_sales:,} sales: {band}; both gain from {_count(b.min_sales)} sales on",
            f"  at the {p.cache_read_tariff:g}x tariff ({_uusd(b.tariff_price_usd)}/load): publisher breaks "
            "even after "
            f"{_count(b.tariff_break_even_sales)} sales; buyer saves "
            f"{_uusd(b.tariff_buyer_saving_usd)}/load, "
            f"{_usd(b.tariff_buyer_savings_total_usd)} over {b.n_sales:,} loads",
        ]
    return "\n".join(lines)


# -- CLI ---------------------------------------------------------------------------------------------
_FLAGS: dict[str, tuple[str, type, str]] = {
    "document_tokens": ("--tokens", int, "document length in tokens"),
    "prefill_usd_per_mtok": ("--prefill-price", float, "prefill price, $ per 1M input tokens"),
    "reuse_ratio": ("--ratio", float, "prefill / reuse compute ratio r"),
    "kv_bytes_per_token": ("--bytes-per-token", int, "KV bytes per token (all layers, K and V)"),
    "egress_usd_per_gb": ("--egress", float, "egress $ per GB"),
    "bytes_per_gb": ("--bytes-per-gb", float, "bytes in a GB (paper: 1.024e9; use 1073741824 for GiB)"),
    "cache_read_tariff": ("--tariff", float, "cache-read price as a fraction of the prefill price"),
    "storage_usd_per_gb_month": ("--storage", float, "provider storage $ per GB-month"),
    "storage_months": ("--storage-months", float, "months the provider hosts the KV"),
    "compression_ratio": ("--compression", float, "artifact compression ratio for shipping"),
}


def build_parser(prog: str = "kvagent economics") -> argparse.ArgumentParser:
    """The argument parser of `kvagent economics`; defaults are the paper's."""
    defaults = CostParams()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Cost of a document read by N agents: re-prefill vs reuse vs shipping vs provider "
        "hosting.",
    )
    for name, (flag, kind, text) in _FLAGS.items():
        default = getattr(defaults, name)
        parser.add_argument(
            flag,
            dest=name,
            type=kind,
            default=default,
            metavar="N" if kind is int else "X",
            help=f"{text} (default {default:g})",
        )
    parser.add_argument(
        "--agents",
        type=int,
        default=PAPER_AGENTS,
        metavar="N",
        help=f"number of agents (default {PAPER_AGENTS:,})",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--market", action="store_true",
                        help="also show the price band where seller and buyer both gain, break-even sales, "
                             "and buyers' savings at the tariff (N = --agents sales)")
    parser.add_argument(
        "--from-benchmark",
        metavar="FILE",
        help="take tokens, r and bytes/token from a benchmarks.reuse_vs_prefill JSON result "
        "(row nearest --tokens)",
    )
    parser.add_argument(
        "--dollars-per-hour",
        type=float,
        default=1.0,
        metavar="X",
        help="price of the measured machine per hour, with --from-benchmark (default 1.0)",
    )
    parser.add_argument(
        "--reuse-path",
        choices=("raw", "sdk"),
        default="sdk",
        help="with --from-benchmark: reuse time of the raw engine or kvagent end to end (default sdk)",
    )
    return parser


def params_from_benchmark(result: dict[str, Any], tokens: int, dollars_per_hour: float, reuse_path: str,
                          **overrides: Any) -> CostParams:
    """Parameters from a ``benchmarks.reuse_vs_prefill`` result: the row whose length is nearest
    ``tokens``."""
    rows = result.get("rows") if isinstance(result, dict) else None
    if not rows:
        raise ConfigError("the benchmark result has no rows")
    row = min(rows, key=lambda r: abs(int(r["tokens"]) - tokens))
    reuse = row["sdk_warm_s"] if reuse_path == "sdk" else row["raw_reuse_s"]
    return params_from_measurement(
        bytes_per_token=int(row["kv_bytes"]) // int(row["tokens"]),
        prefill_seconds=float(row["cold_s"]),
        reuse_seconds=float(reuse),
        tokens=int(row["tokens"]),
        gpu_dollars_per_hour=dollars_per_hour,
        **overrides,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kvagent economics`: print the table (or JSON); 2 on invalid parameters."""
    args = build_parser().parse_args(argv)
    try:
        if args.from_benchmark:
            try:
                with open(args.from_benchmark, encoding="utf-8") as fh:
                    measured = json.load(fh)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read benchmark result {args.from_benchmark}: {exc}") from exc
            keep = {n: getattr(args, n) for n in _FLAGS if n not in
                    ("document_tokens", "prefill_usd_per_mtok", "reuse_ratio", "kv_bytes_per_token")}
            params = params_from_benchmark(
                measured, args.document_tokens, args.dollars_per_hour, args.reuse_path, **keep
            )
        else:
            params = CostParams(**{name: getattr(args, name) for name in _FLAGS})
        result = report(params, args.agents)
    except ConfigError as exc:
        print(f"kvagent economics: {exc}", file=sys.stderr)
        return 2
    bands = market_report(params, args.agents) if args.market else ()
    if args.json:
        out = to_dict(result)
        if args.market:
            out["market"] = [_json_safe(asdict(b)) for b in bands]
        print(json.dumps(out, indent=2, allow_nan=False))
    else:
        print(format_table(result))
        if args.market:
            print("\n" + format_market(bands, params))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
