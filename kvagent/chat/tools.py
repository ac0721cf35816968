"""Tool calling through a model's own chat template: detect its format, render tools, parse calls.

Pure logic shared by the LangChain chat model and the OpenAI-compatible endpoint:

- ``tool_format(template)`` reads which tool-call format a chat template speaks: ``"hermes"``
  (Qwen, Hermes: ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``) or ``"llama3_json"``
  (Llama 3.1: ``{"name": ..., "parameters": ...}`` as the whole reply); ``require_tool_format``
  refuses a template without tools (the embedded SmolLM2's) with an error naming the model.
- ``render(tokenizer, messages, tools)`` turns OpenAI-style messages and tools into prompt ids with
  ``apply_chat_template(..., tools=..., add_generation_prompt=True)``.
- ``parse(text, fmt)`` splits a finished reply into content and ``ToolCall``s; ``StreamParser`` does
  the same over streamed text deltas, holding back text that may still become a tool call.
- ``call_text(fmt, name, arguments)`` writes a call exactly as the template renders it in history,
  so the next turn's prompt starts with the ids this turn generated (KV reuse across agent turns).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ToolsUnsupportedError

ToolFormat = Literal["hermes", "llama3_json"]

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the tool's name, its arguments (a JSON object) and a call id."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict[str, Any]:
        """The call as an OpenAI ``tool_calls`` entry (arguments as a JSON string)."""
        args = json.dumps(self.arguments, ensure_ascii=False)
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": args}}


@dataclass(frozen=True)
class Parsed:
    """A reply split into its text and its tool calls."""

    content: str
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class ContentDelta:
    """Streamed text that is certainly not part of a tool call."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A complete tool call found in the stream; ``index`` counts calls from 0."""

    index: int
    call: ToolCall


StreamEvent = ContentDelta | ToolCallDelta


# -- detection ------------------------------------------------------------------------------
def tool_format(chat_template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template renders, or None when it renders no tools."""
    if not chat_template or not re.search(r"\btools\b", chat_template):
        return None
    if HERMES_OPEN in chat_template:
        return "hermes"
    if "<|start_header_id|>" in chat_template and '"parameters"' in chat_template:
        return "llama3_json"
    return None


def require_tool_format(tokenizer: Any, model_name: str) -> ToolFormat:
    """``tool_format`` of the tokenizer's template; raises ``ToolsUnsupportedError`` naming the model."""
    template = getattr(tokenizer, "chat_template", None)
    fmt = tool_format(template if isinstance(template, str) else None)
    if fmt is None:
        why = (
            "has no chat template" if not template else "renders no tools (or in an unknown tool-call format)"
        )
        raise ToolsUnsupportedError(
            f"model {model_name!r} cannot call tools: its chat template {why}. Use a model whose template "
            "renders tools in the Hermes/Qwen <tool_call> or Llama 3.1 JSON format, or drop the tools"
        )
    return fmt


# -- rendering ------------------------------------------------------------------------------
def normalize_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tools as OpenAI ``{"type": "function", "function": {name, description, parameters}}`` dicts."""
    out = []
    for tool in tools:
        fn = dict(tool.get("function", tool))
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"a tool needs a name, got {tool!r}")
        fn.setdefault("parameters", {"type": "object", "properties": {}})
        out.append({"type": "function", "function": fn})
    return out


def chat_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-style messages as chat templates take them: tool-call arguments as objects, not strings.

    An assistant message keeps a ``tool_calls`` key only when it has calls (Llama 3.1's template
    treats any message with the key as a call).
    """
    out = []
    for m in messages:
        msg = {k: v for k, v in m.items() if k != "tool_calls" and v is not None}
        msg.setdefault("content", "")
        calls = []
        for c in m.get("tool_calls") or ():
            fn = c.get("function", c)
            args = fn.get("arguments", fn.get("args", {}))
            if isinstance(args, str):
                args = json.loads(args) if args.strip() else {}
            calls.append(
                {"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}
            )
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def render(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    model_name: str = "this model",
) -> list[int]:
    """Prompt ids of ``messages`` (and ``tools``) under the model's chat template, generation prompt added."""
    kwargs: dict[str, Any] = {}
    if tools:
        require_tool_format(tokenizer, model_name)
        kwargs["tools"] = normalize_tools(tools)
    encoded = tokenizer.apply_chat_template(
        chat_messages(messages), add_generation_prompt=True, tokenize=True, **kwargs
    )
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded  # a list before transformers 5
    return [int(t) for t in ids]


def call_text(fmt: ToolFormat, name: str, arguments: Mapping[str, Any] | str) -> str:
    """A call as the template writes it in history (``arguments`` as a JSON string or an object)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return call_prefix(fmt, name) + args + call_suffix(fmt)


def call_prefix(fmt: ToolFormat, name: str | None) -> str:
    """The text before a call's arguments (before its quoted name when ``name`` is None)."""
    head = f'{HERMES_OPEN}\n{{"name": ' if fmt == "hermes" else '{"name": '
    if name is None:
        return head
    key = "arguments" if fmt == "hermes" else "parameters"
    return f'{head}{json.dumps(name, ensure_ascii=False)}, "{key}": '


def call_suffix(fmt: ToolFormat) -> str:
    return f"}}\n{HERMES_CLOSE}" if fmt == "hermes" else "}"


# -- parsing --------------------------------------------------------------------------------
def _call_from_json(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def parse(text: str, fmt: ToolFormat) -> Parsed:
    """Split a finished reply into content and tool calls; text that is no valid call stays content."""
    if fmt == "hermes":
        calls: list[ToolCall] = []
        kept: list[str] = []
        pos = 0
        for m in re.finditer(
            re.escape(HERMES_OPEN) + r"(.*?)(?:" + re.escape(HERMES_CLOSE) + r"|$)", text, re.S
        ):
            call = _call_from_json(_loads(m.group(1).strip()))
            kept.append(text[pos : m.start()] if call else text[pos : m.end()])
            pos = m.end()
            if call:
                calls.append(call)
        kept.append(text[pos:])
        return Parsed("".join(kept).strip() if calls else text, tuple(calls))
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG) :].strip()
    if body.startswith("{"):
        found = [_call_from_json(_loads(part)) for part in re.split(r"\s*;\s*(?=\{)", body)]
        if found and all(c is not None for c in found):
            return Parsed("", tuple(c for c in found if c is not None))
    return Parsed(text)


class StreamParser:
    """Incremental ``parse``: feed text deltas, get content deltas and complete tool calls.

    Hermes: text outside ``<tool_call>`` blocks streams at once, except a tail that may still
    grow into the opening tag; a block is emitted as one ``ToolCallDelta`` when it closes.
    Llama 3.1: a reply starting with ``{`` (or the python tag) is held to the end and parsed whole.
    """

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self._buf = ""
        self._in_call = False
        self._held_whole: bool | None = None if fmt == "llama3_json" else False
        self._n_calls = 0

    def feed(self, delta: str) -> list[StreamEvent]:
        self._buf += delta
        if self._held_whole is None:
            head = self._buf.lstrip()
            if not head:
                return []
            if len(head) < len(PYTHON_TAG) and PYTHON_TAG.startswith(head):
                return []
            self._held_whole = head.startswith("{") or head.startswith(PYTHON_TAG)
        if self._held_whole:
            return []
        if self.fmt == "llama3_json":
            out, self._buf = self._buf, ""
            return [ContentDelta(out)] if out else []
        return self._hermes(final=False)

    def finish(self) -> list[StreamEvent]:
        """Events for what is left when the reply ends (an unclosed block is parsed as it stands)."""
        if self._held_whole:
            parsed = parse(self._buf, self.fmt)
            self._buf = ""
            events: list[StreamEvent] = [ContentDelta(parsed.content)] if parsed.content else []
            return events + [self._call(c) for c in parsed.tool_calls]
        return self._hermes(final=True) if self.fmt == "hermes" else self._flush()

    def _flush(self) -> list[StreamEvent]:
        out, self._buf = self._buf, ""
        return [ContentDelta(out)] if out else []

    def _call(self, call: ToolCall) -> ToolCallDelta:
        self._n_calls += 1
        return ToolCallDelta(self._n_calls - 1, call)

    def _hermes(self, final: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        while True:
            if self._in_call:
                end = self._buf.find(HERMES_CLOSE)
                if end < 0 and not final:
                    return events
                body = self._buf[: end if end >= 0 else len(self._buf)]
                rest = self._buf[end + len(HERMES_CLOSE) :] if end >= 0 else ""
                call = _call_from_json(_loads(body.strip()))
                events.append(self._call(call) if call else ContentDelta(HERMES_OPEN + body))
                self._buf, self._in_call = rest, False
                if not rest:
                    return events
                continue
            start = self._buf.find(HERMES_OPEN)
            if start >= 0:
                if self._buf[:start]:
                    events.append(ContentDelta(self._buf[:start]))
                self._buf, self._in_call = self._buf[start + len(HERMES_OPEN) :], True
                continue
            hold = 0 if final else _partial_suffix(self._buf, HERMES_OPEN)
            out = self._buf[: len(self._buf) - hold]
            self._buf = self._buf[len(self._buf) - hold :]
            if out:
                events.append(ContentDelta(out))
            return events


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


# -- tool choice ----------------------------------------------------------------------------
def forced_tool(tool_choice: Any, tools: Sequence[Mapping[str, Any]]) -> str | list[str] | None:
    """What ``tool_choice`` forces: None (the model decides), one tool's name, or the names to pick from.

    Accepts OpenAI's ``"auto"``/``"none"``/``"required"``/``{"type": "function", "function": {"name"}}``
    and LangChain's ``"any"``/``True``/a tool name.
    """
    names = [t["function"]["name"] for t in normalize_tools(tools)]
    if tool_choice in (None, "auto", "none", False):
        return None
    if not names:
        raise ValueError(f"tool_choice {tool_choice!r} forces a tool call, but no tools are given")
    if tool_choice in ("any", "required", True):
        return names[0] if len(names) == 1 else names
    if isinstance(tool_choice, Mapping):
        tool_choice = tool_choice.get("function", tool_choice).get("name")
    if isinstance(tool_choice, str) and tool_choice in names:
        return tool_choice
    raise ValueError(f"tool_choice {tool_choice!r} names no bound tool (tools: {', '.join(names)})")
