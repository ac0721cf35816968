"""Estimates from the file's contents (pure): prefill, local loads and registry links, and ``summary``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from .. import policy as pol
from .fitting import (
    PRIOR_DOF,
    PRIOR_SPREAD,
    SPREAD_FLOOR,
    Fit,
    fit_load,
    load_fit,
    prefill_features,
    prefill_fit,
)
from .outcomes import prediction_errors

FitOf = Callable[[str, list[tuple[Any, ...]]], "Fit | None"]


def prefill_estimate(data: dict[str, Any], profile: str, n_new: int, past: int = 0, *,
                     fit_of: FitOf | None = None) -> pol.Estimate | None:
    """Seconds to prefill ``n_new`` tokens after ``past`` cached ones, or None without samples.

    The estimate's spread is the fit's, widened when ``n_new`` or the attention work lie beyond the samples.
    ``fit_of(profile, samples)``: the fit to use (``Refits.fit``; default: a fit of exactly these samples).
    """
    samples = data["prefill"].get(profile, {}).get("samples", [])
    points = [(s[1], s[2], s[3], s[4]) for s in samples]
    fit = fit_of(profile, points) if fit_of is not None else prefill_fit(points)
    if fit is None:
        return None
    seconds, spread = fit.predict(prefill_features(n_new, past))
    measured = sum(1 for s in samples if s[4] == "m")
    return pol.Estimate(seconds, pol.MEASURED if measured else pol.PROBE, measured, rel_sd=spread)


def load_estimate(
    data: dict[str, Any], machine: str, nbytes: int, section: str = "load"
) -> pol.Estimate | None:
    """Seconds to read, check and decode ``nbytes`` of artifact from ``machine``'s local store; with
    ``section="landing"`` (``machine`` a landing key), for a fetched artifact's bytes to land (checksum,
    decode, verification, store write). None without samples."""
    samples = data[section].get(machine, {}).get("samples", [])
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
    out: dict[str, Any] = {"prefill": {}, "load": {}, "landing": {}, "links": {}, "breakers": {}}
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
    for section in ("load", "landing"):
        for key, entry in data[section].items():
            coef = fit_load([(s[1], s[2]) for s in entry["samples"]])
            out[section][key] = {"samples": len(entry["samples"]),
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
