"""Every read is broken down into stages and checked against the cost model's prediction for its path (issue
26)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kvagent import KVAgent
from kvagent.costs import calibration as cal
from kvagent.costs import stages as stg
from kvagent.costs.calibration.model import MIN_LOAD_BYTES
from tests.conftest import long_text


def test_a_stage_clock_times_blocks_only_while_a_read_is_measured():
    with stg.stage("lookup"):  # no read measured on this thread: nothing to time, nothing fails
        pass
    with stg.measuring() as clock:
        with stg.stage("download"):
            time.sleep(0.01)
        with stg.stage("lookup"):
            pass
        stg.add("download", 0.5)
        stg.predict("local-prefill", 1.0, 100, 0)
        stg.path_done()
        with stg.measuring() as inner:  # a nested read has its own clock; the outer one comes back
            stg.add("resume", 1.0)
        stg.add("resume", 2.0)
    assert inner.seconds == {"resume": 1.0}
    assert list(clock.breakdown()) == ["lookup", "download", "resume"]
    assert clock.seconds["download"] >= 0.51 and clock.seconds["resume"] == 2.0
    p = clock.prediction
    assert p is not None and p.path == "local-prefill" and p.done is not None and p.done >= p.at
    assert stg.current() is None


def test_reads_carry_stages_and_predictions_and_are_recorded(embedded, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("KVAGENT_CALIBRATION", raising=False)
    agent = KVAgent(embedded.model, tokenizer=embedded.tokenizer, cache_dir=tmp_path, memory_slots=1)
    cost = agent.resolver.cost
    assert cost is not None
    seen: list[cal.Outcome] = []
    cost.observers.append(seen.append)
    text = long_text(300, embedded.tokenizer)
    first = agent.read(text).cache
    assert first.status == "prefill" and first.predicted_seconds > 0
    assert set(first.stages) <= set(stg.STAGES) and first.stages["resume"] > 0 and "lookup" in first.stages
    assert "store_write" in first.stages
    assert [(o.kind, o.path) for o in seen] == [("read", "local-prefill")]
    assert seen[0].actual_s == pytest.approx(first.stages["resume"], rel=0.5)
    # a local hit is checked against the load estimate once loads have been measured
    cost.record_load(10 * MIN_LOAD_BYTES, 0.01)
    other = KVAgent(embedded.model, tokenizer=embedded.tokenizer, cache_dir=tmp_path, memory_slots=1)
    other.resolver.cost.observers.append(seen.append)  # type: ignore[union-attr]
    hit = other.read(text).cache
    assert hit.status == "local" and hit.predicted_seconds > 0 and hit.stages["lookup"] > 0
    assert seen[-1].path == "local-hit" and seen[-1].actual_s == pytest.approx(hit.load_seconds)
    # a prompt continuing the cached document: a continuation, recorded as one
    longer = agent.document_ids(text) + agent.tokenizer.encode(" " + long_text(80, embedded.tokenizer),
                                                               add_special_tokens=False)
    cont = agent.resolver.resolve(longer, document=False).info
    assert cont.status == "prefix" and cont.cached_tokens > 0 and cont.predicted_seconds > 0
    assert seen[-1].path == "prefix-prefill" and seen[-1].past == cont.cached_tokens
    cost.flush_outcomes()
    other.resolver.cost.flush_outcomes()  # type: ignore[union-attr]
    stored = cost.calibration.read()
    assert {o[2] for o in stored["outcomes"]} == {"local-prefill", "local-hit", "prefix-prefill"}
    assert any(s[2] > 0 for s in stored["prefill"][cost.profile.key]["samples"])  # the continuation's past
    from kvagent.cli import main

    assert main(["--cache-dir", str(tmp_path), "calibrate", "--show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["prediction_errors"]["count"] == 3 and len(shown["recent_outcomes"]) == 3
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["--cache-dir", str(tmp_path), "calibrate", "--show"]) == 0
    text_out = capsys.readouterr().out
    assert "prediction errors" in text_out and "prefix-prefill" in text_out and "within 2x" in text_out
    agent.close()
    other.close()


def test_outcomes_reach_observers_at_once_and_the_file_in_the_background(tmp_path: Path):
    model = cal.CostModel(
        cal.CalibrationFile(tmp_path / "c.json"), profile=cal.Profile("ef" * 32, "f32", "m")
    )
    seen: list[cal.Outcome] = []
    model.observers.append(seen.append)
    model.observers.append(lambda o: 1 / 0)  # a broken observer is logged, never raised to the read
    model.record_outcome(cal.Outcome("read", "fetch-and-resume", 2.0, 3.0, 1000, 0))
    model.record_outcome(cal.Outcome("chat", "tail", 0.0, 3.0))  # no prediction: nothing to check
    assert [o.ratio for o in seen] == [1.5]
    deadline = time.monotonic() + 10
    while not model.calibration.read()["outcomes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    (row,) = model.calibration.read()["outcomes"]
    assert row[1:] == ["read", "fetch-and-resume", 1000, 0, 2.0, 3.0]
    errors = cal.prediction_errors([row, [0, "read", "local-prefill", 10, 0, 1.0, 0.25]])
    assert errors["count"] == 2 and errors["within_2x"] == 0.5 and errors["worst_ratio"] == 0.25
    assert errors["by_path"]["local-prefill"]["median_ratio"] == 0.25


def test_the_distribution_has_percentiles_extremes_and_kind_path_groups():
    ratios = (0.4, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.5, 1.9, 3.0)
    rows = [[0, "chat", "tail", 16, 1500, 0.1, 0.1 * r] for r in ratios]
    rows.append([0, "prompt", "tail", 16, 1500, 1.0, 1.0])
    d = cal.prediction_errors(rows)
    assert d["count"] == 11 and d["within_2x"] == pytest.approx(9 / 11)
    assert d["slower_than_2x"] == pytest.approx(1 / 11) and d["faster_than_2x"] == pytest.approx(1 / 11)
    assert d["worst_ratio"] == pytest.approx(3.0) and d["p05_ratio"] == pytest.approx(0.4)
    assert d["p95_ratio"] == pytest.approx(3.0) and d["median_ratio"] == pytest.approx(1.1)
    assert set(d["by_kind_path"]) == {"chat/tail", "prompt/tail"} and d["by_path"]["tail"]["count"] == 11
    chat = d["by_kind_path"]["chat/tail"]
    assert chat["count"] == 10 and chat["within_2x"] == 0.8 and chat["p25_ratio"] == pytest.approx(0.9)
    assert cal.describe_ratios([]) == {"count": 0}
