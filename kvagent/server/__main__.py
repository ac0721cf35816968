"""``python -m kvagent.server``: run the registry under uvicorn (SIGTERM/SIGINT shut it down gracefully)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..dtypes import DTYPE_CHOICES
from ..errors import ConfigError, KVAgentError
from ..plugins import DEFAULT_ENGINE, load_engine_factory
from .limits import ConnectionLimits
from .settings import (
    DEFAULT_MAX_ARTIFACT_BYTES,
    SETTINGS_ENV,
    TOKEN_STALE_FACTOR,
    X402_OPTIONS,
    Settings,
    to_env,
)


def build_parser(prog: str = "python -m kvagent.server") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Run the kvagent registry / KV host server.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--data-dir", type=Path, required=True, help="blobs and (by default) the SQLite metadata")
    ap.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help='JSON {"<token>": {"principal": ..., "publish": bool, "admin": bool, "limits": {...}}}, '
        "imported into the database at start (tokens are also issued with `kvagent token`)",
    )
    ap.add_argument("--no-migrate", action="store_true",
                    help="do not upgrade the database schema at start; refuse to serve unless it is current "
                         "(run `kvagent db upgrade` first)")
    ap.add_argument(
        "--token-cache-seconds",
        type=float,
        default=2.0,
        help="how long a node trusts a cached token lookup: revocations reach it within this time",
    )
    ap.add_argument(
        "--token-stale-seconds",
        type=float,
        default=None,
        help="while the database is unreachable, how long past its expiry a cached token lookup still "
        f"answers before requests get 503 (default: --token-cache-seconds × {TOKEN_STALE_FACTOR:g})",
    )
    ap.add_argument(
        "--model", default="none", help="'smollm2', a local model directory, or 'none' (no generate)"
    )
    ap.add_argument(
        "--engine",
        default="transformers",
        help="the generation engine: 'transformers' (built in), 'vllm' (needs vllm-kvagent and vLLM), or a "
        "module:attr engine factory",
    )
    ap.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                    help="the model's dtype, for every engine (default: KVAGENT_DTYPE or float32, the "
                         "token-exact one; auto: bfloat16 where the CPU has AMX or AVX512-BF16 or the GPU "
                         "supports it, as vLLM chooses)")
    ap.add_argument("--models-dir", type=Path, default=None, help="where converted models are cached")
    ap.add_argument("--postgres-dsn", default=None, help="use PostgreSQL for metadata instead of SQLite")
    ap.add_argument("--max-artifact-bytes", type=int, default=DEFAULT_MAX_ARTIFACT_BYTES)
    ap.add_argument("--kv-cache-items", type=int, default=2, help="decoded KVs kept in memory for generate")
    ap.add_argument(
        "--prices",
        type=Path,
        default=None,
        help="host price file (JSON: currency, input/cached_input/output_per_mtok, commission_bps)",
    )
    ap.add_argument(
        "--currency", default=None, help="the currency amounts count micro-units of (default uUSD)"
    )
    ap.add_argument("--dispute-verify", choices=("sample", "full"), default="full",
                    help="how a disputed artifact is re-verified when a model runs here")
    ap.add_argument(
        "--blobs",
        default=None,
        metavar="DIR|s3://BUCKET/PREFIX",
        help="where blobs live: a directory (default <data-dir>/blobs) or an S3-compatible bucket "
        "(credentials, region and AWS_ENDPOINT_URL from the standard AWS_* variables)",
    )
    ap.add_argument(
        "--presign-expiry", type=int, default=300, help="seconds a presigned blob URL stays valid"
    )
    ap.add_argument("--workers", type=int, default=1, help="worker processes serving the same port")
    ap.add_argument("--max-queue", type=int, default=None,
                    help="chat/completion requests queued or running at once; more get 429 + Retry-After "
                         "(default: twice --max-batch)")
    ap.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="sequences decoded together, one forward per step; more admitted ones wait for a slot (default: "
        "half the available memory / the KV bytes of one sequence at the model's full context, in 8..256)",
    )
    ap.add_argument(
        "--prefill-chunk",
        type=int,
        default=256,
        help="prompt-tail tokens prefilled between two decode steps (a longer tail is prefilled in chunks)",
    )
    ap.add_argument("--default-max-tokens", type=int, default=512,
                    help="completion length of a chat request that sets no max_tokens")
    ap.add_argument("--no-calibrate-at-start", dest="calibrate_at_start", action="store_false", default=None,
                    help="serve at once even when the calibration has no measured prefill for this machine + "
                         "model (default: measure a few short forwards first, about 2 s; "
                         "KVAGENT_CALIBRATE_AT_START=0 does the same)")
    ap.add_argument("--prompt-cache-bytes", type=int, default=2 << 30,
                    help="disk budget of the host's private prompt-KV cache (chat endpoint)")
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
    for flag, field, text in X402_OPTIONS:
        ap.add_argument(flag, dest=field, default=None,
                        type=Path if "Path" in str(Settings.__dataclass_fields__[field].type) else str,
                        help=text)
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
        prices_file=args.prices,
        currency=args.currency,
        dispute_verify=args.dispute_verify,
        blobs=args.blobs,
        presign_expiry_s=args.presign_expiry,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        prefill_chunk=args.prefill_chunk,
        default_max_tokens=args.default_max_tokens,
        prompt_cache_bytes=args.prompt_cache_bytes,
        migrate=not args.no_migrate,
        token_cache_s=args.token_cache_seconds,
        token_stale_s=args.token_stale_seconds,
        engine=args.engine,
        calibrate_at_start=args.calibrate_at_start,
        dtype=args.dtype,
        **{field: getattr(args, field) for _, field, _h in X402_OPTIONS},
    )


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
