"""The fitting maths (pure): cost features, robust identifiable least squares, outliers and spread.

``fit_model`` fits ``seconds = coef · features`` on relative error: a term enters only when the samples can
tell it apart, the fixed term never exceeds the fastest sample, outliers are left out, and every fit carries
its spread. ``prefill_fit`` and ``load_fit`` are its two uses; ``ewma`` averages a registry link's figures.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

EWMA_ALPHA = 0.3
Row = tuple[float, ...]

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
    unless they are leverage (``_reinstated``). Nothing is left out of fewer than 5 samples, nor more than a
    third of them."""
    if len(pts) < 5:  # four samples leave one degree of freedom: nothing tells an outlier from a term
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
