"""Configuration in one place: explicit arguments override KVAGENT_* variables, which override defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

DEFAULT_MODEL = "smollm2"


def _default_cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("kvagent", appauthor=False))


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(float(raw))
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a number") from exc
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {value}")
    return value


def _env_bool(name: str) -> bool | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use 1/0, true/false)")


@dataclass(frozen=True)
class Config:
    """Resolved settings of a KVAgent.

    ``cache_dir`` holds the local KV store (``<cache_dir>/kv``); ``models_dir`` holds converted models
    (the user cache dir by default, shared by every cache_dir, so the embedded model converts once).
    """

    model: str = DEFAULT_MODEL
    cache_dir: Path = field(default_factory=_default_cache_dir)
    cache_size_bytes: int = 10 * 1024**3
    dtype: str | None = None
    block_size: int = 256
    local_only: bool = True
    memory_slots: int = 2
    publisher: str | None = None
    models_dir: Path = field(default_factory=lambda: _default_cache_dir() / "models")
    codec: str = "raw"
    lock_timeout: float = 600.0
    verify: str = "sample"
    verify_probes: int = 64
    registry_url: str | None = None
    registry_token: str | None = field(default=None, repr=False)
    allow_context_overflow: bool = False
    # money, in integer micro-units of the registry's currency (kvagent.market): None = no limit
    max_price_per_load: int | None = None
    budget: int | None = None
    prefill_cost_per_token: int = 5  # the buyer's own prefill: $5 per million input tokens

    @property
    def store_dir(self) -> Path:
        return self.cache_dir / "kv"

    @classmethod
    def resolve(
        cls,
        *,
        model: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_size_bytes: int | None = None,
        dtype: str | None = None,
        block_size: int | None = None,
        local_only: bool | None = None,
        memory_slots: int | None = None,
        publisher: str | None = None,
        models_dir: str | os.PathLike[str] | None = None,
        codec: str | None = None,
        verify: str | None = None,
        verify_probes: int | None = None,
        registry_url: str | None = None,
        registry_token: str | None = None,
        allow_context_overflow: bool | None = None,
        max_price_per_load: int | None = None,
        budget: int | None = None,
        prefill_cost_per_token: int | None = None,
    ) -> Config:
        """Build a Config from arguments, then KVAGENT_* variables, then defaults."""
        env_dir = os.environ.get("KVAGENT_CACHE_DIR") or None
        d = cls()
        registry = registry_url or os.environ.get("KVAGENT_REGISTRY_URL") or None
        cfg = cls(
            model=model or os.environ.get("KVAGENT_MODEL") or d.model,
            cache_dir=Path(cache_dir or env_dir or d.cache_dir).expanduser(),
            cache_size_bytes=_first(cache_size_bytes, _env_int("KVAGENT_CACHE_SIZE"), d.cache_size_bytes),
            dtype=dtype or os.environ.get("KVAGENT_DTYPE") or None,
            block_size=_first(block_size, _env_int("KVAGENT_BLOCK_SIZE"), d.block_size),
            local_only=_first(local_only, _env_bool("KVAGENT_LOCAL_ONLY"), registry is None),
            memory_slots=_first(memory_slots, _env_int("KVAGENT_MEMORY_SLOTS"), d.memory_slots),
            publisher=publisher or os.environ.get("KVAGENT_PUBLISHER") or None,
            models_dir=Path(models_dir or os.environ.get("KVAGENT_MODELS_DIR") or d.models_dir).expanduser(),
            codec=codec or os.environ.get("KVAGENT_CODEC") or d.codec,
            verify=verify or os.environ.get("KVAGENT_VERIFY") or d.verify,
            verify_probes=_first(verify_probes, _env_int("KVAGENT_VERIFY_PROBES"), d.verify_probes),
            registry_url=registry,
            registry_token=registry_token or os.environ.get("KVAGENT_REGISTRY_TOKEN") or None,
            allow_context_overflow=_first(
                allow_context_overflow, _env_bool("KVAGENT_ALLOW_CONTEXT_OVERFLOW"), d.allow_context_overflow
            ),
            max_price_per_load=_money(max_price_per_load, "KVAGENT_MAX_PRICE_PER_LOAD", None),
            budget=_money(budget, "KVAGENT_BUDGET", None),
            prefill_cost_per_token=_first(
                _money(prefill_cost_per_token, "KVAGENT_PREFILL_COST_PER_TOKEN", None), d.prefill_cost_per_token
            ),
        )
        if cfg.dtype not in (None, "float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {cfg.dtype!r}")
        from .codecs import ARTIFACT_CODECS

        if cfg.verify not in ("none", "sample", "full"):
            raise ConfigError(f"verify must be none, sample or full, got {cfg.verify!r}")
        if cfg.verify_probes < 0:
            raise ConfigError(f"verify_probes must be >= 0, got {cfg.verify_probes}")
        if cfg.codec not in ARTIFACT_CODECS:
            raise ConfigError(f"codec must be one of {list(ARTIFACT_CODECS)} (lossless), got {cfg.codec!r}")
        if cfg.block_size <= 0:
            raise ConfigError("block_size must be positive")
        if not cfg.local_only and cfg.registry_url is None:
            raise ConfigError("local_only=False needs a registry URL (registry_url= or KVAGENT_REGISTRY_URL)")
        if cfg.registry_url is not None and not cfg.registry_url.startswith(("http://", "https://")):
            raise ConfigError(f"registry URL must start with http:// or https://, got {cfg.registry_url!r}")
        if cfg.cache_size_bytes <= 0:
            raise ConfigError("cache_size_bytes must be positive")
        return cfg


def _money(arg: int | None, env: str, default: int | None) -> int | None:
    """An amount of integer micro-units: the argument, else the variable, else ``default`` (floats refused)."""
    from .market import amount

    if arg is not None:
        return amount(arg, env.removeprefix("KVAGENT_").lower())
    raw = os.environ.get(env)
    if raw is None or raw.strip() == "":
        return default
    return amount(raw, env)


def _first(*values):  # type: ignore[no-untyped-def]
    for v in values:
        if v is not None:
            return v
    return None
