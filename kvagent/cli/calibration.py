"""``kvagent calibrate | economics``: this machine's measured costs for the cost policy, and the paper's
cost model (``kvagent.analysis.economics``, which parses its own options)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from .common import make_console

#: commands that parse their own options (including --help)
FORWARDED = ("economics",)


def register(sub: Any) -> None:
    """Add this group's commands to the ``kvagent`` subparsers ``sub``."""
    cal = sub.add_parser("calibrate", help="measure prefill, load and registry costs for the cost policy")
    cal.add_argument("--show", action="store_true", help="print what is stored; measure nothing")
    cal.add_argument("--json", action="store_true", help="print a JSON record")
    cal.add_argument(
        "--lengths", default="128,512,1024", help="prefill lengths to time (default 128,512,1024)"
    )
    cal.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("economics", help="cost of re-prefill vs reuse vs shipping vs hosting", add_help=False)
    e.add_argument("rest", nargs=argparse.REMAINDER)
    e.set_defaults(func=cmd_economics)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Run the probes (or, with --show, only read the store) and print the calibration."""
    import tempfile

    from rich.table import Table

    from ..config import Config
    from ..costs import calibration as cal

    cfg = Config.from_env(model=args.model, cache_dir=args.cache_dir, registry_url=args.registry,
                          registry_token=args.token)
    store = cal.CalibrationFile(cal.default_path(cfg.cache_dir))
    rows: list[dict[str, Any]] = []
    if not args.show:
        from ..client.registry import RegistryClient
        from ..engines.hf import TransformersEngine
        from ..models import load_model

        loaded = load_model(cfg.model, cfg.models_dir, dtype=cfg.dtype)
        engine = TransformersEngine(loaded.model)
        cost = cal.CostModel.for_engine(engine, loaded.model_fingerprint, cache_dir=cfg.cache_dir)
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        registry = RegistryClient(cfg.registry_url, cfg.registry_token) if cfg.registry_url else None
        with tempfile.TemporaryDirectory() as scratch:
            rows = cal.calibrate(cost, engine, lengths=lengths, scratch_dir=scratch, registry=registry)
        if registry is not None:
            registry.close()
    stored = cal.summary(store.read())
    if args.json:
        print(json.dumps({"file": str(store.path), "measured_now": rows, **stored}, indent=2))
        return 0
    console = make_console()
    if rows:
        now = Table(title="measured now")
        for col in ("what", "seconds", "rate"):
            now.add_column(col)
        for r in rows:
            now.add_row(r["what"], f"{r['seconds']:.3f}", r["rate"])
        console.print(now)
    table = Table(title=f"stored in {store.path}")
    for col in ("estimate", "value", "provenance"):
        table.add_column(col)
    for key, p in stored["prefill"].items():
        for n, secs in p["seconds"].items():
            table.add_row(f"prefill {n} tokens [dim]({key})[/]", f"{secs:.2f} s ({int(n) / secs:.0f} tok/s)",
                          f"{p['provenance']} ({p['samples']} samples)")
    for machine, ld in stored["load"].items():
        rate = f"{ld['bytes_per_s'] / 1e6:.0f} MB/s" if ld["bytes_per_s"] else "n/a"
        table.add_row(f"local load [dim]({machine})[/]", rate, f"measured {ld['samples']}x")
    for key, ld in stored.get("landing", {}).items():
        rate = f"{ld['bytes_per_s'] / 1e6:.0f} MB/s" if ld["bytes_per_s"] else "n/a"
        table.add_row(f"fetched KV landing [dim]({key})[/]", rate, f"measured {ld['samples']}x")
    for url, link in stored["links"].items():
        if link.get("rtt_n"):
            table.add_row(
                f"round trip {url}", f"{link['rtt_s'] * 1000:.1f} ms", f"measured {int(link['rtt_n'])}x"
            )
        if link.get("bps_n"):
            table.add_row(
                f"download {url}", f"{link['bps'] / 1e6:.1f} MB/s", f"measured {int(link['bps_n'])}x"
            )
    for url, b in stored["breakers"].items():
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(b["failing_since"]))
        table.add_row(f"breaker {url}", f"open, {b['failures']} failures", f"failing since {since}")
    if not table.rows:
        table.add_row("(nothing stored)", "", "estimates are assumed until something is measured")
    console.print(table)
    _print_prediction_errors(console, stored)
    return 0


def _print_prediction_errors(console: Any, stored: dict[str, Any]) -> None:
    """The recent reads, prompts and chats against what the cost model predicted for them (actual /
    predicted)."""
    from rich.table import Table

    errors = stored["prediction_errors"]
    if not errors.get("count"):
        console.print(
            "prediction errors: no read, prompt or chat has been checked against its prediction yet"
        )
        return
    dist = Table(title=f"prediction errors (actual / predicted) of the last {errors['count']} decisions")
    for col in ("kind/path", "count", "within 2x", "p05", "p10", "median", "p90", "p95", "worst"):
        dist.add_column(col)
    for path, e in [("all", errors), *errors["by_kind_path"].items()]:
        dist.add_row(path, str(e["count"]), f"{e['within_2x']:.0%}", f"{e['p05_ratio']:.2f}",
                     f"{e['p10_ratio']:.2f}", f"{e['median_ratio']:.2f}", f"{e['p90_ratio']:.2f}",
                     f"{e['p95_ratio']:.2f}", f"{e['worst_ratio']:.2f}")
    console.print(dist)
    recent = Table(title="recent decisions")
    for col in ("when (UTC)", "kind", "path", "tokens", "past", "predicted", "actual", "ratio"):
        recent.add_column(col)
    for o in stored["recent_outcomes"]:
        recent.add_row(
            time.strftime("%H:%M:%S", time.gmtime(o["t"])),
            o["kind"],
            o["path"],
            str(o["tokens"]),
            str(o["past"]),
            f"{o['predicted_s']:.3f} s",
            f"{o['actual_s']:.3f} s",
            f"{o['ratio']:.2f}",
        )
    console.print(recent)


def cmd_economics(args: argparse.Namespace) -> int:
    from ..analysis import economics

    return int(economics.main(args.rest))
