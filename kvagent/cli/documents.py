"""``kvagent demo | read | ask | verify | publish``: documents read once and asked from their cached KV."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

from .common import info_line, make_console, open_agent, open_registry

DEMO_QUESTIONS = (
    "How much does a single adult fare cost?",
    "Who founded the company, and in which year?",
    "What is the largest vessel in the fleet and how many cars does it carry?",
)


def register(sub: Any) -> None:
    """Add this group's commands to the ``kvagent`` subparsers ``sub``."""
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


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..agent import KVAgent

    console = make_console()
    text = resources.files("kvagent").joinpath("data/sample.txt").read_text(encoding="utf-8")
    console.print("[bold]kvagent demo[/] — embedded SmolLM2-135M-Instruct, offline\n")
    with open_agent(args) as agent:
        console.print(f"model: {agent.loaded.name} (loaded in {agent.loaded.load_seconds:.1f}s)")
        agent.store.delete(agent.key_of(agent.document_ids(text)))  # start cold, so the demo shows a prefill
        t0 = time.perf_counter()
        doc = agent.read(text)
        cold = time.perf_counter() - t0
        console.print(f"agent A reads the sample document ({doc.n_tokens} tokens): {info_line(doc.cache)}")
        answers = [agent.ask(doc, q, max_new_tokens=args.max_new_tokens) for q in DEMO_QUESTIONS[:1]]

        # A second agent in the same cache dir: a fresh KVAgent with nothing in memory.
        agent_b = KVAgent(agent.loaded.model, tokenizer=agent.tokenizer, cache_dir=agent.config.cache_dir)
        t1 = time.perf_counter()
        doc_b = agent_b.read(text)
        warm = time.perf_counter() - t1
        console.print(f"agent B reads the same document: {info_line(doc_b.cache)}")
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
    with open_agent(args) as agent:
        doc = agent.read(args.file)
        if args.json:
            print(
                json.dumps(
                    {"key": doc.key, "tokens": doc.n_tokens, "source": doc.source, "cache": asdict(doc.cache)}
                )
            )
        else:
            make_console().print(
                f"{doc.source}: {doc.n_tokens} tokens, key {doc.key}\n{info_line(doc.cache)}"
            )
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    console = make_console()
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}
    with open_agent(args) as agent:
        doc = agent.read(args.file)
        if not args.json:
            console.print(f"[dim]{doc.source}: {doc.n_tokens} tokens — {info_line(doc.cache)}[/]")
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
    with open_agent(args) as agent:
        doc = agent.read(args.file)
        rep = agent.verify(doc, args.question, max_new_tokens=args.tokens)
        if args.json:
            print(json.dumps(asdict(rep)))
        else:
            verdict = "token-exact" if rep.exact else f"DIVERGED at token {rep.first_divergence}"
            make_console().print(
                f"{doc.source}: {doc.n_tokens} document tokens ({info_line(doc.cache)})\n"
                f"{rep.compared_tokens} greedy tokens after reuse vs full prefill: {verdict}\n"
                f"reuse {rep.reuse_seconds:.2f}s vs full prefill + decode {rep.full_seconds:.2f}s"
            )
        return 0 if rep.exact else 1


def cmd_publish(args: argparse.Namespace) -> int:
    with open_agent(args) as agent:
        doc = agent.read(args.file)
        visibility = "public" if args.public else "restricted"
        if args.price is None:
            handle = agent.publish(doc, visibility)
        else:
            with open_registry(args) as reg:
                handle = reg.publish(agent.artifact_bytes(doc), visibility, price=args.price)
        print(json.dumps({"key": handle.key, "size": handle.size, "visibility": handle.visibility,
                          "owner": handle.owner, "tokens": doc.n_tokens}))
    return 0
