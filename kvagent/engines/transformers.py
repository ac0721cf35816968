"""The transformers engine, batched: concurrent requests decode together, one forward per step for all of
them.

Each request first runs its prompt ids after its own prefix KV in forwards of its own, then joins the decode
batch. A prompt tail longer than ``prefill_chunk`` tokens is prefilled in chunks, one chunk's worth of tokens
between two decode steps, so the sequences already decoding keep emitting while a long prompt comes in
(chunked prefill; a chunk attends to the prefix, the earlier chunks and itself, exactly as a
``TransformersEngine.prefill`` with ``chunk_size`` does). Every decode step is one model
call for all active sequences: the linear layers see a ``(batch, 1)`` input, while attention runs per
sequence on that sequence's own keys and values (no padding, no mask, each at its own position), through the
model's usual attention kernel. The K/V of a sequence live in a buffer sized for its prompt plus
``max_new_tokens``, written in place from its prefill on (the prefix copied in once, each chunk and each
decoded token written after it: no concatenation per chunk or per step).

New requests join between steps; a cancelled request leaves before the next step. ``max_batch`` bounds the
active sequences; further requests wait in submission order. One scheduler thread owns the decoding; every
model call (prefills from other threads included) holds ``TransformersEngine.lock``.

Models whose attention does not go through transformers' attention interface with full K/V per layer (sliding
window, recurrent state) are not batched: their requests run one at a time, as before (logged once).
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine import GenerationParams, TransformersEngine, pick_token
from ..errors import EngineError
from ..textstream import TextStream
from .base import Finish, FinishReason, GenerationRequest, Sink, Token, Usage

log = logging.getLogger("kvagent.engine")

RAGGED = "kvagent_ragged"

#: prompt-tail tokens prefilled between two decode steps: a longer tail is prefilled in chunks of this size,
#: several short tails together up to it
PREFILL_CHUNK = 256


class BatchObserver:
    """Receives the engine's scheduling facts (metrics); the default does nothing."""

    def step(self, batch_size: int, seconds: float) -> None:
        """One decode step ran for ``batch_size`` sequences."""


class _Handle:
    def __init__(self, engine: TransformersBatchEngine) -> None:
        self._engine = engine
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self._engine._wake()


@dataclass
class _Seq:
    request: GenerationRequest
    sink: Sink
    handle: _Handle
    submitted: float
    started: float = 0.0
    gen: torch.Generator = field(default_factory=lambda: torch.Generator(device="cpu"))
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    n: int = 0  # tokens in the K/V buffers
    last: int = 0  # the last generated token (the next step's input)
    produced: int = 0
    text: TextStream | None = None
    # the prompt tail's prefill, while it runs: its ids, the transformers cache, how many are done, seconds
    ids: torch.Tensor | None = None
    cache: Any = None
    done: int = 0
    forward_s: float = 0.0

    def finish(self, reason: FinishReason, error: BaseException | None = None) -> None:
        now = time.perf_counter()
        started = self.started or now
        prefix = self.request.prefix.n_tokens if self.request.prefix is not None else 0
        usage = Usage(self.request.n_prompt, prefix, self.produced, started - self.submitted, now - started)
        self.sink(Finish(reason, usage, error))


class _Rows:
    """Per-sequence K (or V) views of one layer, handed from the step's cache to the ragged attention."""

    __slots__ = ("rows",)

    def __init__(self, rows: list[torch.Tensor]) -> None:
        self.rows = rows


class _StepCache:
    """The cache a batched decode step passes to the model: writes each row's new K/V into its sequence's
    buffer and returns every sequence's K/V so far (views, no copy)."""

    def __init__(self, seqs: Sequence[_Seq]) -> None:
        self.seqs = seqs

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> tuple[_Rows, _Rows]:
        ks, vs = [], []
        for i, s in enumerate(self.seqs):
            k, v = s.keys[layer_idx], s.values[layer_idx]
            k[:, :, s.n].copy_(key_states[i, :, 0])
            v[:, :, s.n].copy_(value_states[i, :, 0])
            ks.append(k[:, :, : s.n + 1])
            vs.append(v[:, :, : s.n + 1])
        return _Rows(ks), _Rows(vs)


@functools.cache
def _buffered_layer_type() -> type:
    """A transformers ``DynamicLayer`` that writes into preallocated K/V buffers instead of concatenating
    (made once, on first use: transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):  # type: ignore[misc]
        def __init__(self, kbuf: torch.Tensor, vbuf: torch.Tensor, n: int) -> None:
            super().__init__()
            self.kbuf, self.vbuf = kbuf, vbuf
            self.device = kbuf.device
            self.n = n
            self.keys, self.values = kbuf[:, :, :n], vbuf[:, :, :n]
            self.is_initialized = True

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *_: Any, **__: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            n0 = self.n
            self.n = n1 = n0 + key_states.shape[-2]
            self.kbuf[:, :, n0:n1].copy_(key_states)
            self.vbuf[:, :, n0:n1].copy_(value_states)
            self.keys, self.values = self.kbuf[:, :, :n1], self.vbuf[:, :, :n1]
            return self.keys, self.values

    return BufferedLayer


def _failed(seq: _Seq, exc: BaseException) -> None:
    """End ``seq`` with an error of its own prefill (logged unless the request itself was at fault)."""
    if not isinstance(exc, EngineError):
        log.exception("a prompt's forward failed", exc_info=exc)
    seq.ids = seq.cache = None
    seq.finish("error", exc)


def _ragged_attention(
    module: Any, query: torch.Tensor, key: Any, value: Any, attention_mask: Any, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """Attention of a decode step, one sequence at a time on its own K/V, with the model's usual kernel."""
    if not isinstance(key, _Rows) or not isinstance(value, _Rows):
        raise EngineError("the ragged attention runs only inside a batched decode step")
    inner = _ragged_inner(module)
    outs = [
        inner(module, query[i : i + 1], k, v, None, **kwargs)[0]
        for i, (k, v) in enumerate(zip(key.rows, value.rows, strict=True))
    ]
    return torch.cat(outs, dim=0), None


def _ragged_inner(module: Any) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = getattr(module, "_kvagent_attention", None) or "sdpa"
    return ALL_ATTENTION_FUNCTIONS[name]  # type: ignore[no-any-return]


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(RAGGED, _ragged_attention)


class TransformersBatchEngine:
    """The :class:`~kvagent.engines.base.GenerationEngine` over a :class:`~kvagent.engine.TransformersEngine`:
    continuous batching of up to ``max_batch`` sequences. ``tokenizer`` is needed for stop strings;
    ``prefill_chunk``: prompt-tail tokens prefilled between two decode steps."""

    #: the prompt-turn core resolves the prompt's KV and hands it over as ``GenerationRequest.prefix``
    resolves_prefix = False

    def __init__(
        self,
        engine: TransformersEngine,
        *,
        max_batch: int = 8,
        tokenizer: Any = None,
        observer: BatchObserver | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        if max_batch < 1:
            raise EngineError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise EngineError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.engine = engine
        self.max_batch = max_batch
        self.tokenizer = tokenizer
        self.observer = observer or BatchObserver()
        self.max_positions = engine.max_positions
        self._cv = threading.Condition()
        self._pending: collections.deque[_Seq] = collections.deque()
        self._active: list[_Seq] = []
        self._prefilling: list[_Seq] = []  # admitted, their prompt tails being prefilled (in order)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._batchable: bool | None = None  # decided on the first request (or chunked_prefill's first read)
        self._probe_lock = threading.Lock()

    # -- the interface ---------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink) -> _Handle:
        if not request.prompt_ids:
            raise EngineError("a request needs at least one prompt id after its prefix")
        self.engine.check_ids(request.prompt_ids)
        if request.prefix is not None:
            self.engine.check_kv(request.prefix)
        total = request.n_prompt + request.params.max_new_tokens
        if self.max_positions and total > self.max_positions:
            raise EngineError(
                f"{request.n_prompt} prompt + {request.params.max_new_tokens} generated tokens exceed the "
                f"model's {self.max_positions} positions"
            )
        if request.stop_strings and self.tokenizer is None:
            raise EngineError("stop strings need the engine's tokenizer")
        handle = _Handle(self)
        seq = _Seq(request, sink, handle, time.perf_counter())
        with self._cv:
            if self._closed:
                raise EngineError("the engine is closed")
            self._pending.append(seq)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="kvagent-batch")
                self._thread.start()
            self._cv.notify_all()
        return handle

    @property
    def chunked_prefill(self) -> bool:
        """Whether this engine prefills a request's uncached prompt itself, in chunks between decode steps:
        true for a model that batches; one that does not runs each request alone, the prompt-turn core
        prefilling all but its tail first, as before."""
        return self._batches()

    @property
    def running(self) -> int:
        """Sequences in the decode batch now."""
        return len(self._active)

    @property
    def waiting(self) -> int:
        """Requests submitted but not yet in the decode batch (queued, or their prompts being prefilled)."""
        return len(self._pending) + len(self._prefilling)

    def close(self) -> None:
        """Stop the scheduler: running and waiting requests end with "cancelled"."""
        with self._cv:
            self._closed = True
            for s in self._pending:
                s.handle.cancelled = True
            for s in [*self._active, *self._prefilling]:
                s.handle.cancelled = True
            self._cv.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(30)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # -- the scheduler ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._active and not self._prefilling and not self._closed:
                    self._cv.wait()
                if self._closed and not self._pending and not self._active and not self._prefilling:
                    self._thread = None
                    return
            try:
                self._admit()
                self._drop_cancelled()
                if self._prefilling:
                    self._prefill_some()
                if self._active:
                    self._step()
            except Exception as exc:  # a failed step ends the requests in it; the scheduler goes on
                log.exception("a batched decode step failed")
                for s in self._active:
                    s.finish("error", exc)
                self._active = []

    def _admit(self) -> None:
        """Start the prefill of waiting requests while the batch has room, in order."""
        while len(self._active) + len(self._prefilling) < self.max_batch:
            with self._cv:
                if not self._pending:
                    return
                seq = self._pending.popleft()
            if seq.handle.cancelled:
                seq.finish("cancelled")
                continue
            try:
                self._start(seq)
            except Exception as exc:
                _failed(seq, exc)

    def _drop_cancelled(self) -> None:
        for group in (self._active, self._prefilling):
            for s in [s for s in group if s.handle.cancelled]:
                group.remove(s)
                s.finish("cancelled")

    def _start(self, seq: _Seq) -> None:
        """Set ``seq`` up for its prefill (or run it alone to its end, on a model that does not batch)."""
        req, eng = seq.request, self.engine
        seq.started = time.perf_counter()
        if req.params.seed is not None:
            seq.gen.manual_seed(req.params.seed)
        else:
            seq.gen.seed()
        if req.stop_strings:
            seq.text = TextStream(self.tokenizer, (), req.stop_strings)
        if not self._batches():
            self._solo(seq)
            return
        seq.ids = torch.as_tensor(req.prompt_ids, dtype=torch.long).view(1, -1).to(eng.device)
        seq.cache = self._buffered_cache(seq)
        self._prefilling.append(seq)

    def _buffered_cache(self, seq: _Seq) -> Any:
        """A transformers cache for ``seq``'s prefill whose layers write into ``seq``'s K/V buffers (sized for
        the prompt and the generation), the prefix KV copied in first."""
        from transformers import DynamicCache

        req, eng = seq.request, self.engine
        n0 = req.prefix.n_tokens if req.prefix is not None else 0
        cap = req.n_prompt + req.params.max_new_tokens
        lay = eng.layout
        cache = DynamicCache(config=eng.config)
        layers = []
        for i in range(lay.num_layers):
            kb = torch.empty((1, lay.num_kv_heads, cap, lay.head_dim), dtype=eng.dtype, device=eng.device)
            vb = torch.empty_like(kb)
            if req.prefix is not None:
                kb[:, :, :n0].copy_(req.prefix.keys[i])
                vb[:, :, :n0].copy_(req.prefix.values[i])
            seq.keys.append(kb)
            seq.values.append(vb)
            layers.append(_buffered_layer_type()(kb, vb, n0))
        cache.layers = layers
        return cache

    @torch.inference_mode()
    def _prefill_some(self) -> None:
        """Prefill up to ``prefill_chunk`` prompt-tail tokens, oldest prompts first; a prompt whose tail is
        done joins the decode batch."""
        eng, budget = self.engine, self.prefill_chunk
        while budget > 0 and self._prefilling:
            seq = self._prefilling[0]
            assert seq.ids is not None
            total = seq.ids.shape[1]
            n = min(budget, total - seq.done)
            try:
                with eng.lock:
                    t0 = time.perf_counter()
                    chunk = seq.ids[:, seq.done : seq.done + n]
                    out = eng.forward(seq.cache, input_ids=chunk, logits_to_keep=1)
                    seq.forward_s += time.perf_counter() - t0
                seq.done += n
                budget -= n
                if seq.done == total:
                    self._prefilling.pop(0)
                    self._join(seq, out.logits[0, -1])
            except Exception as exc:
                if self._prefilling and self._prefilling[0] is seq:
                    self._prefilling.pop(0)
                _failed(seq, exc)

    def _join(self, seq: _Seq, logits: torch.Tensor) -> None:
        """``seq``'s prompt is prefilled (into its buffers): hand its KV out, send the first token, join the
        decode batch."""
        req, eng = seq.request, self.engine
        assert seq.ids is not None
        if req.on_prompt_seconds is not None:
            req.on_prompt_seconds(seq.forward_s)
        ids = seq.ids[0].cpu()
        prompt = ids if req.prefix is None else torch.cat([req.prefix.token_ids, ids])
        kv = eng.extract(seq.cache, prompt)
        seq.ids = seq.cache = None
        seq.n = kv.n_tokens
        if req.on_prompt is not None:
            req.on_prompt(kv)  # views of the buffers' first n positions, which decoding never writes
        if self._emit(seq, logits):
            self._active.append(seq)

    def _emit(self, seq: _Seq, logits: torch.Tensor) -> bool:
        """Pick and send ``seq``'s next token; whether it goes on."""
        return self._emit_token(seq, pick_token(logits.float().cpu(), seq.request.params, seq.gen))

    def _emit_token(self, seq: _Seq, tok: int) -> bool:
        """Send ``tok`` as ``seq``'s next token, ending it at a stop condition; whether it goes on."""
        params = seq.request.params
        seq.produced += 1
        seq.last = tok
        seq.sink(Token(tok))
        if tok in params.stop_token_ids:
            seq.finish("stop")
            return False
        if seq.text is not None:
            seq.text.push(tok)
            if seq.text.stopped:
                seq.finish("stop")
                return False
        if seq.produced >= params.max_new_tokens:
            seq.finish("length")
            return False
        if seq.handle.cancelled:
            seq.finish("cancelled")
            return False
        return True

    @torch.inference_mode()
    def _step(self) -> None:
        seqs = self._active
        eng = self.engine
        t0 = time.perf_counter()
        ids = torch.tensor([[s.last] for s in seqs], dtype=torch.long, device=eng.device)
        pos = torch.tensor([[s.n] for s in seqs], dtype=torch.long, device=eng.device)
        with eng.lock, self._ragged():
            out = eng.model(
                input_ids=ids,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **{eng.cache_arg: _StepCache(seqs)},
            )
        for s in seqs:
            s.n += 1
        self.observer.step(len(seqs), time.perf_counter() - t0)
        logits = out.logits[:, -1]
        self._active = [s for i, s in enumerate(seqs) if self._emit(s, logits[i])]

    @contextmanager
    def _ragged(self) -> Iterator[None]:
        """The model's attention switched to the ragged kind for one call (under the engine lock)."""
        cfg = self.engine.model.config
        before = cfg._attn_implementation
        cfg._attn_implementation = RAGGED
        try:
            yield
        finally:
            cfg._attn_implementation = before

    # -- models that cannot batch ----------------------------------------------------------------
    def _batches(self) -> bool:
        """Whether this model batches (probed once, on first need, from whichever thread asks first)."""
        with self._probe_lock:
            if self._batchable is None:
                self._batchable = self._probe()
            return self._batchable

    def _probe(self) -> bool:
        """Whether this model batches: plain full K/V layers, its attention through transformers' interface,
        and a ragged step of two different sequences matching each one's own decode step."""
        from transformers.cache_utils import DynamicLayer

        eng = self.engine
        impl = eng.model.config._attn_implementation
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if impl not in ALL_ATTENTION_FUNCTIONS:
            log.warning(
                "not batching: the model's attention %r is not in transformers' attention interface", impl
            )
            return False
        for mod in eng.model.modules():
            if hasattr(mod, "is_causal") and hasattr(mod, "layer_idx"):
                mod._kvagent_attention = impl
        _register()
        try:
            cache = eng.new_cache(None)
            if any(type(layer) is not DynamicLayer for layer in cache.layers):
                log.warning(
                    "not batching: the model keeps other state than full K/V (sliding window or recurrent)"
                )
                return False
            return self._probe_step()
        except Exception as exc:  # a model whose forward does not take a per-call cache object
            log.warning("not batching: a probe step failed (%s); requests run one at a time", exc)
            return False

    def _probe_step(self) -> bool:
        eng = self.engine
        vocab = eng.config.get_text_config(decoder=True).vocab_size
        prompts = [[1 % vocab, 2 % vocab, 3 % vocab], [4 % vocab, 5 % vocab]]
        nxt = [7 % vocab, 9 % vocab]
        want, seqs = [], []
        for p, t in zip(prompts, nxt, strict=True):
            kv = eng.prefill(p)
            cache = eng.new_cache(kv)
            with eng.lock:
                want.append(
                    eng.forward(
                        cache, input_ids=torch.tensor([[t]], device=eng.device), logits_to_keep=1
                    ).logits[0, -1]
                )
            s = _Seq(
                GenerationRequest(tuple(p), None, GenerationParams(max_new_tokens=1)),
                lambda _e: None,
                _Handle(self),
                0.0,
            )
            s.keys = [torch.cat([k, torch.zeros_like(k[:, :, :1])], dim=2) for k in kv.keys]
            s.values = [torch.cat([v, torch.zeros_like(v[:, :, :1])], dim=2) for v in kv.values]
            s.n, s.last = kv.n_tokens, t
            seqs.append(s)
        ids = torch.tensor([[s.last] for s in seqs], device=eng.device)
        pos = torch.tensor([[s.n] for s in seqs], device=eng.device)
        with torch.inference_mode(), eng.lock, self._ragged():
            got = eng.model(
                input_ids=ids,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **{eng.cache_arg: _StepCache(seqs)},
            ).logits[:, -1]
        ok = all(torch.allclose(got[i].float(), w.float(), rtol=1e-3, atol=1e-3) for i, w in enumerate(want))
        if not ok:
            log.warning("not batching: a batched step of this model does not match its single-sequence step")
        return ok

    def _solo(self, seq: _Seq) -> None:
        """Run ``seq`` alone to its end with the plain streaming decode (models that do not batch)."""
        req = seq.request
        it = self.engine.stream(req.prefix, req.prompt_ids, req.params, on_prompt=req.on_prompt)
        try:
            for tok in it:
                if not self._emit_token(seq, tok):
                    return
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
