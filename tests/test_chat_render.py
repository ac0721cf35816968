"""The OpenAI shapes of one chat/completion answer (kvagent.server.chat_render): finish reason, usage, the
``kvagent`` report, a failed generation's HTTP error, the reply's text and tool calls, the whole object and
the SSE frames, byte for byte."""

from __future__ import annotations

import json

import pytest

from kvagent.chat import tools as tl
from kvagent.chat.turn import Cached, Guided, TurnEvent
from kvagent.engines import Finish, Token, Usage
from kvagent.engines.params import GenerationParams
from kvagent.errors import ContextLengthError, EngineError
from kvagent.reuse.info import CacheInfo, CacheStatus
from kvagent.server import chat_render as render
from kvagent.server.http import ApiError

STOP_0 = GenerationParams(stop_token_ids=(0,))


class _CharTokenizer:
    """One token per character; id 0 is the stop token."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def _tokens(text: str) -> list[Token]:
    return [Token(ord(c)) for c in text]


def _finish(reason: str = "length") -> Finish:
    return Finish(reason, Usage(5, 0, 3))  # type: ignore[arg-type]


@pytest.mark.parametrize(("has_calls", "guided", "text_reason", "expected"), [
    (True, False, "length", "tool_calls"),  # calls win over running out of tokens
    (True, True, "stop", "tool_calls"),
    (False, True, None, "stop"),  # a guided reply ends where its schema does
    (False, True, "length", "stop"),
    (False, False, "stop", "stop"),  # a stop token or string
    (False, False, "length", "length"),
    (False, False, None, "length"),
])
def test_finish_reason(has_calls: bool, guided: bool, text_reason: str | None, expected: str) -> None:
    assert render.finish_reason(has_calls, guided, text_reason) == expected


def test_usage_counts_cached_prompt_tokens_in_the_details() -> None:
    assert render.usage(120, 7, 96) == {
        "prompt_tokens": 120, "completion_tokens": 7, "total_tokens": 127,
        "prompt_tokens_details": {"cached_tokens": 96},
    }
    assert list(render.usage(1, 0, 0)) == ["prompt_tokens", "completion_tokens", "total_tokens",
                                           "prompt_tokens_details"]


def test_kvagent_report_says_what_the_cache_did() -> None:
    assert render.kvagent_report(None, None) == {
        "cache": {"status": "prefill", "source": None, "cached_tokens": 0, "reason": ""},
        "time_to_first_token_s": None,
    }
    hit = CacheInfo(CacheStatus.PREFIX, "found a prefix", 96, 24, source="memory")
    assert render.kvagent_report(hit, 0.123456) == {
        "cache": {"status": "prefix", "source": "memory", "cached_tokens": 96, "reason": "found a prefix"},
        "time_to_first_token_s": 0.1235,
    }
    miss = CacheInfo(CacheStatus.PREFILL, "nothing cached", 0, 120)  # no source: null, not ""
    assert render.kvagent_report(miss, 0.0)["cache"]["source"] is None
    assert render.kvagent_report(miss, 0.0)["time_to_first_token_s"] == 0.0


def test_a_failed_generation_maps_to_its_http_error() -> None:
    assert render.failed(Finish("error", Usage(0, 0, 0), RuntimeError("x")))
    assert not render.failed(_finish("stop")) and not render.failed(Token(1))

    err = render.generation_error(Finish("error", Usage(0, 0, 0), ContextLengthError("too long", 9000, 8192)))
    assert (err.status, err.code, err.detail, err.param) == (400, "context_length_exceeded", "too long",
                                                              "messages")
    busy = ApiError(429, "rate_limit_exceeded", "busy", {"Retry-After": "1"})
    assert render.generation_error(Finish("error", Usage(0, 0, 0), busy)) is busy
    bad = render.generation_error(Finish("error", Usage(0, 0, 0), EngineError("b" * 2000)))
    assert (bad.status, bad.code, bad.detail) == (400, "invalid_request_error", "b" * 1000)
    crash = render.generation_error(Finish("error", Usage(0, 0, 0), RuntimeError("secret path /x")))
    assert (crash.status, crash.code, crash.detail) == (500, "server_error", "generation failed")
    assert render.generation_error(Finish("error", Usage(0, 0, 0))).status == 500


def test_reply_cuts_at_a_stop_string_and_says_stop() -> None:
    reply = render.ShownReply(_CharTokenizer(), STOP_0, ["END"], None)
    assert reply.deltas(Cached(CacheInfo(CacheStatus.PREFILL, "", 0, 5))) == ("", [])
    shown = "".join(reply.deltas(t)[0] for t in _tokens("hi ENDthere"))
    shown += reply.deltas(_finish("length"))[0]
    assert shown == "hi " and reply.finish_reason() == "stop" and reply.calls == []


def test_reply_out_of_tokens_says_length() -> None:
    reply = render.ShownReply(_CharTokenizer(), STOP_0, [], None)
    shown = "".join(reply.deltas(t)[0] for t in _tokens("abc")) + reply.deltas(_finish("length"))[0]
    assert shown == "abc" and reply.finish_reason() == "length"


def test_reply_parses_streamed_hermes_tool_calls() -> None:
    reply = render.ShownReply(_CharTokenizer(), STOP_0, [], "hermes")
    text = 'Let me look.<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'
    shown, calls = "", list[tl.ToolCallDelta]()
    events: list[TurnEvent] = [*_tokens(text), _finish("stop")]
    for ev in events:
        t, c = reply.deltas(ev)
        shown, calls = shown + t, calls + c
    assert shown == "Let me look."
    assert [(c.index, c.call.name, c.call.arguments) for c in calls] == [(0, "weather", {"city": "Oslo"})]
    assert reply.calls == [calls[0].call] and reply.finish_reason() == "tool_calls"


def test_a_guided_reply_is_shown_whole_and_its_finish_adds_nothing() -> None:
    plain = render.ShownReply(_CharTokenizer(), STOP_0, [], None)
    assert plain.deltas(Guided('{"a": 1}', 6)) == ('{"a": 1}', [])
    assert plain.deltas(_finish("stop")) == ("", []) and plain.finish_reason() == "stop"

    tools = render.ShownReply(_CharTokenizer(), STOP_0, [], "hermes")
    text, calls = tools.deltas(Guided('<tool_call>{"name": "f", "arguments": {"x": 2}}</tool_call>', 9))
    assert text == "" and [(c.index, c.call.name) for c in calls] == [(0, "f")]
    assert tools.deltas(_finish("stop")) == ("", []) and tools.finish_reason() == "tool_calls"


def _env(kind: render.Kind) -> render.Envelope:
    return render.Envelope(kind, "smol", "0123456789abcdef", id="chatcmpl-1", created=1700000000)


def test_envelope_makes_an_id_of_its_kind() -> None:
    chat, completion = render.Envelope("chat", "m", "f"), render.Envelope("completion", "m", "f")
    assert chat.id.startswith("chatcmpl-") and len(chat.id) == 9 + 24
    assert completion.id.startswith("cmpl-") and len(completion.id) == 5 + 24
    assert chat.id != render.Envelope("chat", "m", "f").id


def test_whole_chat_answer() -> None:
    usage, report = render.usage(3, 2, 0), render.kvagent_report(None, 0.5)
    body = _env("chat").whole("Hello", [], "stop", usage, report)
    assert json.dumps(body, separators=(",", ":")) == (
        '{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"smol",'
        '"system_fingerprint":"kvagent-0123456789ab","choices":[{"index":0,"message":{"role":"assistant",'
        '"content":"Hello"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":3,'
        '"completion_tokens":2,"total_tokens":5,"prompt_tokens_details":{"cached_tokens":0}},'
        '"kvagent":{"cache":{"status":"prefill","source":null,"cached_tokens":0,"reason":""},'
        '"time_to_first_token_s":0.5}}')


def test_whole_chat_answer_with_tool_calls_has_null_content_unless_it_said_something() -> None:
    call = tl.ToolCall("weather", {"city": "Oslo"}, id="call_1")
    body = _env("chat").whole("", [call], "tool_calls", {}, {})
    assert body["choices"][0]["message"] == {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}],
    }
    said = _env("chat").whole("Checking.", [call], "tool_calls", {}, {})
    assert said["choices"][0]["message"]["content"] == "Checking."
    assert _env("chat").whole("", [], "length", {}, {})["choices"][0]["message"] == {"role": "assistant",
                                                                                    "content": ""}


def test_whole_completion_answer() -> None:
    body = _env("completion").whole("42", [], "length", {"u": 1}, {"k": 2})
    assert body == {"id": "chatcmpl-1", "object": "text_completion", "created": 1700000000, "model": "smol",
                    "system_fingerprint": "kvagent-0123456789ab",
                    "choices": [{"index": 0, "text": "42", "logprobs": None, "finish_reason": "length"}],
                    "usage": {"u": 1}, "kvagent": {"k": 2}}


def test_chat_stream_frames_byte_for_byte() -> None:
    f = render.Frames(_env("chat"))
    head = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"smol",'
            b'"system_fingerprint":"kvagent-0123456789ab","choices":[{"index":0,')
    assert f.role() == head + b'"delta":{"role":"assistant","content":""},"logprobs":null,' \
                              b'"finish_reason":null}]}\n\n'
    assert f.text("Hé") == head + b'"delta":{"content":"H\\u00e9"},"logprobs":null,' \
                                  b'"finish_reason":null}]}\n\n'
    call = tl.ToolCallDelta(1, tl.ToolCall("f", {"x": 2}, id="call_9"))
    assert f.call(call) == head + (b'"delta":{"tool_calls":[{"index":1,"id":"call_9","type":"function",'
                                   b'"function":{"name":"f","arguments":"{\\"x\\": 2}"}}]},"logprobs":null,'
                                   b'"finish_reason":null}]}\n\n')
    assert f.finish("stop") == head + b'"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n'


def test_stream_frames_with_usage_carry_null_usage_until_the_usage_frame() -> None:
    f = render.Frames(_env("chat"), include_usage=True)
    for frame in (f.role(), f.text("a"), f.finish("length")):
        assert frame.endswith(b'}],"usage":null}\n\n'), frame
    assert f.usage({"prompt_tokens": 1}, {"cache": {}}) == (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"smol",'
        b'"choices":[],"usage":{"prompt_tokens":1},"kvagent":{"cache":{}}}\n\n')
    assert not render.Frames(_env("chat")).text("a").endswith(b'"usage":null}\n\n')


def test_completion_stream_frames_carry_text() -> None:
    f = render.Frames(_env("completion"))
    head = (b'data: {"id":"chatcmpl-1","object":"text_completion","created":1700000000,"model":"smol",'
            b'"system_fingerprint":"kvagent-0123456789ab","choices":[{"index":0,')
    assert f.text("4") == head + b'"text":"4","logprobs":null,"finish_reason":null}]}\n\n'
    assert f.finish("length") == head + b'"text":"","logprobs":null,"finish_reason":"length"}]}\n\n'


def test_done_and_error_frames() -> None:
    assert render.DONE_FRAME == b"data: [DONE]\n\n"
    assert render.ERROR_FRAME == (b'data: {"error": {"message": "generation failed", "type": "server_error", '
                                  b'"param": null, "code": "server_error"}}\n\n')
