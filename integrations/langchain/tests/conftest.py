"""Shared fixtures: the embedded model is loaded once per session, into a temporary cache."""

from __future__ import annotations

from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[3] / "kvagent" / "data" / "sample.txt"


@pytest.fixture(scope="session")
def agent(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from kvagent import KVAgent

    agent = KVAgent(cache_dir=tmp_path_factory.mktemp("kvcache"))
    yield agent
    agent.close()


@pytest.fixture(scope="session")
def document(agent) -> str:  # type: ignore[no-untyped-def]
    """The leading paragraphs of the sample document, about 600 tokens."""
    text = ""
    for para in SAMPLE.read_text(encoding="utf-8").split("\n\n"):
        text = f"{text}\n\n{para}" if text else para
        if len(agent.document_ids(text)) >= 550:
            break
    return text
