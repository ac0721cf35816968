"""The cost model: every choice is reachable, thresholds hold, and reasons carry the numbers."""

from __future__ import annotations

import re

import pytest

from kvagent import policy as pol

P = pol.PolicyParams(bandwidth_bytes_per_s=80e6, prefill_tokens_per_s=1000.0, rtt_s=0.05)


def test_local_hit_wins():
    d = pol.decide(pol.Request(n_tokens=5000, local_hit=True, remote_artifact=True, remote_generate=True), P)
    assert d.choice == pol.LOCAL_HIT


def test_fetch_when_transfer_beats_prefill_and_reason_has_numbers():
    d = pol.decide(pol.Request(n_tokens=3100, remote_artifact=True, artifact_bytes=49_000_000), P)
    assert d.choice == pol.FETCH
    assert "49.0 MB" in d.reason and "80 MB/s" in d.reason and "3.10 s" in d.reason
    expected = 0.05 + 49e6 / 80e6 + 3100 / 1000 / 49.7
    assert d.estimates["fetch_s"] == pytest.approx(expected)
    assert d.estimates["fetch_usd"] == pytest.approx(0.049 * 0.09)


def test_no_fetch_when_transfer_is_slower_than_prefill():
    d = pol.decide(pol.Request(n_tokens=1000, remote_artifact=True, artifact_bytes=500_000_000), P)
    assert d.choice == pol.LOCAL_PREFILL and "does not pay" in d.reason


def test_remote_generate_when_fetch_does_not_pay():
    d = pol.decide(
        pol.Request(n_tokens=1000, remote_artifact=True, artifact_bytes=500_000_000, remote_generate=True), P
    )
    assert d.choice == pol.REMOTE_GENERATE
    assert "does not pay" in d.reason and re.search(r"\d+\.\d\d s", d.reason)


def test_latency_budget_pushes_to_remote_generate_only_when_available():
    req = pol.Request(n_tokens=20_000, remote_artifact=True, artifact_bytes=400_000_000)
    tight = pol.PolicyParams(bandwidth_bytes_per_s=80e6, prefill_tokens_per_s=1000.0, latency_budget_s=1.0)
    assert pol.decide(req, tight).choice == pol.FETCH  # over budget, but still the fastest available
    with_gen = pol.Request(**{**req.__dict__, "remote_generate": True})
    d = pol.decide(with_gen, tight)
    assert d.choice == pol.REMOTE_GENERATE and "latency budget" in d.reason


def test_below_min_tokens_nothing_remote():
    d = pol.decide(
        pol.Request(n_tokens=255, remote_artifact=True, artifact_bytes=10, remote_generate=True), P
    )
    assert d.choice == pol.LOCAL_PREFILL and "256-token threshold" in d.reason
    assert pol.should_publish(255)[0] is False and pol.should_publish(256)[0] is True
    custom = pol.PolicyParams(min_tokens=10)
    assert (
        pol.decide(pol.Request(n_tokens=255, remote_artifact=True, artifact_bytes=10), custom).choice
        == pol.FETCH
    )


def test_egress_cap_and_measured_rates_override():
    req = pol.Request(n_tokens=100_000, remote_artifact=True, artifact_bytes=2_000_000_000)
    assert pol.decide(req, P).choice == pol.FETCH
    capped = pol.PolicyParams(bandwidth_bytes_per_s=80e6, prefill_tokens_per_s=1000.0, max_egress_usd=0.1)
    d = pol.decide(req, capped)
    assert d.choice == pol.LOCAL_PREFILL and "egress cap" in d.reason
    fast = pol.decide(
        pol.Request(**{**req.__dict__, "prefill_tokens_per_s": 1e6}), P
    )  # measured: prefill is fast
    assert fast.choice == pol.LOCAL_PREFILL and fast.estimates["prefill_tokens_per_s"] == 1e6


def test_prefix_artifact_counts_the_rest_as_prefill_and_size_estimate():
    d = pol.decide(
        pol.Request(n_tokens=4000, remote_artifact=True, remote_tokens=1000, bytes_per_token=1000), P
    )
    assert d.choice == pol.FETCH
    assert d.estimates["fetch_bytes"] == 1_000_000 and d.estimates["fetch_covered_tokens"] == 1000
    assert d.estimates["fetch_s"] > 3000 / 1000 and "other 3000 tokens" in d.reason


def test_nothing_remote_is_local_prefill_and_params_validate():
    assert pol.decide(pol.Request(n_tokens=5000), P).choice == pol.LOCAL_PREFILL
    with pytest.raises(ValueError):
        pol.PolicyParams(bandwidth_bytes_per_s=0)
