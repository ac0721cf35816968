"""The calibration file's contents (pure): their shape, validation and ageing (``clean``), sample keeping, and
the changes the cost model's records make to them (applied under the file lock by ``CalibrationFile.update``).

``empty()`` is the shape: ``prefill`` samples ``[t, n_new, past, seconds, "m"|"p"]`` per profile key,
``load`` samples ``[t, bytes, seconds]`` per machine, ``landing`` samples of the same shape per profile key
and verification mode (a fetched artifact's bytes landed: checksum, decode, verification, store write),
``links`` and ``breakers`` per registry URL, and
``outcomes`` ``[t, kind, path, n_tokens, past, predicted_s, actual_s]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from .. import breaker as brk
from .fitting import ewma
from .machine import Profile

FORMAT = "kvagent-calibration"
VERSION = 1
DEFAULT_MAX_AGE_S = 14 * 86400.0
CLOCK_SLACK_S = 60.0  # a sample dated further in the future than this means the clock went back
MAX_SAMPLES = 64  # per profile, most recent kept
MAX_OUTCOMES = 512  # predicted-vs-actual records kept (newest)
OUTCOME_KINDS = ("read", "prompt", "chat")


class CorruptCalibration(ValueError):
    """The file is not a calibration file this version can trust."""


def empty() -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "updated": 0.0, "prefill": {}, "load": {}, "landing": {},
            "links": {}, "breakers": {}, "outcomes": []}


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
    return clean_until(raw, now, max_age_s)[0]


def clean_until(raw: Any, now: float, max_age_s: float = DEFAULT_MAX_AGE_S) -> tuple[dict[str, Any], float]:
    """``clean(raw, now)``, and the clock time up to which ``clean(raw, later)`` gives the same contents: the
    first time a kept entry ages out (``now`` when an entry is dated in the future: its stamp moves with the
    clock). A reader may keep the result that long instead of cleaning the same file on every read."""
    until = math.inf

    def stamp(t: float) -> float | None:
        nonlocal until
        kept = _stamp(t, now, max_age_s)
        if t > now + CLOCK_SLACK_S:
            until = min(until, now)
        elif kept is not None:
            until = min(until, t + max_age_s)
        return kept

    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CorruptCalibration("not a kvagent calibration file")
    if raw.get("version") != VERSION:
        raise CorruptCalibration(f"calibration format version {raw.get('version')!r:.20}, expected {VERSION}")
    out = empty()
    sections = {k: raw.get(k, {}) for k in ("prefill", "load", "landing", "links", "breakers")}
    if not all(isinstance(v, dict) for v in sections.values()):
        raise CorruptCalibration("a section is not a JSON object")
    for key, entry in sections["prefill"].items():
        samples = []
        for s in _samples(entry):
            if len(s) != 5 or s[4] not in ("m", "p"):
                raise CorruptCalibration("malformed prefill sample")
            t = stamp(_num(s[0]))
            n, past, secs = _num(s[1]), _num(s[2]), _num(s[3])
            if t is not None and n > 0 and past >= 0 and secs > 0:
                samples.append([t, n, past, secs, s[4]])
        if samples:
            out["prefill"][str(key)] = {**{k: str(v) for k, v in entry.items() if k != "samples"},
                                        "samples": samples[-MAX_SAMPLES:]}
    for section in ("load", "landing"):
        for key, entry in sections[section].items():
            samples = []
            for s in _samples(entry):
                if len(s) != 3:
                    raise CorruptCalibration(f"malformed {section} sample")
                t = stamp(_num(s[0]))
                nbytes, secs = _num(s[1]), _num(s[2])
                if t is not None and nbytes > 0 and secs > 0:
                    samples.append([t, nbytes, secs])
            if samples:
                out[section][str(key)] = {"samples": samples[-MAX_SAMPLES:]}
    for url, link in sections["links"].items():
        if not isinstance(link, dict):
            raise CorruptCalibration("malformed link entry")
        t = stamp(_num(link.get("t", 0.0)))
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
        t = stamp(_num(o[0]))
        n, past, predicted, actual = (_num(x) for x in o[3:])
        if t is not None and predicted > 0 and actual > 0 and n >= 0 and past >= 0:
            out["outcomes"].append([t, o[1], o[2][:40], n, past, predicted, actual])
    return out, until


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


# -- changes the cost model applies under the file lock (``CalibrationFile.update``) ----------------------
def add_prefill(
    data: dict[str, Any],
    *,
    profile: Profile,
    samples: Sequence[tuple[int, int, float]],
    kind: str,
    now: float,
) -> None:
    """Add ``(n_new, past, seconds)`` prefill samples of ``kind`` ("m" measured, "p" probe) to ``profile``."""
    entry = data["prefill"].setdefault(
        profile.key, {"model": profile.model_fingerprint, "dtype": profile.dtype, "machine": profile.machine,
                      "samples": []})
    entry["samples"] = keep_diverse(entry["samples"] + [[now, n, p, s, kind] for n, p, s in samples])


def add_load(data: dict[str, Any], *, machine: str, nbytes: int, seconds: float, now: float,
             section: str = "load") -> None:
    """Add a local-store load sample to ``machine``'s (the newest MAX_SAMPLES kept); ``section="landing"``: a
    fetched artifact's landing sample, ``machine`` then its profile key and verification mode."""
    entry = data[section].setdefault(machine, {"samples": []})
    entry["samples"] = (entry["samples"] + [[now, nbytes, seconds]])[-MAX_SAMPLES:]


def link_answered(link: dict[str, Any], *, seconds: float) -> None:
    """A metadata request over ``link`` answered in ``seconds``: its round-trip average."""
    link.update(
        rtt_s=ewma(link.get("rtt_s"), int(link.get("rtt_n", 0)), seconds),
        rtt_n=link.get("rtt_n", 0) + 1,
    )


def link_downloaded(link: dict[str, Any], *, nbytes: int, seconds: float) -> None:
    """A blob of ``nbytes`` came over ``link`` in ``seconds``: its throughput average and spread."""
    transfer_s = max(seconds - float(link.get("rtt_s", 0.0)), seconds / 2)
    n, bps = int(link.get("bps_n", 0)), nbytes / transfer_s
    dev = math.log(bps / link["bps"]) ** 2 if link.get("bps") else 0.0
    link.update(bps=ewma(link.get("bps"), n, bps), bps_n=n + 1,
                bps_lv=ewma(link.get("bps_lv") if n > 1 else None, n - 1, dev) if n else 0.0)


def link_worked(
    data: dict[str, Any], *, url: str, change: Callable[[dict[str, Any]], None], now: float
) -> None:
    """Apply ``change`` to ``url``'s link figures, date them ``now`` and close its breaker."""
    link = data["links"].setdefault(url, {})
    change(link)
    link["t"] = now
    data["breakers"].pop(url, None)
