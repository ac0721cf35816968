"""The prefill cost model on any mix of samples: degenerate, noisy and adversarial sets (issue 26).

A host repeats prompts of similar length, so its samples come from almost one length. The old three-term fit
could put the whole cost into the fixed term there, and then a 256-token continuation after a 1,768-token
prefix cost as much as a full 2,024-token prefill, so fetching a published prefix never paid.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvagent.costs import calibration as cal
from kvagent.costs import policy as pol
from kvagent.costs.calibration.contents import MAX_SAMPLES
from kvagent.costs.calibration.estimates import link_estimates
from kvagent.costs.calibration.fitting import SPREAD_FLOOR, load_fit, prefill_features
from kvagent.costs.calibration.measure import WARMUP_LENGTHS, WARMUP_TAILS

PROFILE = cal.Profile("cd" * 32, "float32", "cpu:test|threads=2")
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def predict(samples: list[tuple[float, ...]], n: float, past: float = 0.0) -> float:
    fit = cal.prefill_fit(samples)
    assert fit is not None
    return fit.predict(prefill_features(n, past))[0]


# -- the issue's failure, reproduced --------------------------------------------------------------
# : three chats of about one length, 16 s each, the longer ones a little faster (noise): what the issue's host
# had
ISSUE_SAMPLES = [(2000, 24, 16.0), (1985, 24, 16.3), (2012, 24, 15.7)]


def test_the_issues_samples_no_longer_price_a_continuation_as_a_full_prefill():
    # before: coefficients (15.99, 0, 0); "prefill the 256 tokens after 1,768" ≈ 15.99 s ≈ a full prefill of
    # 2,024
    coef = cal.fit_prefill(ISSUE_SAMPLES)
    # one length: a per-token rate, nothing else
    assert coef is not None and coef[0] == 0.0 and coef[2] == 0.0
    full, rest = predict(ISSUE_SAMPLES, 2000, 24), predict(ISSUE_SAMPLES, 256, 1768)
    assert full == pytest.approx(16.0, rel=0.02)
    assert rest < 0.15 * full  # 256 of 2,000 tokens: about an eighth, not all of it


def test_the_issues_decision_now_fetches_and_says_how_sure_it_is(tmp_path: Path):
    model = cal.CostModel(cal.CalibrationFile(tmp_path / "c.json"), profile=PROFILE)
    for n, past, secs in ISSUE_SAMPLES:
        model.record_prefill(n, past, secs)
    req = pol.Request(n_tokens=2000, remote_artifact=True, remote_tokens=1768, artifact_bytes=93_700_000,
                      bandwidth_bytes_per_s=1e9)
    d = model.decide(req, past=24)
    assert d.choice == pol.FETCH, d.reason
    assert d.estimates["rest_prefill_s"] < 0.15 * d.estimates["prefill_s"]
    assert d.estimates["prefill_sd_s"] > 0 and d.estimates["fetch_sd_s"] > 0
    assert "±" in d.reason


# -- properties over any sample set ----------------------------------------------------------------
truths = st.tuples(st.floats(0.0, 0.2), st.floats(1e-4, 2e-2), st.floats(0.0, 2e-5))
lengths = st.integers(32, 4096)
pasts = st.one_of(st.just(0), st.integers(0, 4096))
noise = st.floats(0.7, 1.4)


def _truth(t: tuple[float, float, float], n: float, past: float) -> float:
    return sum(c * f for c, f in zip(t, prefill_features(n, past), strict=True))


@HYP
@given(st.lists(st.tuples(lengths, pasts, st.floats(1e-3, 1e4)), min_size=1, max_size=40))
def test_any_samples_give_a_sane_model(samples):
    """Adversarial: arbitrary seconds. Terms non-negative, the fixed term below the fastest sample, estimates
    finite,
    monotone in the new and the cached tokens, and a continuation never dearer than prefilling everything."""
    fit = cal.prefill_fit(samples)
    assert fit is not None
    a, b, c = fit.coef
    assert min(a, b, c) >= 0 and all(math.isfinite(x) for x in fit.coef)
    assert a <= min(s for *_, s in samples) * (1 + 1e-9)
    assert math.isfinite(fit.spread) and fit.spread >= SPREAD_FLOOR
    for n, past in ((256, 1768), (2024, 0), (64, 0), (8000, 100)):
        value, spread = fit.predict(prefill_features(n, past))
        assert math.isfinite(value) and value >= 0 and math.isfinite(spread)
        assert value <= fit.predict(prefill_features(n + past, 0))[0] * (1 + 1e-9) + 1e-12
        assert value <= fit.predict(prefill_features(n * 2, past))[0] + 1e-12


@HYP
@given(truths, st.integers(32, 4096), st.integers(0, 64), st.lists(noise, min_size=1, max_size=30))
def test_one_length_is_a_per_token_rate(truth, n, past, noises):
    """Degenerate: samples from one length (any noise) cannot tell a fixed cost or attention from the rate."""
    samples = [(n, past, _truth(truth, n, past) * k) for k in noises]
    coef = cal.fit_prefill(samples)
    assert coef is not None and coef[0] == 0.0 and coef[2] == 0.0 and coef[1] > 0
    assert predict(samples, n // 2 + 1, past) < predict(samples, n, past)


@HYP
@given(truths, st.integers(32, 512), st.integers(1024, 4096), st.integers(2, 12), st.data())
def test_two_lengths_fit_both_and_bound_the_fixed_term(truth, short, long, repeats, data):
    """Two lengths, ±10% noise: both are predicted within the noise, the fixed term is bounded."""
    samples = []
    for n in (short, long):
        for _ in range(repeats):
            samples.append((n, 0, _truth(truth, n, 0) * data.draw(st.floats(0.9, 1.1))))
    fit = cal.prefill_fit(samples)
    assert fit is not None
    assert fit.coef[0] <= min(s for *_, s in samples)
    for n in (short, long):
        assert predict(samples, n) == pytest.approx(_truth(truth, n, 0), rel=0.25)


@HYP
@given(st.tuples(st.floats(0.0, 0.05), st.floats(1e-4, 2e-2), st.floats(0.0, 2e-5)),
       st.lists(st.tuples(pasts, st.floats(0.85, 1.2)), min_size=12, max_size=40), st.data())
def test_outliers_are_left_out(truth, drawn, data):
    """A few samples 20-1000x too slow (a suspended process, a clock jump inside a timing) do not move the
    model:
    every other sample is still predicted within 2x (lengths spread over 64-4,096 tokens, as a host's are)."""
    points = [((64, 256, 700, 1500, 4096)[i % 5], p, k) for i, (p, k) in enumerate(drawn)]
    samples = [(n, p, _truth(truth, n, p) * k) for n, p, k in points]
    k = data.draw(st.integers(1, max(1, len(samples) // 5)))
    bad = data.draw(st.lists(st.integers(0, len(samples) - 1), min_size=k, max_size=k, unique=True))
    for i in bad:
        n, p, s = samples[i]
        samples[i] = (n, p, s * data.draw(st.floats(20, 1000)))
    fit = cal.prefill_fit(samples)
    assert fit is not None and fit.outliers >= 1
    for i, (n, p, _) in enumerate(points):
        if i not in bad:
            assert 0.5 <= predict(samples, n, p) / _truth(truth, n, p) <= 2.0


def _polluted(truth, drawn, bad):
    points = [((64, 256, 700, 1500, 4096)[i % 5], p, k) for i, (p, k) in enumerate(drawn)]
    samples = [(n, p, _truth(truth, n, p) * k * bad.get(i, 1)) for i, (n, p, k) in enumerate(points)]
    return points, samples


def test_two_outliers_do_not_mask_each_other():
    """CI's counterexample: two samples 20x too slow pulled one fit towards each other, so neither looked far
    off a fit that still contained the other."""
    truth, bad = (0.0, 0.001953125, 5.926964904401505e-06), {0: 20, 1: 20}
    points, samples = _polluted(truth, [(0, 1.023)] + [(0, 0.85)] * 11, bad)
    fit = cal.prefill_fit(samples)
    assert fit is not None and fit.outliers == 2
    for i, (n, p, _) in enumerate(points):
        if i not in bad:
            assert 0.5 <= predict(samples, n, p) / _truth(truth, n, p) <= 2.0


def test_the_only_short_prompts_are_not_outliers():
    """Three outliers, and only two short prompts without a long cached prefix: those two alone pin the fixed
    term, so a fit without them is far off there; they are leverage, kept, not outliers."""
    truth = (0.012015296925168385, 0.00016211027376196506, 1.2989733650662974e-05)
    drawn = [(340, 0.872), (0, 0.906), (1407, 1.178), (3179, 0.985), (648, 0.868), (4052, 0.890),
             (1139, 0.965), (1532, 1.141), (958, 1.184), (0, 0.991), (0, 0.874), (2896, 1.104), (2571, 1.069),
             (3901, 0.997), (0, 1.126), (184, 1.015)]
    bad = {6: 345.2, 0: 537.4, 10: 41.4}
    points, samples = _polluted(truth, drawn, bad)
    fit = cal.prefill_fit(samples)
    assert fit is not None and fit.outliers == 3
    for i, (n, p, _) in enumerate(points):
        if i not in bad:
            assert 0.5 <= predict(samples, n, p) / _truth(truth, n, p) <= 2.0


@HYP
@given(truths, st.lists(st.tuples(lengths, pasts, noise), min_size=1, max_size=20),
       st.sampled_from([-30 * 86400.0, -3600.0, 3600.0, 30 * 86400.0]))
def test_a_clock_jump_keeps_estimates_valid(tmp_path_factory, truth, points, jump):
    """The wall clock jumps back (samples are re-stamped to now and kept) or forward (past the maximum age:
    the
    estimates fall back to assumed ones, never to garbage)."""
    clock = _Clock()
    f = cal.CalibrationFile(tmp_path_factory.mktemp("jump") / "c.json", clock=clock, max_age_s=14 * 86400.0)
    model = cal.CostModel(f, profile=PROFILE)
    for n, p, k in points:
        model.record_prefill(n, p, _truth(truth, n, p) * k)
    before = model.estimate_prefill(1000, 500)
    clock.t += jump
    after = model.estimate_prefill(1000, 500)
    assert math.isfinite(after.value) and after.value > 0 and math.isfinite(after.spread)
    if jump < 14 * 86400.0:
        assert after == before
    else:
        assert after.source == pol.ASSUMED


class _Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


# -- continuations, uncertainty, retention ----------------------------------------------------------
def test_continuations_inform_the_attention_term():
    """Full prefills of one length say nothing about attention; continuations after long prefixes do."""
    a, b, c = 0.02, 0.004, 2e-6
    full = [(2000, 0, a + b * 2000 + c * 2000 * 1000) * 1 for _ in range(3)]
    alone = cal.prefill_fit(full)
    assert alone is not None and alone.coef[2] == 0.0
    tails = [(n, p, a + b * n + c * n * (n / 2 + p)) for n, p in ((200, 1800), (300, 3000), (150, 500))]
    both = cal.prefill_fit(full + tails)
    assert both is not None and both.coef[2] > 0
    assert predict(full + tails, 256, 1768) == pytest.approx(a + b * 256 + c * 256 * (128 + 1768), rel=0.05)


def test_spread_shrinks_with_agreeing_samples_and_grows_beyond_them():
    one = cal.prefill_fit([(1000, 0, 4.0)])
    many = cal.prefill_fit([(n, 0, n * 0.004 * k) for n, k in ((500, 1.01), (1000, 0.99), (1500, 1.0),
                                                                  (800, 1.02), (1200, 0.98), (600, 1.0))])
    assert one is not None and many is not None and many.spread < one.spread
    inside = many.predict(prefill_features(1000, 0))[1]
    far = many.predict(prefill_features(16000, 0))[1]
    assert far > inside * 2


def test_a_host_repeating_one_length_keeps_its_other_lengths(tmp_path: Path):
    model = cal.CostModel(cal.CalibrationFile(tmp_path / "c.json"), profile=PROFILE)
    model.record_prefill(64, 0, 0.3)
    model.record_prefill(300, 1700, 1.4)
    for i in range(3 * MAX_SAMPLES):
        model.record_prefill(2000 + i % 7, 24, 8.0)
    kept = model.calibration.read()["prefill"][PROFILE.key]["samples"]
    assert len(kept) == MAX_SAMPLES
    assert {s[1] for s in kept} >= {64, 300}


def test_loads_of_one_size_are_a_rate():
    fit = load_fit([(90e6, 0.5), (90e6, 0.55), (91e6, 0.45)])
    assert fit is not None and fit.coef[0] == 0.0
    assert fit.predict((1.0, 9e6))[0] == pytest.approx(0.05, rel=0.1)


def test_the_link_estimate_carries_its_spread(tmp_path: Path):
    model = cal.CostModel(cal.CalibrationFile(tmp_path / "c.json"), profile=PROFILE)
    url = "http://r.test"
    for secs in (1.0, 1.0, 1.0, 1.0):
        model.record_download(url, 100_000_000, secs)
    steady = link_estimates(model.calibration.read(), url)[1]
    for secs in (0.2, 3.0, 0.3, 4.0):
        model.record_download(url, 100_000_000, secs)
    jumpy = link_estimates(model.calibration.read(), url)[1]
    assert steady is not None and jumpy is not None and jumpy.spread > steady.spread


def test_prefill_estimates_say_how_uncertain_they_are(tmp_path: Path):
    model = cal.CostModel(cal.CalibrationFile(tmp_path / "c.json"), profile=PROFILE)
    assert model.estimate_prefill(1000).spread == pol.DEFAULT_SPREAD[pol.ASSUMED]
    model.record_prefill(1000, 0, 4.0)
    est = model.estimate_prefill(1000)
    assert est.source == pol.MEASURED and 0 < est.spread < pol.DEFAULT_SPREAD[pol.ASSUMED]


# -- a fresh host's warm-up and its first chat tails ------------------------------------------------
#: a warm-up on a loaded 2-core machine (tiny model): the only long prefill is the one sample that pins the
#: per-token cost; leaving it out as an "outlier" of the three short forwards (four samples, one degree of
#: freedom) predicted a 1,199-token prompt at 0.14 s (it took 0.41 s) by extrapolating 20x beyond the samples
WARMUP_SEEN = [(64, 0, 0.0142), (512, 0, 0.1923), (16, 512, 0.0164), (64, 512, 0.0203)]


def test_four_samples_have_no_outliers():
    fit = cal.prefill_fit(WARMUP_SEEN)
    assert fit is not None and fit.outliers == 0
    assert 0.5 <= predict(WARMUP_SEEN, 1199) / 0.41 <= 2.0
    assert 0.5 <= predict(WARMUP_SEEN, 512) / 0.1923 <= 2.0


@HYP
@given(st.tuples(st.floats(0.005, 0.1), st.floats(1e-4, 5e-3), st.floats(0.0, 2e-6)),
       st.lists(st.floats(0.8, 1.25), min_size=4, max_size=4),
       st.lists(st.tuples(st.sampled_from([60, 120, 250, 400, 900]), st.integers(1, 24),
                          st.floats(0.8, 1.25)), max_size=6),
       st.integers(1000, 2048))
def test_a_chat_tail_after_a_warm_up_and_a_few_chats_is_predicted_within_2x(truth, warm, chats, past):
    """The realistic mix of a young host: the warm-up (``WARMUP_LENGTHS`` from scratch, ``WARMUP_TAILS``
    after the longest) and a few chats (a prompt prefilled, then its 1-24 token tail), each timing off by
    0.8-1.25x: a 16-token question after a 1-2k token document is predicted within 2x. (With 0.7-1.4x, about
    one draw in 400 misses 2x for the tail or for a 1-2k prompt from scratch, the latter extrapolated from
    the warm-up's 768 tokens when the noise hides the attention term.)"""
    big = max(WARMUP_LENGTHS)
    shapes = [(n, 0) for n in WARMUP_LENGTHS] + [(n, big) for n in WARMUP_TAILS]
    samples = [(n, p, _truth(truth, n, p) * k) for (n, p), k in zip(shapes, warm, strict=True)]
    for n, tail, k in chats:
        samples += [(n, 0, _truth(truth, n, 0) * k), (tail, n, _truth(truth, tail, n) * k)]
    assert 0.5 <= predict(samples, 16, past) / _truth(truth, 16, past) <= 2.0
