"""Rendering one chat/completion answer in OpenAI's shapes: the reply's text and tool calls, its finish
reason and usage, the whole JSON object, the SSE frames of a stream, and a failed generation's error.

Pure: no I/O, no money, no metrics (the run in kvagent.server.chat_answer feeds it events and counts).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..chat import tools as tl
from ..chat.turn import Guided, Reply, TurnEvent
from ..engines import Finish, Token
from ..engines.params import GenerationParams
from ..errors import ContextLengthError, KVAgentError
from ..reuse.info import CacheInfo
from .http import ApiError

#: which route answers: ``/v1/chat/completions`` or ``/v1/completions``
Kind = Literal["chat", "completion"]

DONE_FRAME = b"data: [DONE]\n\n"
#: what a stream sends when its generation fails after the first frame (its status line went out already)
ERROR_FRAME = b"data: " + json.dumps({
    "error": {"message": "generation failed", "type": "server_error", "param": None, "code": "server_error"}
}).encode() + b"\n\n"


def finish_reason(has_calls: bool, guided: bool, text_reason: str | None) -> str:
    """OpenAI's ``finish_reason``: ``tool_calls`` when the reply made calls, ``stop`` for a guided reply (it
    ends where its schema does) or a stop token or string, else ``length`` (out of tokens)."""
    if has_calls:
        return "tool_calls"
    return "stop" if guided or text_reason == "stop" else "length"


def usage(n_prompt: int, n_generated: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's ``usage``, with the prompt tokens read from a cached KV in ``prompt_tokens_details``."""
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_generated,
        "total_tokens": n_prompt + n_generated,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def kvagent_report(info: CacheInfo | None, ttft: float | None) -> dict[str, Any]:
    """The answer's ``kvagent`` field: what the cache did (a plain prefill when nothing was reported) and the
    time to the first token."""
    return {
        "cache": {
            "status": info.status if info else "prefill",
            "source": (info.source or None) if info else None,
            "cached_tokens": info.cached_tokens if info else 0,
            "reason": info.reason if info else "",
        },
        "time_to_first_token_s": round(ttft, 4) if ttft is not None else None,
    }


def failed(ev: TurnEvent) -> bool:
    """Whether ``ev`` ends a generation that failed."""
    return isinstance(ev, Finish) and ev.reason == "error"


def generation_error(ev: TurnEvent) -> ApiError:
    """The HTTP error of a failed generation: a context overflow and a request the engine refuses are the
    caller's (400), an :class:`ApiError` (a 429, a 402) stands as it is, anything else is a bare 500."""
    exc = ev.error if isinstance(ev, Finish) else None
    if isinstance(exc, ContextLengthError):
        return ApiError(400, "context_length_exceeded", str(exc), param="messages")
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, KVAgentError):
        return ApiError(400, "invalid_request_error", str(exc)[:1000])
    return ApiError(500, "server_error", "generation failed")


class ShownReply:
    """What a generation's events make showable to an OpenAI client: the turn core's :class:`Reply` (text
    cut at stop tokens and strings, the finish reason) and, with a tool format, tool calls parsed out of that
    text as they complete; a guided reply is shown whole."""

    def __init__(self, tokenizer: Any, params: GenerationParams, stops: Sequence[str],
                 fmt: tl.ToolFormat | None) -> None:
        self.reply = Reply(tokenizer, params, stops)
        self.parser = tl.StreamParser(fmt) if fmt else None
        self.calls: list[tl.ToolCall] = []
        self.guided = False  # written by kvagent.chat.guided (ends with "stop" or "tool_calls")

    def deltas(self, ev: TurnEvent) -> tuple[str, list[tl.ToolCallDelta]]:
        """The text (and complete tool calls) ``ev`` makes showable."""
        if isinstance(ev, Guided):
            self.guided = True
            if self.parser is None:
                return ev.text, []
            parsed = tl.parse(ev.text, self.parser.fmt)
            calls = [tl.ToolCallDelta(i, c) for i, c in enumerate(parsed.tool_calls)]
            self.calls += list(parsed.tool_calls)
            return parsed.content, calls
        if isinstance(ev, Finish) and self.guided:
            return "", []
        if not isinstance(ev, (Token, Finish)):
            return "", []
        text = self.reply.feed(ev)
        if self.parser is None:
            return text, []
        events = self.parser.feed(text) if text else []
        if isinstance(ev, Finish):
            events += self.parser.finish()
        content = "".join(e.text for e in events if isinstance(e, tl.ContentDelta))
        calls = [e for e in events if isinstance(e, tl.ToolCallDelta)]
        self.calls += [c.call for c in calls]
        return content, calls

    def finish_reason(self) -> str:
        return finish_reason(bool(self.calls), self.guided, self.reply.finish_reason)


@dataclass(frozen=True)
class Envelope:
    """What every object of one answer repeats: its id, creation time, model and fingerprint."""

    kind: Kind
    model: str
    fingerprint: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
            object.__setattr__(self, "id", prefix + uuid.uuid4().hex[:24])

    def head(self, obj: str) -> dict[str, Any]:
        """The fields an answer's ``obj`` object starts with."""
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": f"kvagent-{self.fingerprint[:12]}"}

    def whole(self, content: str, calls: list[tl.ToolCall], finish: str, usage: dict[str, Any],
              report: dict[str, Any]) -> dict[str, Any]:
        """The answer as one ``chat.completion`` (or ``text_completion``) object."""
        if self.kind == "chat":
            message: dict[str, Any] = {
                "role": "assistant",
                "content": content if content or not calls else None,
            }
            if calls:
                message["tool_calls"] = [c.openai() for c in calls]
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None,
                                      "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {**self.head(obj), "choices": [choice], "usage": usage, "kvagent": report}


@dataclass(frozen=True)
class Frames:
    """The SSE frames of one streamed answer; with ``include_usage`` every frame but the last carries
    ``"usage": null`` and the last one the usage (OpenAI's ``stream_options``)."""

    env: Envelope
    include_usage: bool = False

    @property
    def object(self) -> str:
        return "chat.completion.chunk" if self.env.kind == "chat" else "text_completion"

    def chunk(self, delta: dict[str, Any] | str | None, finish: str | None = None) -> bytes:
        """One frame: a chat ``delta`` (a completion's text), with the finish reason at the end."""
        if self.env.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        body: dict[str, Any] = {**self.env.head(self.object), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        return _frame(body)

    def role(self) -> bytes:
        """A chat stream's first frame: the assistant's role, no content yet."""
        return self.chunk({"role": "assistant", "content": ""})

    def text(self, text: str) -> bytes:
        return self.chunk({"content": text} if self.env.kind == "chat" else text)

    def call(self, call: tl.ToolCallDelta) -> bytes:
        return self.chunk({"tool_calls": [{"index": call.index, **call.call.openai()}]})

    def finish(self, reason: str) -> bytes:
        """The frame with the finish reason (an empty delta)."""
        return self.chunk({} if self.env.kind == "chat" else "", reason)

    def usage(self, usage: dict[str, Any], report: dict[str, Any]) -> bytes:
        """The last frame of a stream that asked for the usage: no choices, the usage and the cache report."""
        env = self.env
        return _frame({"id": env.id, "object": self.object, "created": env.created, "model": env.model,
                       "choices": [], "usage": usage, "kvagent": report})


def _frame(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
