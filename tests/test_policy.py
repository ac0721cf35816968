"""The cost model: every choice is reachable, thresholds hold, and reasons carry the numbers."""

from __future__ import annotations

import re

import pytest

from kvagent.costs import policy as pol

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
    measured = pol.Request(**{**req.__dict__, "prefill_tokens_per_s": 1e6})  # measured: prefill is fast
    fast = pol.decide(measured, pol.PolicyParams(bandwidth_bytes_per_s=80e6))
    assert fast.choice == pol.LOCAL_PREFILL and fast.estimates["prefill_tokens_per_s"] == 1e6
    assert "measured" in fast.reason
    fixed = pol.decide(measured, P)  # a rate fixed in PolicyParams replaces the measured one
    assert fixed.choice == pol.FETCH and fixed.estimates["prefill_tokens_per_s"] == 1000.0
    assert "fixed by PolicyParams" in fixed.reason


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


# -- estimates and their provenance ------------------------------------------------------------
def _fetchable(**kw: object) -> pol.Request:
    base = dict(n_tokens=602, remote_artifact=True, artifact_bytes=28_000_000)
    return pol.Request(**{**base, **kw})  # type: ignore[arg-type]


def test_reason_names_each_estimate_and_where_it_came_from():
    req = _fetchable(
        prefill_s=pol.Estimate(2.4, pol.MEASURED, 7),
        link_bytes_per_s=pol.Estimate(100e6, pol.MEASURED, 12),
        link_rtt_s=pol.Estimate(0.002, pol.MEASURED, 12),
        load_s=pol.Estimate(0.05, pol.MEASURED, 3),
    )
    d = pol.decide(req)
    assert d.choice == pol.FETCH
    assert "fetch 28.0 MB" in d.reason and "link measured 12x" in d.reason
    assert "prefill of 602 tokens ≈ 2.40 s" in d.reason and "measured 7x on this machine" in d.reason
    assert d.estimates["fetch_s"] == pytest.approx(0.002 + 0.28 + 0.05)
    assert d.estimates["sources"] == {"prefill": "measured 7x", "link": "measured 12x", "rtt": "measured 12x",
                                      "load": "measured 3x"}


def test_nothing_measured_says_assumed_and_a_probe_says_so():
    d = pol.decide(_fetchable())
    assert "(assumed)" in d.reason and "link assumed" in d.reason
    assert d.estimates["prefill_tokens_per_s"] == pol.ASSUMED_PREFILL_TOKENS_PER_S
    probed = pol.decide(_fetchable(prefill_s=pol.Estimate(3.0, pol.PROBE)))
    assert "first-use probe on this machine" in probed.reason


def test_fixed_params_replace_every_measured_estimate():
    req = _fetchable(
        prefill_s=pol.Estimate(60.0, pol.MEASURED, 5), link_bytes_per_s=pol.Estimate(1e9, pol.MEASURED, 5)
    )
    assert pol.decide(req).choice == pol.FETCH
    forced = pol.decide(req, pol.PolicyParams(prefill_tokens_per_s=1e6, bandwidth_bytes_per_s=1e6))
    assert forced.choice == pol.LOCAL_PREFILL
    assert forced.estimates["sources"]["prefill"] == "fixed by PolicyParams"
    assert forced.estimates["bandwidth_bytes_per_s"] == 1e6


def test_superlinear_rest_of_a_prefix_and_verification_count_against_the_fetch():
    req = _fetchable(
        n_tokens=4000, remote_tokens=1000, artifact_bytes=1_000_000,
        prefill_s=pol.Estimate(20.0, pol.MEASURED, 4), rest_prefill_s=pol.Estimate(18.0, pol.MEASURED, 4),
        link_bytes_per_s=pol.Estimate(1e9, pol.MEASURED, 1), verify_s=pol.Estimate(0.5, pol.MEASURED, 4),
    )
    d = pol.decide(req)
    assert d.estimates["rest_prefill_s"] == 18.0 and d.estimates["verify_s"] == 0.5
    assert d.estimates["fetch_s"] > 18.5 and d.choice == pol.FETCH
    slower = pol.decide(
        pol.Request(**{**req.__dict__, "rest_prefill_s": pol.Estimate(23.0, pol.MEASURED, 4)})
    )
    assert slower.choice == pol.LOCAL_PREFILL and "does not pay" in slower.reason
    # 3% slower than the prefill, within the estimates' spread: the expected loss is small, so it reuses
    tie = pol.decide(pol.Request(**{**req.__dict__, "rest_prefill_s": pol.Estimate(19.9, pol.MEASURED, 4)}))
    assert tie.choice == pol.FETCH and tie.reason.startswith("near a tie: ") and tie.estimates["near_tie"]
    assert tie.estimates["fetch_expected_loss_s"] <= 0.05 * 20.0
    strict = pol.decide(
        pol.Request(**{**req.__dict__, "rest_prefill_s": pol.Estimate(19.9, pol.MEASURED, 4)}),
        pol.PolicyParams(tie_tolerance=0.0),
    )
    assert strict.choice == pol.LOCAL_PREFILL and "does not pay" in strict.reason
    near = pol.decide(pol.Request(**{**req.__dict__, "rest_prefill_s": pol.Estimate(19.9, pol.MEASURED, 4),
                                     "verify_s": pol.Estimate(0.5, pol.MEASURED, 4, rel_sd=2.0)}),
                      pol.PolicyParams(tie_tolerance=0.0))
    assert near.choice == pol.LOCAL_PREFILL and "near a tie, but the expected loss" in near.reason


def test_expected_loss_of_a_choice_under_uncertainty():
    assert pol.expected_excess(1.0, 0.0) == 1.0 and pol.expected_excess(-1.0, 0.0) == 0.0
    assert pol.expected_excess(0.0, 1.0) == pytest.approx(1 / (2 * 3.141592653589793) ** 0.5)
    assert pol.expected_excess(-10.0, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert pol.expected_excess(10.0, 1.0) == pytest.approx(10.0)
    # with nothing to tell them apart, every estimate says how uncertain it is
    assert (
        pol.Estimate(1.0, pol.ASSUMED).spread
        > pol.Estimate(1.0, pol.PROBE).spread
        > pol.Estimate(1.0, pol.MEASURED).spread
    )
    assert pol.Estimate(2.0, pol.MEASURED, 3, rel_sd=0.1).sd == pytest.approx(0.2)
    with pytest.raises(ValueError):
        pol.Estimate(1.0, pol.MEASURED, rel_sd=-0.1)


# -- money ------------------------------------------------------------------------------------
FAST = dict(prefill_s=pol.Estimate(3.0, pol.MEASURED, 3), link_bytes_per_s=pol.Estimate(1e9, pol.MEASURED, 3))


def test_a_purchase_below_the_local_prefill_cost_is_bought_and_says_so():
    d = pol.decide(_fetchable(price_micros=1200, **FAST))  # 602 tokens x 5 = 3010 µUSD locally
    assert d.choice == pol.FETCH
    assert d.reason.startswith("bought for 1200 µUSD: below local prefill cost of 3010 µUSD")
    assert d.estimates["price_micros"] == 1200 and d.estimates["local_prefill_cost_micros"] == 3010
    free = pol.decide(_fetchable(price_micros=0, **FAST))
    assert free.choice == pol.FETCH and free.reason.startswith("free; ")


def test_a_purchase_dearer_than_prefilling_is_refused_even_when_faster():
    d = pol.decide(_fetchable(price_micros=3010, **FAST))
    assert d.choice == pol.LOCAL_PREFILL and "≥ local prefill cost of 3010 µUSD" in d.reason
    cheap_prefill = pol.PolicyParams(prefill_cost_micros_per_token=1)
    assert pol.decide(_fetchable(price_micros=1200, **FAST), cheap_prefill).choice == pol.LOCAL_PREFILL


def test_the_per_load_limit_and_the_budget_refuse_with_the_reason():
    req = _fetchable(price_micros=1200, **FAST)
    capped = pol.decide(req, pol.PolicyParams(max_price_per_load_micros=1000))
    assert capped.choice == pol.LOCAL_PREFILL and "exceeds the 1000 µUSD limit per load" in capped.reason
    broke = pol.decide(req, pol.PolicyParams(budget_left_micros=1199))
    assert broke.choice == pol.LOCAL_PREFILL and "exceeds the 1199 µUSD budget left" in broke.reason
    assert (
        pol.decide(req, pol.PolicyParams(budget_left_micros=1200, max_price_per_load_micros=1200)).choice
        == pol.FETCH
    )


def test_a_cheap_purchase_must_still_pay_in_time():
    slow_link = _fetchable(price_micros=10, prefill_s=pol.Estimate(0.5, pol.MEASURED, 3),
                           link_bytes_per_s=pol.Estimate(10e6, pol.MEASURED, 3))
    d = pol.decide(slow_link)
    assert d.choice == pol.LOCAL_PREFILL and "bought for 10 µUSD" in d.reason and "does not pay" in d.reason


def test_lookup_deadline_follows_the_prefill_estimate_within_bounds():
    assert pol.lookup_deadline(0.01) == pol.LOOKUP_DEADLINE_FLOOR_S
    assert pol.lookup_deadline(4.0) == pytest.approx(2.0)
    assert pol.lookup_deadline(400.0) == pol.LOOKUP_DEADLINE_CEILING_S
    assert pol.lookup_deadline(400.0, ceiling=5.0) == 5.0
    assert pol.lookup_deadline(2.0, rtt_s=0.4) == pytest.approx(1.6)  # 4 round trips, under the prefill
    assert pol.lookup_deadline(1.0, rtt_s=2.0) == pytest.approx(1.0)  # never longer than the prefill


def test_estimates_and_money_params_validate():
    with pytest.raises(ValueError):
        pol.Estimate(-1.0)
    with pytest.raises(ValueError):
        pol.Estimate(1.0, "guessed")
    with pytest.raises(ValueError):
        pol.PolicyParams(budget_left_micros=-1)


def test_a_free_fetch_over_a_link_never_measured_is_taken_near_a_tie_to_measure_it():
    """A first read on a new machine (prefill probed, the link assumed) a little slower to fetch than to
    prefill: the fetch is taken to measure the link, its loss bounded by the download's give-up; a measured
    link or a price decides as before."""
    req = _fetchable(
        remote_tokens=500,
        prefill_s=pol.Estimate(0.4, pol.PROBE), rest_prefill_s=pol.Estimate(0.15, pol.PROBE),
    )
    first = pol.decide(req)
    assert first.estimates["sources"]["link"] == "assumed" and first.estimates["near_tie"]
    assert first.estimates["fetch_s"] > first.estimates["prefill_s"]
    assert first.estimates["fetch_expected_loss_s"] > 0.05 * 0.4  # the tie rule alone would prefill
    assert first.choice == pol.FETCH and "link never measured" in first.reason
    link = pol.Estimate(100e6, pol.MEASURED, 5)
    measured = pol.decide(pol.Request(**{**req.__dict__, "link_bytes_per_s": link}))
    assert measured.choice == pol.LOCAL_PREFILL and "does not pay" in measured.reason
    priced = pol.decide(pol.Request(**{**req.__dict__, "price_micros": 1}))
    assert priced.choice == pol.LOCAL_PREFILL and "does not pay" in priced.reason
    far = pol.decide(pol.Request(**{**req.__dict__, "artifact_bytes": 2_000_000_000}))  # 20 s over the link
    assert far.choice == pol.LOCAL_PREFILL  # predicted 50x the prefill: not a tie to explore
