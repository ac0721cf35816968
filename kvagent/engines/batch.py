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

Sequences that resume from one prefix KV (many agents asking about one cached document) read it in place (a
:class:`_Segment`): their buffers start after it, and each step attends every member's
queries to the shared prefix in one call, then each member's to its own K/V, merging the two partial
softmaxes by their log-sum-exp (:func:`_cascade`). At ~4k tokens a decode step otherwise reads every
sequence's copy of the document's K/V, the memory-bound part of a batched step. The merge equals one call over
the whole K/V up to float rounding, not bit for bit: the first sequence on a prefix holds a copy of it and,
while no other shares it, is attended to plainly, bitwise as without batching; in a group (or reading a
prefix whose first reader left) a sequence's logits may differ from its solo run in the last bits, as with
the batched linear layers (every reply still equals greedy decoding of its own ids in the tests).

A segment is keyed by what its KV *is*, never by token ids: the prefix's
:class:`~kvagent.kvcache.tensors.KVSource` names
the bytes its leading positions copy (a published artifact's checksum-verified payload, a store entry's, or
one computation here) and how many positions it names. A sequence reads another's segment only where both
name the same source over the shared positions (and their ids agree). A published artifact's bytes are the
same for every principal entitled to it (public or granted), so their sequences read its one copy together,
whatever their namespaces; any other KV (a principal's salted prompt cache, a private save, a prompt KV
computed here) is shared only between requests of the same namespace, never across namespaces. A prefix with
the same leading ids but other K/V (another artifact, a tampered copy), or a KV whose source is unknown,
reads nothing but its own copy.

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

from ..errors import EngineError
from ..kvcache.prefix import shared_prefix
from ..kvcache.tensors import KVCache, extended_source
from .base import Finish, FinishReason, GenerationRequest, PromptForward, Sink, Token, Usage
from .hf import TransformersEngine, pick_token
from .params import GenerationParams
from .textstream import TextStream

log = logging.getLogger("kvagent.engine")

RAGGED = "kvagent_ragged"

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
    merged by their log-sum-exp (see :func:`_cascade`), so the prefix is read once per step for the group
    instead of once per sequence. Views of the first request's prefix (immutable).

    ``identity`` says what its first ``named`` positions are (:func:`_identity`): only a sequence whose prefix
    has the same identity reads them, and never more of them than both prefixes name."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    token_ids: torch.Tensor
    identity: tuple[str, ...]
    named: int


def _identity(request: GenerationRequest) -> tuple[tuple[str, ...], int] | None:
    """What ``request``'s prefix KV is, as a segment is keyed, and over how many leading positions: the bytes
    of a published artifact (``("published", digest)``: the same for every principal entitled to it), else
    KV private to the request's namespace (``("private", namespace, digest)``); None when the prefix's
    source is unknown (never shared). Never its token ids: equal ids with other K/V are another identity."""
    prefix = request.prefix
    src = prefix.source if prefix is not None else None
    if prefix is None or src is None:
        return None
    named = min(src.n, prefix.n_tokens)
    if src.published:
        return ("published", src.digest), named
    return ("private", request.namespace or "", src.digest), named


@dataclass
class _Part:
    """``seq``'s ``ids`` in one batched forward: its next tokens, written into its buffers from ``start``."""

    seq: _Seq
    ids: Sequence[int]
    start: int


class _Rows:
    """Per-part K (or V) views of one layer, handed from the step's cache to the ragged attention: a plain
    part's whole K/V so far, a shared-prefix part's own K/V after its segment."""

    __slots__ = ("layer", "rows", "step")

    def __init__(self, rows: list[torch.Tensor], step: _StepCache, layer: int) -> None:
        self.rows = rows
        self.step = step
        self.layer = layer


class _StepCache:
    """The cache a batched forward passes to the model: writes each part's new K/V into its sequence's
    buffer and returns every part's K/V so far (views, no copy). Parts of sequences that read one segment
    (same prefix length) form a group attended to in one call (:func:`_cascade`); a sequence alone on its
    segment whose buffers hold its whole K/V is attended to plainly, as it would be without sharing."""

    def __init__(self, parts: Sequence[_Part], dtype: torch.dtype, device: torch.device) -> None:
        self.parts = parts
        self.spans: list[tuple[int, int]] = []  # (offset in the row, length) of each part's tokens
        self.masks: list[torch.Tensor | None] = []
        by_segment: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(parts):
            if p.seq.segment is not None:
                by_segment.setdefault((id(p.seq.segment), p.seq.seg_n), []).append(i)
        #: the groups attended to through their segment (indexes into ``parts``)
        self.groups = [g for g in by_segment.values() if len(g) > 1 or parts[g[0]].seq.base > 0]
        grouped = {i for g in self.groups for i in g}
        self.grouped = grouped
        self._group_masks: dict[int, torch.Tensor | None] = {}
        off = 0
        for i, p in enumerate(parts):
            n = len(p.ids)
            self.spans.append((off, n))
            if i in grouped:
                self.masks.append(_own_mask(p.start, n, p.seq.seg_n, dtype, device))
            else:
                self.masks.append(_tail_mask(p.start, n, dtype, device))
            off += n
        #: each group's positions in the row: a slice where they are consecutive, else an index
        self.group_rows: list[torch.Tensor | slice] = []
        for g in self.groups:
            first, last = self.spans[g[0]], self.spans[g[-1]]
            if last[0] + last[1] - first[0] == sum(self.spans[i][1] for i in g):
                self.group_rows.append(slice(first[0], last[0] + last[1]))
            else:
                at = [torch.arange(self.spans[i][0], sum(self.spans[i]), device=device) for i in g]
                self.group_rows.append(torch.cat(at))

    def group_mask(self, i: int, query: torch.Tensor) -> torch.Tensor | None:
        """Part ``i``'s own mask in :func:`_cascade`'s layout (every query head of a K/V head over its
        tokens; made on the first layer that asks)."""
        if i not in self._group_masks:
            mask = self.masks[i]
            rep = query.shape[1] // self.parts[i].seq.keys[0].shape[1]
            self._group_masks[i] = None if mask is None else mask.repeat(rep, 1)
        return self._group_masks[i]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> tuple[_Rows, _Rows]:
        ks, vs = [], []
        for i, (p, (off, n)) in enumerate(zip(self.parts, self.spans, strict=True)):
            s = p.seq
            k, v = s.keys[layer_idx], s.values[layer_idx]
            at = p.start - s.base
            k[:, :, at : at + n].copy_(key_states[:, :, off : off + n])
            v[:, :, at : at + n].copy_(value_states[:, :, off : off + n])
            first = s.seg_n - s.base if i in self.grouped else 0
            ks.append(k[:, :, first : at + n])
            vs.append(v[:, :, first : at + n])
        return _Rows(ks, self, layer_idx), _Rows(vs, self, layer_idx)


def _tail_mask(start: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The mask transformers gives ``n`` queries after ``start`` cached tokens alone: none for one query
    (attends to all) or for a tail with nothing before it (SDPA's own causal mask), else causal after the
    prefix. Additive (0 or -inf), as SDPA turns transformers' boolean mask before use, so each layer's call
    does not convert it again."""
    mask = _own_mask(start, n, 0, dtype, device) if start else None
    return None if mask is None else mask[None, None]


def _own_mask(
    start: int, n: int, seg_n: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """The mask of ``n`` queries at ``start`` over a sequence's K/V from position ``seg_n`` on (its own after
    its segment; all of it for 0): causal, ``n`` rows (:meth:`_StepCache.group_mask` repeats it for every
    query head of a K/V head); none for one query."""
    if n == 1:
        return None
    cols = torch.arange(seg_n, start + n, device=device)
    rows = torch.arange(start, start + n, device=device)
    mask = torch.zeros((n, start + n - seg_n), dtype=dtype, device=device)
    return mask.masked_fill_(cols[None, :] > rows[:, None], float("-inf"))


_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over ``k``/``v`` (same head count) and each query row's log-sum-exp of its scaled
    scores: torch's CPU flash-attention kernel, which SDPA itself runs on CPU, else the plain formula."""
    if _FLASH is not None and q.device.type == "cpu":
        out, lse = _FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return out, lse
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v.float()).to(q.dtype), lse


def _cascade(
    query: torch.Tensor,
    out: torch.Tensor,
    rows: torch.Tensor | slice,
    members: Sequence[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]],
    seg_k: torch.Tensor,
    seg_v: torch.Tensor,
    scale: float | None,
) -> None:
    """Attention of a group of sequences resuming from one segment (``seg_k``/``seg_v``): every member's
    queries over the segment in one call, each member's over its own K/V, the two merged by their
    log-sum-exp (the softmax over the union of the keys, as one call over the whole K/V gives up to float
    rounding). ``rows``: the group's positions in the row (a slice when they are consecutive); ``members``:
    each one's query count, own K, own V and own mask (in the layout below), in row order. Query heads
    sharing a K/V head (grouped-query attention) go in as rows of that head, so no K/V is repeated. Writes
    the group's rows of ``out``."""
    _, heads, _, dim = query.shape
    kv_heads = seg_k.shape[1]
    rep = heads // kv_heads
    q = query[:, :, rows] if isinstance(rows, slice) else query.index_select(2, rows)  # [1, H, T, D]
    total = q.shape[2]
    shared, shared_lse = _attend(q.reshape(1, kv_heads, rep * total, dim), seg_k, seg_v, None, scale)
    owns, own_lses = [], []
    t = 0
    for n, k, v, mask in members:
        o, lse = _attend(q[:, :, t : t + n].reshape(1, kv_heads, rep * n, dim), k, v, mask, scale)
        owns.append(o.view(1, kv_heads, rep, n, dim))
        own_lses.append(lse.view(1, kv_heads, rep, n))
        t += n
    own = torch.cat(owns, dim=3).view(1, kv_heads, rep * total, dim)
    own_lse = torch.cat(own_lses, dim=3).view(1, kv_heads, rep * total)
    lse = torch.logaddexp(shared_lse, own_lse)
    merged = shared.mul_(torch.exp(shared_lse - lse).unsqueeze(-1))
    merged.add_(own.mul_(torch.exp(own_lse - lse).unsqueeze(-1)))
    merged = merged.view(1, heads, total, dim).transpose(1, 2)
    if isinstance(rows, slice):
        out[:, rows].copy_(merged)
    else:
        out.index_copy_(1, rows, merged)


def _segment_for(
    live: Sequence[_Seq], prefix: KVCache, identity: tuple[str, ...], named: int
) -> tuple[_Segment | None, int]:
    """The segment of a ``live`` sequence with ``identity`` (see :func:`_identity`) that ``prefix`` (named
    over its first ``named`` positions) shares the most leading positions with (at least ``SHARE_MIN``), and
    how many: positions both name, whose ids agree."""
    best: tuple[_Segment | None, int] = (None, 0)
    seen: set[int] = set()
    for s in live:
        seg = s.segment
        if seg is None or id(seg) in seen or seg.identity != identity:
            continue
        seen.add(id(seg))
        m = min(shared_prefix(seg.token_ids, prefix.token_ids), named, seg.named)
        if m >= SHARE_MIN and m > best[1]:
            best = (seg, m)
    return best


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
    :func:`_direct_sdpa`), else that kernel as the model calls it. Groups of sequences resuming from one
    shared prefix are attended to together (:func:`_cascade`; direct SDPA only)."""
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
        for i, ((off, n), mask, k, v) in enumerate(parts):
            if i in step.grouped:
                continue
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
        for g, group in enumerate(step.groups):
            seq = step.parts[group[0]].seq
            seg = seq.segment
            assert seg is not None
            members = [
                (step.spans[i][1], key.rows[i], value.rows[i], step.group_mask(i, query)) for i in group
            ]
            seg_k = seg.keys[key.layer][:, :, : seq.seg_n]
            seg_v = seg.values[key.layer][:, :, : seq.seg_n]
            _cascade(query, out, step.group_rows[g], members, seg_k, seg_v, scale)
        return out, None
    if step.groups:
        raise EngineError("shared-prefix attention needs the model's SDPA kernel on CPU")
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
        a live sequence already reads as a segment of the same identity (:func:`_identity`: the same published
        bytes, or the same private KV of the same namespace; at least ``SHARE_MIN`` positions both name) is
        read from there in place: the buffers start after it, with the rest of the prefix copied in. Else the
        prefix is copied in whole, and becomes a segment later sequences of its identity may share (none
        when its source is unknown). ``live``: the sequences whose segments may be shared (None: the
        batch's); ``share``: whether to share (None: as probed)."""
        req, eng = seq.request, self.engine
        prefix = req.prefix
        n = prefix.n_tokens if prefix is not None else 0
        ident = _identity(req)
        shares = self._shares if share is None else share
        if prefix is not None and ident is not None and shares and n >= SHARE_MIN:
            identity, named = ident
            if live is None:
                live = (*self._active, *self._prefilling)
            seg, m = _segment_for(live, prefix, identity, named)
            if seg is None:
                seg, m = _Segment(prefix.keys, prefix.values, prefix.token_ids, identity, named), n
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
        cache = _StepCache(parts, self.engine.dtype, self.engine.device)
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

    def _forward(self, parts: Sequence[_Part], cache: _StepCache | None = None) -> torch.Tensor:
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
            cache = _StepCache(parts, eng.dtype, dev)
        with eng.lock, self._ragged():
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
        # its first positions are its prefix's bytes (a segment read in place has the same, by its identity)
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
            if not self._probe_step():
                return False
        except Exception as exc:  # a model whose forward does not take a per-call cache object
            log.warning("not batching: a probe step failed (%s); requests run one at a time", exc)
            return False
        if self.share_prefix:
            try:
                self._shares = self._probe_shared()
            except EngineError as exc:  # the model's attention cannot take the shared path
                log.info("not sharing prefixes between sequences: %s", exc)
            except Exception as exc:  # e.g. a dtype the kernel does not take: batch without sharing
                log.warning("not sharing prefixes between sequences: a probe step failed (%s)", exc)
        return True

    def _probe_step(self) -> bool:
        """A batched forward of a one-token tail after a prefix, a longer tail after a prefix and a tail from
        nothing gives each one's logits from its own forward."""
        vocab = self.engine.config.get_text_config(decoder=True).vocab_size
        cases = [([1, 2, 3], [7]), ([4, 5], [9, 11, 13]), ([], [6, 8, 10])]
        got, want, _ = self._probe_forward(
            [([t % vocab for t in prefix], [t % vocab for t in tail]) for prefix, tail in cases]
        )
        ok = all(torch.allclose(got[i].float(), w.float(), rtol=1e-3, atol=1e-3) for i, w in enumerate(want))
        if not ok:
            log.warning(
                "not batching: a batched forward of this model does not match its single-sequence one"
            )
        return ok

    def _probe_shared(self) -> bool:
        """Whether sequences reading one prefix in place (a one-token tail, a longer tail, and a sequence
        whose own buffers hold the prefix) get each one's logits from its own forward, within float rounding
        (the shared attention merges two partial softmaxes)."""
        eng = self.engine
        vocab = eng.config.get_text_config(decoder=True).vocab_size
        prefix = [(t * 37 + 11) % vocab for t in range(SHARE_MIN + 5)]
        cases = [(prefix, [t % vocab for t in tail]) for tail in ((7,), (9, 11, 13), (6, 8))]
        got, want, parts = self._probe_forward(cases, share=True)
        if len({id(p.seq.segment) for p in parts}) != 1:
            raise EngineError("the probe's sequences did not share their prefix")
        ok = all(torch.allclose(got[i].float(), w.float(), rtol=1e-4, atol=1e-4) for i, w in enumerate(want))
        # bf16/fp16: off by up to ~0.5 in SmolLM2's logits, and not bitwise however the merge is done (in
        # float32 too): the CPU flash kernel returns each part normalised and rounded, with its log-sum-exp,
        # while one call over the whole K/V keeps a float32 accumulator across its 512-key blocks and rounds
        # the probabilities to bf16 against the running maximum (docs/deploy.md, "Exactness in bf16")
        if not ok:
            worst = max(float((got[i].float() - w.float()).abs().max()) for i, w in enumerate(want))
            log.info(
                "not sharing prefixes between sequences: the shared attention's logits differ from this "
                "model's own by up to %.2g (%s)", worst, eng.dtype,
            )
        return ok

    def _probe_forward(
        self, cases: Sequence[tuple[Sequence[int], Sequence[int]]], share: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[_Part]]:
        """The probes' work: every ``(prefix ids, tail ids)`` case's last logits from its own forward and
        from one batched forward of all of them (a prefix given twice is prefilled once, one KV for both;
        ``share``: reading shared prefixes in place): (batched, own, the batch's parts)."""
        eng = self.engine
        want: list[torch.Tensor] = []
        parts: list[_Part] = []
        kvs: dict[tuple[int, ...], KVCache] = {}
        for prefix, tail in cases:
            key = tuple(prefix)
            if key and key not in kvs:
                kvs[key] = eng.prefill(key)
            kv = kvs.get(key)
            ids = tuple(tail)
            with torch.inference_mode(), eng.lock:
                out = eng.forward(eng.new_cache(kv), input_ids=torch.tensor([ids], device=eng.device))
            want.append(out.logits[0, -1])
            s = _Seq(GenerationRequest(ids, kv, GenerationParams(max_new_tokens=1)), lambda _e: None,
                     _Handle(self), 0.0)
            self._buffers(s, [p.seq for p in parts], share=share)
            parts.append(_Part(s, ids, s.n))
        with torch.inference_mode():
            got = self._forward(parts)
        return got, want, parts

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
