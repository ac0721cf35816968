"""Tool calling and structured output in ChatKVAgent, and KV reuse across the turns of a tool loop.

Tiny random Qwen3 and Llama models (the embedded tokenizer, the real Qwen3 / Llama 3.1 templates):
a forced tool call is decoded guided by the tool's schema, parsed into ``tool_calls``, answered by a
``ToolMessage`` and rendered into the next turn, for real. Every turn resumes from the previous
turn's KV and is compared with a full prefill of the same prompt.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from _tool_models import template
from kvagent import KVAgent
from kvagent.errors import ToolsUnsupportedError
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from langchain_kvagent import ChatKVAgent

pytestmark = pytest.mark.slow

LLAMA_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]


@tool
def search_handbook(query: str, limit: int) -> str:
    """Search the company handbook; return at most ``limit`` matching lines."""
    return f"{limit} lines about {query}"


@tool
def fare(destination: str, return_trip: bool) -> str:
    """The fare to a destination."""
    return "12 euros"


def _tiny_agent(arch: str, tokenizer: Any, cache_dir: Path) -> KVAgent:
    tok = copy.deepcopy(tokenizer)
    if arch == "llama":
        tok.add_special_tokens({"additional_special_tokens": LLAMA_SPECIALS})
        tok.chat_template = template("llama3_1")
    else:
        tok.chat_template = template("qwen3")
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)  # fmt: skip
    cfg = LlamaConfig(**common) if arch == "llama" else Qwen3Config(**common, head_dim=16)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return KVAgent(model, tokenizer=tok, cache_dir=cache_dir, block_size=16)


def _calls(msg: BaseMessage) -> list[tuple[str, dict[str, Any]]]:
    assert isinstance(msg, AIMessage)
    return [(c["name"], c["args"]) for c in msg.tool_calls]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_five_tool_turns_resume_from_the_previous_turn_and_match_full_prefill(
    arch: str, agent: KVAgent, tmp_path: Path
) -> None:
    tiny = _tiny_agent(arch, agent.tokenizer, tmp_path / "cache")
    reuse = ChatKVAgent(agent=tiny, max_tokens=6, kv_min_save_tokens=1)
    full = ChatKVAgent(agent=tiny, max_tokens=6, kv_reuse=False)  # the reference: every prompt prefilled
    tools = [search_handbook, fare]
    messages: list[BaseMessage] = [HumanMessage("How much is a return fare to the harbour?")]
    cache_read = []
    for turn in range(5):
        forced = "any" if turn % 2 == 0 else ("search_handbook" if arch == "qwen3" else "fare")
        got = reuse.bind_tools(tools, tool_choice=forced).invoke(messages)
        ref = full.bind_tools(tools, tool_choice=forced).invoke(messages)
        assert _calls(got) == _calls(ref) and len(got.tool_calls) == 1, turn
        assert got.content == ref.content == ""
        assert ref.usage_metadata is not None and ref.usage_metadata["input_token_details"]["cache_read"] == 0
        assert got.usage_metadata is not None
        cache_read.append(got.usage_metadata["input_token_details"]["cache_read"])
        assert got.response_metadata["finish_reason"] == "tool_calls"
        call = got.tool_calls[0]
        messages += [got, ToolMessage(f"result {turn} of {call['name']}", tool_call_id=call["id"])]
    assert all(b > a for a, b in zip(cache_read, cache_read[1:], strict=False)), cache_read
    assert cache_read[-1] > 150
    # the closing free-text turn: the same tools rendered (so the prompt extends the last one), none called
    answer = reuse.bind_tools(tools, tool_choice="none").invoke(messages)
    reference = full.bind_tools(tools, tool_choice="none").invoke(messages)
    assert answer.content == reference.content
    assert (
        answer.usage_metadata is not None
        and answer.usage_metadata["input_token_details"]["cache_read"] > cache_read[-1]
    )


def test_streamed_tool_call_equals_invoked(agent: KVAgent, tmp_path: Path) -> None:
    tiny = _tiny_agent("qwen3", agent.tokenizer, tmp_path / "cache")
    chat = ChatKVAgent(agent=tiny, max_tokens=6).bind_tools([search_handbook], tool_choice="search_handbook")
    question = [HumanMessage("Find the opening hours.")]
    whole = chat.invoke(question)
    chunks = list(chat.stream(question))
    streamed = chunks[0]
    for c in chunks[1:]:
        streamed += c
    assert _calls(streamed) == _calls(whole)
    assert (
        streamed.usage_metadata is not None
        and streamed.usage_metadata["input_token_details"]["cache_read"] > 0
    )


def test_a_template_without_tools_refuses_them_naming_the_model(agent: KVAgent) -> None:
    chat = ChatKVAgent(agent=agent, model=None, max_tokens=4).bind_tools([fare])
    with pytest.raises(ToolsUnsupportedError, match="cannot call tools"):
        chat.invoke("How much is a fare?")


class Fare(BaseModel):
    """A fare from the handbook."""

    destination: str = Field(description="where to")
    euros: int = Field(description="the price in euros")


def test_structured_output_without_tools_decodes_json_of_the_schema(agent: KVAgent) -> None:
    # SmolLM2's template has no tools: JSON guided by the schema
    chat = ChatKVAgent(agent=agent, max_tokens=4)
    out = chat.with_structured_output(Fare, include_raw=True).invoke(
        "A ticket to Oslo costs 30 euros. The fare?"
    )
    assert out["parsing_error"] is None and isinstance(out["parsed"], Fare)
    raw = out["raw"]
    assert isinstance(raw, AIMessage) and raw.tool_calls == []
    assert Fare.model_validate_json(raw.text) == out["parsed"]  # the reply itself is the JSON
