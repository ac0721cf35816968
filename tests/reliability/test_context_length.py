"""Documents longer than the model's context are refused before any prefill, with both numbers named;
an explicit opt-in (argument, KVAGENT_ALLOW_CONTEXT_OVERFLOW, --allow-context-overflow) reads them anyway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvagent import KVAgent, cli
from kvagent.config import Config
from kvagent.engines.hf import check_context
from kvagent.errors import ContextLengthError, EngineError
from tests.conftest import save_tiny_llama

MAX_POSITIONS = 64


def test_check_context_is_pure_and_names_both_numbers() -> None:
    check_context(64, 64)
    check_context(10_000, None)  # unknown context: nothing to check against
    check_context(65, 64, allow_overflow=True)
    with pytest.raises(ContextLengthError, match=r"21181 tokens .* 8192 positions") as e:
        check_context(21181, 8192)
    assert isinstance(e.value, EngineError) and (e.value.n_tokens, e.value.max_positions) == (21181, 8192)


def test_opt_in_resolves_from_argument_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVAGENT_ALLOW_CONTEXT_OVERFLOW", raising=False)
    assert Config.resolve().allow_context_overflow is False
    monkeypatch.setenv("KVAGENT_ALLOW_CONTEXT_OVERFLOW", "1")
    assert Config.resolve().allow_context_overflow is True
    assert Config.resolve(allow_context_overflow=False).allow_context_overflow is False


@pytest.fixture(scope="module")
def short_model_dir(embedded: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with only 64 positions, saved with the embedded model's tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("short-model"), 3, tokenizer=embedded.tokenizer,
                           hidden_size=32, intermediate_size=64, max_position_embeddings=MAX_POSITIONS)


LONG = " ".join(f"Paragraph {i} says the ferry leaves at {i} o'clock." for i in range(20))


@pytest.mark.slow
def test_cli_refuses_before_prefill_and_opt_in_reads(short_model_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("KVAGENT_ALLOW_CONTEXT_OVERFLOW", raising=False)
    monkeypatch.setenv("KVAGENT_MODELS_DIR", str(tmp_path / "models"))
    doc = tmp_path / "long.txt"
    doc.write_text(LONG, encoding="utf-8")
    base = ["--model", str(short_model_dir), "--cache-dir", str(tmp_path / "cache")]
    assert cli.main([*base, "read", str(doc)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"model's context is {MAX_POSITIONS} positions" in err and "--allow-context-overflow" in err, err
    assert not list((tmp_path / "cache").rglob("*.val")), "nothing may be prefilled or stored"
    assert cli.main([*base, "--allow-context-overflow", "read", "--json", str(doc)]) == 0
    assert '"status": "prefill"' in capsys.readouterr().out
    monkeypatch.setenv("KVAGENT_ALLOW_CONTEXT_OVERFLOW", "1")
    assert cli.main([*base, "read", "--json", str(doc)]) == 0  # the environment opts in as well
    assert '"status": "local"' in capsys.readouterr().out


@pytest.mark.slow
def test_loader_refuses_before_prefill(
    short_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from langchain_kvagent import KVDocumentLoader

    monkeypatch.delenv("KVAGENT_ALLOW_CONTEXT_OVERFLOW", raising=False)
    agent = KVAgent(str(short_model_dir), cache_dir=tmp_path / "cache", models_dir=tmp_path / "models")
    try:
        n = len(agent.document_ids(LONG))
        assert n > MAX_POSITIONS
        with pytest.raises(ContextLengthError, match=f"{n} tokens .* {MAX_POSITIONS} positions"):
            KVDocumentLoader(LONG, agent=agent).load()
        assert agent.counters["prefills"] == 0
        [short] = KVDocumentLoader("A short note.", agent=agent).load()  # fits: read as before
        assert short.metadata["kv_status"] == "prefill"
    finally:
        agent.close()
    opted_in = KVAgent(str(short_model_dir), cache_dir=tmp_path / "cache", models_dir=tmp_path / "models",
                       allow_context_overflow=True)
    try:
        [long] = KVDocumentLoader(LONG, agent=opted_in).load()
        assert (long.metadata["kv_status"], long.metadata["kv_tokens"]) == ("prefill", n)
    finally:
        opted_in.close()
