"""The ``kvagent`` command line, one module per command group: documents (:mod:`.documents`: demo, read,
ask, verify, publish), the local store (:mod:`.cache`), the server and its operations (:mod:`.serving`:
serve, db, token), the registry account (:mod:`.account`) and costs (:mod:`.calibration`: calibrate,
economics); :mod:`.common` holds what they share. A new command goes in its group's ``register``."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from ..errors import KVAgentError
from . import account, cache, calibration, documents, serving
from .common import make_console

__all__ = ["main"]

#: the command groups, in the order ``kvagent --help`` lists their commands
GROUPS = (documents, cache, serving, account, calibration)
#: commands that parse their own options (including --help): the rest of the command line goes to them
FORWARDED = (*serving.FORWARDED, *calibration.FORWARDED)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) in FORWARDED:
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
        make_console(stderr=True).print(f"[bold red]error:[/] {exc}")
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

    for group in GROUPS:
        group.register(sub)
    return p
