"""Settings of the registry server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

DEFAULT_MAX_ARTIFACT_BYTES = 8 << 30
#: Largest JSON request body accepted (prefix lookups with 4096 hashes are ~270 KB).
MAX_JSON_BODY = 1 << 20
MAX_PREFIX_HASHES = 4096


@dataclass(frozen=True)
class Settings:
    """Where the server keeps its data, who may call it, and which model (if any) it runs."""

    data_dir: Path
    token_file: Path
    model: str | None = None
    models_dir: Path | None = None
    postgres_dsn: str | None = None
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES
    kv_cache_items: int = 2
    block_size: int = 256

    def __post_init__(self) -> None:
        if self.max_artifact_bytes <= 0:
            raise ConfigError("max_artifact_bytes must be positive")
        if self.kv_cache_items < 0:
            raise ConfigError("kv_cache_items must be >= 0")
        if self.block_size <= 0:
            raise ConfigError("block_size must be positive")
        if self.model is not None and self.model.lower() == "none":
            object.__setattr__(self, "model", None)
