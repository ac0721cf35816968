"""Measurement routines: the first-use prefill probe and ``kvagent calibrate``'s measurements."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .model import CostModel

PROBE_BUDGET_S = 1.0


def probe_prefill(run: Callable[[int], object], budget_s: float = PROBE_BUDGET_S,
                  clock: Callable[[], float] = time.perf_counter) -> list[tuple[int, float]]:
    """Time ``run(n)`` (a prefill of n tokens) at 32 tokens, then at a longer length if ``budget_s`` allows.

    No warm-up: a new process's first prefill pays the same one-off costs, and real reads replace
    probe samples soon.
    """
    t0 = clock()
    run(32)
    samples = [(32, clock() - t0)]
    left = budget_s - samples[0][1]
    per_token = samples[0][1] / 32
    n = int(min(1024, 0.5 * left / per_token))
    if n >= 64:
        s = clock()
        run(n)
        samples.append((n, clock() - s))
    return samples


def engine_probe(engine: Any) -> Callable[[int], object]:
    """``run(n)`` for ``probe_prefill``: prefill n arbitrary in-vocabulary token ids on ``engine``."""
    vocab = int(getattr(engine.config, "vocab_size", 0) or 256)

    def run(n: int) -> object:
        return engine.prefill([(17 + 31 * i) % vocab for i in range(n)])

    return run


def calibrate(
    cost: CostModel,
    engine: Any,
    *,
    lengths: Sequence[int] = (128, 512, 1024),
    scratch_dir: str | os.PathLike[str],
    registry: Any = None,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """``kvagent calibrate``: measure prefill at ``lengths``, artifact loading, and a registry's round trip.

    Every measurement is recorded in the calibration file; returns one row per measurement.
    """
    from .. import artifact as art

    run = engine_probe(engine)
    run(32)  # one-off costs of the first forward pass are not what a length costs
    rows: list[dict[str, Any]] = []
    kv: Any = None
    for n in lengths:
        t0 = time.perf_counter()
        kv = run(n)
        seconds = time.perf_counter() - t0
        cost.record_prefill(n, 0, seconds)
        rows.append({"what": f"prefill {n} tokens", "seconds": seconds, "rate": f"{n / seconds:.0f} tok/s"})
    if kv is not None:
        zero = "0" * 64
        _header, blob = art.encode(kv, model_fingerprint=zero, tokenizer_fingerprint=zero, template_hash=zero)
        path = Path(scratch_dir) / "calibration-probe.kv"
        path.write_bytes(blob)
        try:
            for _ in range(repeats):
                t0 = time.perf_counter()
                art.decode(path.read_bytes())
                seconds = time.perf_counter() - t0
                cost.record_load(len(blob), seconds)
            rows.append({"what": f"load {len(blob) / 1e6:.1f} MB artifact", "seconds": seconds,
                         "rate": f"{len(blob) / seconds / 1e6:.0f} MB/s"})
        finally:
            path.unlink(missing_ok=True)
    if registry is not None:
        for _ in range(repeats):
            t0 = time.perf_counter()
            ok = registry.healthy()
            seconds = time.perf_counter() - t0
            cost.record_lookup(registry.base_url, seconds, ok, "" if ok else "health check failed")
        rows.append({"what": f"round trip to {registry.base_url}", "seconds": seconds,
                     "rate": "ok" if ok else "FAILED"})
    return rows

