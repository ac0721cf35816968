"""A host's start: with no measured prefill for its machine + model it measures a few short forwards before
it serves (``ModelHost.warm_up``), so its first predictions (a chat's prompt, then a chat tail) are measured
ones; ``--no-calibrate-at-start`` / ``KVAGENT_CALIBRATE_AT_START=0`` skips that."""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from kvagent.chat.turn import PromptTurns
from kvagent.costs import calibration as cal
from kvagent.costs import policy as pol
from kvagent.costs.calibration.measure import WARMUP_LENGTHS, WARMUP_TAILS
from kvagent.engines import Finish, events
from kvagent.engines.params import GenerationParams
from kvagent.server.__main__ import build_parser, settings_from_args
from kvagent.server.settings import Settings
from kvagent.server.state import build_state
from tests.conftest import save_tiny_llama

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-host-model"), seed=11)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KVAGENT_CALIBRATION", "KVAGENT_CALIBRATE_AT_START", "KVAGENT_POLICY"):
        monkeypatch.delenv(name, raising=False)


def _state(data_dir: Path, model_dir: Path, **kw: Any) -> Any:
    return build_state(Settings(data_dir=data_dir, token_file=None, model=str(model_dir), **kw))


def _samples(data_dir: Path) -> list[list[Any]]:
    path = data_dir / "host-cache" / "calibration.json"
    if not path.exists():
        return []
    return [s for entry in json.loads(path.read_text())["prefill"].values() for s in entry["samples"]]


def test_a_fresh_host_measures_before_it_serves_and_logs_it(tmp_path: Path, model_dir: Path, caplog):
    caplog.set_level(logging.INFO, logger="kvagent.calibration")
    st = _state(tmp_path / "a", model_dir)
    try:
        samples = _samples(tmp_path / "a")  # written before build_state returned, i.e. before any request
        assert all(s[4] == "m" for s in samples)
        shapes = sorted((int(s[1]), int(s[2])) for s in samples)
        big = max(WARMUP_LENGTHS)
        assert shapes == sorted([(n, 0) for n in WARMUP_LENGTHS] + [(n, big) for n in WARMUP_TAILS])
        assert any(f"{len(samples)} samples in" in r.getMessage() and r.getMessage().startswith("calibrating")
                   for r in caplog.records)
        est = st.model_host.agent.cost.estimate_prefill(16, 1500)
        assert est.source == pol.MEASURED
    finally:
        st.meta.close()
    caplog.clear()
    again = _state(tmp_path / "a", model_dir)  # a restart: the file has samples, nothing is measured again
    again.meta.close()
    assert len(_samples(tmp_path / "a")) == len(samples)
    assert not any(r.getMessage().startswith("calibrating") for r in caplog.records)


@pytest.mark.parametrize("how", ["setting", "env"])
def test_the_skip_flag_skips(tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, how: str):
    if how == "env":
        monkeypatch.setenv("KVAGENT_CALIBRATE_AT_START", "0")
        st = _state(tmp_path / "b", model_dir)
    else:
        st = _state(tmp_path / "b", model_dir, calibrate_at_start=False)
    st.meta.close()
    assert _samples(tmp_path / "b") == []
    assert st.model_host.agent.cost.estimate_prefill(16, 1500).source == pol.ASSUMED


def test_the_cli_flag_reaches_the_settings(tmp_path: Path):
    base = ["--data-dir", str(tmp_path)]
    assert settings_from_args(build_parser().parse_args(base)).calibrate_at_start is None  # the Config's
    flagged = build_parser().parse_args([*base, "--no-calibrate-at-start"])
    assert settings_from_args(flagged).calibrate_at_start is False


def _chat(turns: PromptTurns, ids: list[int]) -> None:
    turn = turns.prepare(ids, GenerationParams(max_new_tokens=1), namespace="ns")
    assert any(isinstance(ev, Finish) for ev in events(turns.engine, turn.request))


def test_a_fresh_hosts_first_predictions_are_within_2x(tmp_path: Path, model_dir: Path):
    """The issue's misses: a host's first chat (a document's prompt, prefilled) and its first chat tail (a
    16-token question after it) were predicted on assumed constants, or on a rate from one long prompt that
    knows nothing of a forward's fixed cost (12x and 6x off for this model without the warm-up); after the
    warm-up the tail is within 2x and the first prompt (one timing) within 3x. A tail takes milliseconds, so
    its actual cost is the median of five tails of the same shape (a neighbour on a shared machine slows
    single ones down)."""
    st = _state(tmp_path / "c", model_dir)
    host = st.model_host
    try:
        cost = host.agent.cost
        seen: list[cal.Outcome] = []
        cost.observers.append(seen.append)
        turns = PromptTurns(host.batch, host.agent.resolver)
        doc = [(7 + 13 * i) % 500 + 1 for i in range(1200)]
        _chat(turns, doc)  # the host's first chat: its prompt is prefilled
        for q in range(5):  # then questions about the same document: 16-token chat tails
            _chat(turns, [*doc, *((100 + 7 * q + i) % 500 + 1 for i in range(16))])
            for _ in range(100):  # a tail's outcome is recorded in the background, before the next one
                if sum(o.path == "tail" and o.n_tokens in (16, 17) for o in seen) > q:
                    break
                time.sleep(0.02)
        # the engine prefills the first prompt itself, in chunks: checked against the sum of the chunks'
        # costs. One timing of a ~50 ms prefill, so within 3x (a full suite's load made one 2.01x), still far
        # from the 12x and 6x misses this test is about
        first = next(o for o in seen if o.path == pol.LOCAL_PREFILL)
        assert first.n_tokens == 1200 and 1 / 3 <= first.ratio <= 3.0, first
        tails = [o for o in seen if o.path == "tail" and o.n_tokens in (16, 17)]
        assert len(tails) == 5 and tails[0].past >= 1199, seen
        actual = statistics.median(o.actual_s for o in tails)
        assert 0.5 <= actual / tails[0].predicted_s <= 2.0, tails
    finally:
        host.close()
        st.meta.close()


def test_kvagent_serve_answers_healthz_only_once_it_has_measured(tmp_path: Path, model_dir: Path):
    """A real ``kvagent serve`` process: by the time ``/v1/healthz`` first answers, the samples are in the
    calibration file and the log says what was measured."""
    from registry_server import start_server

    srv = start_server(tmp_path / "host", {"t-000000000001": {"principal": "a"}}, model=str(model_dir),
                       extra_env={"KVAGENT_CALIBRATION": "", "KVAGENT_CALIBRATE_AT_START": ""})
    try:
        samples = _samples(tmp_path / "host")
        assert len(samples) == len(WARMUP_LENGTHS) + len(WARMUP_TAILS)
        stored = json.loads((tmp_path / "host" / "host-cache" / "calibration.json").read_text())
        key = next(iter(stored["prefill"]))
        assert f"calibrating {key}: {len(samples)} samples in" in srv.log()
    finally:
        srv.stop()
