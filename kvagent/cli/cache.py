"""``kvagent cache ls | stats | rm | clear``: the local KV store."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from typing import Any

from .common import make_console, open_store


def register(sub: Any) -> None:
    """Add this group's commands to the ``kvagent`` subparsers ``sub``."""
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


def cmd_cache_ls(args: argparse.Namespace) -> int:
    from rich.table import Table

    with open_store(args) as store:
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
        make_console().print(table)
    return 0


def cmd_cache_stats(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        print(json.dumps({"directory": str(store.directory), **store.stats()}, indent=2))
    return 0


def cmd_cache_rm(args: argparse.Namespace) -> int:
    from ..errors import InvalidKeyError

    with open_store(args) as store:
        keys = [e.key for e in store.entries()]
        for prefix in args.keys:
            matches = [k for k in keys if k.startswith(prefix.lower())]
            if len(matches) != 1:
                raise InvalidKeyError(f"{prefix!r} matches {len(matches)} cached keys; give a longer prefix")
            store.delete(matches[0])
            print(f"removed {matches[0]}")
    return 0


def cmd_cache_clear(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        n = store.clear()
        print(f"removed {n} entries from {store.directory}")
    return 0
