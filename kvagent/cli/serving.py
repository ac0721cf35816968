"""``kvagent serve | db | token``: the registry/host server and its operations, forwarded to
``kvagent.server``, which parses their options."""

from __future__ import annotations

import argparse
from typing import Any

from .common import server_entry

#: commands that parse their own options (including --help): the rest of the command line goes to them
FORWARDED = ("serve", "db", "token")


def register(sub: Any) -> None:
    """Add this group's commands to the ``kvagent`` subparsers ``sub``."""
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


def cmd_serve(args: argparse.Namespace) -> int:
    return int(server_entry("__main__", "main", "the server")(args.rest))


def cmd_db(args: argparse.Namespace) -> int:
    return int(server_entry("ops_cli", "db_main", "kvagent db")(args.rest))


def cmd_token(args: argparse.Namespace) -> int:
    return int(server_entry("ops_cli", "token_main", "kvagent token")(args.rest))
