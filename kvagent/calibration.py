"""Measured costs that outlive the process: prefill, local loads, registry links and circuit breakers.

One JSON file per machine (``<cache_dir>/calibration.json``; ``KVAGENT_CALIBRATION`` names another),
shared by every process: read without a lock (writes are atomic: temp file + ``os.replace``), changed
read-modify-write under a file lock. It holds

* prefill samples ``(new tokens, past tokens, seconds)`` per model fingerprint + dtype + machine, fitted
  as ``a + b·n + c·n·(n/2 + past)`` (attention makes prefill superlinear) by non-negative least squares
  on relative error;
* local-store load samples ``(bytes, seconds)`` per machine, fitted as ``a + b·bytes``;
* per registry URL: round-trip time and download throughput as moving averages, and a circuit breaker
  (``kvagent.breaker``).

Samples older than ``max_age_s`` are dropped; samples dated in the future (the clock went backwards) are
re-stamped to now, so they age from there. A corrupt or foreign file is ignored with a warning and rebuilt
on the next write; calibration is best-effort and never fails a read. ``CostModel`` turns all this into
``kvagent.policy`` estimates, each with its provenance.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import tempfile
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
MIN_PREFILL_TOKENS = 32
MIN_LOAD_BYTES = 64 * 1024
MIN_DOWNLOAD_BYTES = 256 * 1024
EWMA_ALPHA = 0.3
PROBE_BUDGET_S = 1.0

Row = tuple[float, ...]
T = TypeVar("T")


# -- fitting (pure) ----------------------------------------------------------------------------
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


def fit_nonneg(rows: Sequence[Row], ys: Sequence[float], prefer: Sequence[Sequence[int]]) -> Row | None:
    """Non-negative least squares on relative error over the column subsets in ``prefer``.

    Each subset is solved exactly (columns scaled to 1); those with a negative coefficient are skipped;
    the smallest mean squared relative error wins, ties going to the earlier subset (so one sample fits
    a plain rate, not a quadratic).
    """
    pts = [(r, y) for r, y in zip(rows, ys, strict=True) if y > 0]
    if not pts:
        return None
    width = len(pts[0][0])
    scale = [max(abs(r[j]) for r, _ in pts) or 1.0 for j in range(width)]
    xs = [[r[j] / scale[j] / y for j in range(width)] for r, y in pts]  # divide by y: relative error
    best: tuple[float, Row] | None = None
    for cols in prefer:
        m = [[sum(x[i] * x[j] for x in xs) for j in cols] for i in cols]
        v = [sum(x[i] for x in xs) for i in cols]
        sol = _solve(m, v)
        if sol is None or any(c < -1e-12 for c in sol):
            continue
        coef = [0.0] * width
        for j, c in zip(cols, sol, strict=True):
            coef[j] = max(c, 0.0)
        err = sum((sum(c * xj for c, xj in zip(coef, x, strict=True)) - 1.0) ** 2 for x in xs) / len(xs)
        if best is None or err < best[0] - 1e-9:
            best = (err, tuple(c / s for c, s in zip(coef, scale, strict=True)))
    return best[1] if best else None


PREFILL_SUBSETS = ((1,), (0, 1), (1, 2), (0, 1, 2), (2,), (0, 2), (0,))
LOAD_SUBSETS = ((1,), (0, 1), (0,))


def fit_prefill(samples: Sequence[tuple[float, float, float]]) -> Row | None:
    """(a, b, c) from ``(n_new, past, seconds)`` samples, or None without any."""
    return fit_nonneg([prefill_features(n, p) for n, p, _ in samples], [s for *_, s in samples], PREFILL_SUBSETS)


def fit_load(samples: Sequence[tuple[float, float]]) -> Row | None:
    """(a, b) of ``seconds = a + b·bytes`` from ``(bytes, seconds)`` samples."""
    return fit_nonneg([(1.0, float(b)) for b, _ in samples], [s for _, s in samples], LOAD_SUBSETS)


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
            "breakers": {}}


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
        fields = {k: _num(link[k]) for k in ("rtt_s", "rtt_n", "bps", "bps_n") if k in link}
        if any(v < 0 for v in fields.values()):
            raise CorruptCalibration("negative link estimate")
        out["links"][str(url)] = {**fields, "t": t}
    for url, state in sections["breakers"].items():
        try:
            parsed = brk.BreakerState.from_json(state)
        except ValueError as exc:
            raise CorruptCalibration(str(exc)) from exc
        out["breakers"][str(url)] = parsed.to_json()  # times are bounded when used (clock may have gone back)
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
    """Seconds to prefill ``n_new`` tokens after ``past`` cached ones, or None without samples."""
    samples = data["prefill"].get(profile, {}).get("samples", [])
    coef = fit_prefill([(s[1], s[2], s[3]) for s in samples])
    if coef is None:
        return None
    seconds = sum(c * f for c, f in zip(coef, prefill_features(n_new, past), strict=True))
    measured = sum(1 for s in samples if s[4] == "m")
    return pol.Estimate(seconds, pol.MEASURED if measured else pol.PROBE, measured)


def load_estimate(data: dict[str, Any], machine: str, nbytes: int) -> pol.Estimate | None:
    samples = data["load"].get(machine, {}).get("samples", [])
    coef = fit_load([(s[1], s[2]) for s in samples])
    if coef is None:
        return None
    return pol.Estimate(coef[0] + coef[1] * nbytes, pol.MEASURED, len(samples))


def link_estimates(data: dict[str, Any], url: str) -> tuple[pol.Estimate | None, pol.Estimate | None]:
    """(round trip seconds, download bytes/s) measured for ``url``."""
    link = data["links"].get(url.rstrip("/"))
    if not link:
        return None, None
    rtt = pol.Estimate(link["rtt_s"], pol.MEASURED, int(link["rtt_n"])) if link.get("rtt_n") else None
    bps = pol.Estimate(link["bps"], pol.MEASURED, int(link["bps_n"])) if link.get("bps_n") else None
    return rtt, bps


def summary(data: dict[str, Any], lengths: Sequence[int] = (256, 1024, 4096)) -> dict[str, Any]:
    """A machine-readable view of the contents: fits, predictions and provenance (``calibrate --json``)."""
    out: dict[str, Any] = {"prefill": {}, "load": {}, "links": {}, "breakers": {}}
    for key, entry in data["prefill"].items():
        est = {n: prefill_estimate(data, key, n) for n in lengths}
        coef = fit_prefill([(s[1], s[2], s[3]) for s in entry["samples"]])
        out["prefill"][key] = {
            "samples": len(entry["samples"]), "measured": sum(1 for s in entry["samples"] if s[4] == "m"),
            "coefficients": dict(zip(("a_s", "b_s_per_token", "c_s_per_token2"), coef or (), strict=False)),
            "seconds": {str(n): e.value for n, e in est.items() if e},
            "provenance": next((e.provenance for e in est.values() if e), "none"),
        }
    for key, entry in data["load"].items():
        coef = fit_load([(s[1], s[2]) for s in entry["samples"]])
        out["load"][key] = {"samples": len(entry["samples"]),
                            "bytes_per_s": (1 / coef[1]) if coef and coef[1] > 0 else None,
                            "fixed_s": coef[0] if coef else None}
    out["links"] = {url: dict(link) for url, link in data["links"].items()}
    out["breakers"] = {url: dict(state) for url, state in data["breakers"].items()}
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
                    fill["rest_prefill_s"] = prefill_estimate(data, self.profile.key, n - covered, past + covered)
        if req.remote_artifact:
            nbytes = req.artifact_bytes if req.artifact_bytes is not None else covered * (req.bytes_per_token or 0)
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
            self.estimate_prefill(n_tokens).value, rtt_s=rtt.value if rtt else None, ceiling=self.client_timeout_s
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

    def _add_prefill(self, samples: Sequence[tuple[int, int, float]], kind: str) -> None:
        now = self.calibration.clock()
        prof = self.profile

        def change(data: dict[str, Any]) -> None:
            entry = data["prefill"].setdefault(
                prof.key, {"model": prof.model_fingerprint, "dtype": prof.dtype, "machine": prof.machine,
                           "samples": []})
            entry["samples"] = (entry["samples"] + [[now, n, p, s, kind] for n, p, s in samples])[-MAX_SAMPLES:]

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
        self._link(url, lambda link: link.update(
            rtt_s=ewma(link.get("rtt_s"), int(link.get("rtt_n", 0)), seconds), rtt_n=link.get("rtt_n", 0) + 1))

    def record_download(self, url: str, nbytes: int, seconds: float) -> None:
        """A blob of ``nbytes`` came from ``url`` in ``seconds``: update its throughput, close its breaker."""
        if nbytes < MIN_DOWNLOAD_BYTES or not seconds > 0:
            self._link(url, lambda link: None)
            return

        def change(link: dict[str, Any]) -> None:
            transfer_s = max(seconds - float(link.get("rtt_s", 0.0)), seconds / 2)
            link.update(bps=ewma(link.get("bps"), int(link.get("bps_n", 0)), nbytes / transfer_s),
                        bps_n=link.get("bps_n", 0) + 1)

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
        """Probe prefill (``run(n)`` prefills n tokens) when this machine has no history; True if it probed."""
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
    "CalibrationFile", "CostModel", "Profile", "calibrate", "default_path", "engine_probe", "fit_load", "fit_prefill",
    "machine_id", "probe_prefill", "summary",
]
