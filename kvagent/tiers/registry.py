"""The registry tier: published artifacts, found, priced, bought, measured, verified and disputed.

A :class:`RegistrySource` answers lookups and fetches (``ClientSource``: the HTTP registry of the SDK;
``kvagent.server.source.ServerSource``: the server's own metadata). :class:`RegistryTier` holds what
outlives one read: the money spent, the measured bandwidth per registry, the artifacts already verified
against their tokens, and the circuit breaker; ``consult`` answers one lookup with a candidate that covers
more than the local tiers did, a handle to let the registry generate, or why not.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..artifacts import format as art
from ..artifacts.source import Fetched, RegistrySource
from ..costs import policy as pol
from ..costs import stages as stg
from ..errors import (
    ArtifactError,
    ArtifactIntegrityError,
    KVAgentError,
    RegistryDownloadAbandonedError,
    RegistryError,
    RegistryPaymentRequiredError,
    RegistrySkippedError,
    RegistryUnavailableError,
    StoreError,
)
from ..kvcache.identity import KeyContext, block_hashes
from ..kvcache.prefix import shared_prefix
from .lookup import Candidate, Lookup, ResolverSettings
from .store import KVStore
from .verification import verify_kv

if TYPE_CHECKING:
    from ..artifacts.source import GiveUp, Handle
    from ..client.registry import RegistryClient
    from ..costs.calibration import CostModel
    from ..engines.hf import TransformersEngine

log = logging.getLogger("kvagent")

__all__ = ["ClientSource", "Fetched", "RegistryAnswer", "RegistrySource", "RegistryTier"]


#: seconds of a download over a link never measured before its throughput is judged (``_give_up_past``)
GIVE_UP_AFTER_S = 0.2


def _give_up_past(prefill_s: float) -> GiveUp:
    """A download's ``give_up`` for a fetch chosen on an assumed link speed: once it has run
    ``min(GIVE_UP_AFTER_S, prefill_s)``, stop when the rest, at the speed so far, would take longer than
    prefilling here (``prefill_s``), the seconds already spent being lost either way."""

    def give_up(received: int, size: int, seconds: float) -> str | None:
        if seconds < min(GIVE_UP_AFTER_S, prefill_s) or received >= size:
            return None
        rest = seconds / received * (size - received) if received > 0 else math.inf
        if rest <= prefill_s:
            return None
        return (f"gave up the download after {received / 1e6:.1f} of {size / 1e6:.1f} MB in {seconds:.2f} s "
                f"({received / seconds / 1e6:.1f} MB/s, a link never measured before): the rest would take "
                f"≈ {rest:.2f} s, more than prefilling here ≈ {prefill_s:.2f} s")

    return give_up


class ClientSource:
    """A :class:`RegistryClient` as a registry source (what the SDK uses)."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self.label = client.base_url
        self.remote = True
        self.can_generate = True
        self.bandwidth_hint: float | None = None

    def lookup(self, key: str, *, timeout: float | None = None) -> Handle | None:
        return self.client.lookup(key, timeout=timeout)

    def lookup_prefix(
        self, hashes: Sequence[str], *, timeout: float | None = None
    ) -> tuple[Handle, int] | None:
        return self.client.lookup_prefix(hashes, timeout=timeout)

    def fetch(self, handle: Handle, expect: art.Expectation, *, max_price: int | None = None,
              give_up: GiveUp | None = None) -> Fetched:
        got = self.client.download_verified(handle, expect, max_price=max_price, give_up=give_up)
        return Fetched(
            got.artifact, len(got.data), got.seconds, got.data, charged=got.charge, receipt=got.receipt
        )

    def dispute(self, handle: Handle, receipt: str, reason: str, difference: float) -> str:
        answer = self.client.dispute(handle.key, receipt, difference=difference, detail=reason)
        return str(answer.get("status", answer))


@dataclass(frozen=True)
class RegistryAnswer:
    """What the registry tier made of one lookup: a ``candidate``, or ``remote`` (let the registry generate),
    or
    neither; ``reason`` says why either way."""

    candidate: Candidate | None
    reason: str
    remote: Handle | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class _Offer:
    """A registry artifact that covers the first ``covered`` ids of a lookup."""

    handle: Handle
    covered: int


class RegistryTier:
    """The registry tier of a resolver: one per resolver, shared by its concurrent reads (thread-safe)."""

    def __init__(
        self,
        engine: TransformersEngine,
        context: KeyContext,
        store: KVStore,
        *,
        settings: ResolverSettings,
        cost: CostModel | None = None,
        count: Callable[[str, int], None] = lambda _name, _n: None,
    ) -> None:
        self.engine, self.context, self.store = engine, context, store
        self.settings = settings
        self.cost = cost
        self.count = count
        self.expect = art.Expectation(
            model_fingerprint=context.model_fingerprint, tokenizer_fingerprint=context.tokenizer_fingerprint,
            dtype=context.dtype, layout=engine.layout,
        )
        self.spent = 0  # micro-units spent on purchases
        self.bandwidth: dict[str, float] = {}  # measured bytes/s per registry label
        self.prefill_tokens_per_s: float | None = None  # measured in this process (set by the resolver)
        # (key, payload digest) already checked against its tokens
        self._verified: set[tuple[str, str]] = set()
        self._probed = False
        self._lock = threading.Lock()

    # -- money -------------------------------------------------------------------------------------
    def policy_params(self) -> pol.PolicyParams:
        """The policy settings of one decision: the configured ones, with the money left to spend."""
        s = self.settings
        left = None if s.budget is None else max(0, s.budget - self.spent)
        return replace(s.policy, prefill_cost_micros_per_token=s.prefill_cost_per_token,
                       max_price_per_load_micros=s.max_price_per_load,
                       budget_left_micros=left)

    def price_cap(self) -> int | None:
        """The most one purchase may cost now (None: no limit)."""
        p = self.policy_params()
        caps = [c for c in (p.max_price_per_load_micros, p.budget_left_micros) if c is not None]
        return min(caps) if caps else None

    def note_spent(self, amount: int) -> None:
        """Count a purchase (e.g. a remote generation) against the budget."""
        with self._lock:
            self.spent += amount

    # -- one lookup --------------------------------------------------------------------------------
    def consult(self, source: RegistrySource, lookup: Lookup) -> RegistryAnswer:
        """Ask ``source`` and the policy for more than the ``lookup.local_tokens`` the local tiers cover."""
        params = self.policy_params()
        uncached = len(lookup.ids) - lookup.local_tokens
        if uncached < params.min_tokens:
            return RegistryAnswer(None, f"registry not consulted ({uncached} uncached tokens < "
                                        f"{params.min_tokens}-token threshold)")
        t0 = time.perf_counter()
        try:
            with stg.stage("lookup"):
                offer = self._find(source, lookup)
        except RegistrySkippedError as exc:
            return RegistryAnswer(None, f"{exc}; prefilling locally")
        except (RegistryError, ArtifactError) as exc:
            return RegistryAnswer(None, self.failed(f"registry lookup at {source.label} failed", exc))
        if offer is None:
            return RegistryAnswer(None, "the registry has nothing for it")
        if offer.covered <= lookup.local_tokens:
            return RegistryAnswer(
                None, f"the registry's best prefix ({offer.covered} tokens) does not beat the local one"
            )
        decision = self._decide(source, lookup, offer, params)
        log.info("registry policy for %s…: %s (%s)", lookup.key[:16], decision.choice, decision.reason)
        if decision.choice == pol.REMOTE_GENERATE:
            return RegistryAnswer(None, f"policy: {decision.reason}", remote=offer.handle,
                                  seconds=time.perf_counter() - t0)
        n_local = lookup.local_tokens
        if decision.choice != pol.FETCH:
            if decision.choice == pol.LOCAL_PREFILL and self.predicts():
                stg.predict("prefix-prefill" if n_local else "local-prefill", decision.estimates["prefill_s"],
                            len(lookup.ids) - n_local, n_local)
            return RegistryAnswer(None, f"policy: {decision.reason}")
        est = decision.estimates
        if self.predicts():
            stg.predict(pol.FETCH, est["fetch_s"], len(lookup.ids) - n_local, n_local,
                        est.get("fetch_rest_s", 0.0))
        give_up = None
        if source.remote and est.get("sources", {}).get("link") == "assumed" and not offer.handle.price:
            # a link never measured: the download measures it, against prefilling what the fetch would cover
            give_up = _give_up_past(float(est["prefill_s"]) - float(est.get("fetch_rest_s", 0.0)))
        return self._buy(source, lookup, offer, decision.reason, give_up)

    def predicts(self) -> bool:
        """Whether reads are checked against the cost model: it is calibrated and no rate is fixed by hand."""
        policy = self.settings.policy
        return (
            self.cost is not None
            and policy.prefill_tokens_per_s is None
            and policy.bandwidth_bytes_per_s is None
        )

    def _find(self, source: RegistrySource, lookup: Lookup) -> _Offer | None:
        """The source's best offer, asked under the breaker and a deadline when it is remote."""
        if self.cost is not None and source.remote:
            n = len(lookup.ids) - lookup.local_tokens
            return self.cost.registry_breaker.guarded(
                source.label, n, lambda deadline: self._ask(source, lookup, deadline))
        return self._ask(source, lookup, None)

    def _ask(self, source: RegistrySource, lookup: Lookup, deadline: float | None) -> _Offer | None:
        """The registry's exact artifact (documents only) or its longest block-hash prefix artifact, asked
        within ``deadline`` seconds in all (None: the client's own timeouts)."""
        t_end = None if deadline is None else time.monotonic() + deadline
        if lookup.document:
            handle = source.lookup(lookup.shared_key, timeout=deadline)
            if handle is not None:
                return _Offer(handle, len(lookup.ids))
        hashes = lookup.shared_hashes
        left = None if t_end is None else max(0.05, t_end - time.monotonic())
        found = source.lookup_prefix(hashes, timeout=left) if hashes else None
        if found is None:
            return None
        handle, blocks = found
        covered = min(blocks * lookup.block_size, handle.header.token_count, len(lookup.ids))
        return _Offer(handle, covered) if covered > 0 else None

    def _decide(self, source: RegistrySource, lookup: Lookup, offer: _Offer,
                params: pol.PolicyParams) -> pol.Decision:
        n_local = lookup.local_tokens
        whole = offer.covered == len(lookup.ids) and n_local == 0
        req = pol.Request(
            n_tokens=len(lookup.ids) - n_local,
            remote_artifact=True,
            remote_tokens=offer.covered - n_local,
            artifact_bytes=offer.handle.size,
            bytes_per_token=self.engine.layout.bytes_per_token(self.engine.dtype),
            remote_generate=lookup.remote_generate and source.can_generate and whole,
            bandwidth_bytes_per_s=self.bandwidth.get(source.label) or source.bandwidth_hint,
            prefill_tokens_per_s=None if self.cost is not None else self.prefill_tokens_per_s,
            price_micros=offer.handle.price,
        )
        if self.cost is None:
            return pol.decide(req, params)
        if not self._probed:  # a machine with no history measures prefill once (<= 1 s) instead of assuming
            from ..costs.calibration import engine_probe

            self._probed = True
            with stg.stage("probe"):
                self.cost.ensure_probed(engine_probe(self.engine))
        return self.cost.decide(req, url=source.label if source.remote else None, past=n_local, params=params)

    def _buy(self, source: RegistrySource, lookup: Lookup, offer: _Offer, why: str,
             give_up: GiveUp | None = None) -> RegistryAnswer:
        """Fetch (and pay for) the offer, measure the link, verify the KV and keep it: a candidate, or why
        not. ``give_up``: the source may stop the download part-way (see ``RegistrySource.fetch``)."""
        t0 = time.perf_counter()
        handle = offer.handle
        try:
            expect = replace(self.expect, key=handle.key)
            # ``give_up`` only when there is one: a source written before it need not take the argument
            fetched = (source.fetch(handle, expect, max_price=self.price_cap(), give_up=give_up)
                       if give_up is not None else source.fetch(handle, expect, max_price=self.price_cap()))
            stg.add("download", fetched.seconds)
            stg.add("verification", time.perf_counter() - t0 - fetched.seconds)  # checksum, header, signature
        except RegistryDownloadAbandonedError as exc:
            stg.add("download", exc.seconds)
            if exc.received:  # what the link did so far: the next decision knows it
                self._measure(source, exc.received, exc.seconds, abandoned=True)
            log.warning("kvagent: %s; prefilling locally", exc)
            return RegistryAnswer(None, f"{exc}; prefilling locally")
        except RegistryPaymentRequiredError as exc:
            q = exc.quote
            x402 = f"; x402 {q['x402']}" if q.get("x402") else ""
            reason = (
                f"not bought: {q.get('reason', 'refused')} (price {q.get('price', handle.price)} "
                f"{q.get('currency', handle.currency)}, balance {q.get('balance')}){x402}; prefilling locally"
            )
            log.warning("kvagent: %s…: %s", handle.key[:16], reason)
            return RegistryAnswer(None, reason)
        except (RegistryError, ArtifactError) as exc:
            if self.cost is not None and source.remote and isinstance(exc, RegistryUnavailableError):
                self.cost.record_failure(source.label, f"{type(exc).__name__}: {exc}")
            what = f"fetching {handle.key[:16]}… from the registry failed ({source.label})"
            return RegistryAnswer(None, self.failed(what, exc))
        self.note_spent(fetched.charged)
        self._measure(source, fetched.nbytes, fetched.seconds)
        with stg.stage("verification"):
            problem = self._check(handle.key, fetched.artifact)
        if problem is not None:
            if fetched.receipt:
                problem += self._dispute(source, handle, fetched.receipt, problem)
            return RegistryAnswer(None, problem)
        if fetched.blob is not None:
            with stg.stage("store_write"):
                self._keep(fetched)
            if self.cost is not None:  # from the last byte to the KV kept: the next estimate's landing term
                landed = time.perf_counter() - t0 - fetched.seconds
                threading.Thread(target=self.cost.record_landing, args=(fetched.nbytes, landed), daemon=True,
                                 name="kvagent-calibrate").start()
        kv = fetched.artifact.kv
        if kv.source is None:  # its checked bytes, the same for every reader of this artifact
            kv = kv.with_source(art.published_source(fetched.artifact.header))
        n = shared_prefix(kv.token_ids, lookup.target)
        if n <= lookup.local_tokens:
            return RegistryAnswer(None, f"the registry's artifact shares only {n} tokens")
        what = "fetched from the registry" if fetched.blob is not None else "loaded from the registry"
        bought = f"bought for {fetched.charged} µ-units; " if fetched.charged else ""
        reason = (
            f"{what}: {n} of {len(lookup.ids)} tokens, checksum verified, KV {self.settings.verify}-verified "
            f"against its tokens; {bought}policy: {why}"
        )
        cand = Candidate(
            kv.truncate(n),
            n,
            "registry",
            time.perf_counter() - t0,
            fetched.nbytes,
            origin=handle.key,
            charged=fetched.charged,
        )
        return RegistryAnswer(cand, reason)

    # -- what a fetch leaves behind ----------------------------------------------------------------
    def _measure(
        self, source: RegistrySource, nbytes: int, seconds: float, *, abandoned: bool = False
    ) -> None:
        """``nbytes`` came from ``source`` in ``seconds`` (``abandoned``: the start of a download given up):
        this process's and the machine's figure for its link."""
        if seconds > 0:
            self.bandwidth[source.label] = nbytes / seconds
            if self.cost is not None and source.remote:
                self.cost.record_download(source.label, nbytes, seconds, abandoned=abandoned)

    def _check(self, key: str, artifact: art.Artifact) -> str | None:
        """Verify a registry artifact's KV against its token ids (once per process); the failure reason or
        None."""
        tag = (key, artifact.header.payload_sha256)
        if tag in self._verified:
            return None
        s = self.settings
        check = verify_kv(self.engine, artifact.kv, s.verify, probes=s.verify_probes,
                          seed=int.from_bytes(os.urandom(4), "little"))
        if not check.ok:
            self.count("poisoned", 1)
            return self.failed(
                f"artifact {key[:16]}… from the registry failed {check.mode} verification",
                ArtifactIntegrityError(check.reason),
            )
        self._verified.add(tag)
        return None

    def _dispute(self, source: RegistrySource, handle: Handle, receipt: str, reason: str) -> str:
        try:
            return f"; disputed the purchase ({source.dispute(handle, receipt, reason, 0.0)})"
        except (RegistryError, ArtifactError) as exc:
            log.warning("could not dispute %s… (%s)", handle.key[:16], exc)
            return f"; the dispute failed ({type(exc).__name__})"

    def _keep(self, fetched: Fetched) -> None:
        """Keep a fetched artifact in the local store, indexed by its own ids' block hashes."""
        a = fetched.artifact
        assert fetched.blob is not None
        hashes = block_hashes(self.context, a.kv.token_ids.tolist(), self.settings.block_size)
        try:
            self.store.put(a.header, bytes(fetched.blob), hashes)
        except StoreError as exc:
            log.warning("could not cache the fetched %s… locally (the answer is unaffected): %s",
                        a.header.key[:16], exc)

    def failed(self, what: str, exc: KVAgentError) -> str:
        """Count and log a registry failure; returns the reason shown to the user."""
        self.count("registry_failures", 1)
        reason = f"{what} ({type(exc).__name__}: {exc}); prefilling locally"
        log.warning("%s", reason)
        return reason
