"""The ``kvagent`` command line: demo, read, ask, verify, cache management."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import KVAgentError

DEMO_QUESTIONS = (
    "How much does a single adult fare cost?",
    "Who founded the company, and in which year?",
    "What is the largest vessel in the fleet and how many cars does it carry?",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) in ("serve", "economics", "db", "token"):
        args.rest = extra + list(args.rest)  # these parse their own options (including --help)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KVAgentError as exc:
        _console(stderr=True).print(f"[bold red]error:[/] {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvagent", description="Read a document once; answer from its cached KV."
    )
    p.add_argument(
        "--model", help="model: 'smollm2' (embedded, default), a local HF directory, or a cached hub id"
    )
    p.add_argument(
        "--cache-dir", help="KV cache directory (default: KVAGENT_CACHE_DIR or the user cache dir)"
    )
    p.add_argument("--registry", help="registry URL (default: KVAGENT_REGISTRY_URL; none means local only)")
    p.add_argument("--token", help="registry bearer token (default: KVAGENT_REGISTRY_TOKEN)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log cache decisions (-vv for debug)")
    p.add_argument(
        "--max-price-per-load",
        type=int,
        default=None,
        metavar="MICROS",
        help="never buy a registry load above this (micro-units; default: KVAGENT_MAX_PRICE_PER_LOAD)",
    )
    p.add_argument("--budget", type=int, default=None, metavar="MICROS",
                   help="spend at most this on purchases in this run (default: KVAGENT_BUDGET)")
    p.add_argument("--prefill-cost-per-token", type=int, default=None, metavar="MICROS",
                   help="what a local prefill costs you per token (default 5, the paper's $5/M tokens)")
    p.add_argument(
        "--allow-context-overflow",
        action="store_true",
        help="read documents longer than the model's context (only for models known to extrapolate; "
        "default: KVAGENT_ALLOW_CONTEXT_OVERFLOW or refuse)",
    )
    sub = p.add_subparsers(dest="command")

    d = sub.add_parser("demo", help="offline demo on the embedded model: read once, answer from the cache")
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("read", help="read a file and cache its KV")
    r.add_argument("file", type=Path)
    r.add_argument("--json", action="store_true", help="print a JSON record")
    r.set_defaults(func=cmd_read)

    a = sub.add_parser(
        "ask", help="ask questions about a file (its KV is read from the cache or prefilled once)"
    )
    a.add_argument("file", type=Path)
    a.add_argument("questions", nargs="+")
    a.add_argument("--max-new-tokens", type=int, default=128)
    a.add_argument("--temperature", type=float, default=0.0)
    a.add_argument("--seed", type=int)
    a.add_argument("--no-stream", action="store_true", help="print each answer when complete")
    a.add_argument("--json", action="store_true", help="print JSON records (implies --no-stream)")
    a.set_defaults(func=cmd_ask)

    v = sub.add_parser("verify", help="check that greedy output after reuse equals a full prefill")
    v.add_argument("file", type=Path)
    v.add_argument("--question", default="Summarise the document in one sentence.")
    v.add_argument("--tokens", type=int, default=32, help="greedy tokens to compare (default 32)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    pub = sub.add_parser("publish", help="read a file and publish its KV to the registry")
    pub.add_argument("file", type=Path)
    pub.add_argument("--public", action="store_true", help="visible to every principal (default: restricted)")
    pub.add_argument("--price", type=int, default=None,
                     help="price per load in integer micro-units of the registry's currency (default: free)")
    pub.set_defaults(func=cmd_publish)

    c = sub.add_parser("cache", help="inspect or clean the local KV store")
    csub = c.add_subparsers(dest="cache_command", required=True)
    ls = csub.add_parser("ls", help="list cached artifacts")
    ls.add_argument("--json", action="store_true", help="one JSON record per line")
    ls.set_defaults(func=cmd_cache_ls)
    csub.add_parser("stats", help="store size and counts").set_defaults(func=cmd_cache_stats)
    rm = csub.add_parser("rm", help="remove artifacts by key (or unique key prefix)")
    rm.add_argument("keys", nargs="+")
    rm.set_defaults(func=cmd_cache_rm)
    csub.add_parser("clear", help="remove every cached artifact").set_defaults(func=cmd_cache_clear)

    srv = sub.add_parser(
        "serve", help="run the registry/host server (see docs/registry-api.md)", add_help=False
    )
    srv.add_argument("rest", nargs=argparse.REMAINDER)
    srv.set_defaults(func=cmd_serve)

    dbp = sub.add_parser("db", help="registry database schema: upgrade, current, history", add_help=False)
    dbp.add_argument("rest", nargs=argparse.REMAINDER)
    dbp.set_defaults(func=cmd_db)

    tok = sub.add_parser("token", help="registry bearer tokens: issue, ls, revoke, rotate (in its database)",
                         add_help=False)
    tok.add_argument("rest", nargs=argparse.REMAINDER)
    tok.set_defaults(func=cmd_token)

    acc = sub.add_parser("account", help="your registry account: balance, statement; credit, adjust (admin)")
    asub = acc.add_subparsers(dest="account_command", required=True)
    bal = asub.add_parser("balance", help="your balance in integer micro-units")
    bal.add_argument("--json", action="store_true")
    bal.set_defaults(func=cmd_account_balance)
    stm = asub.add_parser(
        "statement", help="purchases and sales per artifact: loads, amounts, royalties, refunds"
    )
    stm.add_argument("--json", action="store_true")
    stm.set_defaults(func=cmd_account_statement)
    cre = asub.add_parser("credit", help="credit PRINCIPAL with AMOUNT micro-units (admin token only)")
    cre.add_argument("principal")
    cre.add_argument("amount", type=int)
    cre.add_argument("--memo", default="")
    cre.add_argument("--create", action="store_true", help="credit a principal no token names yet")
    cre.add_argument("--idempotency-key", help="repeat a credit safely: the same key credits once")
    cre.add_argument("--json", action="store_true")
    cre.set_defaults(func=cmd_account_credit)
    adj = asub.add_parser("adjust", help="correct PRINCIPAL's balance by AMOUNT micro-units (negative: a "
                                         "debit), with a reason (admin token only)")
    adj.add_argument("principal")
    adj.add_argument("amount", type=int)
    adj.add_argument("--reason", required=True, help="why (shown in the principal's statement and the audit)")
    adj.add_argument("--allow-negative", action="store_true", help="a debit may leave a debt")
    adj.add_argument("--idempotency-key", help="repeat an adjustment safely: the same key posts once")
    adj.add_argument("--json", action="store_true")
    adj.set_defaults(func=cmd_account_adjust)
    top = asub.add_parser("topup", help="add AMOUNT micro-units to your balance, paid by x402 from a wallet")
    top.add_argument("amount", type=int)
    top.add_argument("--wallet", default=None,
                     help="the paying wallet's key file (default: KVAGENT_WALLET_KEY)")
    top.add_argument("--json", action="store_true")
    top.set_defaults(func=cmd_account_topup)
    wdr = asub.add_parser("withdraw", help="pay AMOUNT micro-units of your balance out on chain to ADDRESS "
                                           "(from the host's wallet)")
    wdr.add_argument("amount", type=int)
    wdr.add_argument("--to", required=True, help="the 0x address to pay")
    wdr.add_argument("--principal", default=None, help="(admin) pay out this principal's balance instead")
    wdr.add_argument("--idempotency-key", help="repeat a withdrawal safely: the same key pays out once")
    wdr.add_argument("--json", action="store_true")
    wdr.set_defaults(func=cmd_account_withdraw)
    aud = asub.add_parser("chain-audit", help="(admin) compare the ledger's x402 deposits and withdrawals "
                                              "with the chain's transfers")
    aud.add_argument("--json", action="store_true")
    aud.set_defaults(func=cmd_account_chain_audit)

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
    return p


# -- helpers ---------------------------------------------------------------------------------
def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


@contextmanager
def _agent(args: argparse.Namespace) -> Iterator[Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .agent import KVAgent

    console = _console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} layers"),
        TimeElapsedColumn(), console=console, transient=True,
    )
    task: dict[str, Any] = {}

    def on_progress(what: str, done: int, total: int) -> None:
        if what != "prefill":
            console.print(f"[dim]{what}[/]")
            return
        if "id" not in task:
            progress.start()
            task["id"] = progress.add_task("prefill", total=total)
        progress.update(task["id"], completed=done, total=total)
        if done >= total:
            progress.stop()
            del task["id"]

    agent = KVAgent(
        args.model, cache_dir=args.cache_dir, progress=on_progress,
        registry_url=getattr(args, "registry", None), token=getattr(args, "token", None),
        allow_context_overflow=True if getattr(args, "allow_context_overflow", False) else None,
        max_price_per_load=getattr(args, "max_price_per_load", None), budget=getattr(args, "budget", None),
        prefill_cost_per_token=getattr(args, "prefill_cost_per_token", None),
    )
    try:
        yield agent
    finally:
        progress.stop()
        agent.close()


def _info_line(info: Any) -> str:
    if info.status == "prefill":
        return (
            f"miss → prefilled {info.prefilled_tokens} tokens in {info.prefill_seconds:.2f}s ({info.reason})"
        )
    if info.status == "local":
        ms = info.load_seconds * 1000
        return f"hit (local store): {info.cached_tokens} tokens loaded in {ms:.0f} ms, checksum verified"
    if info.status == "prefix":
        return (f"prefix hit: {info.cached_tokens} tokens reused, {info.prefilled_tokens} prefilled "
                f"({info.reason})")
    if info.status == "remote":
        return (f"hit (registry): {info.cached_tokens} tokens fetched ({info.bytes_read / 1e6:.1f} MB), "
                f"verified ({info.reason})")
    if info.status == "remote-generate":
        return f"registry generates from its copy: {info.cached_tokens} tokens ({info.reason})"
    return f"hit (memory): {info.cached_tokens} tokens"


# -- commands --------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .agent import KVAgent

    console = _console()
    text = resources.files("kvagent").joinpath("data/sample.txt").read_text(encoding="utf-8")
    console.print("[bold]kvagent demo[/] — embedded SmolLM2-135M-Instruct, offline\n")
    with _agent(args) as agent:
        console.print(f"model: {agent.loaded.name} (loaded in {agent.loaded.load_seconds:.1f}s)")
        agent.store.delete(agent.key_of(agent.document_ids(text)))  # start cold, so the demo shows a prefill
        t0 = time.perf_counter()
        doc = agent.read(text)
        cold = time.perf_counter() - t0
        console.print(f"agent A reads the sample document ({doc.n_tokens} tokens): {_info_line(doc.cache)}")
        answers = [agent.ask(doc, q, max_new_tokens=args.max_new_tokens) for q in DEMO_QUESTIONS[:1]]

        # A second agent in the same cache dir: a fresh KVAgent with nothing in memory.
        agent_b = KVAgent(agent.loaded.model, tokenizer=agent.tokenizer, cache_dir=agent.config.cache_dir)
        t1 = time.perf_counter()
        doc_b = agent_b.read(text)
        warm = time.perf_counter() - t1
        console.print(f"agent B reads the same document: {_info_line(doc_b.cache)}")
        answers += [agent_b.ask(doc_b, q, max_new_tokens=args.max_new_tokens) for q in DEMO_QUESTIONS[1:]]

        table = Table(title="answers (greedy)", show_lines=True)
        for col in ("agent", "question", "answer", "time to first token"):
            table.add_column(col)
        for i, (q, ans) in enumerate(zip(DEMO_QUESTIONS, answers, strict=True)):
            table.add_row(
                "A" if i == 0 else "B", q, ans.text or "(empty)", f"{ans.first_token_seconds * 1000:.0f} ms"
            )
        console.print(table)
        report = agent_b.verify(doc_b, DEMO_QUESTIONS[0])
        verdict = (
            "[green]token-exact[/]"
            if report.exact
            else f"[red]DIVERGED at token {report.first_divergence}[/]"
        )
        console.print(
            f"verify: {report.compared_tokens} greedy tokens after reuse vs full prefill: {verdict}\n"
            f"reading the document: prefill {cold:.2f}s vs cache hit {warm:.3f}s "
            f"({cold / max(warm, 1e-9):.0f}x faster)"
        )
        agent_b.close()
        return 0 if report.exact else 1


def cmd_read(args: argparse.Namespace) -> int:
    with _agent(args) as agent:
        doc = agent.read(args.file)
        if args.json:
            print(
                json.dumps(
                    {"key": doc.key, "tokens": doc.n_tokens, "source": doc.source, "cache": asdict(doc.cache)}
                )
            )
        else:
            _console().print(f"{doc.source}: {doc.n_tokens} tokens, key {doc.key}\n{_info_line(doc.cache)}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    console = _console()
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}
    with _agent(args) as agent:
        doc = agent.read(args.file)
        if not args.json:
            console.print(f"[dim]{doc.source}: {doc.n_tokens} tokens — {_info_line(doc.cache)}[/]")
        for q in args.questions:
            if args.json:
                ans = agent.ask(doc, q, **gen)
                print(
                    json.dumps(
                        {
                            "question": q,
                            "answer": ans.text,
                            "key": doc.key,
                            "read": asdict(doc.cache),
                            "finish_reason": ans.finish_reason,
                            "first_token_seconds": ans.first_token_seconds,
                        }
                    )
                )
            elif args.no_stream:
                ans = agent.ask(doc, q, **gen)
                console.print(f"[bold]Q:[/] {q}\n[bold]A:[/] {ans.text}\n")
            else:
                console.print(f"[bold]Q:[/] {q}\n[bold]A:[/] ", end="")
                for piece in agent.stream(doc, q, **gen):
                    console.print(piece, end="", markup=False)
                console.print("\n")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with _agent(args) as agent:
        doc = agent.read(args.file)
        rep = agent.verify(doc, args.question, max_new_tokens=args.tokens)
        if args.json:
            print(json.dumps(asdict(rep)))
        else:
            verdict = "token-exact" if rep.exact else f"DIVERGED at token {rep.first_divergence}"
            _console().print(
                f"{doc.source}: {doc.n_tokens} document tokens ({_info_line(doc.cache)})\n"
                f"{rep.compared_tokens} greedy tokens after reuse vs full prefill: {verdict}\n"
                f"reuse {rep.reuse_seconds:.2f}s vs full prefill + decode {rep.full_seconds:.2f}s"
            )
        return 0 if rep.exact else 1


def cmd_publish(args: argparse.Namespace) -> int:
    with _agent(args) as agent:
        doc = agent.read(args.file)
        visibility = "public" if args.public else "restricted"
        if args.price is None:
            handle = agent.publish(doc, visibility)
        else:
            with _registry(args) as reg:
                handle = reg.publish(agent.artifact_bytes(doc), visibility, price=args.price)
        print(json.dumps({"key": handle.key, "size": handle.size, "visibility": handle.visibility,
                          "owner": handle.owner, "tokens": doc.n_tokens}))
    return 0


def _store(args: argparse.Namespace) -> Any:
    from .config import Config
    from .tiers.store import KVStore

    cfg = Config.from_env(cache_dir=args.cache_dir)
    return KVStore(cfg.store_dir, size_limit=cfg.cache_size_bytes)


def cmd_cache_ls(args: argparse.Namespace) -> int:
    from rich.table import Table

    with _store(args) as store:
        entries = sorted(store.entries(), key=lambda e: e.created_at)
        if args.json:
            for e in entries:
                print(json.dumps(asdict(e)))
            return 0
        table = Table()
        table.add_column("key", no_wrap=True, min_width=64)
        for col in ("tokens", "MB", "dtype", "created"):
            table.add_column(col)
        for e in entries:
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created_at))
            table.add_row(e.key, str(e.token_count), f"{e.nbytes / 1e6:.1f}", e.dtype, created)
        _console().print(table)
    return 0


def cmd_cache_stats(args: argparse.Namespace) -> int:
    with _store(args) as store:
        print(json.dumps({"directory": str(store.directory), **store.stats()}, indent=2))
    return 0


def cmd_cache_rm(args: argparse.Namespace) -> int:
    from .errors import InvalidKeyError

    with _store(args) as store:
        keys = [e.key for e in store.entries()]
        for prefix in args.keys:
            matches = [k for k in keys if k.startswith(prefix.lower())]
            if len(matches) != 1:
                raise InvalidKeyError(f"{prefix!r} matches {len(matches)} cached keys; give a longer prefix")
            store.delete(matches[0])
            print(f"removed {matches[0]}")
    return 0


def cmd_cache_clear(args: argparse.Namespace) -> int:
    with _store(args) as store:
        n = store.clear()
        print(f"removed {n} entries from {store.directory}")
    return 0


def _server_entry(module: str, name: str, what: str) -> Any:
    """``kvagent.server.<module>.<name>``, imported lazily; or an error saying ``what`` needs the extra."""
    try:
        return getattr(importlib.import_module(f"kvagent.server.{module}"), name)
    except ImportError as exc:
        raise KVAgentError(f"{what} needs the server extra: pip install 'kvagent[server]' ({exc})") from exc


def cmd_serve(args: argparse.Namespace) -> int:
    return int(_server_entry("__main__", "main", "the server")(args.rest))


def cmd_db(args: argparse.Namespace) -> int:
    return int(_server_entry("ops_cli", "db_main", "kvagent db")(args.rest))


def cmd_token(args: argparse.Namespace) -> int:
    return int(_server_entry("ops_cli", "token_main", "kvagent token")(args.rest))


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Run the probes (or, with --show, only read the store) and print the calibration."""
    import tempfile

    from rich.table import Table

    from .config import Config
    from .costs import calibration as cal

    cfg = Config.from_env(model=args.model, cache_dir=args.cache_dir, registry_url=args.registry,
                          registry_token=args.token)
    store = cal.CalibrationFile(cal.default_path(cfg.cache_dir))
    rows: list[dict[str, Any]] = []
    if not args.show:
        from .client.registry import RegistryClient
        from .engines.hf import TransformersEngine
        from .models import load_model

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
    console = _console()
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
    from .analysis import economics

    return int(economics.main(args.rest))



# -- account -----------------------------------------------------------------------------------
def _registry(args: argparse.Namespace) -> Any:
    from .client.registry import RegistryClient
    from .config import Config
    from .errors import ConfigError

    cfg = Config.from_env(registry_url=args.registry, registry_token=args.token)
    if cfg.registry_url is None:
        raise ConfigError("no registry configured: pass --registry URL or set KVAGENT_REGISTRY_URL")
    return RegistryClient(cfg.registry_url, cfg.registry_token)


def cmd_account_balance(args: argparse.Namespace) -> int:
    with _registry(args) as reg:
        acct = reg.account()
    print(json.dumps(acct) if args.json else f"{acct['principal']}: {acct['balance']} {acct['currency']}")
    return 0


def cmd_account_credit(args: argparse.Namespace) -> int:
    with _registry(args) as reg:
        out = reg.credit(args.principal, args.amount, args.memo, create=args.create,
                         idempotency_key=args.idempotency_key)
    if args.json:
        print(json.dumps(out))
    else:
        again = " (a replay: nothing new credited)" if out.get("replayed") else ""
        print(
            f"credited {out['credited']} {out['currency']} to {out['principal']} (receipt {out['receipt']}); "
            f"balance {out['balance']}{again}"
        )
    return 0


def cmd_account_adjust(args: argparse.Namespace) -> int:
    with _registry(args) as reg:
        out = reg.adjust(args.principal, args.amount, args.reason, allow_negative=args.allow_negative,
                         idempotency_key=args.idempotency_key)
    if args.json:
        print(json.dumps(out))
    else:
        again = " (a replay: nothing new posted)" if out.get("replayed") else ""
        print(f"adjusted {out['principal']} by {out['adjusted']} {out['currency']} "
              f"(receipt {out['receipt']}); balance {out['balance']}{again}")
    return 0


def _registry_http(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    """The registry's URL and the bearer header of the configured token (the x402 account commands)."""
    from .config import Config
    from .errors import ConfigError

    cfg = Config.from_env(registry_url=args.registry, registry_token=args.token)
    if cfg.registry_url is None:
        raise ConfigError("no registry configured: pass --registry URL or set KVAGENT_REGISTRY_URL")
    auth = {"Authorization": f"Bearer {cfg.registry_token}"} if cfg.registry_token else {}
    return cfg.registry_url.rstrip("/"), auth


def _answer(r: Any, what: str) -> dict[str, Any]:
    from .errors import KVAgentError

    try:
        body = r.json()
    except ValueError:
        body = {}
    if r.status_code >= 400:
        raise KVAgentError(f"{what} refused ({r.status_code}): {body.get('detail') or r.text[:200]}")
    return dict(body)


def cmd_account_topup(args: argparse.Namespace) -> int:
    import httpx

    from .payments import SpendCaps, load_wallet
    from .payments.http import request_paying
    from .payments.payer import Payer

    url, auth = _registry_http(args)
    wallet = load_wallet(args.wallet)
    probe = httpx.post(f"{url}/v1/account/topup", json={"amount": args.amount}, headers=auth, timeout=60)
    if probe.status_code != 402:
        _answer(probe, "the top-up")
    from .payments.terms import PAYMENT_REQUIRED_HEADER, decode_header

    accepts = decode_header(probe.headers[PAYMENT_REQUIRED_HEADER])["accepts"]
    payer = Payer(wallet, SpendCaps(max_price_per_load=args.amount),
                  allowed_assets=[(a["network"], a["asset"]) for a in accepts])
    with httpx.Client(timeout=120) as c:
        r, _ = request_paying(c, "POST", f"{url}/v1/account/topup", payer, json={"amount": args.amount},
                              headers=auth)
    out = _answer(r, "the top-up")
    print(json.dumps(out) if args.json else
          f"deposited {out['deposited']} {out['currency']} to {out['principal']} (receipt {out['receipt']}, "
          f"transaction {out['transaction']}); balance {out['balance']}")
    return 0


def cmd_account_withdraw(args: argparse.Namespace) -> int:
    import uuid

    import httpx

    url, auth = _registry_http(args)
    body: dict[str, Any] = {"amount": args.amount, "to": args.to}
    if args.principal:
        body["principal"] = args.principal
    headers = {**auth, "Idempotency-Key": args.idempotency_key or uuid.uuid4().hex}
    r = httpx.post(f"{url}/v1/account/withdraw", json=body, headers=headers, timeout=300)
    out = _answer(r, "the withdrawal")
    if args.json:
        print(json.dumps(out))
    else:
        again = " (a replay: nothing new sent)" if out.get("replayed") else ""
        print(f"withdrew {out['amount']} {out['currency']} of {out['principal']} to {out['to']}: "
              f"{out['status']} (transaction {out['transaction']}, receipt {out['receipt']}); "
              f"balance {out['balance']}{again}")
    return 0


def cmd_account_chain_audit(args: argparse.Namespace) -> int:
    import httpx

    url, auth = _registry_http(args)
    out = _answer(httpx.get(f"{url}/v1/market/x402-audit", headers=auth, timeout=300), "the chain audit")
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{'ok' if out['ok'] else 'MISMATCH'}: {out['deposits']} deposits of {out['deposited']} "
              f"({out['confirmed']} on chain), withdrawn {out['withdrawn']} ({out['withdrawn_confirmed']} on "
              f"chain), missing {out['missing']}")
    return 0 if out["ok"] else 1


def cmd_account_statement(args: argparse.Namespace) -> int:
    with _registry(args) as reg:
        s = reg.statement()
    if args.json:
        print(json.dumps(s))
        return 0
    cur = s["currency"]
    lines = [f"{s['principal']}: balance {s['balance']} {cur}, credits {s['credits']} {cur}"]
    for a in s.get("adjustments", []):
        lines.append(f"  adjustment {a['amount']:+d} {cur} ({a['receipt']}): {a['reason']}")
    for t in s.get("transfers", []):
        lines.append(f"  {t['kind']} {t['amount']:+d} {cur} ({t['receipt']}): {t['memo']}")
    for title, rows, cols in (("purchases", s["purchases"], ("loads", "amount", "refunds")),
                              ("sales", s["sales"], ("loads", "amount", "royalties", "refunds"))):
        lines.append(f"{title}:" if rows else f"{title}: none")
        for r in rows:
            lines.append(f"  {r['key'][:16]}…  " + "  ".join(f"{c} {r[c]}" for c in cols))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
