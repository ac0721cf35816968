"""``KVAgentConnector``: vLLM's KV connector (``KVConnectorBase_V1``) onto kvagent's cache and market.

Scheduler half: for each waiting request, the longest prefix of its prompt that kvagent holds or can fetch
beyond what vLLM already computed (``lookup.PrefixLookups``, off the scheduler's loop), in whole vLLM
blocks, always leaving vLLM at least the prompt's last token. It tells the worker half what to load, and
which prompts just finished prefilling, in a small metadata object per step.

Worker half: copies the found KV into the request's paged blocks before the forward (``start_load_kv``),
and copies the KV of finished prefills out of the blocks (``save_kv_layer``) for a background thread that
writes kvagent artifacts, recording the engine, to the local store and publishes them when configured.
A load that fails is reported (``get_block_ids_with_load_errors``) so vLLM recomputes those blocks.

Privacy: a request's ``cache_salt`` is its own kvagent namespace (``settings.namespace_of``): its lookups
see only that namespace on this machine, its KV is saved there, and it is never published.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from kvagent import Config, KeyContext, KVAgent, KVAgentError, KVCache, KVStore, PolicyParams
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from . import paged
from .lookup import Match, PrefixLookups, aligned
from .saver import ArtifactSaver, SaveRequest
from .settings import ConnectorSettings, engine_policy, namespace_of

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("vllm.kvagent")  # under "vllm": shown by vLLM's own log handler

_LAYER_NO = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def engine_label() -> str:
    """The producing engine recorded in artifact headers, e.g. "vllm 0.32.0"."""
    import vllm

    return f"vllm {vllm.__version__}"


@dataclass(frozen=True)
class LoadSpec:
    """Copy tokens ``start..end`` of the artifact ``key`` into the request's blocks."""

    req_id: str
    key: str
    start: int
    end: int
    block_ids: tuple[int, ...]
    token_ids: tuple[int, ...]  # the request's first ``end`` ids: the artifact must hold exactly these


@dataclass(frozen=True)
class SaveSpec:
    """The request's prompt finished prefilling this step: copy its KV out of ``block_ids``."""

    req_id: str
    token_ids: tuple[int, ...]
    block_ids: tuple[int, ...]
    namespace: str | None
    #: the artifact whose KV the prompt's loaded blocks copy (a copy staged in the caller's namespace names
    # the published artifact it came from), recorded with the save so that deleting that artifact reaches it
    derived_from: str | None = None


@dataclass
class KVAgentConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step (plain data: vLLM may send it to another process)."""

    context: KeyContext | None = None
    index_block_size: int = 256
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Tracked:
    """What the scheduler half remembers of a request until it finishes."""

    token_ids: tuple[int, ...]
    namespace: str | None
    local: int = 0  # tokens vLLM had computed (its own prefix cache) when the connector was asked
    external: int = 0  # tokens the connector will load
    match: Match | None = None
    load_pending: bool = False
    saved: bool = False


class KVAgentConnector(KVConnectorBase_V1):
    """A vLLM KV connector that reuses, saves and publishes KV through kvagent (see the module docstring)."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)  # type: ignore[arg-type]
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.settings = ConnectorSettings.from_extra(extra)
        self.block_size = int(vllm_config.cache_config.block_size)
        self.engine = engine_label()
        self.cache_dir = Config.resolve(cache_dir=self.settings.cache_dir).cache_dir
        self._agent: KVAgent | None = None
        self._lookups: PrefixLookups | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._layer_of: dict[str, int] = {}
        self._tiles: dict[tuple[Any, ...], paged.TileMap] = {}
        self._captured: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._load_errors: set[int] = set()
        self._saver: ArtifactSaver | None = None
        self._store: KVStore | None = None
        _show_kvagent_log()
        if role == KVConnectorRole.SCHEDULER:
            self._agent = self._make_agent(vllm_config)
            self._lookups = PrefixLookups(
                self._agent,
                engine=self.engine,
                same_engine_only=engine_policy(self.settings.engines, _dtype_of(vllm_config)) == "same",
                shared_reads=self.settings.salted_reads == "shared",
            )
            self._lookups.warm_up()
            log.info(
                "KVAgentConnector (scheduler): cache %s, registry %s, engine %s, block %d",
                self.cache_dir,
                self.settings.registry_url or "none",
                self.engine,
                self.block_size,
            )
        else:
            self._store = KVStore(self.cache_dir / "kv")
            self._saver = ArtifactSaver(self.settings, self.cache_dir / "kv", self.engine)

    def _make_agent(self, vllm_config: VllmConfig) -> KVAgent:
        s = self.settings
        dtype = _dtype_of(vllm_config)
        policy = PolicyParams(
            prefill_tokens_per_s=s.prefill_tokens_per_s, bandwidth_bytes_per_s=s.bandwidth_bytes_per_s
        )
        options = {**s.config_options(), "cache_dir": self.cache_dir}
        return KVAgent(s.model or vllm_config.model_config.model, policy=policy, memory_slots=0, dtype=dtype,
                       **options)

    # ==============================
    # Scheduler side
    # ==============================
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._lookups is not None
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            ids = tuple(request.prompt_token_ids or ())
            tracked = _Tracked(ids, namespace_of(getattr(request, "cache_salt", None)))
            self._tracked[request.request_id] = tracked
        tracked.local = num_computed_tokens
        limit = aligned(len(tracked.token_ids) - 1, self.block_size)  # vLLM computes at least the last token
        if limit <= num_computed_tokens or getattr(request, "prompt_embeds", None) is not None:
            return 0, False
        match = self._lookups.poll(request.request_id, tracked.token_ids[:limit], tracked.namespace)
        if match is None:
            return None, False  # still looking: vLLM asks again on a later step
        if tracked.match is None and match.n == 0:
            log.info(
                "request %s: nothing from kvagent for %d tokens: %s", request.request_id, limit, match.reason
            )
        tracked.match = match
        n = aligned(min(match.n, limit), self.block_size)
        if n <= num_computed_tokens:
            if match.n:
                log.info(
                    "request %s: kvagent's %d tokens do not beat vLLM's own %d",
                    request.request_id,
                    match.n,
                    num_computed_tokens,
                )
            return 0, False
        log.info(
            "request %s: %d prompt tokens from kvagent (%s, %s…): %s",
            request.request_id,
            n - num_computed_tokens,
            match.source,
            match.key[:16],
            match.reason,
        )
        return n - num_computed_tokens, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            return
        tracked.external = num_external_tokens
        tracked.load_pending = num_external_tokens > 0

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._agent is not None
        meta = KVAgentConnectorMetadata(
            context=self._agent.context, index_block_size=self._agent.config.block_size
        )
        progress: list[tuple[str, int, tuple[int, ...] | None]] = []
        for new in scheduler_output.scheduled_new_reqs:
            progress.append((new.req_id, new.num_computed_tokens, tuple(new.block_ids[0])))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            progress.append((req_id, cached.num_computed_tokens[i], None))
        for req_id, done, block_ids in progress:
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            if block_ids is None:
                block_ids = self._block_ids(req_id)
            if tracked.load_pending and tracked.match is not None:
                tracked.load_pending = False
                end = tracked.local + tracked.external
                meta.loads.append(
                    LoadSpec(
                        req_id, tracked.match.key, tracked.local, end, block_ids, tracked.token_ids[:end]
                    )
                )
            scheduled = scheduler_output.num_scheduled_tokens.get(req_id, 0)
            prompt = len(tracked.token_ids)
            if not tracked.saved and done + scheduled >= prompt > done:
                tracked.saved = True
                computed = prompt - tracked.local - tracked.external
                if computed >= self.settings.min_save_tokens:
                    meta.saves.append(SaveSpec(req_id, tracked.token_ids, block_ids, tracked.namespace,
                                               self._derived_from(tracked)))
        return meta

    def _derived_from(self, tracked: _Tracked) -> str | None:
        """The artifact a prompt's saved KV copies where the connector loaded blocks for it: the published
        artifact a staged copy came from, else the loaded artifact itself."""
        match = tracked.match
        if match is None or not tracked.external or not match.key or self._agent is None:
            return None
        try:
            return self._agent.store.derived_from(match.key) or match.key
        except KVAgentError:
            return match.key

    def _block_ids(self, req_id: str) -> tuple[int, ...]:
        if self._kv_cache_manager is None:
            return ()
        return tuple(self._kv_cache_manager.get_block_ids(req_id)[0])

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._tracked.pop(request.request_id, None)
        if self._lookups is not None:
            self._lookups.forget(request.request_id)
        return False, None

    # ==============================
    # Worker side
    # ==============================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._kv_caches = dict(kv_caches)
        for name in kv_caches:
            m = _LAYER_NO.search(name)
            if m is not None:
                self._layer_of[name] = int(m.group(1))

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVAgentConnectorMetadata)
        for spec in meta.loads:
            try:
                self._load(spec, meta, forward_context)
            except Exception as exc:  # noqa: BLE001 - any failed load is recomputed by vLLM, never a wrong answer
                first, last = spec.start // self.block_size, -(-spec.end // self.block_size)
                self._load_errors.update(spec.block_ids[first:last])
                log.warning(
                    "request %s: loading %d tokens of %s… failed, vLLM recomputes them: %s: %s",
                    spec.req_id,
                    spec.end - spec.start,
                    spec.key[:16],
                    type(exc).__name__,
                    exc,
                )

    def _load(self, spec: LoadSpec, meta: KVAgentConnectorMetadata, forward_context: ForwardContext) -> None:
        assert self._store is not None
        found = self._store.get(spec.key)
        if found.artifact is None:
            raise LookupError(f"not in the local store any more ({found.reason})")
        kv = found.artifact.kv
        want = torch.as_tensor(spec.token_ids, dtype=torch.int64)
        if kv.n_tokens < spec.end or not torch.equal(kv.token_ids[: spec.end], want):
            raise ValueError("the artifact's token ids are not the request's")
        if (
            meta.context is not None
            and found.artifact.header.model_fingerprint != meta.context.model_fingerprint
        ):
            raise ValueError("the artifact was computed by another model")
        layers = self._layers(forward_context)
        if len(layers) != len(kv.keys):
            raise ValueError(f"the artifact has {len(kv.keys)} layers, the model {len(layers)}")
        for i, (name, cache, layer) in enumerate(layers):
            tile = self._tile(name, cache, layer)
            k = kv.keys[i][:, :, spec.start : spec.end]
            v = kv.values[i][:, :, spec.start : spec.end]
            paged.write_blocks(cache, tile, spec.block_ids, spec.start, k, v)
        log.info(
            "request %s: loaded %d tokens of %s… into vLLM's blocks",
            spec.req_id,
            spec.end - spec.start,
            spec.key[:16],
        )

    def _layers(self, forward_context: ForwardContext) -> list[tuple[str, torch.Tensor, Any]]:
        """(name, paged cache, layer module) of every attention layer, in model order."""
        out = []
        for name, cache in self._kv_caches.items():
            if name in self._layer_of:
                out.append((self._layer_of[name], name, cache, forward_context.no_compile_layers.get(name)))
        out.sort(key=lambda t: t[0])
        return [(name, cache, layer) for _, name, cache, layer in out]

    def _tile(self, name: str, cache: torch.Tensor, layer: Any) -> paged.TileMap:
        isa = getattr(layer, "isa", None)
        if isa is None:
            raise NotImplementedError(
                f"layer {name}: the KVAgentConnector copies blocks of vLLM's CPU attention backend; this one "
                f"keeps a {tuple(cache.shape)} cache it does not know"
            )
        tag = (tuple(cache.shape[1:]), cache.dtype, isa)
        tile = self._tiles.get(tag)
        if tile is None:
            from vllm import _custom_ops as ops

            nb, heads, bs, two_d = cache.shape

            def write(
                key: torch.Tensor, value: torch.Tensor, block: torch.Tensor, slots: torch.Tensor
            ) -> None:
                kc, vc = block.view(block.shape[0], heads, bs * 2, -1).chunk(2, dim=2)
                ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, isa)

            tile = paged.discover_tile(cache.shape, cache.dtype, bs, heads, two_d // 2, write)
            self._tiles[tag] = tile
        return tile

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads finish inside start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVAgentConnectorMetadata)
        if not meta.saves or layer_name not in self._layer_of:
            return
        from vllm.forward_context import get_forward_context

        layer = get_forward_context().no_compile_layers.get(layer_name)
        tile = self._tile(layer_name, kv_layer, layer)
        for spec in meta.saves:
            k, v = paged.read_blocks(kv_layer, tile, spec.block_ids, len(spec.token_ids))
            self._captured.setdefault(spec.req_id, {})[self._layer_of[layer_name]] = (k, v)

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVAgentConnectorMetadata)
        for spec in meta.saves:
            layers = self._captured.pop(spec.req_id, {})
            if meta.context is None or self._saver is None or len(layers) != len(self._layer_of):
                log.warning(
                    "request %s: %d of %d layers captured, its KV is not saved",
                    spec.req_id,
                    len(layers),
                    len(self._layer_of),
                )
                continue
            order = sorted(layers)
            kv = KVCache(
                keys=tuple(layers[i][0] for i in order),
                values=tuple(layers[i][1] for i in order),
                token_ids=torch.as_tensor(spec.token_ids, dtype=torch.int64),
            )
            self._saver.submit(SaveRequest(kv, meta.context, spec.namespace, meta.index_block_size,
                                           spec.derived_from))

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self._saver is not None:
            self._saver.close()
        if self._lookups is not None:
            self._lookups.close()


def _dtype_of(vllm_config: VllmConfig) -> str:
    """vLLM's model dtype by kvagent's name for it (``bfloat16``)."""
    return str(vllm_config.model_config.dtype).removeprefix("torch.")


def _show_kvagent_log() -> None:
    """Route kvagent's own log (every cache decision and its reason) through vLLM's handlers, once."""
    kv_log, vllm_log = logging.getLogger("kvagent"), logging.getLogger("vllm")
    if not kv_log.handlers and vllm_log.handlers:
        for handler in vllm_log.handlers:
            kv_log.addHandler(handler)
        kv_log.setLevel(logging.INFO)
        kv_log.propagate = False


def store_dir(cache_dir: str | Path | None) -> Path:
    """Where the connector's local store lives for ``cache_dir`` (what a kvagent SDK agent reads too)."""
    return Config.resolve(cache_dir=cache_dir).store_dir
