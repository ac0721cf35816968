"""Settings of the registry server."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..dtypes import check_dtype
from ..errors import ConfigError
from ..plugins import check_engine_name

DEFAULT_MAX_ARTIFACT_BYTES = 8 << 30
#: Largest JSON request body accepted (prefix lookups with 4096 hashes are ~270 KB).
MAX_JSON_BODY = 1 << 20
MAX_PREFIX_HASHES = 4096
#: during a database outage a cached token answer serves at most ``token_cache_s`` × this many seconds past
#: its expiry (unless ``token_stale_s`` says otherwise); then token lookups fail closed (503)
TOKEN_STALE_FACTOR = 5.0


@dataclass(frozen=True)
class Settings:
    """Where the server keeps its data, who may call it, and which model (if any) it runs."""

    data_dir: Path
    token_file: Path | None  # the JSON tokens imported into the database at start (None: import nothing)
    model: str | None = None
    models_dir: Path | None = None
    postgres_dsn: str | None = None
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES
    kv_cache_items: int = 2
    block_size: int = 256
    prices_file: Path | None = None  # the host's price file (kvagent.costs.market.HostPrices); None: free
    # hosting
    currency: str | None = None  # overrides the price file's currency (default uUSD)
    dispute_verify: str = "full"  # how a model-running host re-verifies a disputed artifact
    blobs: str | None = None  # None: <data_dir>/blobs; a directory; or s3://BUCKET[/PREFIX] (AWS_* variables)
    presign_expiry_s: int = 300  # lifetime of a presigned blob URL (S3 backend)
    prompt_cache_bytes: int = 2 << 30  # the host's private prompt-KV cache on disk (chat endpoint)
    # chat/completion requests waiting or running at once; more get 429 + Retry-After (None: 2 x max_batch)
    max_queue: int | None = None
    # sequences the model decodes together; further admitted requests wait for a slot (None: sized from the
    # memory the KV may take, kvagent.server.sizing)
    max_batch: int | None = None
    prefill_chunk: int = 256  # prompt-tail tokens prefilled between two decode steps (chunked prefill)
    default_max_tokens: int = 512  # completion length when a request gives no max_tokens
    # unreferenced blobs / temp files younger than this are left alone at startup
    orphan_grace_s: float = 600.0
    migrate: bool = True  # upgrade the database schema at start (False: refuse unless it is at head already)
    # how long a node trusts its cached answer for a token (revocations take this long)
    token_cache_s: float = 2.0
    # how long past its expiry a cached token answer still serves while the database cannot be asked; then
    # lookups fail closed (503). None: token_cache_s × TOKEN_STALE_FACTOR
    token_stale_s: float | None = None
    # the generation engine: "transformers", an installed engine ("vllm": vllm-kvagent) or module:attr
    engine: str = "transformers"
    # measure prefill before serving when the calibration has none for this machine + model (None: the
    # host's Config, i.e. KVAGENT_CALIBRATE_AT_START or its default)
    calibrate_at_start: bool | None = None
    # the model's dtype: auto|float32|bfloat16|float16 (None: the host's Config, i.e. KVAGENT_DTYPE or
    # float32);
    # every engine of the host runs in it (kvagent.dtypes)
    dtype: str | None = None
    # x402 payments (kvagent.server.x402_setup; docs/market.md): all None, the server takes no x402
    x402_wallet: Path | None = None  # the host's wallet key file (payee, payouts; or KVAGENT_X402_WALLET_KEY)
    x402_pay_to: str | None = None  # the payee address, when the host holds no key here (no payouts then)
    x402_network: str | None = None  # CAIP-2, e.g. eip155:8453 (Base), eip155:84532 (Base Sepolia)
    x402_asset: str | None = None  # the token's address (USDC on the network)
    x402_token_name: str | None = None  # its EIP-712 domain name (USDC: "USD Coin")
    x402_token_version: str | None = None  # its EIP-712 domain version (USDC: "2")
    x402_facilitator: str | None = None  # a hosted facilitator's URL (else one runs in process)
    x402_facilitator_key: Path | None = None  # the in-process facilitator's gas key file (or env)
    x402_rpc: str | None = None  # the chain's JSON-RPC URL (in-process facilitator, payouts, audit)

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


#: The ``--x402-*`` options, declared once: (flag, Settings field, help); ``python -m kvagent.server`` and
#: ``kvagent serve`` add them from here.
X402_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("--x402-wallet", "x402_wallet", "the host's wallet key file: it is paid (payTo) and sends payouts "
     "(or set KVAGENT_X402_WALLET_KEY)"),
    ("--x402-pay-to", "x402_pay_to", "the payee address when the host's key is not kept here (no payouts)"),
    ("--x402-network", "x402_network", "CAIP-2 network: eip155:8453 (Base), eip155:84532 (Base Sepolia)"),
    ("--x402-asset", "x402_asset", "the token's contract address (USDC on that network)"),
    ("--x402-token-name", "x402_token_name", "the token's EIP-712 name (default 'USD Coin')"),
    ("--x402-token-version", "x402_token_version", "the token's EIP-712 version (default '2')"),
    ("--x402-facilitator", "x402_facilitator", "a hosted x402 facilitator's URL (default: one in process)"),
    ("--x402-facilitator-key", "x402_facilitator_key", "the in-process facilitator's key file; it pays the "
     "settlement gas (or set KVAGENT_X402_FACILITATOR_KEY)"),
    ("--x402-rpc", "x402_rpc", "the chain's JSON-RPC URL (in-process facilitator, payouts, chain audit)"),
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
