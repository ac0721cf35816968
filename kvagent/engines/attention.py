"""The batched forward's attention kernel: each sequence of one row of tokens attended to on its own K/V.

The batch engine (:mod:`.batch`) runs one model call per step over one row of tokens from several sequences.
While that call runs, the model's attention is switched to the ``kvagent_ragged`` kind (:func:`ragged`,
registered with transformers' attention interface by :func:`register`), which attends each sequence's queries
to that sequence's own keys and values through the model's usual kernel (transformers' SDPA is called as
``torch``'s SDPA directly, bit for bit the same), with the mask that sequence would get alone (none for one
token, causal for a tail with nothing before it, causal after the prefix otherwise): no padding, each token
at its own position. :class:`StepCache` is the cache the model gets for that call: it writes each sequence's
new K/V into its buffers in place and hands the attention every sequence's K/V so far (views, no copy).

Sequences that resume from one prefix KV read it in place (a segment): each step attends every member's
queries to the shared prefix in one call, then each member's to its own K/V, merging the two partial
softmaxes by their log-sum-exp (:func:`_cascade`). The merge equals one call over the whole K/V up to float
rounding, not bit for bit (see :mod:`.batch` for when a sequence is attended to so).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from ..errors import EngineError

RAGGED = "kvagent_ragged"


class SegmentKV(Protocol):
    """A prefix K/V that a group of sequences reads in place (per layer)."""

    @property
    def keys(self) -> Sequence[torch.Tensor]: ...

    @property
    def values(self) -> Sequence[torch.Tensor]: ...


class SequenceKV(Protocol):
    """What the kernel reads of a sequence: its K/V buffers per layer (their first slot at position
    ``base``), the segment it reads in place (None: its buffers hold all its K/V) and how many of the
    segment's positions it reads (``seg_n``)."""

    @property
    def keys(self) -> Sequence[torch.Tensor]: ...

    @property
    def values(self) -> Sequence[torch.Tensor]: ...

    @property
    def segment(self) -> SegmentKV | None: ...

    @property
    def seg_n(self) -> int: ...

    @property
    def base(self) -> int: ...


class StepPart(Protocol):
    """A sequence's ``ids`` in one batched forward, written into its buffers from position ``start``."""

    @property
    def seq(self) -> SequenceKV: ...

    @property
    def ids(self) -> Sequence[int]: ...

    @property
    def start(self) -> int: ...


class _Rows:
    """Per-part K (or V) views of one layer, handed from the step's cache to the ragged attention: a plain
    part's whole K/V so far, a shared-prefix part's own K/V after its segment."""

    __slots__ = ("layer", "rows", "step")

    def __init__(self, rows: list[torch.Tensor], step: StepCache, layer: int) -> None:
        self.rows = rows
        self.step = step
        self.layer = layer


class StepCache:
    """The cache a batched forward passes to the model: writes each part's new K/V into its sequence's
    buffer and returns every part's K/V so far (views, no copy). Parts of sequences that read one segment
    (same prefix length) form a group attended to in one call (:func:`_cascade`); a sequence alone on its
    segment whose buffers hold its whole K/V is attended to plainly, as it would be without sharing."""

    def __init__(self, parts: Sequence[StepPart], dtype: torch.dtype, device: torch.device) -> None:
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
    its segment; all of it for 0): causal, ``n`` rows (:meth:`StepCache.group_mask` repeats it for every
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


def register() -> None:
    """Make the ragged attention known to transformers' attention interface, as ``kvagent_ragged``."""
    from transformers import AttentionInterface

    AttentionInterface.register(RAGGED, _ragged_attention)



@contextmanager
def ragged(model: Any) -> Iterator[None]:
    """``model``'s attention switched to the ragged kind for one call (under the engine lock)."""
    cfg = model.config
    before = cfg._attn_implementation
    cfg._attn_implementation = RAGGED
    try:
        yield
    finally:
        cfg._attn_implementation = before
