"""The transformers engine, batched: concurrent requests run together, one model forward per scheduler step
for all of them.

Every step is one model call over one row of tokens: each decoding sequence's last token, then up to
``prefill_chunk`` prompt-tail tokens of the requests still being prefilled (oldest first; a longer tail goes
in chunks over several steps, so the sequences already decoding keep emitting while a long prompt comes in).
The linear layers see all those tokens at once; attention runs per sequence on that sequence's own keys and
values, through the model's usual attention kernel (transformers' SDPA is called as ``torch``'s SDPA
directly, bit for bit the same), with the mask that sequence would get alone (none for one token, causal
for a tail with nothing before it, causal after the prefix otherwise): no padding, each token at its own
position. A chunk thus attends to the prefix, the earlier chunks and itself, exactly as a
``TransformersEngine.prefill`` with ``chunk_size`` does. A sequence whose tail is done joins the decode
batch with its first token, picked from its last tail token's logits (its ``on_prompt_forwards`` is called
only if no other sequence shared its forwards: times of its own). The K/V of a sequence live in a buffer
sized for its prompt plus ``max_new_tokens``, written in place (the prefix copied in once, then each chunk
and each decoded token after it: no concatenation per chunk or per step).

New requests join between steps; a cancelled request leaves before the next step. ``max_batch`` bounds the
sequences admitted (decoding or being prefilled); further requests wait in submission order. One scheduler
thread owns the model calls of the batch; each holds ``TransformersEngine.lock``.

Models whose attention does not go through transformers' attention interface with full K/V per layer (sliding
window, recurrent state), or whose batched step does not match their single-sequence one, are not batched:
their requests run one at a time, as before (logged once).
"""

from __future__ import annotations

import collections
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
from ..kv import KVCache
from ..textstream import TextStream
from .base import Finish, FinishReason, GenerationRequest, PromptForward, Sink, Token, Usage

log = logging.getLogger("kvagent.engine")

RAGGED = "kvagent_ragged"

#: prompt-tail tokens prefilled per step (one forward, beside the decoding sequences' tokens): a longer tail
#: is prefilled in chunks of this size, several short tails together up to it
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
    done: int = 0  # prompt-tail tokens prefilled so far
    forwards: list[PromptForward] = field(default_factory=list)  # those that prefilled this prompt's tail
    shared: bool = False  # whether any of them also ran other sequences' tokens

    def finish(self, reason: FinishReason, error: BaseException | None = None) -> None:
        now = time.perf_counter()
        started = self.started or now
        prefix = self.request.prefix.n_tokens if self.request.prefix is not None else 0
        usage = Usage(self.request.n_prompt, prefix, self.produced, started - self.submitted, now - started)
        self.sink(Finish(reason, usage, error))


@dataclass
class _Part:
    """``seq``'s ``ids`` in one batched forward: its next tokens, written into its buffers from ``start``."""

    seq: _Seq
    ids: Sequence[int]
    start: int


class _Rows:
    """Per-sequence K (or V) views of one layer, handed from the step's cache to the ragged attention, with
    where each sequence's queries lie in the row and the mask each gets."""

    __slots__ = ("rows", "step")

    def __init__(self, rows: list[torch.Tensor], step: _StepCache) -> None:
        self.rows = rows
        self.step = step


class _StepCache:
    """The cache a batched forward passes to the model: writes each part's new K/V into its sequence's
    buffer and returns every sequence's K/V so far (views, no copy)."""

    def __init__(self, parts: Sequence[_Part], dtype: torch.dtype, device: torch.device) -> None:
        self.parts = parts
        self.spans: list[tuple[int, int]] = []  # (offset in the row, length) of each part's tokens
        self.masks: list[torch.Tensor | None] = []
        off = 0
        for p in parts:
            n = len(p.ids)
            self.spans.append((off, n))
            self.masks.append(_tail_mask(p.start, n, dtype, device))
            off += n

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> tuple[_Rows, _Rows]:
        ks, vs = [], []
        for p, (off, n) in zip(self.parts, self.spans, strict=True):
            k, v = p.seq.keys[layer_idx], p.seq.values[layer_idx]
            end = p.start + n
            k[:, :, p.start : end].copy_(key_states[:, :, off : off + n])
            v[:, :, p.start : end].copy_(value_states[:, :, off : off + n])
            ks.append(k[:, :, :end])
            vs.append(v[:, :, :end])
        return _Rows(ks, self), _Rows(vs, self)


def _tail_mask(start: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The mask transformers gives ``n`` queries after ``start`` cached tokens alone: none for one query
    (attends to all) or for a tail with nothing before it (SDPA's own causal mask), else causal after the
    prefix. Additive (0 or -inf), as SDPA turns transformers' boolean mask before use, so each layer's call
    does not convert it again."""
    if n == 1 or start == 0:
        return None
    cols = torch.arange(start + n, device=device)
    rows = torch.arange(start, start + n, device=device)
    mask = torch.zeros((1, 1, n, start + n), dtype=dtype, device=device)
    return mask.masked_fill_(cols[None, None, None, :] > rows[None, None, :, None], float("-inf"))


def _failed(seq: _Seq, exc: BaseException) -> None:
    """End ``seq`` with an error of its own prefill (logged unless the request itself was at fault)."""
    if not isinstance(exc, EngineError):
        log.exception("a prompt's forward failed", exc_info=exc)
    seq.finish("error", exc)


def _ragged_attention(
    module: Any, query: torch.Tensor, key: Any, value: Any, attention_mask: Any, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """Attention of a batched forward, one sequence at a time on its own K/V with its own mask, through the
    model's usual kernel: SDPA called directly where the model's kernel is transformers' SDPA on CPU (see
    :func:`_direct_sdpa`), else that kernel as the model calls it."""
    if not isinstance(key, _Rows) or not isinstance(value, _Rows):
        raise EngineError("the ragged attention runs only inside a batched forward")
    step = key.step
    parts = zip(step.spans, step.masks, key.rows, value.rows, strict=True)
    if _direct_sdpa(module, query, kwargs):
        scale = kwargs.get("scaling")
        gqa = getattr(module, "num_key_value_groups", 1) > 1
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
        for (off, n), mask, k, v in parts:
            o = torch.nn.functional.scaled_dot_product_attention(
                query[:, :, off : off + n],
                k,
                v,
                attn_mask=mask,
                scale=scale,
                is_causal=bool(causal and n > 1 and mask is None),
                enable_gqa=gqa,
            )
            out[:, off : off + n].copy_(o.transpose(1, 2))
        return out, None
    inner = _ragged_inner(module)
    outs = [
        inner(module, query[:, :, off : off + n], k, v, mask, **kwargs)[0] for (off, n), mask, k, v in parts
    ]
    return torch.cat(outs, dim=1), None


def _direct_sdpa(module: Any, query: torch.Tensor, kwargs: dict[str, Any]) -> bool:
    """Whether the ragged attention may call ``torch.nn.functional.scaled_dot_product_attention`` itself
    instead of transformers' ``sdpa_attention_forward``: the model's kernel is that one, on CPU, with none of
    its extras (dropout, softcap, position bias). The call is then the one the wrapper makes, without its
    per-call overhead and copies, except after a prefix (a mask) where the wrapper repeats the K/V heads of a
    grouped-query model and this call lets SDPA share them (``enable_gqa``): the same arithmetic, bit for bit
    on CPU (``tests/test_batching.py`` checks it), without copying every sequence's K/V per layer."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return (
        query.device.type == "cpu"
        and _ragged_inner(module) is sdpa_attention_forward
        and not kwargs.get("dropout")
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and not kwargs.get("output_attentions")
        and query.shape[-1] <= 256
    )


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
    ``prefill_chunk``: prompt-tail tokens prefilled per step."""

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
                if self._active or self._prefilling:
                    self._step()
            except Exception as exc:  # a failed step ends the requests in it; the scheduler goes on
                log.exception("a batched step failed")
                for s in [*self._active, *self._prefilling]:
                    s.finish("error", exc)
                self._active, self._prefilling = [], []

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
        req = seq.request
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
        self._buffers(seq)
        self._prefilling.append(seq)

    def _buffers(self, seq: _Seq) -> None:
        """``seq``'s K/V buffers, sized for its prompt and its generation, the prefix KV copied in."""
        req, eng = seq.request, self.engine
        cap = req.n_prompt + req.params.max_new_tokens
        lay = eng.layout
        for i in range(lay.num_layers):
            kb = torch.empty((1, lay.num_kv_heads, cap, lay.head_dim), dtype=eng.dtype, device=eng.device)
            vb = torch.empty_like(kb)
            if req.prefix is not None:
                kb[:, :, : req.prefix.n_tokens].copy_(req.prefix.keys[i])
                vb[:, :, : req.prefix.n_tokens].copy_(req.prefix.values[i])
            seq.keys.append(kb)
            seq.values.append(vb)
        seq.n = req.prefix.n_tokens if req.prefix is not None else 0

    @torch.inference_mode()
    def _step(self) -> None:
        """One forward: a token for every decoding sequence, and up to ``prefill_chunk`` prompt-tail tokens
        (oldest prompts first); a prompt whose tail is done joins the decode batch."""
        decoding = self._active
        parts = [_Part(s, (s.last,), s.n) for s in decoding]
        budget = self.prefill_chunk
        for s in self._prefilling:
            if budget == 0:
                break
            tail = s.request.prompt_ids
            n = min(budget, len(tail) - s.done)
            parts.append(_Part(s, tail[s.done : s.done + n], s.n))
            budget -= n
        t0 = time.perf_counter()
        logits = self._forward(parts)
        seconds = time.perf_counter() - t0
        for p in parts:
            p.seq.n += len(p.ids)
        if decoding:
            self.observer.step(len(decoding), seconds)
        self._active = [s for i, s in enumerate(decoding) if self._emit(s, logits[i])]
        for i, p in enumerate(parts[len(decoding) :], start=len(decoding)):
            s = p.seq
            s.done += len(p.ids)
            s.forwards.append(PromptForward(len(p.ids), p.start, seconds))
            s.shared = s.shared or len(parts) > 1
            if s.done == len(s.request.prompt_ids):
                self._prefilling.remove(s)
                try:
                    self._join(s, logits[i])
                except Exception as exc:
                    _failed(s, exc)

    def _forward(self, parts: Sequence[_Part]) -> torch.Tensor:
        """One model call over ``parts``' tokens as one row, each at its own positions, each sequence's
        K/V written into its own buffers; the logits after each part's last token, one row per part."""
        eng = self.engine
        ids: list[int] = []
        pos: list[int] = []
        last: list[int] = []
        for p in parts:
            ids.extend(p.ids)
            pos.extend(range(p.start, p.start + len(p.ids)))
            last.append(len(ids) - 1)
        dev = eng.device
        with eng.lock, self._ragged():
            out = eng.model(
                input_ids=torch.tensor([ids], dtype=torch.long, device=dev),
                position_ids=torch.tensor([pos], dtype=torch.long, device=dev),
                use_cache=True,
                logits_to_keep=torch.tensor(last, dtype=torch.long, device=dev),
                **{eng.cache_arg: _StepCache(parts, eng.dtype, dev)},
            )
        return out.logits[0]  # type: ignore[no-any-return]

    def _join(self, seq: _Seq, logits: torch.Tensor) -> None:
        """``seq``'s prompt is prefilled (into its buffers): hand its KV out, send the first token, join the
        decode batch."""
        req = seq.request
        if req.on_prompt_forwards is not None and not seq.shared:  # times of its own only
            req.on_prompt_forwards(tuple(seq.forwards))
        ids = torch.tensor(req.prompt_ids, dtype=torch.int64)
        prompt = ids if req.prefix is None else torch.cat([req.prefix.token_ids, ids])
        n = seq.n
        kv = KVCache(
            keys=tuple(k[:, :, :n] for k in seq.keys),
            values=tuple(v[:, :, :n] for v in seq.values),
            token_ids=prompt,
        )
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
        and a batched forward of three different sequences matching each one's own forward."""
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
        """A batched forward of a one-token tail after a prefix, a longer tail after a prefix and a tail from
        nothing gives each one's logits from its own forward."""
        eng = self.engine
        vocab = eng.config.get_text_config(decoder=True).vocab_size
        cases = [([1, 2, 3], [7]), ([4, 5], [9, 11, 13]), ([], [6, 8, 10])]
        want, parts = [], []
        for prefix, tail in cases:
            kv = eng.prefill([t % vocab for t in prefix]) if prefix else None
            ids = tuple(t % vocab for t in tail)
            with torch.inference_mode(), eng.lock:
                out = eng.forward(eng.new_cache(kv), input_ids=torch.tensor([ids], device=eng.device))
            want.append(out.logits[0, -1])
            s = _Seq(
                GenerationRequest(ids, kv, GenerationParams(max_new_tokens=1)),
                lambda _e: None,
                _Handle(self),
                0.0,
            )
            self._buffers(s)
            parts.append(_Part(s, ids, s.n))
        with torch.inference_mode():
            got = self._forward(parts)
        ok = all(torch.allclose(got[i].float(), w.float(), rtol=1e-3, atol=1e-3) for i, w in enumerate(want))
        if not ok:
            log.warning(
                "not batching: a batched forward of this model does not match its single-sequence one"
            )
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
