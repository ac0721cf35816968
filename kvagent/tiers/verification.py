"""Does a KV belong to the token ids it claims? Checks against poisoned artifacts.

A checksum proves the bytes are what the publisher sent, not that the publisher computed them from
the claimed tokens: a malicious host could serve KV for another text (a prompt-injection vector).
Modes:

* ``none``   — trust the artifact (right for the local store, which holds only what this machine computed);
* ``sample`` — (1) recompute layer 0's K and V for *every* position (they depend only on each token and
  its position: the embedding and two projections, no attention or MLP) and compare; (2) recompute all
  layers' K/V at ``probes`` random positions (the last one always) in one batched forward pass, each
  probe attending only to the artifact's own K/V before it, and compare. A probe at position p checks
  every layer at p *and*, through attention, that the earlier positions' K/V are consistent with p's;
  tampering confined to the last layer is seen only at probed positions, so a span of w tampered
  positions among n escapes with probability (1 - w/n) ** probes;
* ``full``   — recompute the whole KV and compare.

Comparisons allow for float noise between a chunked and a one-shot computation: an element fails when
``|recomputed - stored| > rtol * max|stored|`` of that tensor (``rtol`` from ``tolerance()``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..engines.hf import TransformersEngine
from ..errors import ConfigError, UnsupportedModelError
from ..kvcache.tensors import KVCache

MODES = ("none", "sample", "full")


@dataclass(frozen=True)
class VerificationReport:
    mode: str
    ok: bool
    checked_positions: int
    checked_layers: int
    max_rel_diff: float
    tolerance: float
    seconds: float
    reason: str


class _StopAfterLayer0(Exception):
    """Raised by the cache to end a forward pass once layer 0 has computed its K/V."""


#: bf16: honest KV of 1,600 tokens recomputed at 64 probes differs by up to 0.068 of a tensor's largest value
#: on a CPU whose bf16 products round with the shape of the call (oneDNN/AMX; one-pass and 256-token-chunked
#: prefills, ``benchmarks/poisoning.py --dtype bfloat16``); 3e-2 rejected half of them. Every tampering that
#: changed an answer there differed by 0.27 or more.
TOLERANCES = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 0.15}


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance between honest chunked and one-shot computations of the same KV."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])


def verify_kv(
    engine: TransformersEngine,
    kv: KVCache,
    mode: str = "sample",
    *,
    probes: int = 64,
    seed: int | None = None,
) -> VerificationReport:
    """Check that ``kv`` is the KV of ``kv.token_ids`` under ``engine``'s model."""
    if mode not in MODES:
        raise ConfigError(f"verification mode must be one of {MODES}, got {mode!r}")
    if probes < 0:
        raise ConfigError(f"probes must be >= 0, got {probes}")
    t0 = time.perf_counter()
    tol = tolerance(kv.dtype)
    if mode == "none":
        return VerificationReport(mode, True, 0, 0, 0.0, tol, 0.0, "not verified (mode none)")
    if mode == "full":
        fresh = engine.prefill(kv.token_ids.tolist())
        worst, where = _compare_layers(fresh, kv, 0, kv.n_tokens, range(len(kv.keys)))
        positions, layers = kv.n_tokens, len(kv.keys)
    else:
        worst, where = _layer0(engine, kv)
        positions, layers = kv.n_tokens, 1
        picked = probe_positions(kv.n_tokens, probes, seed)
        if worst <= tol and picked:
            diff, w = _probe(engine, kv, picked)
            positions, layers = positions + len(picked), len(kv.keys)
            if diff > worst:
                worst, where = diff, w
    ok = worst <= tol
    reason = (
        "KV matches its token ids"
        if ok
        else f"KV does not match its token ids ({where}: relative diff {worst:.3g} > {tol:g})"
    )
    return VerificationReport(mode, ok, positions, layers, worst, tol, time.perf_counter() - t0, reason)


def probe_positions(n: int, probes: int, seed: int | None) -> list[int]:
    """``probes`` distinct positions in ``[0, n)``, sorted: the last one always, the rest at random."""
    if n <= 0 or probes <= 0:
        return []
    rng = random.Random(seed)
    rest = rng.sample(range(n - 1), min(probes - 1, n - 1))
    return sorted([n - 1, *rest])


@torch.inference_mode()
def _probe(engine: TransformersEngine, kv: KVCache, positions: list[int]) -> tuple[float, str]:
    """Recompute every layer's K/V at ``positions`` from the artifact's own earlier K/V, in one pass.

    The probes are appended after the artifact's ``n`` positions with their true position ids and a
    mask letting probe i see the artifact's positions ``< positions[i]`` and itself only — exactly what
    a prefill computes at that position if the earlier K/V are honest.
    """
    n, k = kv.n_tokens, len(positions)
    pos = torch.tensor(positions, dtype=torch.long)
    allowed = torch.zeros(k, n + k, dtype=torch.bool)
    allowed[:, :n] = torch.arange(n).view(1, -1) < pos.view(-1, 1)
    allowed[torch.arange(k), n + torch.arange(k)] = True
    dtype = engine.model.dtype
    mask = torch.zeros(1, 1, k, n + k, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    cache = engine.new_cache(kv)
    engine.forward(
        cache,
        input_ids=kv.token_ids[pos].view(1, -1).to(engine.device),
        position_ids=pos.view(1, -1).to(engine.device),
        attention_mask=mask.to(engine.device),
        logits_to_keep=1,
    )
    return _worst(
        (f"layer {i} {name}, probed positions", fresh[:, :, n:].cpu(), stored[:, :, pos])
        for i, layer in enumerate(cache.layers)
        for name, fresh, stored in (("keys", layer.keys, kv.keys[i]), ("values", layer.values, kv.values[i]))
    )


@torch.inference_mode()
def _layer0(engine: TransformersEngine, kv: KVCache) -> tuple[float, str]:
    """Recompute layer 0's K/V for all positions, ending the forward pass as layer 0 hands them to its
    cache."""
    from transformers import DynamicCache

    captured: list[torch.Tensor] = []

    class _Layer0Cache(DynamicCache):
        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *a: Any, **kw: Any
        ) -> Any:
            if layer_idx == 0:
                captured.extend((key_states, value_states))
                raise _StopAfterLayer0
            return super().update(key_states, value_states, layer_idx, *a, **kw)

    try:
        engine.forward(
            _Layer0Cache(config=engine.config), input_ids=kv.token_ids.view(1, -1).to(engine.device)
        )
    except _StopAfterLayer0:
        pass
    # the engine reads every KV out of this same cache, so no supported model gets here
    if len(captured) != 2:
        raise UnsupportedModelError(
            "the model did not hand layer 0's K/V to its cache; kvagent cannot verify it"
        )
    k, v = (t.cpu() for t in captured)
    return _worst((("layer 0 keys", k, kv.keys[0]), ("layer 0 values", v, kv.values[0])))


def _compare_layers(
    fresh: KVCache, kv: KVCache, start: int, end: int, layers: Iterable[int]
) -> tuple[float, str]:
    return _worst(
        (f"layer {i} {name}, positions {start}-{end - 1}", a[:, :, start:end], b[:, :, start:end])
        for i in layers
        for name, a, b in (("keys", fresh.keys[i], kv.keys[i]), ("values", fresh.values[i], kv.values[i]))
    )


def _worst(pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]]) -> tuple[float, str]:
    """The largest :func:`_rel` difference over ``(label, recomputed, stored)`` pairs, and its label."""
    worst, where = 0.0, ""
    for label, fresh, stored in pairs:
        d = _rel(fresh, stored)
        if d > worst:
            worst, where = d, label
    return worst, where


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (inf if shapes differ or values are not finite)."""
    if a.shape != b.shape:
        return float("inf")
    a32, b32 = a.float(), b.float()
    scale = float(b32.abs().max()) if b32.numel() else 0.0
    diff = float((a32 - b32).abs().max()) if b32.numel() else 0.0
    if not (diff == diff) or diff == float("inf"):
        return float("inf")
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
