"""Tool calling through the OpenAI-compatible endpoint: a real server hosting the embedded SmolLM2 weights
under the
real Qwen3 chat template (Hermes ``<tool_call>`` format), driven by the official ``openai`` client."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.registry_server import start_server

pytestmark = pytest.mark.slow

TOKENS = {"alice-token-0001": {"principal": "alice"}}
TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
MAGIC = {"type": "function", "function": {
    "name": "magic_function", "description": "Apply a magic function to an input.",
    "parameters": {"type": "object", "properties": {"input": {"type": "integer"}}, "required": ["input"]}}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, embedded: Any) -> Path:
    """The embedded weights (linked, not copied) with a tokenizer speaking the Qwen3 template."""
    from kvagent.config import Config
    from kvagent.models import ensure_embedded

    src = ensure_embedded(Config.resolve().models_dir)
    d = tmp_path_factory.mktemp("smollm2-qwen3-template")
    for f in src.iterdir():
        if (
            f.suffix in (".safetensors", ".json")
            and not f.name.startswith("tokenizer")
            and f.name != "special_tokens_map.json"
        ):
            (d / f.name).symlink_to(f)
    import copy

    tok = copy.deepcopy(embedded.tokenizer)
    tok.chat_template = (TEMPLATES / "qwen3.jinja").read_text(encoding="utf-8")
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):
    srv = start_server(tmp_path_factory.mktemp("openai-tools") / "data", TOKENS, model=str(model_dir))
    yield srv
    srv.stop()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="alice-token-0001", max_retries=0, timeout=600)


def test_forced_tool_call_then_tool_result_turn_reuses_the_conversation(server, model_dir) -> None:
    c = client(server)
    model = str(model_dir)
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "What is the value of magic_function(3)? Use the tool."}
    ]
    r = c.chat.completions.create(model=model, messages=messages, tools=[MAGIC], temperature=0, max_tokens=8,
                                  tool_choice={"type": "function", "function": {"name": "magic_function"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "magic_function"
    args = json.loads(call.function.arguments)
    # decoded by the model, typed by the schema
    assert set(args) == {"input"} and isinstance(args["input"], int)
    first_prompt = r.usage.prompt_tokens
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "22"}]
    r2 = c.chat.completions.create(model=model, messages=messages, tools=[MAGIC], temperature=0, max_tokens=8)
    assert r2.usage.prompt_tokens > first_prompt
    assert r2.usage.prompt_tokens_details.cached_tokens >= first_prompt - 1, r2.model_extra["kvagent"]


def test_streamed_forced_call_and_schema_output(server, model_dir) -> None:
    c = client(server)
    model = str(model_dir)
    chunks = list(c.chat.completions.create(
        model=model, stream=True, temperature=0, max_tokens=8, tools=[MAGIC], tool_choice="required",
        messages=[{"role": "user", "content": "Call magic_function on 5."}]))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "magic_function" and deltas[0].index == 0
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "year": {"type": "integer"}},
              "required": ["city", "year"]}
    r = c.chat.completions.create(
        model=model,
        temperature=0,
        max_tokens=12,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        messages=[{"role": "user", "content": "Paris was founded long ago. Give city and year."}],
    )
    out = json.loads(r.choices[0].message.content)
    assert set(out) == {"city", "year"} and isinstance(out["year"], int) and isinstance(out["city"], str)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                  response_format={"type": "json_object"})
