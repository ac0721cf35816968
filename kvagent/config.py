"""Configuration in one place: every SDK option, its default, its KVAGENT_* variable and its doc is
declared once, here (as ``kvagent.options`` fields).

Explicit arguments override KVAGENT_* variables, which override defaults (``Config.from_env``). The
runtime (``kvagent.runtime``), the ``KVAgent`` facade, the server host and the LangChain models all take
their options from a ``Config``; an unknown option name is a ``ConfigError`` naming the closest one.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .costs.market import DEFAULT_PREFILL_MICROS_PER_TOKEN
from .errors import ConfigError
from .modes import Publish, Verify
from .options import declare, option_field

if TYPE_CHECKING:
    from .costs.policy import PolicyParams

DEFAULT_MODEL = "smollm2"
#: what ``publish`` takes: a :class:`~kvagent.modes.Publish` or its string, or the older False / True
PUBLISH_CHOICES = (False, True, *Publish.choices())
#: other spellings accepted for an option (``KVAgent(token=...)`` as ``RegistryClient(url, token)`` has it)
ALIASES = {"token": "registry_token"}


def _default_cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("kvagent", appauthor=False))


# -- reading KVAGENT_* variables ------------------------------------------------------------------
def _env_int(name: str, raw: str) -> int:
    try:
        value = int(float(raw))
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a number") from exc
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {value}")
    return value


def _env_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a number") from exc
    if not value >= 0:
        raise ConfigError(f"{name} must not be negative, got {value}")
    return value


def _env_bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use 1/0, true/false)")


def _env_str(_name: str, raw: str) -> str:
    return raw


def _env_money(name: str, raw: str) -> int:
    from .costs.market import amount

    return amount(raw, name)


def _env_keys(_name: str, raw: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in raw.split(",") if k.strip())


def _env_wallet(_name: str, _raw: str) -> bool:
    """KVAGENT_WALLET_KEY is set: the wallet is that key (read when the runtime is built; never kept here)."""
    return True


def _env_assets(_name: str, raw: str) -> tuple[tuple[str, str], ...]:
    return wallet_assets(raw)


def wallet_assets(value: str | Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``eip155:8453/0x...`` entries (a comma-separated string or a list) as (CAIP-2 network, token) pairs."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[tuple[str, str]] = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        network, sep, asset = item.partition("/")
        if not sep or not network.startswith("eip155:") or not asset.startswith("0x") or len(asset) != 42:
            raise ConfigError(f"wallet_assets: {item!r} is not NETWORK/TOKEN (e.g. eip155:8453/0x833...)")
        out.append((network, asset))
    return tuple(out)


#: PolicyParams fields with their own Config option (money is integer micro-units, set in one place)
_POLICY_MONEY = {
    "prefill_cost_micros_per_token": "KVAGENT_PREFILL_COST_PER_TOKEN",
    "max_price_per_load_micros": "KVAGENT_MAX_PRICE_PER_LOAD",
    "budget_left_micros": "KVAGENT_BUDGET",
}


def _env_policy(name: str, raw: str) -> PolicyParams:
    """``min_tokens=0,prefill_tokens_per_s=120,bandwidth_bytes_per_s=1e9``: the cost policy's settings (the
    rest keep their defaults). An unknown or malformed setting is an error, never ignored."""
    import typing

    from .costs.policy import PolicyParams

    hints = typing.get_type_hints(PolicyParams)
    values: dict[str, Any] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        key, sep, text = (x.strip() for x in item.partition("="))
        if not sep or not text:
            raise ConfigError(f"{name}: {item!r} is not key=value")
        if key in _POLICY_MONEY:
            raise ConfigError(f"{name}: {key} is set by {_POLICY_MONEY[key]} (integer micro-units)")
        if key not in hints:
            known = ", ".join(sorted(k for k in hints if k not in _POLICY_MONEY))
            raise ConfigError(f"{name}: unknown setting {key!r} (known: {known})")
        if text.lower() == "none" and "None" in str(hints[key]):
            values[key] = None
            continue
        parse = _env_int if hints[key] is int else _env_float
        values[key] = parse(f"{name}:{key}", text)
    try:
        return PolicyParams(**values)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from exc


@dataclass(frozen=True)
class Config:
    """Resolved settings of a kvagent runtime: every option of kvagent declared once (``kvagent.options``),
    with its default, its KVAGENT_* variable and its doc; the server, the vLLM connector and the resolver
    derive their fields of the same settings from these.

    ``cache_dir`` holds the local KV store (``<cache_dir>/kv``) and the calibration file; ``models_dir``
    holds converted models (the user cache dir by default, shared by every cache_dir, so the embedded model
    converts once). Money is in integer micro-units of the registry's currency (``kvagent.costs.market``).
    """

    # the model
    model: str = declare(DEFAULT_MODEL, env="KVAGENT_MODEL",
                         doc="'smollm2', a local model directory or a cached Hugging Face id")
    models_dir: Path = declare(factory=lambda: _default_cache_dir() / "models", env="KVAGENT_MODELS_DIR",
                               doc="where converted models are cached")
    dtype: str = declare(
        "float32", env="KVAGENT_DTYPE",
        doc="auto|float32|bfloat16|float16; auto: bfloat16 where the hardware computes it natively "
        "(kvagent.dtypes). float32 by default: the one dtype in which greedy output after reuse equals a "
        "full prefill's (docs/deploy.md)")
    system_prompt: str | None = declare(None, doc="None: the chat template's own default")
    prefill_chunk_size: int | None = declare(None, env="KVAGENT_PREFILL_CHUNK_SIZE", parse=_env_int,
                                             doc="tokens per prefill forward (None: the whole prompt)")
    allow_context_overflow: bool = declare(False, env="KVAGENT_ALLOW_CONTEXT_OVERFLOW", parse=_env_bool,
                                           doc="run past the model's context length instead of refusing")
    # the local caches
    cache_dir: Path = declare(factory=_default_cache_dir, env="KVAGENT_CACHE_DIR",
                              doc="the local KV store (<cache_dir>/kv) and the calibration file")
    cache_size_bytes: int = declare(10 * 1024**3, env="KVAGENT_CACHE_SIZE", parse=_env_int,
                                    doc="disk budget of the local KV store")
    memory_slots: int = declare(2, env="KVAGENT_MEMORY_SLOTS", parse=_env_int,
                                doc="decoded KVs kept in memory")
    block_size: int = declare(256, env="KVAGENT_BLOCK_SIZE", parse=_env_int,
                              doc="tokens per hashed block of a prefix")
    codec: str = declare("raw", env="KVAGENT_CODEC", doc="the artifacts' lossless codec")
    lock_timeout: float = declare(600.0, env="KVAGENT_LOCK_TIMEOUT", parse=_env_float,
                                  doc="seconds to wait for the lock of a KV another process computes")
    calibration: str | Path | bool | None = declare(
        None, env="KVAGENT_CALIBRATION", doc="the calibration file (None: cache_dir's; False: none)")
    calibrate_at_start: bool = declare(
        True, env="KVAGENT_CALIBRATE_AT_START", parse=_env_bool,
        doc="a host (kvagent serve --model) with no measured prefill for its machine + model measures a "
        "few short forwards before it serves (about 2 s), so its first decisions are not made on assumed "
        "constants")
    # checking what comes from elsewhere
    verify: Verify = declare(Verify.SAMPLE, env="KVAGENT_VERIFY",
                             doc="how KV from elsewhere is checked against its tokens: none, sample or full")
    verify_probes: int = declare(64, env="KVAGENT_VERIFY_PROBES", parse=_env_int,
                                 doc="positions a sample verification checks")
    trusted_keys: tuple[str, ...] | None = declare(None, env="KVAGENT_TRUSTED_KEYS", parse=_env_keys,
                                                   doc="publisher keys whose signatures are trusted")
    # the registry
    registry_url: str | None = declare(None, env="KVAGENT_REGISTRY_URL", doc="the registry (None: none)")
    registry_token: str | None = declare(None, env="KVAGENT_REGISTRY_TOKEN", secret=True,
                                         doc="the registry's bearer token")
    local_only: bool = declare(True, env="KVAGENT_LOCAL_ONLY", parse=_env_bool,
                               doc="use no registry (default: True unless a registry_url is given)")
    registry_timeout: float | None = declare(
        None, env="KVAGENT_REGISTRY_TIMEOUT", parse=_env_float,
        doc="seconds each registry request may take (None: the client's, 3 s to connect and 20 s to read)")
    registry_attempts: int = declare(3, env="KVAGENT_REGISTRY_ATTEMPTS", parse=_env_int,
                                     doc="tries per registry request")
    publisher: str | None = declare(None, env="KVAGENT_PUBLISHER", doc="the name recorded in saved artifacts")
    publish: Publish = declare(
        Publish.NONE,
        doc="publish what is computed: none, restricted or public (a Publish; False: none, True: restricted)")
    policy: PolicyParams | None = declare(
        None, env="KVAGENT_POLICY", parse=_env_policy,
        doc="the cost policy's settings (None: kvagent.costs.policy's defaults)")
    # money, integer micro-units
    max_price_per_load: int | None = declare(None, env="KVAGENT_MAX_PRICE_PER_LOAD", parse=_env_money,
                                             doc="never buy a load above this (None: no limit)")
    budget: int | None = declare(None, env="KVAGENT_BUDGET", parse=_env_money,
                                 doc="never spend more than this in all (None: no limit)")
    prefill_cost_per_token: int = declare(DEFAULT_PREFILL_MICROS_PER_TOKEN,
                                          env="KVAGENT_PREFILL_COST_PER_TOKEN", parse=_env_money,
                                          doc="what a local prefill costs, per token")
    wallet: str | Path | bool | None = declare(
        None, env="KVAGENT_WALLET_KEY", parse=_env_wallet,
        doc="x402: a wallet pays a priced artifact's 402 by itself, within max_price_per_load and budget. A "
        "key file's path, or True: the key in KVAGENT_WALLET_KEY (set, it turns this on); never kept here")
    wallet_assets: tuple[tuple[str, str], ...] = declare(
        (), env="KVAGENT_WALLET_ASSETS", parse=_env_assets,
        doc="tokens the wallet may pay in beyond the x402 SDK's own (USDC): 'eip155:31337/0x...', "
        "comma-separated")

    @property
    def store_dir(self) -> Path:
        return self.cache_dir / "kv"

    @property
    def publish_visibility(self) -> str | None:
        """The visibility computed KVs are published with, or None when they are not published."""
        return Publish.of(self.publish).visibility

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_env(cls, **options: Any) -> Config:
        """A Config from ``options`` (None: not given), then KVAGENT_* variables, then defaults; validated."""
        given = canonical_options(options)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if given.get(f.name) is not None:
                values[f.name] = given[f.name]
                continue
            opt = option_field(f)
            raw = os.environ.get(opt.env) if opt.env else None
            if opt.env and raw is not None and raw.strip() != "":
                values[f.name] = (opt.parse or _env_str)(opt.env, raw)
        if "local_only" not in values:
            values["local_only"] = values.get("registry_url") is None
        return cls(**values)._checked()

    def with_options(self, **options: Any) -> Config:
        """This Config with ``options`` replaced (None: keep), validated; KVAGENT_* variables are not read."""
        given = {k: v for k, v in canonical_options(options).items() if v is not None}
        if "registry_url" in given and "local_only" not in given:
            given["local_only"] = False
        return replace(self, **given)._checked() if given else self

    #: deprecated name of :meth:`from_env`
    resolve = from_env

    def _checked(self) -> Config:
        """Normalise types (paths, money, keys) and refuse bad values with what was expected."""
        from .artifacts.codecs import ARTIFACT_CODECS
        from .costs.market import amount
        from .dtypes import check_dtype

        norm: dict[str, Any] = {
            "cache_dir": Path(self.cache_dir).expanduser(), "models_dir": Path(self.models_dir).expanduser(),
            "dtype": check_dtype(self.dtype),  # None: auto
        }
        for name in ("max_price_per_load", "budget", "prefill_cost_per_token"):
            value = getattr(self, name)
            if value is not None:
                norm[name] = amount(value, name)
        if not (isinstance(self.wallet_assets, tuple)
                and all(isinstance(a, tuple) and len(a) == 2 for a in self.wallet_assets)):
            norm["wallet_assets"] = wallet_assets(self.wallet_assets)  # type: ignore[arg-type]
        if isinstance(self.wallet, str) or isinstance(self.wallet, os.PathLike):
            norm["wallet"] = Path(self.wallet).expanduser()
        if self.trusted_keys is not None:
            keys = (self.trusted_keys,) if isinstance(self.trusted_keys, str) else self.trusted_keys
            norm["trusted_keys"] = tuple(str(k) for k in keys)
        if isinstance(self.calibration, str) and self.calibration.lower() in (
            "0",
            "false",
            "no",
            "off",
            "none",
        ):
            norm["calibration"] = False
        norm["verify"] = Verify.of(self.verify, "verify")
        norm["publish"] = Publish.of(self.publish, "publish")
        cfg = replace(self, **norm)
        if cfg.verify_probes < 0:
            raise ConfigError(f"verify_probes must be >= 0, got {cfg.verify_probes}")
        if cfg.codec not in ARTIFACT_CODECS:
            raise ConfigError(f"codec must be one of {list(ARTIFACT_CODECS)} (lossless), got {cfg.codec!r}")
        if cfg.registry_timeout is not None and not cfg.registry_timeout > 0:
            raise ConfigError(f"registry_timeout must be positive seconds, got {cfg.registry_timeout!r}")
        if cfg.registry_attempts < 1:
            raise ConfigError(
                f"registry_attempts counts tries and must be at least 1, got {cfg.registry_attempts}"
            )
        if cfg.block_size <= 0:
            raise ConfigError("block_size must be positive")
        if cfg.prefill_chunk_size is not None and cfg.prefill_chunk_size <= 0:
            raise ConfigError(f"prefill_chunk_size must be positive, got {cfg.prefill_chunk_size}")
        if not cfg.local_only and cfg.registry_url is None:
            raise ConfigError("local_only=False needs a registry URL (registry_url= or KVAGENT_REGISTRY_URL)")
        if cfg.registry_url is not None and not cfg.registry_url.startswith(("http://", "https://")):
            raise ConfigError(f"registry URL must start with http:// or https://, got {cfg.registry_url!r}")
        if cfg.cache_size_bytes <= 0:
            raise ConfigError("cache_size_bytes must be positive")
        if cfg.wallet is not None and not isinstance(cfg.wallet, (bool, Path)):
            raise ConfigError(f"wallet must be a key file's path or True (KVAGENT_WALLET_KEY), got "
                              f"{type(cfg.wallet).__name__}")
        return cfg


def canonical_options(options: Mapping[str, Any], extra: Iterable[str] = ()) -> dict[str, Any]:
    """``options`` under Config's field names (aliases such as ``token`` mapped); an unknown name is a
    ConfigError naming the closest option. ``extra``: further names the caller accepts (passed through)."""
    names = set(Config.option_names())
    allowed = names | set(ALIASES) | set(extra)
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name not in allowed:
            raise ConfigError(unknown_option(name, allowed))
        canon = ALIASES.get(name, name)
        if canon in out and out[canon] is not None and value is not None and out[canon] != value:
            raise ConfigError(f"{name}= and {canon}= are the same option; give one of them")
        if value is not None or canon not in out:
            out[canon] = value
    return out


def unknown_option(name: str, known: Iterable[str]) -> str:
    """The message of an unknown option: the closest known name, when one is close."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown option {name!r}{hint} (options: {', '.join(sorted(known))})"
