"""Plots of the cost model: total cost vs number of agents, and the reuse ratio vs document length.

    python -m benchmarks.economics_plots --out benchmarks/results [--ratios ratios.json]

`--ratios` takes a ratio benchmark's output, a JSON list of {"tokens": int, "ratio": float} (or the "rows" of
benchmarks/reuse_vs_prefill.py's JSON with `--ratio-key raw_ratio`); without it only
the paper's two reported endpoints (9x at 255 tokens, 49.7x at 3774) are drawn, labelled as paper figures.
Needs matplotlib (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvagent.analysis import economics as econ

#: The abstract's "9-50x": reported endpoints of the sweep (summaries: contexts 255-3774 tokens).
PAPER_RATIO_ENDPOINTS: tuple[tuple[int, float], ...] = ((255, 9.0), (3774, 49.7))

#: Likely lengths of the paper's sweep (paper-notes); used as x ticks so figures line up.
PAPER_SWEEP: tuple[int, ...] = (255, 485, 945, 1888, 3774)

#: Illustrative object-storage price so provider hosting is visibly distinct from bare reuse (S3 standard).
DEFAULT_PLOT_STORAGE_USD_PER_GB_MONTH = 0.023

STYLES: dict[str, dict[str, Any]] = {
    "re_prefill": dict(color="tab:red", linestyle="-"),
    "reuse": dict(color="tab:green", linestyle="-"),
    "shipping": dict(color="tab:orange", linestyle="--"),
    "hosting": dict(color="tab:blue", linestyle=":", linewidth=2.5),
}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("matplotlib is needed for the plots: pip install 'kvagent[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def agent_grid(lo: int = 1, hi: int = 10**9, per_decade: int = 8) -> list[int]:
    """Log-spaced distinct agent counts from lo to hi inclusive."""
    steps = int(round(math.log10(hi / lo) * per_decade))
    grid = sorted({max(1, round(lo * 10 ** (i / per_decade))) for i in range(steps + 1)})
    return grid


def load_ratios(path: Path, key: str = "ratio") -> list[tuple[int, float]]:
    """Read (tokens, ratio) points sorted by tokens from a JSON list of {"tokens", key} objects.

    Also takes a benchmark result object with the list under "rows" (benchmarks/reuse_vs_prefill.py writes
    that; pass key="raw_ratio" or "sdk_ratio" for it).
    """
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "rows" in data:
        data = data["rows"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{'tokens', {key!r}}} objects")
    points = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "tokens" not in item or key not in item:
            raise ValueError(f"{path}: item {i} is not an object with 'tokens' and {key!r}: {item!r}")
        points.append((int(item["tokens"]), float(item[key])))
    return sorted(points)


def plot_cost_vs_agents(params: econ.CostParams, out: Path) -> Path:
    """Log-log total cost of the four strategies against the number of agents."""
    plt = _pyplot()
    grid = agent_grid()
    totals = {name: [] for name in econ.STRATEGIES}  # type: dict[str, list[float]]
    for n in grid:
        for s in econ.strategy_costs(params, n):
            totals[s.name].append(s.total_usd)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for name in econ.STRATEGIES:
        ax.plot(grid, totals[name], label=econ.STRATEGY_LABELS[name], **STYLES[name])
    n_star = econ.paper_break_even(params.reuse_ratio)
    if math.isfinite(n_star):
        ax.axvline(n_star, color="grey", linewidth=0.8)
        ax.annotate(
            f"break-even N* = {n_star:.3g}",
            (n_star, 0.03),
            xycoords=("data", "axes fraction"),
            xytext=(4, 0),
            textcoords="offset points",
            color="grey",
            fontsize=9,
        )
    headline = econ.report(params, econ.PAPER_AGENTS)
    for name in ("re_prefill", "reuse"):
        y = headline.strategy(name).total_usd
        ax.plot([econ.PAPER_AGENTS], [y], "o", color=STYLES[name]["color"])
        ax.annotate(
            rf"\${y / 1e6:.3g}M",
            (econ.PAPER_AGENTS, y),
            xytext=(-8, 8),
            textcoords="offset points",
            ha="right",
            fontsize=9,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of agents reading the document (N)")
    ax.set_ylabel("total cost (USD)")
    ax.set_title(
        f"{params.document_tokens:,}-token document, r = {params.reuse_ratio:g}x, "
        rf"\${params.prefill_usd_per_mtok:g}/1M prefill, \${params.egress_usd_per_gb:g}/GB egress"
        "\n"
        rf"hosting: \${params.storage_usd_per_gb_month:g}/GB-month x {params.storage_months:g} month(s); "
        f"ship: {params.compression_ratio:g}x compression",
        fontsize=10,
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = out / "cost_vs_agents.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_ratio_vs_length(measured: Sequence[tuple[int, float]] | None, out: Path, label: str) -> Path:
    """Reuse/prefill compute ratio against document length: measured points if given, paper endpoints
    always."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if measured:
        xs, ys = zip(*measured, strict=True)
        ax.plot(xs, ys, "o-", color="tab:blue", label=label)
        for x, y in measured:
            ax.annotate(
                f"{y:.3g}x", (x, y), xytext=(0, -14), textcoords="offset points", ha="center", fontsize=8
            )
    px, py = zip(*PAPER_RATIO_ENDPOINTS, strict=True)
    ax.plot(
        px, py, "s", color="tab:red", markersize=8, label="paper figures (Qwen3-4B fp16, reported endpoints)"
    )
    for x, y in PAPER_RATIO_ENDPOINTS:
        ax.annotate(
            f"{y:g}x @ {x}",
            (x, y),
            xytext=(0, 9),
            textcoords="offset points",
            ha="center",
            color="tab:red",
            fontsize=9,
        )
    ax.set_xscale("log")
    # the paper's sweep only when nothing measured is drawn: neighbouring labels would overlap
    # (the paper's points are annotated with their lengths already)
    ticks = sorted(
        {x for x, _ in measured} if measured else {x for x, _ in PAPER_RATIO_ENDPOINTS} | set(PAPER_SWEEP)
    )
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    xs = ticks + [x for x, _ in PAPER_RATIO_ENDPOINTS]
    ax.set_xlim(min(xs) / 1.25, max(xs) * 1.25)
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("prefill / reuse compute (x)")
    ax.set_title("KV reuse saving vs document length")
    top = max([y for _, y in PAPER_RATIO_ENDPOINTS] + [y for _, y in measured or ()])
    ax.set_ylim(0, top * 1.18)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    path = out / "ratio_vs_length.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Write the PNGs under --out and print their paths."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.economics_plots", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    parser.add_argument("--ratios", type=Path, help='JSON list of {"tokens": int, "ratio": float} to plot')
    parser.add_argument(
        "--ratio-key", default="ratio", help="field holding the ratio (raw_ratio for reuse_vs_prefill)"
    )
    parser.add_argument(
        "--ratios-label", default="measured (kvagent ratio benchmark)", help="legend for --ratios"
    )
    parser.add_argument(
        "--storage",
        type=float,
        default=DEFAULT_PLOT_STORAGE_USD_PER_GB_MONTH,
        help="provider storage $/GB-month (default %(default)s, S3 standard)",
    )
    parser.add_argument("--compression", type=float, default=1.0, help="artifact compression for shipping")
    args = parser.parse_args(argv)
    measured = None
    if args.ratios is not None:
        try:
            measured = load_ratios(args.ratios, args.ratio_key)
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
    params = econ.qwen3_4b(storage_usd_per_gb_month=args.storage, compression_ratio=args.compression)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in (
        plot_cost_vs_agents(params, args.out),
        plot_ratio_vs_length(measured, args.out, args.ratios_label),
    ):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
