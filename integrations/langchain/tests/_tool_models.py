"""A tool-capable model for the tests: the embedded SmolLM2 weights under the real Qwen3 chat template."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from kvagent import KVAgent

TEMPLATES = Path(__file__).resolve().parents[3] / "tests" / "chat_templates"


def template(name: str) -> str:
    """A real chat template from ``tests/chat_templates`` (``qwen3`` or ``llama3_1``)."""
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def with_template(agent: KVAgent, chat_template: str, cache_dir: Path, **kwargs: Any) -> KVAgent:
    """A KVAgent sharing ``agent``'s weights, its tokenizer speaking ``chat_template``."""
    tokenizer = copy.deepcopy(agent.tokenizer)
    tokenizer.chat_template = chat_template
    return KVAgent(agent.engine.model, tokenizer=tokenizer, cache_dir=cache_dir, **kwargs)
