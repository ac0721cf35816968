"""Defaults that scale: ``--max-batch`` sized from the memory the KV may take (``kvagent.server.sizing``),
``--max-queue`` from it, and a queued request's wait visible in the metrics."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from kvagent.engines import GenerationRequest, TransformersBatchEngine, events
from kvagent.engines.hf import TransformersEngine
from kvagent.engines.params import GenerationParams
from kvagent.server import sizing
from kvagent.server.__main__ import build_parser, settings_from_args
from kvagent.server.metrics import Metrics
from kvagent.server.settings import Settings
from kvagent.server.state import build_state
from tests.conftest import save_tiny_llama

GiB = 1 << 30


@pytest.mark.parametrize(
    ("available", "per_token", "context", "want"),
    [
        (64 * GiB, 23040, 8192, 182),  # SmolLM2-135M in bf16 at 8k: 180 MiB a sequence, 32 GiB for the KV
        (16 * GiB, 46080, 8192, 22),  # the same in float32 with 16 GiB available
        (1 * GiB, 23040, 8192, 8),  # little memory: never below 8
        (512 * GiB, 256, 4096, 256),  # a tiny model: never above 256
        (0, 23040, 8192, 8),  # memory unknown
        (64 * GiB, 23040, None, 182),  # no stated context: 8192 assumed
        (80 * GiB, 147456, 40960, 8),  # Qwen3-4B bf16 at its full 40k context on an 80 GiB GPU
    ],
)
def test_max_batch_is_half_the_available_memory_over_a_sequences_kv_clamped(
    available: int, per_token: int, context: int | None, want: int
) -> None:
    assert sizing.default_max_batch(available, per_token, context) == want
    if sizing.MIN_BATCH < want < sizing.MAX_BATCH:
        assert want == int(available * sizing.KV_FRACTION) // (per_token * (context or 8192))


def test_available_memory_is_memavailable(tmp_path: Path) -> None:
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    assert sizing.available_memory("cpu", info) == 20000000 * 1024
    assert sizing.available_memory("cpu", tmp_path / "missing") == 0


def test_the_flags_default_to_the_machines_sizes(tmp_path: Path) -> None:
    """Before: ``--max-batch`` and ``--max-queue`` defaulted to a fixed 8."""
    args = settings_from_args(build_parser().parse_args(["--data-dir", str(tmp_path)]))
    assert args.max_batch is None and args.max_queue is None
    given = build_parser().parse_args(["--data-dir", str(tmp_path), "--max-batch", "3", "--max-queue", "5"])
    assert (settings_from_args(given).max_batch, settings_from_args(given).max_queue) == (3, 5)
    with pytest.raises(Exception, match="max_queue must be >= 1"):
        Settings(data_dir=tmp_path, token_file=None, max_queue=0)


@pytest.mark.slow
def test_a_host_sizes_its_batch_from_its_models_kv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVAGENT_CALIBRATE_AT_START", "0")
    model_dir = save_tiny_llama(tmp_path / "model", seed=2)
    monkeypatch.setattr(sizing, "available_memory", lambda device="cpu": 80 * 2**20)
    st = build_state(Settings(data_dir=tmp_path / "d", token_file=None, model=str(model_dir)))
    try:
        eng = st.host.agent.engine
        per_seq = eng.layout.bytes_per_token(eng.dtype) * eng.max_positions  # 512 B x 4096 = 2 MiB
        assert per_seq == 2 << 20
        assert st.host.max_batch == st.settings.max_batch == 20  # 80 MiB x 0.5 / 2 MiB
        assert st.host.batch.max_batch == 20
        assert st.settings.max_queue == 40
    finally:
        st.host.close()
        st.meta.close()


def test_a_queued_requests_wait_is_observed_when_it_gets_a_slot(tiny_model: Any) -> None:
    """Two requests on a batch of one: the second waits for the first, and the histogram shows it."""
    metrics = Metrics()
    batch = TransformersBatchEngine(TransformersEngine(tiny_model("llama")), max_batch=1)
    metrics.watch(batch)
    params = GenerationParams(max_new_tokens=12)
    requests = [GenerationRequest((5, 6, 7 + i), None, params) for i in range(2)]
    threads = [threading.Thread(target=lambda r=r: list(events(batch, r))) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    batch.close()
    text = generate_latest(metrics.registry).decode()
    assert "kvagent_batch_queue_wait_seconds_count 2.0" in text
    waited = metrics.batch_queue_wait.collect()[0].samples
    total = next(s.value for s in waited if s.name.endswith("_sum"))
    assert total > 0
