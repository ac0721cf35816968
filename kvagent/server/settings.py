"""Settings of the registry server."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..config import Config
from ..dtypes import DTYPE_CHOICES, check_dtype
from ..errors import ConfigError
from ..options import declare, derive, option_name, options_of
from ..plugins import DEFAULT_ENGINE, check_engine_name

DEFAULT_MAX_ARTIFACT_BYTES = 8 << 30
#: Largest JSON request body accepted (prefix lookups with 4096 hashes are ~270 KB).
MAX_JSON_BODY = 1 << 20
MAX_PREFIX_HASHES = 4096
#: during a database outage a cached token answer serves at most ``token_cache_s`` × this many seconds past
#: its expiry (unless ``token_stale_s`` says otherwise); then token lookups fail closed (503)
TOKEN_STALE_FACTOR = 5.0


@dataclass(frozen=True)
class Settings:
    """Where the server keeps its data, who may call it, and which model (if any) it runs.

    Each field is an option (``kvagent.options``) with its ``kvagent serve`` flag and help; a setting the SDK
    has too (the model, its dtype, block size...) derives from :class:`~kvagent.config.Config`'s
    declaration, None there meaning the host's Config (its KVAGENT_* variable or default).
    """

    data_dir: Path = declare(flag="--data-dir", doc="blobs and (by default) the SQLite metadata")
    token_file: Path | None = declare(
        None, flag="--token-file",
        doc='JSON {"<token>": {"principal": ..., "publish": bool, "admin": bool, "limits": {...}}}, '
        "imported into the database at start (tokens are also issued with `kvagent token`)")
    migrate: bool = declare(
        True, flag="--no-migrate",
        doc="do not upgrade the database schema at start; refuse to serve unless it is current "
        "(run `kvagent db upgrade` first)")
    token_cache_s: float = declare(
        2.0, flag="--token-cache-seconds",
        doc="how long a node trusts a cached token lookup: revocations reach it within this time")
    token_stale_s: float | None = declare(
        None, flag="--token-stale-seconds",
        doc="while the database is unreachable, how long past its expiry a cached token lookup still "
        f"answers before requests get 503 (default: --token-cache-seconds × {TOKEN_STALE_FACTOR:g})")
    model: str | None = derive(Config, "model", None, flag="--model",
                               doc="'smollm2', a local model directory, or 'none' (no generate)")
    engine: str = declare(
        DEFAULT_ENGINE, flag="--engine",
        doc="the generation engine: 'transformers' (built in), 'vllm' (needs vllm-kvagent and vLLM), or a "
        "module:attr engine factory")
    dtype: str | None = derive(
        Config, "dtype", None, flag="--dtype", choices=DTYPE_CHOICES,
        doc="the model's dtype, for every engine (default: KVAGENT_DTYPE or float32, the token-exact one; "
        "auto: bfloat16 where the CPU has AMX or AVX512-BF16 or the GPU supports it, as vLLM chooses)")
    models_dir: Path | None = derive(Config, "models_dir", None, flag="--models-dir")
    postgres_dsn: str | None = declare(None, flag="--postgres-dsn",
                                       doc="use PostgreSQL for metadata instead of SQLite")
    max_artifact_bytes: int = declare(DEFAULT_MAX_ARTIFACT_BYTES, flag="--max-artifact-bytes",
                                      doc="the largest artifact accepted, in bytes")
    kv_cache_items: int = derive(Config, "memory_slots", flag="--kv-cache-items",
                                 doc="decoded KVs kept in memory for generate")
    prices_file: Path | None = declare(
        None, flag="--prices",
        doc="host price file (JSON: currency, input/cached_input/output_per_mtok, commission_bps)")
    currency: str | None = declare(None, flag="--currency",
                                   doc="the currency amounts count micro-units of (default uUSD)")
    dispute_verify: str = declare("full", flag="--dispute-verify", choices=("sample", "full"),
                                  doc="how a disputed artifact is re-verified when a model runs here")
    blobs: str | None = declare(
        None, flag="--blobs", metavar="DIR|s3://BUCKET/PREFIX",
        doc="where blobs live: a directory (default <data-dir>/blobs) or an S3-compatible bucket "
        "(credentials, region and AWS_ENDPOINT_URL from the standard AWS_* variables)")
    presign_expiry_s: int = declare(300, flag="--presign-expiry",
                                    doc="seconds a presigned blob URL stays valid")
    max_queue: int | None = declare(
        None, flag="--max-queue",
        doc="chat/completion requests queued or running at once; more get 429 + Retry-After "
        "(default: twice --max-batch)")
    max_batch: int | None = declare(
        None, flag="--max-batch",
        doc="sequences decoded together, one forward per step; more admitted ones wait for a slot (default: "
        "half the available memory / the KV bytes of one sequence at the model's full context, in 8..256)")
    prefill_chunk: int = declare(
        256, flag="--prefill-chunk",
        doc="prompt-tail tokens prefilled between two decode steps (a longer tail is prefilled in chunks)")
    default_max_tokens: int = declare(512, flag="--default-max-tokens",
                                      doc="completion length of a chat request that sets no max_tokens")
    calibrate_at_start: bool | None = derive(
        Config, "calibrate_at_start", None, flag="--no-calibrate-at-start",
        doc="serve at once even when the calibration has no measured prefill for this machine + model "
        "(default: measure a few short forwards first, about 2 s; KVAGENT_CALIBRATE_AT_START=0 does the "
        "same)")
    prompt_cache_bytes: int = declare(2 << 30, flag="--prompt-cache-bytes",
                                      doc="disk budget of the host's private prompt-KV cache (chat endpoint)")
    block_size: int = derive(Config, "block_size",
                             doc="tokens per hashed block of the registry's prefix index")
    orphan_grace_s: float = declare(
        600.0, doc="unreferenced blobs / temp files younger than this are left alone at startup")
    # x402 payments (kvagent.server.x402_setup; docs/market.md): all None, the server takes no x402
    x402_wallet: Path | None = declare(
        None, flag="--x402-wallet",
        doc="the host's wallet key file: it is paid (payTo) and sends payouts "
        "(or set KVAGENT_X402_WALLET_KEY)")
    x402_pay_to: str | None = declare(
        None, flag="--x402-pay-to", doc="the payee address when the host's key is not kept here (no payouts)")
    x402_network: str | None = declare(
        None, flag="--x402-network", doc="CAIP-2 network: eip155:8453 (Base), eip155:84532 (Base Sepolia)")
    x402_asset: str | None = declare(None, flag="--x402-asset",
                                     doc="the token's contract address (USDC on that network)")
    x402_token_name: str | None = declare(None, flag="--x402-token-name",
                                          doc="the token's EIP-712 name (default 'USD Coin')")
    x402_token_version: str | None = declare(None, flag="--x402-token-version",
                                             doc="the token's EIP-712 version (default '2')")
    x402_facilitator: str | None = declare(
        None, flag="--x402-facilitator", doc="a hosted x402 facilitator's URL (default: one in process)")
    x402_facilitator_key: Path | None = declare(
        None, flag="--x402-facilitator-key",
        doc="the in-process facilitator's key file; it pays the settlement gas (or set "
        "KVAGENT_X402_FACILITATOR_KEY)")
    x402_rpc: str | None = declare(
        None, flag="--x402-rpc",
        doc="the chain's JSON-RPC URL (in-process facilitator, payouts, chain audit)")

    def host_options(self) -> dict[str, Any]:
        """The Config options of the host's runtime that these settings give, under Config's names: each
        option derived from Config's (None: the Config's own, i.e. its KVAGENT_* variable or default), but
        the model and models_dir (the host resolves and loads the model itself) and block_size (the
        registry's index)."""
        return {option_name(Config, opt.declaration): getattr(self, name)
                for name, opt in options_of(Settings).items()
                if opt.of is not None and name not in ("model", "models_dir", "block_size")}

    @property
    def x402_configured(self) -> bool:
        """Whether any ``--x402-*`` option is set (then x402 must be complete and installed at start)."""
        return any(getattr(self, f) is not None for _, f, _h in X402_OPTIONS)

    def __post_init__(self) -> None:
        if self.max_artifact_bytes <= 0:
            raise ConfigError("max_artifact_bytes must be positive")
        if self.kv_cache_items < 0:
            raise ConfigError("kv_cache_items must be >= 0")
        if not 1 <= self.presign_expiry_s <= 7 * 24 * 3600:
            raise ConfigError("presign_expiry_s must be in 1..604800 (S3 allows at most 7 days)")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError("max_batch must be >= 1")
        if self.max_queue is not None and self.max_queue < 1:
            raise ConfigError("max_queue must be >= 1")
        if self.prefill_chunk < 1:
            raise ConfigError("prefill_chunk must be >= 1")
        if self.block_size <= 0:
            raise ConfigError("block_size must be positive")
        if not 0 <= self.token_cache_s <= 60:
            raise ConfigError("token_cache_s must be in 0..60 seconds")
        if self.token_stale_s is not None and not 0 <= self.token_stale_s <= 3600:
            raise ConfigError("token_stale_s must be in 0..3600 seconds")
        if self.dispute_verify not in ("sample", "full"):
            raise ConfigError("dispute_verify must be 'sample' or 'full'")
        check_engine_name(self.engine)
        if self.dtype is not None:
            check_dtype(self.dtype)
        if self.model is not None and self.model.lower() == "none":
            object.__setattr__(self, "model", None)


#: The ``--x402-*`` options: (flag, Settings field, help), from their declarations in ``Settings``.
X402_OPTIONS: tuple[tuple[str, str, str], ...] = tuple(
    (opt.flag, name, opt.doc) for name, opt in options_of(Settings).items()
    if name.startswith("x402_") and opt.flag is not None
)


#: Environment variable carrying the settings to ``--workers`` processes (see ``to_env`` / ``from_env``).
SETTINGS_ENV = "KVAGENT_SERVER_SETTINGS"


def to_env(settings: Settings) -> str:
    """``settings`` as JSON, for a worker process to rebuild with ``from_env``."""
    raw = {f.name: getattr(settings, f.name) for f in fields(settings)}
    return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in raw.items()})


def from_env(value: str) -> Settings:
    """The settings that ``to_env`` encoded (path fields become ``Path`` again)."""
    try:
        raw = json.loads(value)
    except ValueError as exc:
        raise ConfigError(f"{SETTINGS_ENV} is not valid JSON: {exc}") from exc
    paths = {f.name for f in fields(Settings) if "Path" in str(f.type)}
    kw: dict[str, Any] = {k: Path(v) if k in paths and v is not None else v for k, v in raw.items()}
    return Settings(**kw)
