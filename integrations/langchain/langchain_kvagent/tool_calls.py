"""LangChain <-> kvagent.chat.tools: messages as template dicts, parsed calls as messages, structured
output."""

from __future__ import annotations

import json
from typing import Any

from kvagent import ToolCall
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.tool import ToolCallChunk, tool_call_chunk
from langchain_core.output_parsers import BaseOutputParser
from langchain_core.outputs import ChatGeneration, Generation
from pydantic import BaseModel
from pydantic.v1 import BaseModel as BaseModelV1


def to_chat_dicts(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as OpenAI-style dicts (tool calls and tool results included) for a chat template."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if isinstance(m, SystemMessage):
            out.append({"role": "system", "content": m.text})
        elif isinstance(m, HumanMessage):
            out.append({"role": "user", "content": m.text})
        elif isinstance(m, AIMessage):
            msg: dict[str, Any] = {"role": "assistant", "content": m.text}
            if m.tool_calls:
                msg["tool_calls"] = [
                    {
                        "id": c.get("id"),
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["args"]},
                    }
                    for c in m.tool_calls
                ]
            out.append(msg)
        elif isinstance(m, ToolMessage):
            out.append({"role": "tool", "content": m.text, "tool_call_id": m.tool_call_id, "name": m.name})
        elif isinstance(m, ChatMessage):
            out.append({"role": m.role, "content": m.text})
        else:
            raise ValueError(f"ChatKVAgent cannot render a {type(m).__name__} message")
    return out


def lc_tool_call(call: ToolCall) -> dict[str, Any]:
    """A parsed call as a LangChain ``ToolCall`` dict."""
    return {"name": call.name, "args": call.arguments, "id": call.id, "type": "tool_call"}


def lc_tool_call_chunk(call: ToolCall, index: int) -> ToolCallChunk:
    """A complete parsed call as one streamed ``ToolCallChunk``."""
    return tool_call_chunk(
        name=call.name, args=json.dumps(call.arguments, ensure_ascii=False), id=call.id, index=index
    )


def validate(target: Any, data: Any) -> Any:
    """``data`` as ``target``: a Pydantic (v2 or v1) model instance, else the plain JSON value."""
    if isinstance(target, type) and issubclass(target, BaseModel):
        return target.model_validate(data)
    if isinstance(target, type) and issubclass(target, BaseModelV1):
        return target.parse_obj(data)
    return data


class StructuredOutputParser(BaseOutputParser[Any]):
    """The structured value of a reply: the first tool call's arguments, else the reply's JSON text."""

    target: Any = None

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        gen = result[0]
        if isinstance(gen, ChatGeneration) and isinstance(gen.message, AIMessage) and gen.message.tool_calls:
            return validate(self.target, gen.message.tool_calls[0]["args"])
        return self.parse(gen.text)

    def parse(self, text: str) -> Any:
        return validate(self.target, json.loads(text))

    @property
    def _type(self) -> str:
        return "kvagent-structured-output"
