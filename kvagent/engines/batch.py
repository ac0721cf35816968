"""The transformers engine, batched: concurrent requests run together, one model forward per scheduler step
for all of them.

Every step is one model call over one row of tokens: each decoding sequence's last token, then up to
``prefill_chunk`` prompt-tail tokens of the requests still being prefilled (oldest first; a longer tail goes
in chunks over several steps, so the sequences already decoding keep emitting while a long prompt comes in).
The linear layers see all those tokens at once; attention runs per sequence on that sequence's own keys and
values (the kernel of :mod:`.attention`), through the model's usual attention kernel (transformers' SDPA is
called as ``torch``'s SDPA directly, bit for bit the same), with the mask that sequence would get alone (none
for one token, causal for a tail with nothing before it, causal after the prefix otherwise): no padding, each
token at its own position. A chunk thus attends to the prefix, the earlier chunks and itself, exactly as a
``TransformersEngine.prefill`` with ``chunk_size`` does. A sequence whose tail is done joins the decode
batch with its first token, picked from its last tail token's logits (its ``on_prompt_forwards`` is called
only if no other sequence shared its forwards: times of its own). The K/V of a sequence live in a buffer
sized for its prompt plus ``max_new_tokens``, written in place (the prefix copied in once, then each chunk
and each decoded token after it: no concatenation per chunk or per step).

Sequences that resume from one prefix KV (many agents asking about one cached document) read it in place (a
:class:`_Segment`): their buffers start after it, and each step attends every member's queries to the shared
prefix in one call, then each member's to its own K/V, merging the two partial softmaxes by their
log-sum-exp (:func:`.attention._cascade`). At ~4k tokens a decode step otherwise reads every sequence's copy
of the document's K/V, the memory-bound part of a batched step. The merge equals one call over the whole K/V
up to float rounding, not bit for bit: the first sequence on a prefix holds a copy of it and, while no other
shares it, is attended to plainly, bitwise as without batching; in a group (or reading a prefix whose first
reader left) a sequence's logits may differ from its solo run in the last bits, as with the batched linear
layers (every reply still equals greedy decoding of its own ids in the tests).

A segment is keyed by what its KV *is*, never by token ids: the prefix's
:class:`~kvagent.kvcache.tensors.KVSource` names
the bytes its leading positions copy (a published artifact's checksum-verified payload, a store entry's, or
one computation here) and how many positions it names, and so on for the prefix a computed KV was
extended from (its lineage: a prompt KV computed after a short cached prefix names its own positions, one
computed after a published document still names the document's). A sequence reads another's segment only
where both name one source over the shared positions (and their ids agree). A published artifact's bytes are
the same for every principal entitled to it (public or granted), so their sequences read its one copy
together, whatever their namespaces; any other KV (a principal's salted prompt cache, a private save, a
prompt KV computed here) is shared only between requests of the same namespace, never across namespaces. A
prefix with the same leading ids but other K/V (another artifact, a tampered copy), or a KV whose source is
unknown, reads nothing but its own copy.

New requests join between steps; a cancelled request leaves before the next step. ``max_batch`` bounds the
sequences admitted (decoding or being prefilled); further requests wait in submission order. One scheduler
thread owns the model calls of the batch; each holds ``TransformersEngine.lock``.

Models whose attention does not go through transformers' attention interface with full K/V per layer (sliding
window, recurrent state), or whose batched step does not match their single-sequence one, are not batched:
their requests run one at a time, as before (logged once; the probes are :mod:`.probe`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import EngineError
from ..kvcache.prefix import shared_prefix
from ..kvcache.tensors import KVCache, extended_source
from .attention import StepCache, ragged
from .base import Finish, FinishReason, GenerationRequest, PromptForward, Sink, Token, Usage
from .hf import TransformersEngine, pick_token
from .params import GenerationParams
from .probe import probe
from .textstream import TextStream

log = logging.getLogger("kvagent.engine")

#: prompt-tail tokens prefilled per step (one forward, beside the decoding sequences' tokens): a longer tail
#: is prefilled in chunks of this size, several short tails together up to it
PREFILL_CHUNK = 256

#: leading tokens a prefix must have in common with a live sequence's segment to be read from it in place
SHARE_MIN = 64


class BatchObserver:
    """Receives the engine's scheduling facts (metrics); the default does nothing."""

    def step(self, batch_size: int, seconds: float) -> None:
        """One decode step ran for ``batch_size`` sequences."""

    def shared_prefix(self, sequences: int) -> None:
        """In that step, ``sequences`` of them read a prefix they share with others in place."""

    def queued(self, seconds: float) -> None:
        """A request got a batch slot after waiting ``seconds`` since it was submitted."""


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
    #: the prefix K/V this sequence reads in place, shared with the other sequences that resume from it (see
    # :class:`_Segment`), and how many of its positions it reads; None: its buffers hold all its K/V
    segment: _Segment | None = None
    seg_n: int = 0
    base: int = 0  # the position of its buffers' first slot (``seg_n`` when they start after the segment)

    def finish(self, reason: FinishReason, error: BaseException | None = None) -> None:
        now = time.perf_counter()
        started = self.started or now
        prefix = self.request.prefix.n_tokens if self.request.prefix is not None else 0
        usage = Usage(self.request.n_prompt, prefix, self.produced, started - self.submitted, now - started)
        self.sink(Finish(reason, usage, error))


@dataclass(eq=False)
class _Segment:
    """A prefix KV that several sequences resume from, read in place by all of them: their decode steps (and
    prompt-tail chunks) attend to it in one call for the group, each then to its own buffers, the two results
    merged by their log-sum-exp (see :func:`.attention._cascade`), so the prefix is read once per step for
    the group instead of once per sequence. Views of the first request's prefix (immutable).

    ``names`` says what its leading positions are (:func:`_names`: each source, over how many positions):
    only a sequence whose prefix has one of its sources reads them, and never more of them than both name."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    token_ids: torch.Tensor
    names: dict[tuple[str, ...], int]


def _names(request: GenerationRequest) -> dict[tuple[str, ...], int]:
    """What ``request``'s prefix KV is, as a segment is keyed: each source of its lineage (see
    :meth:`~kvagent.kvcache.tensors.KVSource.lineage`) and over how many leading positions. A published
    artifact's bytes are ``("published", digest)``: the same for every principal entitled to it; any other KV
    is private to the request's namespace (``("private", namespace, digest)``). Empty when the prefix's
    source is unknown (never shared). Never its token ids: equal ids with other K/V are another identity."""
    prefix = request.prefix
    src = prefix.source if prefix is not None else None
    if prefix is None or src is None:
        return {}
    names: dict[tuple[str, ...], int] = {}
    for s in src.clipped(prefix.n_tokens).lineage():
        key = ("published", s.digest) if s.published else ("private", request.namespace or "", s.digest)
        names[key] = max(names.get(key, 0), min(s.n, prefix.n_tokens))
    return names


@dataclass
class _Part:
    """``seq``'s ``ids`` in one batched forward: its next tokens, written into its buffers from ``start``."""

    seq: _Seq
    ids: Sequence[int]
    start: int



def _segment_for(
    live: Sequence[_Seq], prefix: KVCache, names: dict[tuple[str, ...], int]
) -> tuple[_Segment | None, int]:
    """The segment of a ``live`` sequence that ``prefix`` (whose sources are ``names``, see :func:`_names`)
    shares the most leading positions with (at least ``SHARE_MIN``), and how many: positions that a source
    of both names, whose ids agree."""
    best: tuple[_Segment | None, int] = (None, 0)
    seen: set[int] = set()
    for s in live:
        seg = s.segment
        if seg is None or id(seg) in seen:
            continue
        seen.add(id(seg))
        named = max((min(n, seg.names[k]) for k, n in names.items() if k in seg.names), default=0)
        if named < SHARE_MIN or named <= best[1]:
            continue
        m = min(shared_prefix(seg.token_ids, prefix.token_ids), named)
        if m >= SHARE_MIN and m > best[1]:
            best = (seg, m)
    return best


def _failed(seq: _Seq, exc: BaseException) -> None:
    """End ``seq`` with an error of its own prefill (logged unless the request itself was at fault)."""
    if not isinstance(exc, EngineError):
        log.exception("a prompt's forward failed", exc_info=exc)
    seq.finish("error", exc)



class TransformersBatchEngine:
    """The :class:`~kvagent.engines.base.GenerationEngine` over a
    :class:`~kvagent.engines.hf.TransformersEngine`:
    continuous batching of up to ``max_batch`` sequences. ``tokenizer`` is needed for stop strings;
    ``prefill_chunk``: prompt-tail tokens prefilled per step; ``share_prefix``: sequences resuming from one
    prefix KV (the same source, see the module docstring) read it in place, attended to together (where the
    model's attention allows it; probed)."""

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
        share_prefix: bool = True,
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
        self.share_prefix = share_prefix
        self._shares = False  # whether sequences resuming from one prefix read it in place (probed)
        self._probe_lock = threading.Lock()

    @classmethod
    def shared(
        cls,
        engine: TransformersEngine,
        tokenizer: Any = None,
        max_batch: int = 8,
        prefill_chunk: int | None = None,
    ) -> TransformersBatchEngine:
        """``engine``'s batching front, made on first use and shared by every later caller (it is kept as
        ``engine.batch_front``); ``tokenizer`` serves stop strings; ``prefill_chunk``: prompt-tail tokens
        prefilled per batched step (None: the default). A later caller's ``max_batch`` and ``prefill_chunk``
        do not change the shared one."""
        with engine.lock:
            front = engine.batch_front
            if not isinstance(front, TransformersBatchEngine):
                front = cls(engine, max_batch=max_batch, tokenizer=tokenizer,
                            prefill_chunk=prefill_chunk or PREFILL_CHUNK)
                engine.batch_front = front
            elif tokenizer is not None and front.tokenizer is None:
                front.tokenizer = tokenizer
            return front

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
        self.observer.queued(seq.started - seq.submitted)
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

    def _buffers(self, seq: _Seq, live: Sequence[_Seq] | None = None, share: bool | None = None) -> None:
        """``seq``'s K/V buffers, sized for its prompt and its generation. A prefix whose leading positions
        a live sequence already reads as a segment with a source in common (:func:`_names`: the same
        published bytes, or the same private KV of the same namespace; at least ``SHARE_MIN`` positions both
        name) is read from there in place: the buffers start after it, with the rest of the prefix copied in.
        Else the prefix is copied in whole, and becomes a segment later sequences with one of its sources may
        share (none when its source is unknown). ``live``: the sequences whose segments may be shared (None:
        the batch's); ``share``: whether to share (None: as probed)."""
        req, eng = seq.request, self.engine
        prefix = req.prefix
        n = prefix.n_tokens if prefix is not None else 0
        names = _names(req)
        shares = self._shares if share is None else share
        if prefix is not None and names and shares and n >= SHARE_MIN:
            if live is None:
                live = (*self._active, *self._prefilling)
            seg, m = _segment_for(live, prefix, names)
            if seg is None:
                seg, m = _Segment(prefix.keys, prefix.values, prefix.token_ids, names), n
            else:
                seq.base = m
            seq.segment, seq.seg_n = seg, m
        cap = req.n_prompt + req.params.max_new_tokens - seq.base
        lay = eng.layout
        for i in range(lay.num_layers):
            kb = torch.empty((1, lay.num_kv_heads, cap, lay.head_dim), dtype=eng.dtype, device=eng.device)
            vb = torch.empty_like(kb)
            if prefix is not None and n > seq.base:
                kb[:, :, : n - seq.base].copy_(prefix.keys[i][:, :, seq.base :])
                vb[:, :, : n - seq.base].copy_(prefix.values[i][:, :, seq.base :])
            seq.keys.append(kb)
            seq.values.append(vb)
        seq.n = n

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
        cache = StepCache(parts, self.engine.dtype, self.engine.device)
        logits = self._forward(parts, cache)
        seconds = time.perf_counter() - t0
        for p in parts:
            p.seq.n += len(p.ids)
        if decoding:
            self.observer.step(len(decoding), seconds)
            self.observer.shared_prefix(sum(1 for i in cache.grouped if i < len(decoding)))
        self._active = [s for i, s in enumerate(decoding) if self._emit(s, logits[i])]
        kept: list[tuple[_Seq, Callable[[], None]]] = []  # prompt KVs to hand out after the first tokens
        for i, p in enumerate(parts[len(decoding) :], start=len(decoding)):
            s = p.seq
            s.done += len(p.ids)
            s.forwards.append(PromptForward(len(p.ids), p.start, seconds))
            s.shared = s.shared or len(parts) > 1
            if s.done == len(s.request.prompt_ids):
                self._prefilling.remove(s)
                try:
                    self._join(s, logits[i], kept)
                except Exception as exc:
                    _failed(s, exc)
        for s, keep in kept:  # once every prompt done in this step has sent its first token
            try:
                keep()
            except Exception as exc:
                self._active.remove(s)
                _failed(s, exc)

    def _forward(self, parts: Sequence[_Part], cache: StepCache | None = None) -> torch.Tensor:
        """One model call over ``parts``' tokens as one row, each at its own positions, each sequence's
        K/V written into its own buffers (through ``cache``, made here when None); the logits after each
        part's last token, one row per part."""
        eng = self.engine
        ids: list[int] = []
        pos: list[int] = []
        last: list[int] = []
        for p in parts:
            ids.extend(p.ids)
            pos.extend(range(p.start, p.start + len(p.ids)))
            last.append(len(ids) - 1)
        dev = eng.device
        if cache is None:
            cache = StepCache(parts, eng.dtype, dev)
        with eng.lock, ragged(eng.model):
            out = eng.model(
                input_ids=torch.tensor([ids], dtype=torch.long, device=dev),
                position_ids=torch.tensor([pos], dtype=torch.long, device=dev),
                use_cache=True,
                logits_to_keep=torch.tensor(last, dtype=torch.long, device=dev),
                **{eng.cache_arg: cache},
            )
        return out.logits[0]  # type: ignore[no-any-return]

    def _join(self, seq: _Seq, logits: torch.Tensor, kept: list[tuple[_Seq, Callable[[], None]]]) -> None:
        """``seq``'s prompt is prefilled (into its buffers): send the first token, join the decode batch, and
        hand its prompt KV out (through ``kept``, once the step's other first tokens are out; at once if the
        first token ends it, so always before its Finish)."""
        req = seq.request
        if req.on_prompt_forwards is not None and not seq.shared:  # times of its own only
            req.on_prompt_forwards(tuple(seq.forwards))
        keep = None
        if req.on_prompt is not None:
            on_prompt = req.on_prompt
            ids = torch.tensor(req.prompt_ids, dtype=torch.int64)
            prompt = ids if req.prefix is None else torch.cat([req.prefix.token_ids, ids])

            def keep() -> None:
                on_prompt(self._prompt_kv(seq, prompt))

        if self._emit(seq, logits, keep):
            self._active.append(seq)
            if keep is not None:
                kept.append((seq, keep))

    @staticmethod
    def _prompt_kv(seq: _Seq, prompt: torch.Tensor) -> KVCache:
        """``seq``'s prompt KV: views of its buffers' first positions, which decoding never writes; joined to
        its segment's (a copy) when its buffers start after it."""
        n, base, seg = seq.n, seq.base, seq.segment
        if base == 0 or seg is None:
            keys = tuple(k[:, :, :n] for k in seq.keys)
            values = tuple(v[:, :, :n] for v in seq.values)
        else:
            keys = tuple(
                torch.cat([s[:, :, :base], k[:, :, : n - base]], dim=2)
                for s, k in zip(seg.keys, seq.keys, strict=True)
            )
            values = tuple(
                torch.cat([s[:, :, :base], v[:, :, : n - base]], dim=2)
                for s, v in zip(seg.values, seq.values, strict=True)
            )
        # its first positions are its prefix's bytes (so are a segment's read in place: a source in common)
        return KVCache(keys=keys, values=values, token_ids=prompt).with_source(
            extended_source(seq.request.prefix, int(prompt.numel()))
        )

    def _emit(self, seq: _Seq, logits: torch.Tensor, before_finish: Callable[[], None] | None = None) -> bool:
        """Pick and send ``seq``'s next token; whether it goes on."""
        tok = pick_token(logits.float().cpu(), seq.request.params, seq.gen)
        return self._emit_token(seq, tok, before_finish)

    def _emit_token(self, seq: _Seq, tok: int, before_finish: Callable[[], None] | None = None) -> bool:
        """Send ``tok`` as ``seq``'s next token, ending it at a stop condition (``before_finish`` runs first);
        whether it goes on."""
        params = seq.request.params
        seq.produced += 1
        seq.last = tok
        seq.sink(Token(tok))
        reason: FinishReason | None = None
        if tok in params.stop_token_ids:
            reason = "stop"
        elif seq.text is not None:
            seq.text.push(tok)
            reason = "stop" if seq.text.stopped else None
        if reason is None:
            if seq.produced >= params.max_new_tokens:
                reason = "length"
            elif seq.handle.cancelled:
                reason = "cancelled"
            else:
                return True
        if before_finish is not None:
            before_finish()
        seq.finish(reason)
        return False

    # -- models that cannot batch ----------------------------------------------------------------
    def _batches(self) -> bool:
        """Whether this model batches (probed once, on first need, from whichever thread asks first)."""
        with self._probe_lock:
            if self._batchable is None:
                self._batchable = self._probe()
            return self._batchable

    def _probe(self) -> bool:
        """Whether this model batches, and whether its sequences share prefixes (:func:`.probe.probe`)."""
        found = probe(self.engine, self._probe_batch, share_prefix=self.share_prefix, share_min=SHARE_MIN)
        if found.shares:
            self._shares = True
        return found.batches

    def _probe_batch(
        self, cases: Sequence[tuple[KVCache | None, Sequence[int]]], share: bool
    ) -> tuple[torch.Tensor, int]:
        """The probes' batched forward: every ``(prefix KV, tail ids)`` case as a sequence of one forward
        (``share``: reading shared prefixes in place); each one's last logits, and how many distinct
        segments they read."""
        parts: list[_Part] = []
        for kv, ids in cases:
            s = _Seq(GenerationRequest(tuple(ids), kv, GenerationParams(max_new_tokens=1)), lambda _e: None,
                     _Handle(self), 0.0)
            self._buffers(s, [p.seq for p in parts], share=share)
            parts.append(_Part(s, ids, s.n))
        with torch.inference_mode():
            got = self._forward(parts)
        return got, len({id(p.seq.segment) for p in parts})


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
