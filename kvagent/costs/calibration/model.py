"""``CostModel``: the calibration file turned into ``kvagent.costs.policy`` estimates and decisions, and the
records
that feed it (prefill, local loads, registry links, the circuit breaker's failures, outcomes)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

from .. import breaker as brk
from .. import policy as pol
from ..breaker import PROBE_LOOKUP_DEADLINE_S
from . import contents as ct
from .estimates import link_estimates, load_estimate, prefill_estimate
from .file import CalibrationFile, default_path
from .machine import Profile, machine_id
from .measure import PROBE_BUDGET_S, probe_prefill
from .outcomes import Outcome, OutcomeLog
from .refits import Refits

#: every forward is a sample: the short ones (a chat's question after a cached document, 10-50 tokens) are
#: what pin the fixed cost of one forward, which dominates them (dropping them under 32 tokens left a host
#: predicting 0.03 s for tails that took 0.1-0.2 s)
MIN_PREFILL_TOKENS = 1
MIN_LOAD_BYTES = 64 * 1024
MIN_DOWNLOAD_BYTES = 256 * 1024
T = TypeVar("T")


class CostModel:
    """Estimates for ``kvagent.costs.policy`` from the calibration file, and the records that feed it.

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
        self.outcomes = OutcomeLog(calibration)
        self._refits = Refits()  # a host asks per request: refit only when the samples moved

    @property
    def observers(self) -> list[Callable[[Outcome], None]]:
        """Called with every ``Outcome`` as it is recorded (the server feeds its Prometheus histogram)."""
        return self.outcomes.observers

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
        from ...artifacts.format import dtype_name

        profile = Profile(model_fingerprint, dtype_name(engine.dtype), machine_id(engine.device))
        return cls(CalibrationFile(default_path(cache_dir, path)), params, profile=profile,
                   num_layers=engine.layout.num_layers, verify=verify, verify_probes=verify_probes)

    # -- estimates ---------------------------------------------------------------------------
    def estimate_prefill(self, n_new: int, past: int = 0) -> pol.Estimate:
        """Seconds to prefill ``n_new`` tokens after ``past``: fixed rate > measured > probe > assumed."""
        if self.params.prefill_tokens_per_s is not None:
            return pol.Estimate(n_new / self.params.prefill_tokens_per_s, pol.FIXED)
        found = prefill_estimate(self.calibration.read(), self.profile.key, n_new, past,
                                 fit_of=self._refits.fit)
        return found or pol.Estimate(n_new / pol.ASSUMED_PREFILL_TOKENS_PER_S, pol.ASSUMED)

    def estimate_load(self, nbytes: int) -> pol.Estimate | None:
        """Seconds to read, check and decode ``nbytes`` of artifact from the local store (None: never
        measured)."""
        return load_estimate(self.calibration.read(), self.profile.machine, nbytes)

    @property
    def landing_key(self) -> str:
        """Whose landing samples these are: the model on this machine, and how fetched KV is verified."""
        return f"{self.profile.key}|verify={self.verify}"

    def estimate_landing(self, nbytes: int) -> pol.Estimate | None:
        """Seconds for ``nbytes`` of fetched artifact to land here once downloaded: checksum, decode,
        verification against its tokens and the store write (None: never measured)."""
        return load_estimate(self.calibration.read(), self.landing_key, nbytes, section="landing")

    def _verify_fraction(self, covered: int) -> float:
        """Share of a prefill that ``kvagent.tiers.verification`` spends checking a fetched KV."""
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
            found = prefill_estimate(data, self.profile.key, n, past, fit_of=self._refits.fit)
            if found is not None:
                fill["prefill_s"] = found
                if covered < n and req.rest_prefill_s is None:
                    fill["rest_prefill_s"] = prefill_estimate(
                        data, self.profile.key, n - covered, past + covered, fit_of=self._refits.fit
                    )
        if req.remote_artifact:
            nbytes = (
                req.artifact_bytes if req.artifact_bytes is not None else covered * (req.bytes_per_token or 0)
            )
            landing = (load_estimate(data, self.landing_key, nbytes, section="landing")
                       if req.load_s is None and req.verify_s is None else None)
            if landing is not None:  # measured as a whole: checksum, decode, verification, store write
                fill["load_s"], fill["verify_s"] = landing, pol.Estimate(0.0, pol.FIXED)
            if req.load_s is None and landing is None:
                fill["load_s"] = load_estimate(data, self.profile.machine, nbytes)
            if req.verify_s is None and landing is None:
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

    # -- the circuit breaker (orchestrated by kvagent.costs.breaker.RegistryBreaker) ------------------
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
        self.registry_breaker.record_failure(url, error)

    # -- records -----------------------------------------------------------------------------
    def record_prefill(self, n_new: int, past: int, seconds: float, *, probe: bool = False) -> None:
        """A prefill of ``n_new`` tokens after ``past`` cached ones took ``seconds`` (engine time)."""
        if n_new < MIN_PREFILL_TOKENS or not seconds > 0:
            return
        self._add_prefill([(n_new, past, seconds)], "p" if probe else "m")

    def record_outcome(self, outcome: Outcome) -> None:
        """A read, prompt or chat took ``outcome.actual_s`` where ``outcome.predicted_s`` was predicted.

        Observers hear of it at once; the file gets it from a background writer (batched, at most one write
        per ``OUTCOME_FLUSH_S``), so a warm read never waits for a file write. ``flush_outcomes`` writes now.
        """
        self.outcomes.record(outcome)

    def flush_outcomes(self) -> None:
        """Write the outcomes recorded so far to the calibration file."""
        self.outcomes.flush()

    def _add_prefill(self, samples: Sequence[tuple[int, int, float]], kind: str) -> None:
        now = self.calibration.clock()
        change = partial(ct.add_prefill, profile=self.profile, samples=samples, kind=kind, now=now)
        self.calibration.update(change)

    def record_load(self, nbytes: int, seconds: float) -> None:
        """Reading, checking and decoding ``nbytes`` of artifact from the local store took ``seconds``."""
        self._add_bytes_sample("load", self.profile.machine, nbytes, seconds)

    def record_landing(self, nbytes: int, seconds: float) -> None:
        """A fetched artifact of ``nbytes`` landed in ``seconds`` after its download (checksum, decode,
        verification, store write): what the next fetch's estimate adds to its transfer."""
        self._add_bytes_sample("landing", self.landing_key, nbytes, seconds)

    def _add_bytes_sample(self, section: str, key: str, nbytes: int, seconds: float) -> None:
        """Add a ``[t, bytes, seconds]`` sample to ``section``'s ``key`` (too few bytes say nothing)."""
        if nbytes < MIN_LOAD_BYTES or not seconds > 0:
            return
        now = self.calibration.clock()
        self.calibration.update(
            partial(ct.add_load, machine=key, nbytes=nbytes, seconds=seconds, now=now, section=section)
        )

    def record_lookup(self, url: str, seconds: float, ok: bool, error: str = "") -> None:
        """A metadata request to ``url`` answered in ``seconds`` (``ok``; a 404 is ok) or failed."""
        if not ok:
            self.record_failure(url, error)
            return
        self._link(url, partial(ct.link_answered, seconds=seconds))

    def record_download(self, url: str, nbytes: int, seconds: float, *, abandoned: bool = False) -> None:
        """A blob of ``nbytes`` came from ``url`` in ``seconds``: update its throughput, close its breaker.
        ``abandoned``: the first ``nbytes`` of a download given up for being slow, a throughput sample
        whatever its size (a short download otherwise measures mostly the round trip)."""
        if (nbytes < MIN_DOWNLOAD_BYTES and not abandoned) or not nbytes > 0 or not seconds > 0:
            self._link(url, lambda link: None)
            return
        self._link(url, partial(ct.link_downloaded, nbytes=nbytes, seconds=seconds))

    def _link(self, url: str, change: Callable[[dict[str, Any]], None]) -> None:
        """Update ``url``'s link figures with ``change`` (the registry answered: its breaker closes)."""
        url = url.rstrip("/")
        now = self.calibration.clock()
        if self._breaker is not None:
            self._breaker.done_probing(url)
        self.calibration.update(partial(ct.link_worked, url=url, change=change, now=now))

    # -- first use ---------------------------------------------------------------------------
    def has_history(self) -> bool:
        return self.profile.key in self.calibration.read()["prefill"]

    def needs_warm_up(self) -> bool:
        """Whether this machine + model has no measured prefill sample (probes aside) and no fixed rate: its
        next decision would rest on assumed constants or a first-use probe (see ``measure.warm_up``)."""
        if self.params.prefill_tokens_per_s is not None:
            return False
        entry = self.calibration.read()["prefill"].get(self.profile.key, {})
        return not any(s[4] == "m" for s in entry.get("samples", []))

    def ensure_probed(self, run: Callable[[int], object], budget_s: float = PROBE_BUDGET_S) -> bool:
        """Probe prefill (``run(n)`` prefills n tokens) when this machine has no history; True if it
        probed."""
        if self.params.prefill_tokens_per_s is not None or self.has_history():
            return False
        samples = probe_prefill(run, budget_s)
        self._add_prefill([(n, 0, s) for n, s in samples if s > 0], "p")
        return True
