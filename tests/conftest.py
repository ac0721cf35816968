"""Shared fixtures: tiny random models of several architectures, and the embedded model loaded once."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from kvagent.server.ledger import Ledger

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite's models run in float32 unless a test asks for another dtype (dtype=... / --dtype): its exactness
# tests compare against float32 references, and "auto" would pick bfloat16 on a CPU with AMX / AVX512-BF16.
# Spawned servers inherit it. The dtype tests (tests/test_dtype.py) set or clear it themselves.
os.environ["KVAGENT_DTYPE"] = "float32"

# Property tests: CI replays the same derandomised examples on every run (a new counterexample is found by
# running the suite locally, where Hypothesis explores and keeps what it finds), and prints a reproducer blob.
try:
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        _hyp_settings.load_profile("ci")
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    pass

SAMPLE = Path(__file__).resolve().parents[1] / "kvagent" / "data" / "sample.txt"

TINY_ARCHS = ("llama", "qwen3", "qwen2", "mistral", "gpt2")


def tiny_config(arch: str, vocab: int = 512, **sizes: int) -> Any:
    """A small config of ``arch`` (``sizes`` override the common ones of the non-GPT-2 architectures).
    Exactness does not depend on the weights, so random init is fine."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    common.update(sizes)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=4096,
                          bos_token_id=0, eos_token_id=0)
    raise ValueError(arch)


def save_tiny_llama(directory: Path, seed: int | None = None, *, tokenizer: Any = None, **sizes: int) -> Path:
    """Save a tiny random llama (``tiny_config("llama", **sizes)``, seeded unless ``seed`` is None) to
    ``directory`` for a server or agent to load; with ``tokenizer`` (its vocabulary, saved beside the weights)
    the directory is a whole local model with a real chat template."""
    from transformers import AutoModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    vocab = len(tokenizer) if tokenizer is not None else 512
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab, **sizes)).save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_model() -> Callable[[str], Any]:
    """Factory: a seeded tiny random model of the given architecture (cached per arch)."""
    from transformers import AutoModelForCausalLM

    made: dict[str, Any] = {}

    def make(arch: str) -> Any:
        if arch not in made:
            torch.manual_seed(1234)
            made[arch] = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
        return made[arch]

    return make


@pytest.fixture(scope="session")
def embedded() -> Any:
    """The embedded SmolLM2-135M-Instruct (converted once into the user cache), loaded once per session."""
    from kvagent.config import Config
    from kvagent.models import load_model

    return load_model(None, Config.resolve().models_dir)


@pytest.fixture()
def embedded_agent(embedded: Any, tmp_path: Path) -> Any:
    """A KVAgent on the session's embedded model with a fresh, empty cache directory."""
    from kvagent import KVAgent

    agent = KVAgent(embedded.model, tokenizer=embedded.tokenizer, cache_dir=tmp_path / "cache")
    yield agent
    agent.close()


def long_text(tokens_wanted: int, tokenizer: Any) -> str:
    """Real English text of at least ``tokens_wanted`` tokens: the sample document's paragraphs, varied."""
    paras = [p for p in SAMPLE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    out: list[str] = []
    i = 0
    while len(tokenizer.encode("\n\n".join(out), add_special_tokens=False)) < tokens_wanted:
        p = paras[i % len(paras)]
        out.append(f"Section {i + 1}. {p}")
        i += 1
    return "\n\n".join(out)


@pytest.fixture(params=["sqlite", "postgres"])
def any_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    """A ledger (10% commission) on SQLite and on PostgreSQL (the x402 tests; a module using it imports the
    pg_schema_dsn fixture of tests/test_server_postgres.py)."""
    from kvagent.costs import market as mk
    from kvagent.server.ledger import Ledger
    from kvagent.server.meta import MetaStore, PostgresMeta, SQLiteMeta

    meta: MetaStore
    if request.param == "sqlite":
        meta = SQLiteMeta(tmp_path / "meta.sqlite3")
    else:
        meta = PostgresMeta(request.getfixturevalue("pg_schema_dsn"))
    yield Ledger(meta, mk.HostPrices(commission_bps=1_000))
    meta.close()
