"""Stop strings and incremental detokenisation (kvagent.engines.textstream), and a reply worked out from a
turn's events (kvagent.chat.turn.Reply)."""

from __future__ import annotations

import pytest

from kvagent import (
    Cached,
    CacheInfo,
    CacheStatus,
    EngineError,
    Finish,
    GenerationParams,
    Reply,
    TextStream,
    Token,
    Usage,
    scan_stops,
)

_INFO = CacheInfo(CacheStatus.PREFILL, "test", 0, 3)


def test_no_stops_shows_everything() -> None:
    assert scan_stops("hello\n", []) == ("hello\n", False)


def test_cuts_at_the_earliest_stop_string() -> None:
    assert scan_stops("one. two\n\nthree END", ["END", "\n\n"]) == ("one. two", True)


def test_holds_back_a_tail_that_may_become_a_stop() -> None:
    assert scan_stops("answer: yes\n", ["\n\n"]) == ("answer: yes", False)
    assert scan_stops("abc EN", ["END"]) == ("abc ", False)
    assert scan_stops("abc E", ["END", "Ex"]) == ("abc ", False)


def test_empty_stop_strings_are_ignored() -> None:
    assert scan_stops("text", [""]) == ("text", False)


class _CharTokenizer:
    """One token per character; id 0 is a stop token; 200+ are halves of a two-token character."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, i = [], 0
        while i < len(ids):
            if ids[i] >= 200:  # a multi-byte character needs its second half
                out.append("é" if i + 1 < len(ids) else "\ufffd")
                i += 2
                continue
            out.append(chr(ids[i]))
            i += 1
        return "".join(out)


def _feed(stream: TextStream, text: str) -> str:
    return "".join(stream.push(ord(c)) for c in text)


def test_stream_cuts_at_stop_string_and_never_shows_it() -> None:
    s = TextStream(_CharTokenizer(), stop_token_ids=[0], stops=["END"])
    shown = _feed(s, "hello EN")
    assert shown == "hello " and not s.stopped  # "EN" held back: it may become "END"
    shown += s.push(ord("D"))
    assert s.stopped and s.finish_reason == "stop" and shown == "hello " and s.text == "hello "


def test_stream_flushes_a_held_tail_at_the_end() -> None:
    s = TextStream(_CharTokenizer(), stop_token_ids=[0], stops=["END"])
    shown = _feed(s, "bye E") + s.finish()
    assert shown == "bye E" and s.finish_reason == "length"


def test_stop_token_ends_and_is_not_kept() -> None:
    s = TextStream(_CharTokenizer(), stop_token_ids=[0])
    shown = _feed(s, "ok") + s.push(0) + s.push(ord("x"))
    assert shown == "ok" and s.token_ids == [ord("o"), ord("k")] and s.finish_reason == "stop"


def test_partial_multibyte_character_is_held_back() -> None:
    s = TextStream(_CharTokenizer())
    assert s.push(ord("a")) == "a"
    assert s.push(201) == ""  # first half only
    assert s.push(202) == "é"


def test_without_a_tokenizer_stop_tokens_still_end_the_stream() -> None:
    stream = TextStream(None, [0])
    assert list(stream.deltas([104, 105, 0, 106])) == []
    assert (stream.finish_reason, stream.token_ids, stream.text) == ("stop", [104, 105], "")


def test_a_reply_works_out_text_and_finish_reason_from_turn_events() -> None:
    """kvagent.Reply, fed a turn's events: a stop string ends the reply (later tokens are not kept), a
    Finish's "length" stands when nothing stopped it, and an error Finish is raised."""
    params = GenerationParams(max_new_tokens=8, stop_token_ids=(0,))
    stopped = Reply(_CharTokenizer(), params, ["c"])
    events = [Cached(_INFO), *(Token(ord(ch)) for ch in "abcd"), Finish("stop", Usage(3, 0, 4))]
    assert "".join(stopped.deltas(events)) == "ab"
    assert (stopped.finish_reason, stopped.token_ids) == ("stop", [97, 98, 99])
    long = Reply(_CharTokenizer(), params)
    assert "".join(long.deltas([Token(97), Token(98), Finish("length", Usage(3, 0, 2))])) == "ab"
    assert long.finish_reason == "length" and long.usage == Usage(3, 0, 2)
    eos = Reply(_CharTokenizer(), params)
    assert "".join(eos.deltas([Token(97), Token(0)])) == "a"  # bare tokens (a registry's), no Finish
    assert (eos.finish_reason, eos.token_ids) == ("stop", [97, 0])
    with pytest.raises(EngineError, match="boom"):
        list(Reply(_CharTokenizer(), params).deltas([Token(97), Finish("error", Usage(3, 0, 1),
                                                                         EngineError("boom"))]))
