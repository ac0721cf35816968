"""Model loading: the embedded GGUF converts once; local directories load offline; errors are clear."""

from __future__ import annotations

import pytest

from kvagent import KVAgent, ModelLoadError
from kvagent.models import ensure_embedded, load_model, model_fingerprint
from tests.conftest import save_tiny_llama


@pytest.mark.slow
def test_embedded_gguf_converts_once_then_loads_without_conversion(tmp_path, embedded, monkeypatch):
    models_dir = tmp_path / "models"
    messages: list[str] = []
    path = ensure_embedded(models_dir, notify=messages.append)
    assert (path / "model.safetensors").is_file() and (path / "kvagent-converted.json").is_file()
    assert messages and "once" in messages[0]
    # Later loads must not convert again: make conversion fail loudly if it were attempted.
    import kvagent.models as km

    def boom(*_a, **_k):  # pragma: no cover - only runs if the test fails
        raise AssertionError("converted the GGUF a second time")

    monkeypatch.setattr(km, "_convert_gguf", boom)
    loaded = load_model("smollm2", models_dir)
    # Same weights and tokenizer as the session's model, converted independently.
    assert loaded.model_fingerprint == embedded.model_fingerprint
    assert loaded.tokenizer_fingerprint == embedded.tokenizer_fingerprint


def test_a_local_model_directory_loads_offline(tmp_path, tiny_model, embedded):
    model_dir = save_tiny_llama(tmp_path / "tiny", tokenizer=embedded.tokenizer, hidden_size=32,
                                intermediate_size=64, max_position_embeddings=1024)
    loaded = load_model(str(model_dir), tmp_path / "models")
    assert loaded.model_fingerprint == model_fingerprint(loaded.model)
    agent = KVAgent(str(model_dir), cache_dir=tmp_path / "cache", models_dir=tmp_path / "models")
    doc = agent.read("A short document about tides and ferries, long enough to matter.")
    assert agent.read("A short document about tides and ferries, long enough to matter.").key == doc.key
    rep = agent.verify(doc, "What is it about?", max_new_tokens=16)
    assert rep.exact
    agent.close()


def test_fingerprint_changes_with_one_weight(tiny_model):
    import torch

    model = tiny_model("llama")
    before = model_fingerprint(model)
    with torch.no_grad():
        p = next(model.parameters())
        old = p.view(-1)[0].item()
        p.view(-1)[0] += 1e-3
        try:
            assert model_fingerprint(model) != before
        finally:
            p.view(-1)[0] = old
    assert model_fingerprint(model) == before


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(tmp_path / "nope"), tmp_path / "models")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model("some-org/not-downloaded-model", tmp_path / "models")
