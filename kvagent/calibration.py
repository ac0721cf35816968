"""Measured costs that outlive the process: prefill, local loads, registry links and circuit breakers.

One JSON file per machine (``<cache_dir>/calibration.json``; ``KVAGENT_CALIBRATION`` names another),
shared by every process: read without a lock (writes are atomic: temp file + ``os.replace``), changed
read-modify-write under a file lock. It holds

* prefill samples ``(new tokens, past tokens, seconds)`` per model fingerprint + dtype + machine, fitted
  as ``a + b·n + c·n·(n/2 + past)`` (attention makes prefill superlinear) by non-negative least squares
  on relative error;
* local-store load samples ``(bytes, seconds)`` per machine, fitted as ``a + b·bytes``;
* per registry URL: round-trip time and download throughput as moving averages (with the throughput's
  spread), and a circuit breaker (``kvagent.breaker``);
* outcomes: the newest ``MAX_OUTCOMES`` reads, prompts and chats, each with the path it took and the seconds
  the model predicted for it against the seconds it took (``kvagent calibrate --show`` prints the errors).

Fits are identifiable and robust (``fit_model``): a term enters only when the samples can tell it apart,
the fixed term never exceeds the fastest sample, outliers are left out, and every estimate carries its
spread. When a profile holds more than ``MAX_SAMPLES``, the oldest sample of the most common length goes
first, so a host that repeats one prompt length keeps what it measured at others.

Samples older than ``max_age_s`` are dropped; samples dated in the future (the clock went backwards) are
re-stamped to now, so they age from there. A corrupt or foreign file is ignored with a warning and rebuilt
on the next write; calibration is best-effort and never fails a read. ``CostModel`` turns all this into
``kvagent.policy`` estimates, each with its provenance.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from . import breaker as brk
from . import policy as pol
from .breaker import PROBE_LOOKUP_DEADLINE_S, PROBE_WAIT_S  # noqa: F401  (PROBE_WAIT_S: importable from here)

log = logging.getLogger("kvagent.calibration")

FORMAT = "kvagent-calibration"
VERSION = 1
DEFAULT_MAX_AGE_S = 14 * 86400.0
CLOCK_SLACK_S = 60.0  # a sample dated further in the future than this means the clock went back
MAX_SAMPLES = 64  # per profile, most recent kept
MAX_OUTCOMES = 512  # predicted-vs-actual records kept (newest)
OUTCOME_KINDS = ("read", "prompt", "chat")
MIN_PREFILL_TOKENS = 32
MIN_LOAD_BYTES = 64 * 1024
MIN_DOWNLOAD_BYTES = 256 * 1024
EWMA_ALPHA = 0.3
PROBE_BUDGET_S = 1.0
OUTCOME_FLUSH_S = 1.0  # outcomes are written to the file at most this often (in the background)

Row = tuple[float, ...]
T = TypeVar("T")


# -- fitting (pure) ----------------------------------------------------------------------------
SPREAD_FLOOR = 0.03  # no fit predicts one run better than ±3%: timers, caches and the scheduler see to that
PRIOR_SPREAD, PRIOR_DOF = 0.25, 2.0  # what a fit's spread is taken to be before its residuals say otherwise
EXTRAPOLATION_SPREAD = 0.3  # added spread per e-fold beyond the measured range of a term
MIN_TERM_SPREAD = 1.5  # two terms are told apart only when their ratio varies this much over the samples
OUTLIER_FACTOR = 2.0  # a sample this many times off the fit (and 3 robust sd) is left out of it
PROBE_WEIGHT = 0.25  # a first-use probe (no warm-up) counts this much next to a measured read


def prefill_features(n_new: float, past: float) -> Row:
    """Terms of ``seconds = a + b·n + c·n·(n/2 + past)``: fixed cost, per-token work, attention."""
    return (1.0, float(n_new), float(n_new) * (n_new / 2.0 + past))


def _solve(m: list[list[float]], v: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    k = len(v)
    a = [row[:] + [v[i]] for i, row in enumerate(m)]
    for col in range(k):
        piv = max(range(col, k), key=lambda r: abs(a[r][col]))
        if abs(a[piv][col]) < 1e-12:
            return None
        a[col], a[piv] = a[piv], a[col]
        for r in range(k):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
    return [a[i][k] / a[i][i] for i in range(k)]


@dataclass(frozen=True)
class Fit:
    """A cost fitted as ``seconds = coef · features``, with what it rests on and how far to trust it.

    ``spread`` is the log-space standard deviation of one prediction inside the measured range; ``lo``/``hi``
    bound each feature over the samples used, and predictions beyond them get wider (``predict``).
    """

    coef: Row
    spread: float
    samples: int  # samples used
    outliers: int  # samples left out as outliers
    lo: Row
    hi: Row

    def predict(self, x: Row) -> tuple[float, float]:
        """(seconds, log-space spread) at features ``x``."""
        value = sum(c * f for c, f in zip(self.coef, x, strict=True))
        beyond = 0.0
        for f, lo, hi in zip(x, self.lo, self.hi, strict=True):
            if f > 0 and lo > 0 and hi > 0:
                beyond = max(beyond, math.log(f / hi), math.log(lo / f))
        return value, math.hypot(self.spread, EXTRAPOLATION_SPREAD * beyond)


def _identifiable(cols: Sequence[int], pts: Sequence[tuple[Row, float, float]]) -> bool:
    """Whether the samples tell the terms ``cols`` apart: every pair's ratio varies by MIN_TERM_SPREAD, and
    there are at least as many distinct sample points (features binned by 25%) as terms."""
    for i, j in ((i, j) for i in cols for j in cols if i < j):
        ratios = [r[j] / r[i] for r, _, _ in pts if r[i] > 0 and r[j] > 0]
        if len(ratios) < 2 or max(ratios) < MIN_TERM_SPREAD * min(ratios):
            return False
    points = {
        tuple(round(math.log(r[j]) / math.log(1.25)) if r[j] > 0 else None for j in cols) for r, _, _ in pts
    }
    return len(points) >= len(cols)


def _solve_subset(
    pts: Sequence[tuple[Row, float, float]], cols: Sequence[int], fixed: dict[int, float], rounds: int = 3
) -> list[float] | None:
    """Weighted least squares on log error over ``cols`` (``fixed`` terms held at their values): relative
    error
    first, then ``rounds - 1`` Gauss-Newton rounds that divide by the prediction instead of the measurement,
    so that a prediction half too low weighs as much as one twice too high."""
    coef = _solve_relative(pts, cols, fixed, [y for _, y, _ in pts])
    for _ in range(rounds - 1):
        if coef is None:
            return None
        preds = [sum(c * f for c, f in zip(coef, r, strict=True)) for r, _, _ in pts]
        if not all(p > 0 for p in preds):
            break
        coef = _solve_relative(
            pts, cols, fixed, [math.sqrt(p * y) for p, (_, y, _) in zip(preds, pts, strict=True)]
        )
    return coef


def _solve_relative(
    pts: Sequence[tuple[Row, float, float]], cols: Sequence[int], fixed: dict[int, float], by: Sequence[float]
) -> list[float] | None:
    free = [j for j in cols if j not in fixed]
    width = len(pts[0][0])
    rest = [y - sum(v * r[j] for j, v in fixed.items()) for r, y, _ in pts]
    coef = [0.0] * width
    for j, held in fixed.items():
        coef[j] = held
    if free:
        scale = [max(abs(r[j]) for r, _, _ in pts) or 1.0 for j in range(width)]
        xs = [([r[j] / scale[j] / d * math.sqrt(w) for j in free], t / d * math.sqrt(w))
              for (r, _, w), t, d in zip(pts, rest, by, strict=True)]
        m = [[sum(x[i] * x[j] for x, _ in xs) for j in range(len(free))] for i in range(len(free))]
        rhs = [sum(x[i] * t for x, t in xs) for i in range(len(free))]
        sol = _solve(m, rhs)
        if sol is None or any(c < -1e-12 for c in sol):
            return None
        for j, c in zip(free, sol, strict=True):
            coef[j] = max(c, 0.0) / scale[j]
    return coef


def _log_residuals(coef: Sequence[float], pts: Sequence[tuple[Row, float, float]]) -> list[float]:
    out = []
    for r, y, _ in pts:
        pred = sum(c * f for c, f in zip(coef, r, strict=True))
        out.append(math.log(y / pred) if pred > 0 else math.inf)
    return out


def _best_fit(
    pts: Sequence[tuple[Row, float, float]],
    prefer: Sequence[Sequence[int]],
    fixed_col: int | None,
    cap: float,
) -> tuple[list[float], float, int, tuple[int, ...]] | None:
    """(coef, weighted mean squared log residual, terms) of the best identifiable subset, by a BIC-like score
    (each term must pay for itself in fit), the fixed term capped at ``cap`` seconds."""
    total_w = sum(w for _, _, w in pts)
    best: tuple[float, list[float], float, tuple[int, ...]] | None = None
    base = tuple(prefer[0]) if prefer else ()
    for cols in prefer:
        if not _identifiable(sorted(set(cols) | set(base)), pts):  # told apart from the plain rate, too
            continue
        coef = _solve_subset(pts, cols, {})
        if coef is not None and fixed_col is not None and fixed_col in cols and coef[fixed_col] > cap:
            # the fixed term never exceeds the fastest sample
            coef = _solve_subset(pts, cols, {fixed_col: cap})
        if coef is None or sum(coef) <= 0:
            continue
        res = _log_residuals(coef, pts)
        if not all(math.isfinite(r) for r in res):
            continue
        mse = sum(w * r * r for (_, _, w), r in zip(pts, res, strict=True)) / total_w
        score = total_w * math.log(mse + SPREAD_FLOOR ** 2) + len(cols) * math.log(max(total_w, 2.0))
        if best is None or score < best[0] - 1e-9:
            best = (score, coef, mse, tuple(cols))
    return None if best is None else (best[1], best[2], len(best[3]), best[3])


def _miss(coef: Sequence[float], pt: tuple[Row, float, float]) -> float:
    pred = sum(c * f for c, f in zip(coef, pt[0], strict=True))
    return math.log(pt[1] / pred) if pred > 0 else 0.0


def _inliers(
    pts: Sequence[tuple[Row, float, float]],
    prefer: Sequence[Sequence[int]],
    fixed_col: int | None,
    cap: float,
) -> list[tuple[Row, float, float]]:
    """``pts`` without its outliers, by least median of squares over a few candidate fits.

    Only the worst third of the samples (by the whole fit) can be outliers. The candidates are fits that
    leave suspects out: all of them, each one alone, and all but each one (so two outliers cannot hide by
    pulling one fit towards each other). The candidate with the smallest median miss over every sample is the
    reference; samples beyond OUTLIER_FACTOR and 3 robust standard deviations of its misses are left out,
    unless they are leverage (``_reinstated``). Nothing is left out of fewer than 4 samples, nor more than a
    third of them."""
    if len(pts) < 4:
        return list(pts)
    whole = _best_fit(pts, prefer, fixed_col, cap)
    if whole is None:
        return list(pts)
    res = _log_residuals(whole[0], pts)
    suspects = sorted(range(len(pts)), key=lambda i: -abs(res[i]))[: max(2, len(pts) // 3)]
    leave_out = [set(suspects), *({i} for i in suspects), *(set(suspects) - {i} for i in suspects)]
    best: tuple[float, list[float]] | None = None
    for out in leave_out:
        fit = _best_fit([p for j, p in enumerate(pts) if j not in out], prefer, fixed_col, cap)
        if fit is None:
            continue
        misses = [_miss(fit[0], p) for p in pts]
        score = statistics.median(abs(x) for x in misses)
        if best is None or score < best[0]:
            best = (score, misses)
    if best is None:
        return list(pts)
    res = best[1]
    med = statistics.median(res)
    mad = 1.4826 * statistics.median(abs(x - med) for x in res)
    limit = max(math.log(OUTLIER_FACTOR), 3 * mad)
    kept = [p for p, x in zip(pts, res, strict=True) if abs(x - med) <= limit]
    if len(kept) < len(pts):
        kept = _reinstated(kept, [p for p in pts if p not in kept], prefer, fixed_col, cap, limit)
    return kept if len(kept) >= max(3, len(pts) - len(pts) // 3) else list(pts)


def _reinstated(
    kept: list[tuple[Row, float, float]],
    left_out: list[tuple[Row, float, float]],
    prefer: Sequence[Sequence[int]],
    fixed_col: int | None,
    cap: float,
    limit: float,
) -> list[tuple[Row, float, float]]:
    """``kept`` plus the left-out samples that a fit including them predicts within ``limit`` without moving
    its predictions of ``kept`` (median by more than a tenth of ``limit``): a sample of a length the others
    barely cover (the only short prompts, which alone pin the fixed term) is leverage, not an outlier."""
    base = _best_fit(kept, prefer, fixed_col, cap)
    if base is None:
        return kept
    before = statistics.median(abs(_miss(base[0], p)) for p in kept)
    out = list(kept)
    for p in sorted(left_out, key=lambda q: abs(_miss(base[0], q))):
        fit = _best_fit([*out, p], prefer, fixed_col, cap)
        if fit is None or abs(_miss(fit[0], p)) > limit:
            continue
        if statistics.median(abs(_miss(fit[0], q)) for q in kept) <= before + 0.1 * limit:
            out.append(p)
    return out


def fit_model(
    rows: Sequence[Row], ys: Sequence[float], prefer: Sequence[Sequence[int]], *,
    weights: Sequence[float] | None = None, fixed_col: int | None = 0,
) -> Fit | None:
    """Fit ``y = coef · row`` (non-negative terms) on relative error, robustly and identifiably.

    Only the column subsets in ``prefer`` that the samples can tell apart (together with the first, the plain
    rate) are tried (``_identifiable``: with samples from one length, only the plain rate); the subset with
    the best BIC-like score wins, ties going to
    the earlier one. The fixed column ``fixed_col`` never exceeds the fastest sample. Samples more than
    OUTLIER_FACTOR (and 3 robust standard deviations) off the first fit are left out of a second one.
    """
    ws = list(weights) if weights is not None else [1.0] * len(ys)
    pts = [(tuple(float(x) for x in r), float(y), float(w)) for r, y, w in zip(rows, ys, ws, strict=True)
           if y > 0 and math.isfinite(y) and w > 0]
    if not pts:
        return None
    cap = min(y for _, y, _ in pts)  # the fastest sample, outlier or not
    first = _best_fit(pts, prefer, fixed_col, cap)
    if first is None:
        return None
    coef, mse, k, cols = first
    outliers = 0
    for _ in range(3):  # a few rounds: one outlier can hide another
        kept = _inliers(pts, prefer, fixed_col, cap)
        if len(kept) == len(pts):
            break
        again = _best_fit(kept, prefer, fixed_col, cap)
        if again is None:
            break
        outliers += len(pts) - len(kept)
        pts = kept
        coef, mse, k, cols = again
    total_w = sum(w for _, _, w in pts)
    dof = max(0.0, total_w - k)
    spread = max(SPREAD_FLOOR, math.sqrt((mse * total_w + PRIOR_SPREAD ** 2 * PRIOR_DOF) / (dof + PRIOR_DOF)))
    width = len(pts[0][0])
    lo = tuple(min(r[j] for r, _, _ in pts) for j in range(width))
    hi = tuple(max(r[j] for r, _, _ in pts) for j in range(width))
    return Fit(tuple(coef), spread, len(pts), outliers, lo, hi)


PREFILL_SUBSETS = ((1,), (0, 1), (1, 2), (0, 1, 2), (2,), (0, 2))  # (2,), (0, 2): when b < 0 would fit
LOAD_SUBSETS = ((1,), (0, 1))


def prefill_fit(samples: Sequence[Sequence[Any]]) -> Fit | None:
    """The prefill fit of ``(n_new, past, seconds[, kind])`` samples (probes weigh PROBE_WEIGHT), or None."""
    return _prefill_fit(tuple(tuple(s) for s in samples))


@functools.lru_cache(maxsize=16)
def _prefill_fit(samples: tuple[tuple[Any, ...], ...]) -> Fit | None:  # refitted only when the samples change
    return fit_model(
        [prefill_features(s[0], s[1]) for s in samples],
        [s[2] for s in samples],
        PREFILL_SUBSETS,
        weights=[PROBE_WEIGHT if len(s) > 3 and s[3] == "p" else 1.0 for s in samples],
    )


def fit_prefill(samples: Sequence[tuple[float, float, float]]) -> Row | None:
    """(a, b, c) from ``(n_new, past, seconds)`` samples, or None without any."""
    fit = prefill_fit(samples)
    return fit.coef if fit else None


@functools.lru_cache(maxsize=16)
def _load_fit(samples: tuple[tuple[float, float], ...]) -> Fit | None:
    return fit_model([(1.0, float(b)) for b, _ in samples], [s for _, s in samples], LOAD_SUBSETS)


def load_fit(samples: Sequence[tuple[float, float]]) -> Fit | None:
    """The fit of ``seconds = a + b·bytes`` to ``(bytes, seconds)`` samples."""
    return _load_fit(tuple((float(b), float(s)) for b, s in samples))


def fit_load(samples: Sequence[tuple[float, float]]) -> Row | None:
    """(a, b) of ``seconds = a + b·bytes`` from ``(bytes, seconds)`` samples."""
    fit = load_fit(samples)
    return fit.coef if fit else None


def ewma(old: float | None, n: int, new: float) -> float:
    """A moving average that starts at the first sample and then weighs recent ones by EWMA_ALPHA."""
    if old is None or n <= 0:
        return new
    alpha = max(EWMA_ALPHA, 1.0 / (n + 1))
    return (1 - alpha) * old + alpha * new


# -- the machine -------------------------------------------------------------------------------
def machine_id(device: Any = "cpu") -> str:
    """CPU model or GPU kind, plus the torch thread count: what prefill speed depends on besides the model."""
    import torch

    dev = torch.device(device) if not isinstance(device, torch.device) else device
    threads = torch.get_num_threads()
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}|threads={threads}"
    return f"{dev.type}:{_cpu_model()}|threads={threads}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@dataclass(frozen=True)
class Profile:
    """What a prefill sample is valid for."""

    model_fingerprint: str
    dtype: str
    machine: str

    @property
    def key(self) -> str:
        return f"{self.model_fingerprint[:16]}/{self.dtype}/{self.machine}"


def default_path(cache_dir: str | os.PathLike[str], path: str | os.PathLike[str] | None = None) -> Path:
    """``path``, else ``KVAGENT_CALIBRATION``, else ``<cache_dir>/calibration.json``."""
    chosen = path or os.environ.get("KVAGENT_CALIBRATION") or Path(cache_dir) / "calibration.json"
    return Path(chosen).expanduser()


# -- the file ----------------------------------------------------------------------------------
class CorruptCalibration(ValueError):
    """The file is not a calibration file this version can trust."""


def empty() -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "updated": 0.0, "prefill": {}, "load": {}, "links": {},
            "breakers": {}, "outcomes": []}


def _num(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise CorruptCalibration(f"{x!r:.40} is not a finite number")
    return float(x)


def _stamp(t: float, now: float, max_age_s: float) -> float | None:
    """A sample's time after ageing: None when too old, ``now`` when dated in the future."""
    if t > now + CLOCK_SLACK_S:
        return now
    return t if now - t <= max_age_s else None


def clean(raw: Any, now: float, max_age_s: float = DEFAULT_MAX_AGE_S) -> dict[str, Any]:
    """Validate a parsed file and drop what is too old; raises CorruptCalibration on a foreign shape."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CorruptCalibration("not a kvagent calibration file")
    if raw.get("version") != VERSION:
        raise CorruptCalibration(f"calibration format version {raw.get('version')!r:.20}, expected {VERSION}")
    out = empty()
    sections = {k: raw.get(k, {}) for k in ("prefill", "load", "links", "breakers")}
    if not all(isinstance(v, dict) for v in sections.values()):
        raise CorruptCalibration("a section is not a JSON object")
    for key, entry in sections["prefill"].items():
        samples = []
        for s in _samples(entry):
            if len(s) != 5 or s[4] not in ("m", "p"):
                raise CorruptCalibration("malformed prefill sample")
            t = _stamp(_num(s[0]), now, max_age_s)
            n, past, secs = _num(s[1]), _num(s[2]), _num(s[3])
            if t is not None and n > 0 and past >= 0 and secs > 0:
                samples.append([t, n, past, secs, s[4]])
        if samples:
            out["prefill"][str(key)] = {**{k: str(v) for k, v in entry.items() if k != "samples"},
                                        "samples": samples[-MAX_SAMPLES:]}
    for key, entry in sections["load"].items():
        samples = []
        for s in _samples(entry):
            if len(s) != 3:
                raise CorruptCalibration("malformed load sample")
            t = _stamp(_num(s[0]), now, max_age_s)
            nbytes, secs = _num(s[1]), _num(s[2])
            if t is not None and nbytes > 0 and secs > 0:
                samples.append([t, nbytes, secs])
        if samples:
            out["load"][str(key)] = {"samples": samples[-MAX_SAMPLES:]}
    for url, link in sections["links"].items():
        if not isinstance(link, dict):
            raise CorruptCalibration("malformed link entry")
        t = _stamp(_num(link.get("t", 0.0)), now, max_age_s)
        if t is None:
            continue
        fields = {k: _num(link[k]) for k in ("rtt_s", "rtt_n", "bps", "bps_n", "bps_lv") if k in link}
        if any(v < 0 for v in fields.values()):
            raise CorruptCalibration("negative link estimate")
        out["links"][str(url)] = {**fields, "t": t}
    for url, state in sections["breakers"].items():
        try:
            parsed = brk.BreakerState.from_json(state)
        except ValueError as exc:
            raise CorruptCalibration(str(exc)) from exc
        out["breakers"][str(url)] = parsed.to_json()  # times are bounded when used (clock may have gone back)
    outcomes = raw.get("outcomes", [])
    if not isinstance(outcomes, list):
        raise CorruptCalibration("outcomes is not a JSON list")
    for o in outcomes[-MAX_OUTCOMES:]:
        if not isinstance(o, list) or len(o) != 7 or o[1] not in OUTCOME_KINDS or not isinstance(o[2], str):
            raise CorruptCalibration("malformed outcome")
        t = _stamp(_num(o[0]), now, max_age_s)
        n, past, predicted, actual = (_num(x) for x in o[3:])
        if t is not None and predicted > 0 and actual > 0 and n >= 0 and past >= 0:
            out["outcomes"].append([t, o[1], o[2][:40], n, past, predicted, actual])
    return out


def _length_class(sample: Sequence[Any]) -> tuple[int, bool]:
    """A prefill sample's length (by powers of two) and whether it continued a cached prefix."""
    return round(math.log2(max(1.0, float(sample[1])))), float(sample[2]) > 0


def keep_diverse(samples: list[Any], limit: int = MAX_SAMPLES) -> list[Any]:
    """At most ``limit`` prefill samples (oldest first): the oldest of the most common length class goes
    first, so the lengths a host measures rarely are not pushed out by the one it repeats."""
    out = list(samples)
    while len(out) > limit:
        counts: dict[tuple[int, bool], int] = {}
        for smp in out:
            counts[_length_class(smp)] = counts.get(_length_class(smp), 0) + 1
        fullest = max(counts.values())
        del out[next(i for i, smp in enumerate(out) if counts[_length_class(smp)] == fullest)]
    return out


def _samples(entry: Any) -> list[Any]:
    if not isinstance(entry, dict) or not isinstance(entry.get("samples"), list):
        raise CorruptCalibration("an entry without a samples list")
    if not all(isinstance(s, list) for s in entry["samples"]):
        raise CorruptCalibration("a sample that is not a list")
    return list(entry["samples"])


class CalibrationFile:
    """The machine's calibration file: atomic writes, a file lock for read-modify-write, a bounded age."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        lock_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.max_age_s = max_age_s
        self.lock_timeout = lock_timeout
        self.clock = clock
        self._cache: tuple[tuple[int, int, int], Any] | None = None
        self._warned: set[tuple[int, int, int]] = set()

    def _parse(self) -> Any:
        """The file's JSON (cached by stat), None when absent."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._cache is not None and self._cache[0] == sig:
            return self._cache[1]
        try:
            raw: Any = json.loads(self.path.read_bytes())
        except (OSError, ValueError, RecursionError) as exc:
            raw = CorruptCalibration(f"unreadable JSON: {exc}")
        self._cache = (sig, raw)
        return raw

    def read(self) -> dict[str, Any]:
        """The current, aged contents; an empty calibration when the file is absent, corrupt or foreign."""
        raw = self._parse()
        if raw is None:
            return empty()
        try:
            if isinstance(raw, CorruptCalibration):
                raise raw
            return clean(raw, self.clock(), self.max_age_s)
        except CorruptCalibration as exc:
            sig = self._cache[0] if self._cache else (0, 0, 0)
            if sig not in self._warned:
                self._warned.add(sig)
                log.warning("ignoring calibration file %s (%s); it will be rebuilt from new measurements",
                            self.path, exc)
            return empty()

    def update(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Apply ``change`` to the contents under the file lock and write them back atomically."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path) + ".lock", timeout=self.lock_timeout):
                self._cache = None
                data = self.read()
                change(data)
                data["updated"] = self.clock()
                self._write(data)
                return data
        except (OSError, Timeout) as exc:
            log.warning("could not update calibration file %s (measurements of this process are lost): %s",
                        self.path, exc)
            data = self.read()
            change(data)
            return data

    def _write(self, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".calibration-", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, separators=(",", ":"))  # no fsync: losing a sample to a crash is harmless
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# -- estimates from the contents (pure) --------------------------------------------------------
def prefill_estimate(data: dict[str, Any], profile: str, n_new: int, past: int = 0) -> pol.Estimate | None:
    """Seconds to prefill ``n_new`` tokens after ``past`` cached ones, or None without samples.

    The estimate's spread is the fit's, widened when ``n_new`` or the attention work lie beyond the samples.
    """
    samples = data["prefill"].get(profile, {}).get("samples", [])
    fit = prefill_fit([(s[1], s[2], s[3], s[4]) for s in samples])
    if fit is None:
        return None
    seconds, spread = fit.predict(prefill_features(n_new, past))
    measured = sum(1 for s in samples if s[4] == "m")
    return pol.Estimate(seconds, pol.MEASURED if measured else pol.PROBE, measured, rel_sd=spread)


def load_estimate(data: dict[str, Any], machine: str, nbytes: int) -> pol.Estimate | None:
    samples = data["load"].get(machine, {}).get("samples", [])
    fit = load_fit([(s[1], s[2]) for s in samples])
    if fit is None:
        return None
    seconds, spread = fit.predict((1.0, float(nbytes)))
    return pol.Estimate(seconds, pol.MEASURED, len(samples), rel_sd=spread)


def link_estimates(data: dict[str, Any], url: str) -> tuple[pol.Estimate | None, pol.Estimate | None]:
    """(round trip seconds, download bytes/s) measured for ``url``."""
    link = data["links"].get(url.rstrip("/"))
    if not link:
        return None, None
    rtt = pol.Estimate(link["rtt_s"], pol.MEASURED, int(link["rtt_n"])) if link.get("rtt_n") else None
    bps = None
    if link.get("bps_n"):
        # spread: the variance of the log throughput, plus a prior that a few samples wash out
        n = int(link["bps_n"])
        spread = math.sqrt(
            (float(link.get("bps_lv", 0.0)) * n + PRIOR_SPREAD**2 * PRIOR_DOF) / (n + PRIOR_DOF)
        )
        bps = pol.Estimate(link["bps"], pol.MEASURED, n, rel_sd=max(SPREAD_FLOOR, spread))
    return rtt, bps


def summary(
    data: dict[str, Any], lengths: Sequence[int] = (256, 1024, 4096), recent: int = 20
) -> dict[str, Any]:
    """A machine-readable view of the contents: fits, predictions and provenance (``calibrate --json``)."""
    out: dict[str, Any] = {"prefill": {}, "load": {}, "links": {}, "breakers": {}}
    for key, entry in data["prefill"].items():
        est = {n: prefill_estimate(data, key, n) for n in lengths}
        fit = prefill_fit([(s[1], s[2], s[3], s[4]) for s in entry["samples"]])
        out["prefill"][key] = {
            "samples": len(entry["samples"]), "measured": sum(1 for s in entry["samples"] if s[4] == "m"),
            "continuations": sum(1 for s in entry["samples"] if s[2] > 0),
            "coefficients": dict(zip(("a_s", "b_s_per_token", "c_s_per_token2"), fit.coef if fit else (),
                                     strict=False)),
            "outliers": fit.outliers if fit else 0,
            "seconds": {str(n): e.value for n, e in est.items() if e},
            "spread": {str(n): e.spread for n, e in est.items() if e},
            "provenance": next((e.provenance for e in est.values() if e), "none"),
        }
    for key, entry in data["load"].items():
        coef = fit_load([(s[1], s[2]) for s in entry["samples"]])
        out["load"][key] = {"samples": len(entry["samples"]),
                            "bytes_per_s": (1 / coef[1]) if coef and coef[1] > 0 else None,
                            "fixed_s": coef[0] if coef else None}
    out["links"] = {url: dict(link) for url, link in data["links"].items()}
    out["breakers"] = {url: dict(state) for url, state in data["breakers"].items()}
    out["prediction_errors"] = prediction_errors(data["outcomes"])
    out["recent_outcomes"] = [
        {"t": o[0], "kind": o[1], "path": o[2], "tokens": int(o[3]), "past": int(o[4]), "predicted_s": o[5],
         "actual_s": o[6], "ratio": o[6] / o[5]} for o in data["outcomes"][-recent:]
    ]
    return out


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


# -- predictions checked against what they cost -----------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """One read, prompt or chat: the path it took, what the model predicted for it and what it cost."""

    kind: str  # "read" | "prompt" | "chat"
    path: str  # "local-hit" | "fetch-and-resume" | "local-prefill" | "prefix-prefill" | "tail"
    predicted_s: float
    actual_s: float
    n_tokens: int = 0  # tokens the path computed or loaded
    past: int = 0  # tokens already cached before them

    @property
    def ratio(self) -> float:
        """Actual over predicted seconds (1.0: exact; 2.0: twice as slow as predicted)."""
        return self.actual_s / self.predicted_s


def prediction_errors(outcomes: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """The distribution of actual/predicted over stored outcome rows, overall and per path."""

    def describe(ratios: list[float]) -> dict[str, Any]:
        if not ratios:
            return {"count": 0}
        q = sorted(ratios)
        pick = lambda f: q[min(len(q) - 1, int(f * len(q)))]  # noqa: E731
        return {"count": len(q), "within_2x": sum(1 for r in q if 0.5 <= r <= 2.0) / len(q),
                "median_ratio": statistics.median(q), "p10_ratio": pick(0.1), "p90_ratio": pick(0.9),
                "worst_ratio": max(q, key=lambda r: abs(math.log(r)))}

    rows = [o for o in outcomes if o[5] > 0 and o[6] > 0]
    out = describe([o[6] / o[5] for o in rows])
    out["by_path"] = {path: describe([o[6] / o[5] for o in rows if o[2] == path])
                      for path in sorted({o[2] for o in rows})}
    return out


# -- the facade the resolver uses --------------------------------------------------------------
class CostModel:
    """Estimates for ``kvagent.policy`` from the calibration file, and the records that feed it.

    ``decide`` fills the estimates a ``Request`` leaves out (fixed ``PolicyParams`` rates still win);
    ``record_*`` learn from real reads; ``breaker_open`` and ``lookup_deadline`` keep a failing or stalled
    registry cheap.
    """

    def __init__(
        self,
        calibration: CalibrationFile,
        params: pol.PolicyParams | None = None,
        *,
        profile: Profile,
        num_layers: int = 0,
        verify: str = "none",
        verify_probes: int = 64,
        breaker: brk.BreakerPolicy | None = None,
        client_timeout_s: float = pol.LOOKUP_DEADLINE_CEILING_S,
    ) -> None:
        self.calibration = calibration
        self.params = params if params is not None else pol.PolicyParams()
        self.profile = profile
        self.num_layers = num_layers
        self.verify = verify
        self.verify_probes = verify_probes
        self.breaker = breaker if breaker is not None else brk.BreakerPolicy()
        self.client_timeout_s = client_timeout_s
        self._breaker: brk.RegistryBreaker | None = None
        #: called with every ``Outcome`` as it is recorded (the server feeds its Prometheus histogram)
        self.observers: list[Callable[[Outcome], None]] = []
        self._outcomes: list[list[Any]] = []
        self._outcome_lock = threading.Lock()
        self._writer: threading.Thread | None = None

    @classmethod
    def for_engine(
        cls,
        engine: Any,
        model_fingerprint: str,
        *,
        cache_dir: str | os.PathLike[str],
        params: pol.PolicyParams | None = None,
        path: str | os.PathLike[str] | None = None,
        verify: str = "sample",
        verify_probes: int = 64,
    ) -> CostModel:
        """A CostModel for a ``TransformersEngine`` (its dtype, device and layers) on this machine."""
        from .artifact import dtype_name

        profile = Profile(model_fingerprint, dtype_name(engine.dtype), machine_id(engine.device))
        return cls(CalibrationFile(default_path(cache_dir, path)), params, profile=profile,
                   num_layers=engine.layout.num_layers, verify=verify, verify_probes=verify_probes)

    # -- estimates ---------------------------------------------------------------------------
    def estimate_prefill(self, n_new: int, past: int = 0) -> pol.Estimate:
        """Seconds to prefill ``n_new`` tokens after ``past``: fixed rate > measured > probe > assumed."""
        if self.params.prefill_tokens_per_s is not None:
            return pol.Estimate(n_new / self.params.prefill_tokens_per_s, pol.FIXED)
        found = prefill_estimate(self.calibration.read(), self.profile.key, n_new, past)
        return found or pol.Estimate(n_new / pol.ASSUMED_PREFILL_TOKENS_PER_S, pol.ASSUMED)

    def estimate_load(self, nbytes: int) -> pol.Estimate | None:
        """Seconds to read, check and decode ``nbytes`` of artifact from the local store (None: never
        measured)."""
        return load_estimate(self.calibration.read(), self.profile.machine, nbytes)

    def _verify_fraction(self, covered: int) -> float:
        """Share of a prefill that ``kvagent.verification`` spends checking a fetched KV."""
        if self.verify == "full":
            return 1.0
        if self.verify != "sample" or covered <= 0:
            return 0.0
        return min(1.0, 1.0 / max(1, self.num_layers) + self.verify_probes / covered)

    def decide(self, req: pol.Request, *, url: str | None = None, past: int = 0,
               params: pol.PolicyParams | None = None) -> pol.Decision:
        """``policy.decide`` with the estimates ``req`` leaves out filled from the calibration.

        ``url``: the registry consulted (its link estimates); ``past``: tokens already cached locally
        before the request's ``n_tokens`` (they make the remaining prefill dearer); ``params``: this
        decision's settings (e.g. with the budget left), default the model's own.
        """
        data = self.calibration.read()
        n = req.n_tokens
        covered = min(n, req.remote_tokens if req.remote_tokens is not None else n)
        fill: dict[str, Any] = {}
        if req.prefill_s is None and req.prefill_tokens_per_s is None:
            found = prefill_estimate(data, self.profile.key, n, past)
            if found is not None:
                fill["prefill_s"] = found
                if covered < n and req.rest_prefill_s is None:
                    fill["rest_prefill_s"] = prefill_estimate(
                        data, self.profile.key, n - covered, past + covered
                    )
        if req.remote_artifact:
            nbytes = (
                req.artifact_bytes if req.artifact_bytes is not None else covered * (req.bytes_per_token or 0)
            )
            if req.load_s is None:
                fill["load_s"] = load_estimate(data, self.profile.machine, nbytes)
            if req.verify_s is None:
                base = (self.estimate_prefill(covered) if req.prefill_tokens_per_s is None
                        else pol.Estimate(covered / req.prefill_tokens_per_s, pol.MEASURED))
                fill["verify_s"] = base.scaled(self._verify_fraction(covered))
        if url is not None:
            rtt, bps = link_estimates(data, url)
            if req.link_rtt_s is None:
                fill["link_rtt_s"] = rtt
            if req.link_bytes_per_s is None:
                fill["link_bytes_per_s"] = bps
        return pol.decide(replace(req, **fill), params if params is not None else self.params)

    def lookup_deadline(self, n_tokens: int, url: str | None = None) -> float:
        """Seconds to wait for registry metadata before prefilling ``n_tokens`` instead."""
        rtt = link_estimates(self.calibration.read(), url)[0] if url else None
        deadline = pol.lookup_deadline(
            self.estimate_prefill(n_tokens).value,
            rtt_s=rtt.value if rtt else None,
            ceiling=self.client_timeout_s,
        )
        if url is not None and self._breaker is not None and self._breaker.probing(url):
            deadline = min(deadline, PROBE_LOOKUP_DEADLINE_S)
        return deadline

    # -- the circuit breaker (orchestrated by kvagent.breaker.RegistryBreaker) ------------------
    @property
    def registry_breaker(self) -> brk.RegistryBreaker:
        """The circuit breaker over this model's calibration file (one per CostModel)."""
        if self._breaker is None:
            self._breaker = brk.RegistryBreaker(self)
        return self._breaker

    def breaker_open(self, url: str) -> str | None:
        """Why ``url`` must be skipped now, or None to go ahead (see ``RegistryBreaker.skip_reason``)."""
        return self.registry_breaker.skip_reason(url)

    def guarded_lookup(self, url: str, n_tokens: int, call: Callable[[float], T]) -> T:
        """``call(deadline_s)`` under ``url``'s breaker (see ``RegistryBreaker.guarded``)."""
        return self.registry_breaker.guarded(url, n_tokens, call)

    def record_failure(self, url: str, error: str = "") -> None:
        """The registry at ``url`` failed (unreachable, timed out, 5xx): open or extend its breaker."""
        url = url.rstrip("/")
        now = self.calibration.clock()
        if self._breaker is not None:
            self._breaker.done_probing(url)

        def change(data: dict[str, Any]) -> None:
            raw = data["breakers"].get(url)
            state = brk.sanitize(brk.BreakerState.from_json(raw), now, self.breaker) if raw else None
            data["breakers"][url] = brk.on_failure(state, now, self.breaker, error).to_json()

        data = self.calibration.update(change)
        skip = float(data["breakers"][url]["open_until"]) - now
        log.warning("registry %s failed (%s); skipping it for %.0f s", url, error or "error", skip)

    # -- records -----------------------------------------------------------------------------
    def record_prefill(self, n_new: int, past: int, seconds: float, *, probe: bool = False) -> None:
        """A prefill of ``n_new`` tokens after ``past`` cached ones took ``seconds`` (engine time)."""
        if n_new < MIN_PREFILL_TOKENS or not seconds > 0:
            return
        self._add_prefill([(n_new, past, seconds)], "p" if probe else "m")

    def record_outcome(self, outcome: Outcome) -> None:
        """A read, prompt or chat took ``outcome.actual_s`` where ``outcome.predicted_s`` was predicted.

        Observers hear of it at once; the file gets it from a background writer (batched, at most one write
        per
        ``OUTCOME_FLUSH_S``), so a warm read never waits for a file write. ``flush_outcomes`` writes now.
        """
        if not (outcome.predicted_s > 0 and outcome.actual_s > 0 and outcome.kind in OUTCOME_KINDS):
            return
        for observe in list(self.observers):
            try:
                observe(outcome)
            except Exception:  # an observer (metrics) never fails a read
                log.exception("an outcome observer failed")
        row = [self.calibration.clock(), outcome.kind, outcome.path, outcome.n_tokens, outcome.past,
               outcome.predicted_s, outcome.actual_s]
        with self._outcome_lock:
            self._outcomes.append(row)
            del self._outcomes[:-MAX_OUTCOMES]
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_outcomes, daemon=True, name="kvagent-outcomes"
                )
                self._writer.start()

    def _write_outcomes(self) -> None:
        while True:
            time.sleep(OUTCOME_FLUSH_S)
            self.flush_outcomes()
            with self._outcome_lock:
                if not self._outcomes:
                    self._writer = None
                    return

    def flush_outcomes(self) -> None:
        """Write the outcomes recorded so far to the calibration file."""
        with self._outcome_lock:
            rows, self._outcomes = self._outcomes, []
        if rows:
            def change(data: dict[str, Any]) -> None:
                data["outcomes"] = (data["outcomes"] + rows)[-MAX_OUTCOMES:]

            self.calibration.update(change)

    def _add_prefill(self, samples: Sequence[tuple[int, int, float]], kind: str) -> None:
        now = self.calibration.clock()
        prof = self.profile

        def change(data: dict[str, Any]) -> None:
            entry = data["prefill"].setdefault(
                prof.key, {"model": prof.model_fingerprint, "dtype": prof.dtype, "machine": prof.machine,
                           "samples": []})
            entry["samples"] = keep_diverse(entry["samples"] + [[now, n, p, s, kind] for n, p, s in samples])

        self.calibration.update(change)

    def record_load(self, nbytes: int, seconds: float) -> None:
        """Reading, checking and decoding ``nbytes`` of artifact from the local store took ``seconds``."""
        if nbytes < MIN_LOAD_BYTES or not seconds > 0:
            return
        now, machine = self.calibration.clock(), self.profile.machine

        def change(data: dict[str, Any]) -> None:
            entry = data["load"].setdefault(machine, {"samples": []})
            entry["samples"] = (entry["samples"] + [[now, nbytes, seconds]])[-MAX_SAMPLES:]

        self.calibration.update(change)

    def record_lookup(self, url: str, seconds: float, ok: bool, error: str = "") -> None:
        """A metadata request to ``url`` answered in ``seconds`` (``ok``; a 404 is ok) or failed."""
        if not ok:
            self.record_failure(url, error)
            return
        self._link(
            url,
            lambda link: link.update(
                rtt_s=ewma(link.get("rtt_s"), int(link.get("rtt_n", 0)), seconds),
                rtt_n=link.get("rtt_n", 0) + 1,
            ),
        )

    def record_download(self, url: str, nbytes: int, seconds: float) -> None:
        """A blob of ``nbytes`` came from ``url`` in ``seconds``: update its throughput, close its breaker."""
        if nbytes < MIN_DOWNLOAD_BYTES or not seconds > 0:
            self._link(url, lambda link: None)
            return

        def change(link: dict[str, Any]) -> None:
            transfer_s = max(seconds - float(link.get("rtt_s", 0.0)), seconds / 2)
            n, bps = int(link.get("bps_n", 0)), nbytes / transfer_s
            dev = math.log(bps / link["bps"]) ** 2 if link.get("bps") else 0.0
            link.update(bps=ewma(link.get("bps"), n, bps), bps_n=n + 1,
                        bps_lv=ewma(link.get("bps_lv") if n > 1 else None, n - 1, dev) if n else 0.0)

        self._link(url, change)

    def _link(self, url: str, change: Callable[[dict[str, Any]], None]) -> None:
        url = url.rstrip("/")
        now = self.calibration.clock()
        if self._breaker is not None:
            self._breaker.done_probing(url)

        def apply(data: dict[str, Any]) -> None:
            link = data["links"].setdefault(url, {})
            change(link)
            link["t"] = now
            data["breakers"].pop(url, None)

        self.calibration.update(apply)

    # -- first use ---------------------------------------------------------------------------
    def has_history(self) -> bool:
        return self.profile.key in self.calibration.read()["prefill"]

    def ensure_probed(self, run: Callable[[int], object], budget_s: float = PROBE_BUDGET_S) -> bool:
        """Probe prefill (``run(n)`` prefills n tokens) when this machine has no history; True if it
        probed."""
        if self.params.prefill_tokens_per_s is not None or self.has_history():
            return False
        samples = probe_prefill(run, budget_s)
        self._add_prefill([(n, 0, s) for n, s in samples if s > 0], "p")
        return True


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
    from . import artifact as art

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


__all__ = [
    "CalibrationFile", "CostModel", "Fit", "Outcome", "Profile", "calibrate", "default_path", "engine_probe",
    "fit_load", "fit_model", "fit_prefill", "keep_diverse", "machine_id", "prediction_errors", "prefill_fit",
    "probe_prefill", "summary",
]
