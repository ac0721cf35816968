"""The connector's settings: vLLM's ``kv_connector_extra_config``, checked once, nothing silently dropped."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from kvagent import Config, ConfigError, Option, Publish, Verify, option_name, option_of, options_of

PUBLISH_MODES = Publish.choices()
ENGINE_POLICIES = ("any", "same")
SALTED_READS = ("own", "shared")


@dataclass(frozen=True)
class ConnectorSettings:
    """What ``kv_connector_extra_config`` may carry (every key optional): each field is an option whose doc
    says what it does (``kvagent.options_of(ConnectorSettings)``). A setting kvagent's SDK has too derives
    from :class:`~kvagent.Config`'s declaration (its meaning, default and checks); None there takes
    kvagent's value (its KVAGENT_* variable or default) unless the doc says otherwise.

    ``salted_reads`` "own" or "shared": either way a salted prompt's own KV is saved in its namespace only
    and never published; "shared" suits a server that salts every request per tenant (``kvagent serve
    --engine vllm``) and whose registry token sees only what all its tenants may see.
    """

    model: str | None = option_of(Config, "model").derive(
        None, doc="the kvagent model spec used for keys and verification (None: vLLM's own model directory)"
    ).field()
    cache_dir: str | None = option_of(Config, "cache_dir").derive(
        None, doc="kvagent's cache directory (local store under <cache_dir>/kv; None: kvagent's)"
    ).field()
    registry_url: str | None = option_of(Config, "registry_url").derive(
        doc="the registry: one URL, several comma-separated, or a list (failover)"
    ).field()
    token: str | None = option_of(Config, "registry_token").derive().field()
    publish: Publish = option_of(Config, "publish").derive(
        doc="none, restricted or public (a Publish, as Config.publish; False and True as there: none and "
        "restricted) for the KV of prompts vLLM computed (unsalted ones only)"
    ).field()
    price: int | None = Option(
        None, doc="what a load of a published artifact costs buyers (integer micro-units; None: free)"
    ).field()
    max_price_per_load: int | None = option_of(Config, "max_price_per_load").derive(
        doc="what this server may pay for one artifact load (micro-units; None: no limit)"
    ).field()
    budget: int | None = option_of(Config, "budget").derive(
        doc="what this server may pay for artifacts in all (micro-units; None: no limit)"
    ).field()
    wallet: str | bool | None = option_of(Config, "wallet").derive(
        doc="an x402 wallet's key file (or true: KVAGENT_WALLET_KEY) that pays priced artifacts within "
        "max_price_per_load and budget (no token needed for public ones)"
    ).field()
    wallet_assets: str | None = option_of(Config, "wallet_assets").derive(
        None, doc="tokens the wallet may pay in beyond USDC ('eip155:8453/0x...', comma-separated)"
    ).field()
    verify: Verify | None = option_of(Config, "verify").derive(
        None, doc="none, sample or full (a Verify) check of registry artifacts against their tokens (None: "
        "kvagent's)"
    ).field()
    min_save_tokens: int = Option(
        256, doc="save a prompt's KV when vLLM computed at least this many of its tokens"
    ).field()
    engines: str | None = Option(
        None, doc="'any' reuses KV whatever engine computed it, 'same' only KV that this vLLM version "
        "computed; None: 'any' in float32, 'same' in bfloat16 and float16, where KV another engine computed "
        "does not give vLLM's greedy replies bit for bit (engine_policy)"
    ).field()
    calibration: bool = option_of(Config, "calibration").derive(
        True, doc="use the machine's measured costs (kvagent calibrate) in the fetch policy (False: none)"
    ).field()
    publisher: str | None = option_of(Config, "publisher").derive().field()
    prefill_tokens_per_s: float | None = Option(
        None, doc="this vLLM's prefill rate, for the fetch-or-prefill policy (None: kvagent's calibration, "
        "which measures its engine, not vLLM)"
    ).field()
    bandwidth_bytes_per_s: float | None = Option(
        None, doc="the registry link's rate, for the fetch-or-prefill policy (None: kvagent's calibration)"
    ).field()
    salted_reads: str = Option(
        "own", doc="what a salted request may reuse: 'own' (its namespace on this machine only) or 'shared' "
        "(its namespace first, then unsalted KV: the local store's shared namespace and the registry)"
    ).field()

    def config_options(self) -> dict[str, Any]:
        """The kvagent Config options of the connector's agent that these settings give, under Config's
        names: each derived option but the model (vLLM's when not set) and publish (the saver publishes)."""
        out = {option_name(Config, opt.declaration): getattr(self, name)
               for name, opt in options_of(ConnectorSettings).items()
               if opt.of is not None and name not in ("model", "publish")}
        out["calibration"] = None if self.calibration else False  # True: kvagent's calibration file
        return out

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> ConnectorSettings:
        """Parse ``kv_connector_extra_config``; an unknown key or a wrong type is a ConfigError."""
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConfigError(
                f"unknown kv_connector_extra_config keys {unknown}; the connector takes {sorted(known)}"
            )
        url = extra.get("registry_url")
        if isinstance(url, (list, tuple)):
            extra["registry_url"] = ",".join(str(u) for u in url) or None
        if extra.get("wallet") is not None and not isinstance(extra["wallet"], (str, bool)):
            raise ConfigError("kv_connector_extra_config['wallet'] must be a key file's path or true")
        strings = ("model", "cache_dir", "registry_url", "token", "publisher", "salted_reads",
                   "wallet_assets")
        for name in strings:
            if extra.get(name) is not None and not isinstance(extra[name], str):
                raise ConfigError(
                    f"kv_connector_extra_config[{name!r}] must be a string, got {type(extra[name]).__name__}"
                )
        for name in ("price", "max_price_per_load", "budget", "min_save_tokens"):
            v = extra.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(
                    f"kv_connector_extra_config[{name!r}] must be an integer >= 0 (micro-units), got {v!r}"
                )
        for name in ("prefill_tokens_per_s", "bandwidth_bytes_per_s"):
            v = extra.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise ConfigError(f"kv_connector_extra_config[{name!r}] must be a positive number, got {v!r}")
        if "calibration" in extra and not isinstance(extra["calibration"], bool):
            raise ConfigError("kv_connector_extra_config['calibration'] must be true or false")
        extra["publish"] = Publish.of(extra.get("publish"), "publish")
        if extra.get("verify") is not None:
            extra["verify"] = Verify.of(extra["verify"], "verify")
        s = cls(**extra)
        if s.engines is not None and s.engines not in ENGINE_POLICIES:
            raise ConfigError(f"engines must be one of {ENGINE_POLICIES}, got {s.engines!r}")
        if s.salted_reads not in SALTED_READS:
            raise ConfigError(f"salted_reads must be one of {SALTED_READS}, got {s.salted_reads!r}")
        if s.publish != "none" and not s.registry_url:
            raise ConfigError(f"publish={s.publish!r} needs a registry_url")
        if s.price is not None and s.publish == "none":
            raise ConfigError("price is what buyers pay for published KV: set publish too")
        return s


def engine_policy(engines: str | None, dtype: str) -> str:
    """Whose KV the connector reuses: ``engines`` when set, else by vLLM's ``dtype``: any engine's in
    float32, this vLLM's only in half precision. In bf16 a matrix product rounds a row differently with the
    number of rows in its call, so KV computed by another engine (or in other chunks) moves vLLM's logits in
    their last bits and can turn a greedy near-tie (docs/deploy.md, "Exactness in bf16")."""
    if engines is not None:
        return engines
    return "any" if dtype == "float32" else "same"


def namespace_of(cache_salt: str | None) -> str | None:
    """kvagent's private namespace for a vLLM request's ``cache_salt`` (None: the shared one)."""
    return f"vllm-cache-salt:{cache_salt}" if cache_salt else None
