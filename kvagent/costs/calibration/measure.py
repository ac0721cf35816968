"""Measurement routines: the first-use prefill probe, ``kvagent calibrate``'s measurements and a fresh host's
warm-up (``warm_up``), the last two both ``measure_prefill``."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from .file import CalibrationFile
from .machine import Profile

log = logging.getLogger("kvagent.calibration")

PROBE_BUDGET_S = 1.0
#: a fresh host's warm-up (``warm_up``): from-scratch prefills of these lengths, then chat tails of
#: WARMUP_TAILS tokens after the longest (what a chat about a cached document prefills); about 2 s for
#: SmolLM2-135M on 2 CPU cores
WARMUP_LENGTHS = (64, 768)
WARMUP_TAILS = (16, 64)


class CostRecords(Protocol):
    """What the measurements record into (``model.CostModel``, which imports this module): named here so
    that this module imports nothing of the cost model."""

    @property
    def calibration(self) -> CalibrationFile: ...

    @property
    def profile(self) -> Profile: ...

    def record_prefill(self, n_new: int, past: int, seconds: float, *, probe: bool = False) -> None: ...

    def record_load(self, nbytes: int, seconds: float) -> None: ...

    def record_lookup(self, url: str, seconds: float, ok: bool, error: str = "") -> None: ...

    def needs_warm_up(self) -> bool: ...


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


def measure_prefill(
    cost: CostRecords,
    engine: Any,
    lengths: Sequence[int],
    *,
    tails: Sequence[int] = (),
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[dict[str, Any]], Any]:
    """Time from-scratch prefills of ``lengths`` tokens, then continuations of ``tails`` tokens after the last
    of them (a chat's question after a cached document), each recorded as a measured sample
    (``CostModel.record_prefill``, as a live read's). One untimed forward first: a process's first pays
    one-off costs that are not what a length costs. Returns (one row per measurement, the last KV)."""
    run = engine_probe(engine)
    run(32)
    rows: list[dict[str, Any]] = []
    kv: Any = None
    for n in lengths:
        t0 = clock()
        kv = run(n)
        seconds = clock() - t0
        cost.record_prefill(n, 0, seconds)
        rows.append({"what": f"prefill {n} tokens", "seconds": seconds, "rate": f"{n / seconds:.0f} tok/s"})
    if kv is not None:
        vocab = int(getattr(engine.config, "vocab_size", 0) or 256)
        past = int(kv.n_tokens)
        for n in tails:
            ids = [(23 + 37 * i) % vocab for i in range(n)]
            t0 = clock()
            engine.prefill_from(kv, ids)
            seconds = clock() - t0
            cost.record_prefill(n, past, seconds)
            rows.append({"what": f"prefill {n} tokens after {past}", "seconds": seconds,
                         "rate": f"{n / seconds:.0f} tok/s"})
    return rows, kv


def warm_up(cost: CostRecords, engine: Any, *, lengths: Sequence[int] = WARMUP_LENGTHS,
            tails: Sequence[int] = WARMUP_TAILS) -> list[dict[str, Any]]:
    """Measure a few short forwards (``measure_prefill``) when this machine + model has no measured prefill
    sample yet (nor a fixed rate), so that a fresh host's first decision is not made on assumed constants.

    Under a file lock beside the calibration file: processes starting together (``--workers``) measure once,
    not all at the same time on the same cores. Returns the measurements (none: it had samples already).
    """
    from filelock import FileLock, Timeout

    if not cost.needs_warm_up():
        return []
    lock = FileLock(str(cost.calibration.path) + ".warmup.lock", timeout=60)
    try:
        cost.calibration.path.parent.mkdir(parents=True, exist_ok=True)
        with lock:
            if not cost.needs_warm_up():  # another process measured while this one waited
                return []
            t0 = time.perf_counter()
            rows, _kv = measure_prefill(cost, engine, lengths, tails=tails)
    except (OSError, Timeout) as exc:
        log.warning(
            "could not calibrate at start (%s): the first decisions use the assumed prefill rate", exc)
        return []
    log.info("calibrating %s: %d samples in %.1f s (%s)", cost.profile.key, len(rows),
             time.perf_counter() - t0, ", ".join(f"{r['what']}: {r['seconds'] * 1000:.0f} ms" for r in rows))
    return rows


def calibrate(
    cost: CostRecords,
    engine: Any,
    *,
    lengths: Sequence[int] = (128, 512, 1024),
    tails: Sequence[int] = (16, 64),
    scratch_dir: str | os.PathLike[str],
    registry: Any = None,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """``kvagent calibrate``: measure prefill at ``lengths`` (and ``tails`` after the longest), artifact
    loading, and a registry's round trip.

    Every measurement is recorded in the calibration file; returns one row per measurement.
    """
    from ...artifacts import format as art

    rows, kv = measure_prefill(cost, engine, lengths, tails=tails)
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

