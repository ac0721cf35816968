"""``python -m kvagent.server``: run the registry under uvicorn (SIGTERM/SIGINT shut it down gracefully)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..errors import ConfigError, KVAgentError
from ..options import add_arguments, from_arguments
from ..plugins import DEFAULT_ENGINE, load_engine_factory
from .limits import ConnectionLimits
from .settings import SETTINGS_ENV, Settings, to_env


def build_parser(prog: str = "python -m kvagent.server") -> argparse.ArgumentParser:
    """``kvagent serve``'s options: where it listens, then every ``Settings`` option with a flag (declared
    there once: default, type, help), its worker count and connection limits."""
    ap = argparse.ArgumentParser(prog=prog, description="Run the kvagent registry / KV host server.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    add_arguments(ap, Settings)
    ap.add_argument("--workers", type=int, default=1, help="worker processes serving the same port")
    d = ConnectionLimits()
    ap.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                    help="seconds a client has to send its request headers (slowloris guard)")
    ap.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                    help="seconds a request body may stall between chunks before the connection is closed")
    ap.add_argument(
        "--keep-alive",
        type=int,
        default=d.keep_alive_s,
        help="seconds an idle keep-alive connection stays open",
    )
    ap.add_argument("--max-connections", type=int, default=d.max_connections,
                    help="concurrent connections + requests before new requests get 503")
    ap.add_argument(
        "--max-header-bytes", type=int, default=d.max_header_bytes, help="largest request head accepted"
    )
    ap.add_argument("--log-level", default="info")
    return ap


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(**from_arguments(args, Settings))


def limits_from_args(args: argparse.Namespace) -> ConnectionLimits:
    return ConnectionLimits(
        header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout, keep_alive_s=args.keep_alive,
        max_connections=args.max_connections, max_header_bytes=args.max_header_bytes,
    )


def serve(settings: Settings, host: str, port: int, log_level: str = "info", workers: int = 1,
          limits: ConnectionLimits | None = None) -> None:
    """Run the registry; ``workers`` > 1 runs that many processes (uvicorn's supervisor) on one socket."""
    import uvicorn

    from .app import create_app
    from .state import build_state

    # uvicorn handles SIGTERM/SIGINT itself (graceful shutdown), then re-raises the signal it caught;
    # this handler turns that re-raise into a clean exit status 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    common: dict[str, Any] = dict(
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
        lifespan="on",
    )
    if settings.model and settings.engine != DEFAULT_ENGINE:
        load_engine_factory(settings.engine)  # unknown or not installed: a clear error before anything starts
        if workers > 1:
            raise ConfigError(f"--engine {settings.engine} runs in one process: use --workers 1 (it batches "
                              "concurrent requests itself)")
    limits = limits or ConnectionLimits()
    limits.export()  # the protocol's deadlines, here and in worker processes
    common.update(limits.uvicorn_options())
    if workers <= 1:
        uvicorn.Server(uvicorn.Config(create_app(settings), **common)).run()
        return
    # migrate, import the token file and clean up once, here, before the workers start (and fail early on bad
    # settings); the workers then only check that the schema is current
    build_state(replace(settings, model=None)).meta.close()
    os.environ[SETTINGS_ENV] = to_env(replace(settings, migrate=False, token_file=None))
    uvicorn.run("kvagent.server.app:create_app_from_env", factory=True, workers=workers, **common)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s", stream=sys.stderr)
    try:
        serve(
            settings_from_args(args),
            args.host,
            args.port,
            args.log_level,
            args.workers,
            limits_from_args(args),
        )
    except KVAgentError as exc:
        print(f"kvagent serve: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
