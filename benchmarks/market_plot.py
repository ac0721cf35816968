"""Plot of the KV market: the price band in which publisher and buyer both gain, against the number of sales.

    python -m benchmarks.market_plot --out benchmarks/results [--from-benchmark FILE --tokens N
    --dollars-per-hour X]

For each delivery (shipped: the buyer downloads the KV; hosted: the seller generates next to it) the floor
is the seller's cost per load plus one prefill spread over the sales, the ceiling the buyer's saving
against its own prefill (kvagent.analysis.economics.market_band); the band is shaded where floor < ceiling.
The
0.1x cache-read tariff is drawn as a line. Paper parameters by default; measured ones with --from-benchmark.
Needs matplotlib (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kvagent.analysis import economics as econ

from .economics_plots import _pyplot, agent_grid


def plot(p: econ.CostParams, out: Path, title: str) -> Path:
    plt = _pyplot()
    grid = agent_grid(1, 10**6, per_decade=10)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = {"shipped": "tab:orange", "hosted": "tab:blue"}
    for delivery in econ.DELIVERIES:
        bands = [econ.market_band(p, delivery, n) for n in grid]
        floor = [b.micros(b.floor_usd) for b in bands]
        ceiling = [b.micros(b.ceiling_usd) for b in bands]
        c = colors[delivery]
        ax.plot(grid, floor, color=c, label=f"{delivery}: seller's floor")
        ax.plot(grid, ceiling, color=c, linestyle="--", label=f"{delivery}: buyer's ceiling")
        ax.fill_between(grid, floor, ceiling, where=[f < g for f, g in zip(floor, ceiling, strict=True)],
                        color=c, alpha=0.15)
    tariff = econ.market_band(p, "hosted", 1)
    ax.axhline(tariff.micros(tariff.tariff_price_usd), color="tab:green", linestyle=":",
               label=f"{p.cache_read_tariff:g}x cache-read tariff")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sales of the artifact (loads)")
    ax.set_ylabel("price per load (uUSD)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.market_plot", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument(
        "--from-benchmark", type=Path, default=None, help="a benchmarks.reuse_vs_prefill JSON result"
    )
    ap.add_argument(
        "--tokens", type=int, default=2048, help="with --from-benchmark: the row nearest this length"
    )
    ap.add_argument(
        "--dollars-per-hour", type=float, default=1.0, help="price of the measured machine per hour"
    )
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    paper = econ.CostParams()
    made = [plot(paper, args.out / "market_band.png",
                 f"paper: {paper.document_tokens} tokens, Qwen3-4B fp16, r={paper.reuse_ratio:g}")]
    if args.from_benchmark:
        measured = econ.params_from_benchmark(json.loads(args.from_benchmark.read_text()), args.tokens,
                                              args.dollars_per_hour, "sdk")
        made.append(plot(measured, args.out / "market_band_measured.png",
                         f"measured: {measured.document_tokens} tokens, r={measured.reuse_ratio:.3g}, "
                         f"${args.dollars_per_hour:g}/h"))
    for m in made:
        print(m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
