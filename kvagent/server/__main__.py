"""``python -m kvagent.server``: run the registry under uvicorn (SIGTERM/SIGINT shut it down gracefully)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import KVAgentError
from .settings import DEFAULT_MAX_ARTIFACT_BYTES, Settings


def build_parser(prog: str = "python -m kvagent.server") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Run the kvagent registry / KV host server.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--data-dir", type=Path, required=True, help="blobs and (by default) the SQLite metadata")
    ap.add_argument("--token-file", type=Path, required=True, help='JSON {"<token>": {"principal": ..., "publish": bool}}')
    ap.add_argument("--model", default="none", help="'smollm2', a local model directory, or 'none' (no generate)")
    ap.add_argument("--models-dir", type=Path, default=None, help="where converted models are cached")
    ap.add_argument("--postgres-dsn", default=None, help="use PostgreSQL for metadata instead of SQLite")
    ap.add_argument("--max-artifact-bytes", type=int, default=DEFAULT_MAX_ARTIFACT_BYTES)
    ap.add_argument("--kv-cache-items", type=int, default=2, help="decoded KVs kept in memory for generate")
    ap.add_argument("--log-level", default="info")
    return ap


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        data_dir=args.data_dir,
        token_file=args.token_file,
        model=args.model,
        models_dir=args.models_dir,
        postgres_dsn=args.postgres_dsn,
        max_artifact_bytes=args.max_artifact_bytes,
        kv_cache_items=args.kv_cache_items,
    )


def serve(settings: Settings, host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    from .app import create_app

    app = create_app(settings)
    # uvicorn handles SIGTERM/SIGINT itself (graceful shutdown), then re-raises the signal it caught;
    # this handler turns that re-raise into a clean exit status 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=10,
        lifespan="on",
    )
    uvicorn.Server(config).run()


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s", stream=sys.stderr)
    try:
        serve(settings_from_args(args), args.host, args.port, args.log_level)
    except KVAgentError as exc:
        print(f"kvagent serve: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
