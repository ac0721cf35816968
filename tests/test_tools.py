"""kvagent.chat.tools and kvagent.chat.guided: tool formats from the real Qwen3 and Llama 3.1 chat templates,
rendering, parsing (whole and streamed token by token) and schema-guided JSON."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvagent.chat.guided import GuidedJSON, guided_json, guided_tool_call
from kvagent.chat.tools import (
    ContentDelta,
    StreamParser,
    ToolCallDelta,
    call_text,
    chat_messages,
    forced_tool,
    parse,
    render,
    require_tool_format,
    tool_format,
)
from kvagent.errors import ToolsUnsupportedError

TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
LLAMA_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]

LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up in the handbook.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["query"],
        },
    },
}


@pytest.fixture(scope="module")
def smol_tokenizer() -> Any:
    """The embedded SmolLM2 tokenizer (its own template has no tools)."""
    from transformers import AutoTokenizer

    from kvagent.config import Config
    from kvagent.models import ensure_embedded

    return AutoTokenizer.from_pretrained(ensure_embedded(Config.resolve().models_dir))


@pytest.fixture(scope="module")
def tokenizers(smol_tokenizer: Any) -> dict[str, Any]:
    """SmolLM2's vocabulary under the real Qwen3 and Llama 3.1 templates (Llama's header tokens added)."""
    qwen = copy.deepcopy(smol_tokenizer)
    qwen.chat_template = (TEMPLATES / "qwen3.jinja").read_text(encoding="utf-8")
    llama = copy.deepcopy(smol_tokenizer)
    llama.add_special_tokens({"additional_special_tokens": LLAMA_SPECIALS})
    llama.chat_template = (TEMPLATES / "llama3_1.jinja").read_text(encoding="utf-8")
    return {"qwen3": qwen, "llama3.1": llama}


FORMATS = {"qwen3": "hermes", "llama3.1": "llama3_json"}


def test_format_is_read_from_the_template(tokenizers: dict[str, Any], smol_tokenizer: Any) -> None:
    for name, fmt in FORMATS.items():
        assert tool_format(tokenizers[name].chat_template) == fmt
    assert tool_format(smol_tokenizer.chat_template) is None
    assert tool_format(None) is None


def test_a_template_without_tools_refuses_them_naming_the_model(smol_tokenizer: Any) -> None:
    with pytest.raises(ToolsUnsupportedError, match="'smollm2'.*renders no tools"):
        require_tool_format(smol_tokenizer, "smollm2")
    with pytest.raises(ToolsUnsupportedError, match="smollm2"):
        render(smol_tokenizer, [{"role": "user", "content": "hi"}], [LOOKUP], model_name="smollm2")
    assert render(smol_tokenizer, [{"role": "user", "content": "hi"}])  # no tools: renders as before


def _history(arguments: Any) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "What does the handbook say about fares?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "A return fare is 12 euros."},
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["qwen3", "llama3.1"])
def test_render_writes_tools_calls_and_results_the_way_call_text_does(
    tokenizers: dict[str, Any], name: str
) -> None:
    tok, fmt = tokenizers[name], FORMATS[name]
    args = {"query": "fare", "limit": 2}
    ids = render(tok, _history(json.dumps(args)), [LOOKUP], model_name=name)  # OpenAI's string arguments
    text = tok.decode(ids)
    assert '"name": "lookup"' in text and "Look a word up in the handbook." in text  # the tool schema
    assert call_text(fmt, "lookup", args) in text  # a generated call is exactly what history re-renders
    assert "A return fare is 12 euros." in text
    assert render(tok, _history(args), [LOOKUP]) == ids  # object arguments render the same


def _decode_token_by_token(tok: Any, ids: list[int]) -> Iterator[str]:
    """Text deltas as a generation loop shows them: decode the growing ids, hold incomplete characters."""
    shown = ""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(shown):
            yield text[len(shown) :]
            shown = text


@pytest.mark.parametrize("name", ["qwen3", "llama3.1"])
def test_forced_output_parses_whole_and_streamed(tokenizers: dict[str, Any], name: str) -> None:
    tok, fmt = tokenizers[name], FORMATS[name]
    args = {"query": "fare «return»", "limit": 3}
    reply = call_text(fmt, "lookup", args)
    if fmt == "hermes":
        reply = "Let me check.\n" + reply
    else:
        reply = "<|python_tag|>" + reply
    ids = tok.encode(reply, add_special_tokens=False)
    assert len(ids) > 10
    deltas = list(_decode_token_by_token(tok, ids))
    whole = parse("".join(deltas), fmt)
    assert [(c.name, c.arguments) for c in whole.tool_calls] == [("lookup", args)]
    assert whole.content == ("Let me check." if fmt == "hermes" else "")
    sp = StreamParser(fmt)
    events = [e for d in deltas for e in sp.feed(d)] + sp.finish()
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    text = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert [(c.index, c.call.name, c.call.arguments) for c in calls] == [(0, "lookup", args)]
    assert "<tool" not in text and "lookup" not in text
    assert text.strip() == whole.content


def test_stream_parser_hermes_edge_cases() -> None:
    sp = StreamParser("hermes")
    out = sp.feed("a <tool") + sp.feed("_cal")
    assert out == [ContentDelta("a ")]  # a tail that may become the tag is held back
    out = sp.feed("l>{\"name\": \"x\", \"arguments\": {}}</tool_call><tool_call>{broken")
    assert [type(e) for e in out] == [ToolCallDelta]
    rest = sp.finish()  # an unclosed, unparsable block stays text
    assert rest == [ContentDelta("<tool_call>{broken")]
    sp = StreamParser("hermes")
    assert sp.feed("x <too") == [ContentDelta("x ")]
    assert sp.finish() == [ContentDelta("<too")]


def test_parse_keeps_text_that_is_not_a_call() -> None:
    assert parse('{"answer": 3}', "llama3_json").tool_calls == ()
    assert parse("plain words", "llama3_json").content == "plain words"
    two = parse('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"k": 1}}', "llama3_json")
    assert [c.name for c in two.tool_calls] == ["a", "b"]
    bad = parse("<tool_call>not json</tool_call>", "hermes")
    assert bad.tool_calls == () and bad.content == "<tool_call>not json</tool_call>"
    call = parse('<tool_call>{"name": "f", "arguments": "{\\"k\\": 1}"}</tool_call>', "hermes").tool_calls[0]
    assert call.arguments == {"k": 1} and json.loads(call.openai()["function"]["arguments"]) == {"k": 1}


def test_chat_messages_and_tool_choice() -> None:
    msgs = chat_messages([{"role": "assistant", "content": None, "tool_calls": []}, _history('{"q": 1}')[1]])
    assert "tool_calls" not in msgs[0] and msgs[0]["content"] == ""  # Llama treats the key as a call
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"q": 1}
    two = [LOOKUP, {"name": "other", "parameters": {"type": "object", "properties": {}}}]
    assert (
        forced_tool(None, two) is None
        and forced_tool("auto", two) is None
        and forced_tool("none", two) is None
    )
    assert forced_tool("any", [LOOKUP]) == "lookup" and forced_tool("required", two) == ["lookup", "other"]
    assert forced_tool({"type": "function", "function": {"name": "other"}}, two) == "other"
    with pytest.raises(ValueError, match="names no bound tool"):
        forced_tool("missing", two)


def _model(*replies: str) -> tuple[Any, list[str]]:
    """A scripted model: the n-th continuation yields the n-th reply in pieces; records what it was given."""
    seen: list[str] = []
    queue = list(replies)

    def continue_(forced: str) -> Iterator[str]:
        seen.append(forced)
        reply = queue.pop(0) if queue else ""
        for i in range(0, len(reply), 2):
            yield reply[i : i + 2]

    return continue_, seen


def test_guided_json_writes_structure_and_takes_values_from_the_model() -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "ratio": {"type": "number"},
            "ok": {"type": "boolean"},
            "mood": {"enum": ["happy", "sad"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "pet": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}]},
        },
        "$defs": {"Pet": {"type": "object", "properties": {"kind": {"type": "string"}}}},
    }
    cont, seen = _model(
        'Ann "Lee"", junk', " 42, more", "-1.5e3}", " true", '"sa', ' "a', 'b", ', ", ", 'c"', "]", 'cat"}'
    )
    text, value = guided_json(schema, cont)
    assert value == {"name": "Ann ", "age": 42, "ratio": -1500.0, "ok": True, "mood": "sad",
                     "tags": ["b", "c"], "pet": {"kind": "cat"}}  # fmt: skip
    assert json.loads(text) == value
    # values continue the JSON so far
    assert seen[0] == '{"name": "' and seen[1] == '{"name": "Ann ", "age": '


def test_guided_value_the_model_fails_falls_back_and_is_counted() -> None:
    cont, _ = _model("abc", "maybe")
    g = GuidedJSON(cont)
    assert g.value({"type": "integer", "default": 7}) == 7
    assert g.value({"type": "boolean"}) is False
    assert g.fallbacks == 2 and g.text == "7false"


def test_guided_tool_call_picks_the_tool_and_fills_its_arguments() -> None:
    other = {"name": "other", "parameters": {"type": "object", "properties": {}}}
    cont, seen = _model('"look', '"', " 3,")
    text = guided_tool_call("hermes", [LOOKUP, other], ["lookup", "other"], cont)
    assert parse(text, "hermes").tool_calls[0].arguments == {"query": "", "limit": 3}
    assert seen[0].endswith('{"name": ') and len(seen) == 3
    cont, seen = _model()
    text = guided_tool_call("llama3_json", [other], "other", cont)
    assert text == call_text("llama3_json", "other", {}) and seen == []  # nothing left to decode
