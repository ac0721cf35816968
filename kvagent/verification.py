"""Does a KV belong to the token ids it claims? Checks against poisoned artifacts.

A checksum proves the bytes are what the publisher sent, not that the publisher computed them from
the claimed tokens: a malicious host could serve KV for another text (a prompt-injection vector).
Modes:

* ``none``   — trust the artifact (right for the local store, which holds only what this machine computed);
* ``sample`` — (1) recompute layer 0's K and V for *every* position (they depend only on each token and
  its position, so one layer's work, not a prefill) and compare; (2) recompute whole chunks of tokens in
  *all* layers from the artifact's own prefix — the last chunk of the document always, plus random
  ones — and compare. A chunk attends to every earlier position, so tampering with any earlier position
  in any layer but the last shows up in the chunk's deeper layers;
* ``full``   — recompute the whole KV and compare.

Comparisons allow for float noise between a chunked and a one-shot computation: an element fails when
``|recomputed - stored| > rtol * max|stored|`` of that tensor (``rtol`` from ``tolerance()``).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from .engine import TransformersEngine
from .errors import ConfigError
from .kv import KVCache

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
    """Raised by a forward hook to end a forward pass once layer 0 has written its K/V."""


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance between honest chunked and one-shot computations of the same KV."""
    return {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}.get(dtype, 3e-2)


def verify_kv(
    engine: TransformersEngine,
    kv: KVCache,
    mode: str = "sample",
    *,
    chunks: int = 2,
    chunk_len: int = 32,
    seed: int | None = None,
) -> VerificationReport:
    """Check that ``kv`` is the KV of ``kv.token_ids`` under ``engine``'s model."""
    if mode not in MODES:
        raise ConfigError(f"verification mode must be one of {MODES}, got {mode!r}")
    t0 = time.perf_counter()
    tol = tolerance(kv.dtype)
    if mode == "none":
        return VerificationReport(mode, True, 0, 0, 0.0, tol, 0.0, "not verified (mode none)")
    worst = 0.0
    positions = 0
    if mode == "full":
        fresh = engine.prefill(kv.token_ids.tolist())
        worst, where = _compare_layers(fresh, kv, 0, kv.n_tokens, range(len(kv.keys)))
        positions = kv.n_tokens
    else:
        worst, where = _layer0(engine, kv)
        positions = kv.n_tokens
        if worst <= tol:
            for start in _chunk_starts(kv.n_tokens, chunks, chunk_len, seed):
                end = min(kv.n_tokens, start + chunk_len)
                recomputed = engine.prefill_from(kv.truncate(start), kv.token_ids[start:end].tolist())
                diff, w = _compare_layers(recomputed, kv, start, end, range(len(kv.keys)))
                positions += end - start
                if diff > worst:
                    worst, where = diff, w
                if worst > tol:
                    break
    ok = worst <= tol
    layers = len(kv.keys) if mode == "full" or positions > kv.n_tokens else 1
    reason = "KV matches its token ids" if ok else f"KV does not match its token ids ({where}: relative diff {worst:.3g} > {tol:g})"
    return VerificationReport(mode, ok, positions, layers, worst, tol, time.perf_counter() - t0, reason)


def _chunk_starts(n: int, chunks: int, chunk_len: int, seed: int | None) -> list[int]:
    """The last chunk of the document always, plus ``chunks - 1`` random ones; all start at >= 1."""
    if n < 2 or chunks <= 0:
        return []
    last = max(1, n - chunk_len)
    rng = random.Random(seed)
    starts = [last] + [rng.randint(1, last) for _ in range(max(0, chunks - 1))] if last > 1 else [last]
    return sorted(set(starts))


@torch.inference_mode()
def _layer0(engine: TransformersEngine, kv: KVCache) -> tuple[float, str]:
    """Recompute layer 0's K/V for all positions (stopping the forward pass after layer 0)."""
    from transformers import DynamicCache

    layers = engine._layers
    if not layers:
        fresh = engine.prefill(kv.token_ids.tolist())
        return _compare_layers(fresh, kv, 0, kv.n_tokens, [0])
    cache = DynamicCache(config=engine.config)

    def stop(*_: Any) -> None:
        raise _StopAfterLayer0

    hook = layers[0].register_forward_hook(stop)
    try:
        engine.model(input_ids=kv.token_ids.view(1, -1).to(engine.device), past_key_values=cache, use_cache=True)
    except _StopAfterLayer0:
        pass
    finally:
        hook.remove()
    layer = cache.layers[0]
    k, v = layer.keys, layer.values
    return max((_rel(k, kv.keys[0]), "layer 0 keys"), (_rel(v, kv.values[0]), "layer 0 values"))


def _compare_layers(fresh: KVCache, kv: KVCache, start: int, end: int, layers: Any) -> tuple[float, str]:
    worst, where = 0.0, ""
    for i in layers:
        for name, a, b in (("keys", fresh.keys[i], kv.keys[i]), ("values", fresh.values[i], kv.values[i])):
            d = _rel(a[:, :, start:end], b[:, :, start:end])
            if d > worst:
                worst, where = d, f"layer {i} {name}, positions {start}-{end - 1}"
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
