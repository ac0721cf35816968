"""Persistent calibration: fitting, ageing, concurrent writers, corrupt files, clocks, breakers, deadlines."""

from __future__ import annotations

import json
import logging
import multiprocessing
import socket
import threading
import time
from pathlib import Path

import pytest

from kvagent.client.registry import RegistryClient
from kvagent.costs import calibration as cal
from kvagent.costs import policy as pol
from kvagent.costs.breaker import PROBE_LOOKUP_DEADLINE_S, PROBE_WAIT_S, BreakerPolicy
from kvagent.costs.calibration.contents import FORMAT, MAX_OUTCOMES, MAX_SAMPLES, VERSION, empty
from kvagent.costs.calibration.fitting import prefill_features
from kvagent.errors import RegistrySkippedError, RegistryUnavailableError

PROFILE = cal.Profile("ab" * 32, "float32", "cpu:test|threads=2")
URL = "http://registry.test:8765"


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def model(path: Path, clock: Clock | None = None, **kw: object) -> cal.CostModel:
    f = cal.CalibrationFile(path, clock=clock or Clock(), max_age_s=kw.pop("max_age_s", 1000.0))  # type: ignore[arg-type]
    return cal.CostModel(f, profile=PROFILE, **kw)  # type: ignore[arg-type]


# -- fitting ------------------------------------------------------------------------------------
def test_fit_recovers_a_superlinear_prefill_and_extrapolates():
    a, b, c = 0.04, 0.0025, 1.5e-6
    truth = lambda n, p: a + b * n + c * n * (n / 2 + p)  # noqa: E731
    samples = [(n, p, truth(n, p)) for n, p in ((64, 0), (300, 0), (900, 0), (1500, 500))]
    coef = cal.fit_prefill(samples)
    assert coef == pytest.approx((a, b, c), rel=1e-6)
    est = sum(k * f for k, f in zip(coef, prefill_features(4096, 0), strict=True))
    assert est == pytest.approx(truth(4096, 0), rel=1e-6)


def test_fit_with_one_sample_is_a_plain_rate_and_never_negative():
    assert cal.fit_prefill([(600, 0, 2.4)]) == pytest.approx((0.0, 0.004, 0.0))
    # per-token cost falling with length: a fixed cost, not a negative attention term
    coef = cal.fit_prefill([(32, 0, 0.2), (256, 0, 0.9)])
    assert coef is not None and all(k >= 0 for k in coef) and coef[0] > 0
    assert cal.fit_prefill([]) is None
    assert cal.fit_load([(1e6, 0.01), (4e6, 0.031)]) == pytest.approx((0.003, 7e-9), rel=1e-6)


# -- persistence, ageing, clocks ----------------------------------------------------------------
def test_estimates_persist_across_instances_and_say_how_they_were_made(tmp_path: Path):
    path = tmp_path / "calibration.json"
    first = model(path)
    assert first.estimate_prefill(600).source == pol.ASSUMED
    first.record_prefill(300, 0, 0.9)
    first.record_prefill(1200, 0, 4.5)
    first.record_prefill(8, 0, 0.06)  # a short forward: what one forward costs whatever its length
    first.record_prefill(8, 0, 0.0)  # no time: ignored
    second = model(path)  # another process, later
    est = second.estimate_prefill(600)
    assert est.source == pol.MEASURED and est.n == 3 and est.provenance == "measured 3x"
    assert 1.8 < est.value < 2.4
    # a chat's short tail is priced with the fixed cost the short sample taught (0.03 s from the rate alone)
    assert 0.04 < second.estimate_prefill(8).value < 0.09
    assert json.loads(path.read_text())["version"] == VERSION
    fixed = model(path, params=pol.PolicyParams(prefill_tokens_per_s=100.0))
    assert fixed.estimate_prefill(600) == pol.Estimate(6.0, pol.FIXED)


def test_old_samples_age_out_and_the_count_is_bounded(tmp_path: Path):
    clock = Clock()
    m = model(tmp_path / "c.json", clock, max_age_s=100.0)
    m.record_prefill(300, 0, 0.9)
    clock.t += 60
    m.record_prefill(600, 0, 1.8)
    assert m.estimate_prefill(600).n == 2
    clock.t += 50  # the first sample is now 110 s old
    assert m.estimate_prefill(600).n == 1
    clock.t += 100
    assert m.estimate_prefill(600).source == pol.ASSUMED
    for i in range(MAX_SAMPLES + 5):
        m.record_prefill(100 + i, 0, 0.3)
    assert (
        len(json.loads((tmp_path / "c.json").read_text())["prefill"][PROFILE.key]["samples"])
        == MAX_SAMPLES
    )


def test_a_clock_going_backwards_restamps_samples_and_bounds_the_breaker(tmp_path: Path):
    clock = Clock()
    m = model(tmp_path / "c.json", clock, max_age_s=1000.0, breaker=BreakerPolicy(base_s=10, max_s=40))
    m.record_prefill(300, 0, 0.9)
    m.record_failure(URL, "ReadTimeout")
    clock.t -= 86400  # the clock jumps back a day: everything looks dated in the future
    assert m.estimate_prefill(300).n == 1  # kept, re-stamped to now...
    assert "next probe in 10 s" in (m.breaker_open(URL) or "")  # not in a day: bounded to one back-off
    m.record_prefill(600, 0, 1.8)
    clock.t += 11
    assert m.breaker_open(URL) is None
    clock.t += 1001  # ...so samples age from now on instead of living a day longer
    assert m.estimate_prefill(300).source == pol.ASSUMED


def test_a_corrupt_or_foreign_file_is_ignored_with_a_warning_and_rebuilt(tmp_path: Path, caplog):
    path = tmp_path / "c.json"
    for bad in (b"\x00garbage{", json.dumps({"format": "someone-else", "version": 1}).encode(),
                json.dumps({**empty(), "version": 99}).encode(),
                json.dumps({**empty(), "prefill": {"k": {"samples": [[1, "x", 0, 1, "m"]]}}}).encode()):
        path.write_bytes(bad)
        caplog.clear()
        m = model(path)
        with caplog.at_level(logging.WARNING, logger="kvagent.calibration"):
            assert m.estimate_prefill(500).source == pol.ASSUMED
            m.estimate_prefill(500)
        warnings = [r for r in caplog.records if "ignoring calibration file" in r.getMessage()]
        assert len(warnings) == 1 and "rebuilt" in warnings[0].getMessage()
        m.record_prefill(500, 0, 2.0)
        assert json.loads(path.read_text())["format"] == FORMAT
        assert model(path).estimate_prefill(500).n == 1


def _count_cleaning(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every timestamp the calibration contents are cleaned of (one per sample, link and outcome)."""
    from kvagent.costs.calibration import contents

    seen: list[float] = []
    stamp = contents._stamp

    def counted(t: float, now: float, max_age_s: float) -> float | None:
        seen.append(t)
        return stamp(t, now, max_age_s)

    monkeypatch.setattr(contents, "_stamp", counted)
    return seen


def _full_file(m: cal.CostModel, clock: Clock) -> None:
    """A file as a busy process leaves it: load and prefill samples and the most outcomes it keeps."""
    for i in range(8):
        m.record_load(1_000_000 * (i + 1), 0.002 * (i + 1))
        m.record_prefill(100 * (i + 1), 0, 0.3 * (i + 1))
    for i in range(MAX_OUTCOMES):
        m.record_outcome(cal.Outcome("read", pol.LOCAL_HIT, 0.01, 0.011 + i * 1e-6, 512))
    m.flush_outcomes()
    clock.t += 1


def test_warm_reads_clean_the_file_once_per_change_not_once_per_read(tmp_path: Path, monkeypatch):
    """A local hit estimates its load from the calibration file (issue 35): the file, 512 outcomes and
    all, is parsed and cleaned once per change (or when an entry ages out), not on every read."""
    path, clock = tmp_path / "c.json", Clock()
    writer = model(path, clock, max_age_s=100.0)
    _full_file(writer, clock)
    reader = model(path, clock, max_age_s=100.0)  # another process
    cleaned = _count_cleaning(monkeypatch)
    first = reader.estimate_load(4_000_000)
    assert first is not None and first.n == 8
    once = len(cleaned)
    assert once > MAX_OUTCOMES  # the first read cleans the whole file...
    for _ in range(20):
        clock.t += 0.5
        assert reader.estimate_load(4_000_000) == first
        assert reader.estimate_prefill(500).n == 8
    assert len(cleaned) == once  # ...and the next 40 estimates clean nothing
    writer.record_load(9_000_000, 0.02)  # the file changes: the reader sees the new sample
    assert reader.estimate_load(4_000_000).n == 9  # type: ignore[union-attr]
    assert len(cleaned) > once
    clock.t += 100 - 10.5 + 1  # the first samples (recorded at t0) are now older than max_age_s
    after = reader.estimate_load(4_000_000)
    assert after is not None and after.n == 1  # aged out without any write: kept contents expire
    assert reader.calibration.read() == cal.CalibrationFile(path, clock=clock, max_age_s=100.0).read()


def test_a_process_reads_its_own_outcome_writes_without_cleaning_them(tmp_path: Path, monkeypatch):
    """The outcomes' background writer leaves the cleaned contents ready: a warm read after this process's
    own write (every second while reads are recorded) neither parses nor cleans the file."""
    path, clock = tmp_path / "c.json", Clock()
    m = model(path, clock)
    _full_file(m, clock)
    m.record_outcome(cal.Outcome("read", pol.LOCAL_HIT, 0.01, 0.012, 512))
    m.flush_outcomes()  # what the writer thread does
    cleaned = _count_cleaning(monkeypatch)
    for _ in range(10):
        assert m.estimate_load(4_000_000) is not None
    assert cleaned == []
    fresh = cal.CalibrationFile(path, clock=clock, max_age_s=1000.0).read()
    assert m.calibration.read() == fresh and fresh["outcomes"][-1][6] == 0.012


def _writer(path: str, worker: int, n: int) -> None:
    m = cal.CostModel(cal.CalibrationFile(path), profile=PROFILE)
    for i in range(n):
        m.record_prefill(100 + worker * 100 + i, 0, 0.5 + i / 100)
        m.record_lookup(URL, 0.01, ok=True)


@pytest.mark.slow
def test_concurrent_writer_processes_lose_nothing(tmp_path: Path):
    path = tmp_path / "c.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 12)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.loads(path.read_text())
    assert len(data["prefill"][PROFILE.key]["samples"]) == 48
    assert data["links"][URL]["rtt_n"] == 48
    assert not list(tmp_path.glob(".calibration-*"))  # no temp file left behind


# -- links, loads, decisions --------------------------------------------------------------------
def test_decide_fills_measured_estimates_and_the_reason_names_them(tmp_path: Path):
    m = model(tmp_path / "c.json", verify="sample", num_layers=30)
    for n, s in ((300, 1.2), (600, 2.4), (1200, 5.1)):
        m.record_prefill(n, 0, s)
    for _ in range(3):
        m.record_lookup(URL, 0.004, ok=True)
        m.record_download(URL, 20_000_000, 0.2)
    m.record_load(20_000_000, 0.05)
    req = pol.Request(n_tokens=600, remote_artifact=True, artifact_bytes=28_000_000)
    d = m.decide(req, url=URL + "/")
    assert d.choice == pol.FETCH
    assert "link measured 3x" in d.reason and "measured 3x on this machine" in d.reason
    assert d.estimates["bandwidth_bytes_per_s"] == pytest.approx(20e6 / (0.2 - 0.004), rel=0.01)
    assert d.estimates["verify_s"] == pytest.approx(2.4 * (1 / 30 + 64 / 600), rel=0.05)
    assert d.estimates["load_s"] == pytest.approx(0.07, rel=0.01)
    slow_link = model(tmp_path / "c.json", params=pol.PolicyParams(bandwidth_bytes_per_s=5e6))
    assert slow_link.decide(req, url=URL).choice == pol.LOCAL_PREFILL


def test_a_fetch_is_priced_with_what_fetched_kv_took_to_land_here(tmp_path: Path):
    """Once fetched artifacts have landed here (checksum, decode, verification, store write, after the
    download), the next fetch's estimate uses that measured time instead of a load and a verification assumed
    from the prefill rate; per verification mode, which changes what landing costs."""
    path = tmp_path / "c.json"
    m = model(path, verify="sample", num_layers=30)
    for n, s in ((300, 1.2), (600, 2.4), (1200, 5.1)):
        m.record_prefill(n, 0, s)
    for _ in range(3):
        m.record_lookup(URL, 0.004, ok=True)
        m.record_download(URL, 20_000_000, 0.2)
    req = pol.Request(n_tokens=600, remote_artifact=True, artifact_bytes=28_000_000)
    assert m.estimate_landing(28_000_000) is None
    assert m.decide(req, url=URL).estimates["sources"]["load"] == "assumed"
    for nbytes, seconds in ((10_000_000, 0.12), (20_000_000, 0.22), (40_000_000, 0.42)):
        m.record_landing(nbytes, seconds)
    m.record_landing(10, 1.0)  # too small to say anything: ignored
    after = model(path, verify="sample", num_layers=30).decide(req, url=URL)  # another process, later
    assert after.estimates["load_s"] == pytest.approx(0.30, rel=0.02) and after.estimates["verify_s"] == 0.0
    assert "load measured 3x" in after.reason
    full = model(path, verify="full", num_layers=30).decide(req, url=URL)  # no landing measured for "full"
    assert full.estimates["sources"]["load"] == "assumed" and full.estimates["verify_s"] > 2.0
    assert cal.summary(cal.CalibrationFile(path).read())["landing"][m.landing_key]["samples"] == 3


@pytest.mark.slow
def test_first_use_probe_is_short_and_says_so(tmp_path: Path, tiny_model):
    from kvagent.engines.hf import TransformersEngine

    m = model(tmp_path / "c.json")
    engine = TransformersEngine(tiny_model("llama"))
    assert m.ensure_probed(cal.engine_probe(engine)) is True
    est = m.estimate_prefill(1000)
    assert est.source == pol.PROBE and est.provenance == "first-use probe"
    assert m.ensure_probed(cal.engine_probe(engine)) is False  # history exists now
    assert "first-use probe on this machine" in m.decide(pol.Request(n_tokens=1000)).reason


def test_probe_stays_within_its_budget():
    clock = Clock(0.0)
    ran: list[int] = []

    def run(n: int) -> None:  # 0.1 s fixed + 1 ms per token
        ran.append(n)
        clock.t += 0.1 + n / 1000

    samples = cal.probe_prefill(run, budget_s=1.0, clock=clock)
    assert ran[0] == 32 and len(ran) == 2 and clock.t <= 1.0
    assert samples == [(32, pytest.approx(0.132)), (ran[1], pytest.approx(0.1 + ran[1] / 1000))]
    clock.t, ran[:] = 0.0, []
    assert len(cal.probe_prefill(lambda n: run(n * 20), budget_s=1.0, clock=clock)) == 1  # slow: one length


# -- the circuit breaker ------------------------------------------------------------------------
def test_breaker_opens_backs_off_probes_once_and_closes(tmp_path: Path):
    clock = Clock()
    path = tmp_path / "c.json"
    policy = BreakerPolicy(base_s=10, factor=2, max_s=600, probe_s=30)
    a, b = model(path, clock, breaker=policy), model(path, clock, breaker=policy)  # two processes
    assert a.breaker_open(URL) is None
    a.record_lookup(URL, 0.5, ok=False, error="ReadTimeout")
    why = b.breaker_open(URL)
    assert why is not None and why.startswith("registry skipped: failing since 2027-01-15 08:00:00 UTC")
    assert "next probe in 10 s" in why
    clock.t += 10
    assert a.breaker_open(URL) is None  # half-open: a claims the one probe...
    assert a.lookup_deadline(100_000, URL) == PROBE_LOOKUP_DEADLINE_S  # ...and keeps it short
    assert "another process is probing" in (b.breaker_open(URL) or "")
    a.record_failure(URL, "ReadTimeout")  # the probe failed: a longer back-off
    clock.t += 15
    assert "2 failures, next probe in 5 s" in (b.breaker_open(URL) or "")
    clock.t += 5
    assert b.breaker_open(URL) is None
    b.record_lookup(URL, 0.01, ok=True)  # the probe worked: closed for everyone
    assert a.breaker_open(URL) is None and b.breaker_open(URL) is None
    assert a.lookup_deadline(100_000, URL) == pol.LOOKUP_DEADLINE_CEILING_S


def test_lookup_deadline_follows_the_prefill_estimate(tmp_path: Path):
    m = model(tmp_path / "c.json")
    m.record_prefill(1000, 0, 4.0)
    assert m.lookup_deadline(1000) == pytest.approx(2.0)
    assert m.lookup_deadline(50) == pol.LOOKUP_DEADLINE_FLOOR_S


@pytest.fixture()
def stalled_registry():
    """A real socket that accepts connections and never answers."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join(2)
    for c in held:
        c.close()
    srv.close()


def test_a_stalled_registry_costs_one_deadline_then_is_skipped(tmp_path: Path, stalled_registry: str):
    m = model(tmp_path / "c.json")
    m.record_prefill(1000, 0, 1.6)
    assert m.lookup_deadline(1000, stalled_registry) == pytest.approx(0.8)
    client = RegistryClient(stalled_registry, retries=3, backoff_initial=0.05)
    key = "0" * 64
    t0 = time.perf_counter()
    with pytest.raises(RegistryUnavailableError):
        m.guarded_lookup(stalled_registry, 1000, lambda deadline: client.lookup(key, timeout=deadline))
    assert 0.7 < time.perf_counter() - t0 < 1.1  # the deadline, retries included, not the 20 s read timeout
    other = model(tmp_path / "c.json")  # the next process on the machine
    t1 = time.perf_counter()
    with pytest.raises(RegistrySkippedError, match="^registry skipped: failing since"):
        other.guarded_lookup(stalled_registry, 1000, lambda deadline: client.lookup(key, timeout=deadline))
    assert time.perf_counter() - t1 < 0.1
    t2 = time.perf_counter()
    with pytest.raises(RegistryUnavailableError):
        client.lookup_prefix(["1" * 64], timeout=0.3)
    assert time.perf_counter() - t2 < 0.6
    client.close()
    # a deadline never lengthens the client's own
    short = RegistryClient(stalled_registry, timeout=0.3, retries=1)
    t3 = time.perf_counter()
    with pytest.raises(RegistryUnavailableError):
        short.lookup(key, timeout=5.0)
    assert time.perf_counter() - t3 < 1.0
    short.close()


def test_a_half_open_probe_costs_a_read_little_and_finishes_in_the_background(
    tmp_path: Path, stalled_registry: str, monkeypatch: pytest.MonkeyPatch
):
    # the probe's deadline made long here (3 s), so that only the read's own wait can end it early: with the
    # 0.5 s floor, a CI machine that stalled this process for 0.5 s let the probe time out before the read
    # began to wait (the read then got the probe's RegistryUnavailableError, as it should)
    probe_deadline = 3.0
    monkeypatch.setattr("kvagent.costs.calibration.model.PROBE_LOOKUP_DEADLINE_S", probe_deadline)
    clock = Clock()
    path = tmp_path / "c.json"
    m = model(path, clock)
    m.record_failure(stalled_registry, "ReadTimeout")
    clock.t += 3600  # the back-off is over: the next read sends the half-open probe
    m.record_prefill(1000, 0, 4 * probe_deadline)  # a lookup deadline of half the prefill: the probe's binds
    assert m.lookup_deadline(1000, stalled_registry) > probe_deadline
    client = RegistryClient(stalled_registry, retries=1)
    t0 = time.perf_counter()
    with pytest.raises(
        RegistrySkippedError, match="^registry skipped: failing since .*goes on in the background"
    ):
        m.guarded_lookup(stalled_registry, 1000, lambda deadline: client.lookup("0" * 64, timeout=deadline))
    assert time.perf_counter() - t0 < PROBE_WAIT_S + 1.0  # not the probe's 3 s deadline
    other = model(path, clock)  # meanwhile the other processes keep skipping it
    assert "another process is probing" in (other.breaker_open(stalled_registry) or "")
    deadline = time.monotonic() + probe_deadline + 5
    while "2 failures" not in (other.breaker_open(stalled_registry) or ""):  # the probe timed out aside
        assert time.monotonic() < deadline, other.breaker_open(stalled_registry)
        time.sleep(0.05)
    client.close()
    clock.t += 3600  # a registry that recovered answers the probe within the wait: the read uses the answer
    assert m.guarded_lookup(stalled_registry, 1000, lambda deadline: "handle") == "handle"
    assert other.breaker_open(stalled_registry) is None  # closed for everyone


def test_calibrate_show_prints_what_is_stored(tmp_path: Path, capsys, monkeypatch):
    from kvagent.cli import main

    monkeypatch.delenv("KVAGENT_CALIBRATION", raising=False)
    m = cal.CostModel(cal.CalibrationFile(cal.default_path(tmp_path)), profile=PROFILE)
    m.record_prefill(500, 0, 2.0)
    m.record_lookup(URL, 0.02, ok=True)
    m.record_failure("http://down.test", "ConnectError")
    assert main(["--cache-dir", str(tmp_path), "calibrate", "--show", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["file"] == str(tmp_path / "calibration.json") and out["measured_now"] == []
    assert out["prefill"][PROFILE.key]["seconds"]["1024"] == pytest.approx(2.0 * 1024 / 500)
    assert out["links"][URL]["rtt_n"] == 1 and out["breakers"]["http://down.test"]["failures"] == 1
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    assert main(["--cache-dir", str(tmp_path), "calibrate", "--show"]) == 0
    text = capsys.readouterr().out
    assert "measured 1x" in text and "failing since" in text
    monkeypatch.setenv("KVAGENT_CALIBRATION", str(tmp_path / "other.json"))
    assert main(["--cache-dir", str(tmp_path), "calibrate", "--show", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prefill"] == {}
