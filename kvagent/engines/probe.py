"""Whether a model batches, probed once before its first batched request: its layers keep plain full K/V,
its attention goes through transformers' attention interface (so the ragged kernel of :mod:`.attention` can
stand in for it), and a batched forward of a few different sequences gives each one's logits from its own
forward. A second probe says whether sequences resuming from one prefix may read it in place (the shared
attention's merge is within float rounding of the model's own logits: not in bf16/fp16).

The batch engine (:mod:`.batch`) runs the batched forwards (a :data:`BatchedForward`); the probes compare
them with the model's own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import EngineError
from ..kvcache.tensors import KVCache
from .attention import register
from .hf import TransformersEngine

log = logging.getLogger("kvagent.engine")

#: one batched forward of the probe's cases, each (prefix KV or None, tail ids); ``share``: whether the
#: sequences read shared prefixes in place. Returns each case's last logits (one row per case) and how many
#: distinct segments the sequences read.
BatchedForward = Callable[[Sequence[tuple[KVCache | None, Sequence[int]]], bool], tuple[torch.Tensor, int]]


@dataclass(frozen=True)
class Batchability:
    """What the probes found: whether the model batches, and whether sequences resuming from one prefix
    read it in place."""

    batches: bool
    shares: bool = False


def probe(
    engine: TransformersEngine, batched: BatchedForward, *, share_prefix: bool, share_min: int
) -> Batchability:
    """Whether ``engine``'s model batches: plain full K/V layers, its attention through transformers'
    interface, and a batched forward of three different sequences matching each one's own forward. Then, with
    ``share_prefix``, whether sequences reading one prefix of ``share_min`` + 5 tokens in place do too."""
    from transformers.cache_utils import DynamicLayer

    impl = engine.model.config._attn_implementation
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl not in ALL_ATTENTION_FUNCTIONS:
        log.warning(
            "not batching: the model's attention %r is not in transformers' attention interface", impl
        )
        return Batchability(False)
    for mod in engine.model.modules():
        if hasattr(mod, "is_causal") and hasattr(mod, "layer_idx"):
            mod._kvagent_attention = impl
    register()
    try:
        cache = engine.new_cache(None)
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            log.warning(
                "not batching: the model keeps other state than full K/V (sliding window or recurrent)"
            )
            return Batchability(False)
        if not _probe_step(engine, batched):
            return Batchability(False)
    except Exception as exc:  # a model whose forward does not take a per-call cache object
        log.warning("not batching: a probe step failed (%s); requests run one at a time", exc)
        return Batchability(False)
    shares = False
    if share_prefix:
        try:
            shares = _probe_shared(engine, batched, share_min)
        except EngineError as exc:  # the model's attention cannot take the shared path
            log.info("not sharing prefixes between sequences: %s", exc)
        except Exception as exc:  # e.g. a dtype the kernel does not take: batch without sharing
            log.warning("not sharing prefixes between sequences: a probe step failed (%s)", exc)
    return Batchability(True, shares)


def _probe_step(engine: TransformersEngine, batched: BatchedForward) -> bool:
    """A batched forward of a one-token tail after a prefix, a longer tail after a prefix and a tail from
    nothing gives each one's logits from its own forward."""
    vocab = engine.config.get_text_config(decoder=True).vocab_size
    cases = [([1, 2, 3], [7]), ([4, 5], [9, 11, 13]), ([], [6, 8, 10])]
    got, want, _ = _probe_forward(
        engine, batched, [([t % vocab for t in prefix], [t % vocab for t in tail]) for prefix, tail in cases]
    )
    ok = all(torch.allclose(got[i].float(), w.float(), rtol=1e-3, atol=1e-3) for i, w in enumerate(want))
    if not ok:
        log.warning(
            "not batching: a batched forward of this model does not match its single-sequence one"
        )
    return ok


def _probe_shared(engine: TransformersEngine, batched: BatchedForward, share_min: int) -> bool:
    """Whether sequences reading one prefix in place (a one-token tail, a longer tail, and a sequence
    whose own buffers hold the prefix) get each one's logits from its own forward, within float rounding
    (the shared attention merges two partial softmaxes)."""
    vocab = engine.config.get_text_config(decoder=True).vocab_size
    prefix = [(t * 37 + 11) % vocab for t in range(share_min + 5)]
    cases = [(prefix, [t % vocab for t in tail]) for tail in ((7,), (9, 11, 13), (6, 8))]
    got, want, segments = _probe_forward(engine, batched, cases, share=True)
    if segments != 1:
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
            "model's own by up to %.2g (%s)", worst, engine.dtype,
        )
    return ok


def _probe_forward(
    engine: TransformersEngine,
    batched: BatchedForward,
    cases: Sequence[tuple[Sequence[int], Sequence[int]]],
    share: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """The probes' work: every ``(prefix ids, tail ids)`` case's last logits from its own forward and
    from one batched forward of all of them (a prefix given twice is prefilled once, one KV for both;
    ``share``: reading shared prefixes in place): (batched, own, the distinct segments the batch read)."""
    want: list[torch.Tensor] = []
    inputs: list[tuple[KVCache | None, Sequence[int]]] = []
    kvs: dict[tuple[int, ...], KVCache] = {}
    for prefix, tail in cases:
        key = tuple(prefix)
        if key and key not in kvs:
            kvs[key] = engine.prefill(key)
        kv = kvs.get(key)
        ids = tuple(tail)
        with torch.inference_mode(), engine.lock:
            out = engine.forward(engine.new_cache(kv), input_ids=torch.tensor([ids], device=engine.device))
        want.append(out.logits[0, -1])
        inputs.append((kv, ids))
    got, segments = batched(inputs, share)
    return got, want, segments
