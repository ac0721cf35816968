"""The runtime: the parts a model needs to reuse KV, built once from a :class:`~kvagent.config.Config`.

``build_runtime(config)`` loads (or wraps) the model and returns the engine, tokenizer, prompt template,
key context, local store, registry client, resolver and cost model, wired together. The ``KVAgent``
facade, the server's model host and the LangChain models all stand on a ``Runtime``; none of them
repeats the option list or the wiring.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .artifacts import format as art
from .chat.prompt import PromptTemplate, build_template
from .config import Config
from .costs import policy as pol
from .engines.hf import TransformersEngine
from .engines.params import GenerationParams
from .errors import ArtifactError, ConfigError, EngineError, RegistryError
from .kvcache.identity import KeyContext, sha256_hex, tokenizer_fingerprint
from .models import LoadedModel, load_model, model_fingerprint
from .options import option_name, options_of
from .reuse.resolver import ClientSource, KVMemory, Resolver, ResolverSettings
from .tiers.store import KVStore

if TYPE_CHECKING:
    from .client.registry import RegistryClient
    from .costs.calibration import CostModel
    from .payments.payer import Payer

log = logging.getLogger("kvagent")

#: progress(task, done, total): task is "prefill" or a message shown while loading.
Progress = Callable[[str, int, int], None]

__all__ = ["Progress", "Runtime", "build_runtime", "resolver_settings"]


@dataclass
class Runtime:
    """A model's KV-reuse parts, wired: what ``build_runtime`` returns."""

    config: Config
    loaded: LoadedModel
    engine: TransformersEngine
    tokenizer: Any  # None for a bare model given without one (ids-only APIs)
    template: PromptTemplate | None
    context: KeyContext
    store: KVStore
    registry: RegistryClient | None
    resolver: Resolver
    cost: CostModel | None
    policy: pol.PolicyParams

    @property
    def counters(self) -> dict[str, int]:
        return self.resolver.counters

    def params(self, **gen: Any) -> GenerationParams:
        """GenerationParams with this model's stop tokens unless ``stop_token_ids`` is given."""
        if "stop_token_ids" not in gen and self.template is not None:
            gen["stop_token_ids"] = self.template.stop_token_ids
        try:
            return GenerationParams(**gen)
        except TypeError as exc:
            raise EngineError(f"unknown generation parameter: {exc}") from exc

    def close(self) -> None:
        """Stop the engine's batching front (its scheduler thread), close the store and write the outcomes
        the cost model has not written yet."""
        self.engine.close()
        if self.cost is not None:
            self.cost.flush_outcomes()
        self.store.close()


def resolver_settings(config: Config, policy: pol.PolicyParams) -> ResolverSettings:
    """The resolver's settings from a Config: the value of each Config option a ResolverSettings field derives
    from, and ``policy`` (the Config's, with kvagent's defaults where it has none)."""
    values = {name: getattr(config, option_name(Config, opt.declaration))
              for name, opt in options_of(ResolverSettings).items() if name != "policy"}
    return ResolverSettings(policy=policy, **values)


def build_runtime(
    config: Config,
    *,
    model: Any = None,
    tokenizer: Any = None,
    registry_client: RegistryClient | None = None,
    progress: Progress | None = None,
) -> Runtime:
    """Load ``config.model`` (or wrap ``model``: a ``LoadedModel``, or a transformers model with its
    ``tokenizer``) and wire the parts. ``registry_client`` replaces the client built from the config."""
    loaded = _load(config, model, tokenizer, progress)
    engine = TransformersEngine(loaded.model, chunk_size=config.prefill_chunk_size)
    template = (
        build_template(loaded.tokenizer, config.system_prompt) if loaded.tokenizer is not None else None
    )
    context = KeyContext(
        model_fingerprint=loaded.model_fingerprint,
        tokenizer_fingerprint=loaded.tokenizer_fingerprint,
        dtype=art.dtype_name(engine.dtype),
        template_hash=template.hash if template else KeyContext.template_hash,
    )
    policy = config.policy if config.policy is not None else pol.PolicyParams()
    registry: RegistryClient | None = None
    if not config.local_only:
        from .client.registry import DEFAULT_TIMEOUT, RegistryClient

        registry = registry_client or RegistryClient(
            config.registry_url or "", config.registry_token, trusted_keys=config.trusted_keys,
            retries=config.registry_attempts,
            timeout=DEFAULT_TIMEOUT if config.registry_timeout is None else config.registry_timeout,
            payer=wallet_payer(config),
        )
    store = KVStore(config.store_dir, size_limit=config.cache_size_bytes)
    resolver = Resolver(
        engine, context, store, memory=KVMemory(config.memory_slots),
        registry=ClientSource(registry) if registry is not None else None,
        settings=resolver_settings(config, policy), publisher=config.publisher, codec=config.codec,
        cost=_cost_model(config, engine, context, policy),
    )
    if registry is not None and config.publish_visibility is not None:
        resolver.saver.on_saved = AutoPublish(registry, config.publish_visibility, policy, resolver.counters)
    return Runtime(config, loaded, engine, loaded.tokenizer, template, context, store, registry, resolver,
                   resolver.cost, policy)


def wallet_payer(config: Config) -> Payer | None:
    """The x402 payer of ``config.wallet`` (a key file, or True: ``KVAGENT_WALLET_KEY``), capped by
    ``max_price_per_load`` and ``budget``; None without a wallet. Needs ``kvagent[x402]``."""
    if config.wallet is None or config.wallet is False:
        return None
    from .payments import SpendCaps, load_wallet
    from .payments.payer import Payer

    wallet = load_wallet(None if config.wallet is True else config.wallet)
    payer = Payer(wallet, SpendCaps(config.max_price_per_load, config.budget),
                  allowed_assets=config.wallet_assets)
    log.info("kvagent: x402 wallet %s pays priced loads (cap %s, budget %s per process, micro-units)",
             wallet.address, config.max_price_per_load, config.budget)
    return payer


def _load(config: Config, model: Any, tokenizer: Any, progress: Progress | None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return _in_dtype(model, config.dtype)
    if model is not None and not isinstance(model, str):  # an already-loaded transformers model
        tfp = tokenizer_fingerprint(tokenizer) if tokenizer is not None else sha256_hex(b"no-tokenizer")
        loaded = LoadedModel(model, tokenizer, type(model).__name__, model_fingerprint(model), tfp, 0.0)
        return _in_dtype(loaded, config.dtype)
    notify = (lambda msg: progress(msg, 0, 0)) if progress else None
    return load_model(model or config.model, config.models_dir, dtype=config.dtype, notify=notify)


def _in_dtype(loaded: LoadedModel, dtype: str) -> LoadedModel:
    """``loaded``, a model given already loaded: ``auto`` takes its dtype; an explicit dtype it is not in
    is a ConfigError (it is never silently run in another)."""
    have = art.dtype_name(next(loaded.model.parameters()).dtype)
    if dtype != "auto" and have != dtype:
        raise ConfigError(f"dtype={dtype!r} was asked for, but the model given is in {have}: load it in "
                          f"{dtype}, or leave dtype at 'auto' to run it as it is")
    return loaded


def _cost_model(config: Config, engine: TransformersEngine, context: KeyContext,
                policy: pol.PolicyParams) -> CostModel | None:
    """Measured costs shared by this machine's processes (``config.calibration``: a file, or False for
    none)."""
    if config.calibration is False:
        return None
    from .costs.calibration import CostModel

    path = None if config.calibration in (None, True) else config.calibration
    return CostModel.for_engine(
        engine, context.model_fingerprint, cache_dir=config.cache_dir, params=policy,
        path=path, verify=config.verify, verify_probes=config.verify_probes,  # type: ignore[arg-type]
    )


class AutoPublish:
    """The resolver's ``on_saved`` hook: publish a computed KV to the registry when the policy says it is
    worth it."""

    def __init__(self, registry: RegistryClient, visibility: str, policy: pol.PolicyParams,
                 counters: dict[str, int]) -> None:
        self.registry, self.visibility, self.policy, self.counters = registry, visibility, policy, counters

    def __call__(self, key: str, artifact_bytes: Callable[[], bytes], n_tokens: int) -> str:
        ok, why = pol.should_publish(n_tokens, self.policy)
        if not ok:
            return f"; not published ({why})"
        try:
            self.registry.publish(artifact_bytes(), self.visibility)
        except (RegistryError, ArtifactError) as exc:
            log.warning("publishing %s… to the registry failed (the answer is unaffected): %s", key[:16], exc)
            return f"; publishing failed ({type(exc).__name__})"
        self.counters["publishes"] += 1
        return f"; published ({self.visibility})"
