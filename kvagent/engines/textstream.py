"""Token ids to streamed text: incremental detokenisation with stop tokens and stop strings.

Used wherever generated tokens are shown as they arrive (``KVAgent.stream``, the LangChain models,
the OpenAI-compatible endpoint), so all of them cut at stop strings and hold back partial
multi-byte characters the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any


def scan_stops(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Split ``text`` generated so far into (the part safe to show, whether a stop string occurred).

    With a stop string, the text ends just before its earliest occurrence. Without one, a tail
    that could still grow into a stop string is held back, so streamed text never shows it.
    """
    stops = [s for s in stops if s]
    if not stops:
        return text, False
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[: min(hits)], True
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[: len(text) - hold], False


class TextStream:
    """Feed generated token ids one at a time; get the text that may be shown now.

    ``finish_reason`` becomes ``"stop"`` at a stop token or stop string; ``token_ids`` holds the
    generated ids up to (not including) a stop token. ``text`` is everything shown so far (always empty
    without a ``tokenizer``: ids only, stop tokens still end the stream).
    """

    def __init__(self, tokenizer: Any, stop_token_ids: Iterable[int] = (), stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(stop_token_ids)
        self.stops = [s for s in stops if s]
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    @property
    def stopped(self) -> bool:
        return self.finish_reason == "stop"

    def push(self, token: int) -> str:
        """Add one generated token; return the newly showable text (may be empty)."""
        if self.stopped:
            return ""
        if token in self.stop_token_ids:
            self.finish_reason = "stop"
            return self._flush()
        self.token_ids.append(token)
        full = self._decode()
        if full.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return ""
        safe, hit = scan_stops(full, self.stops)
        if hit:
            self.finish_reason = "stop"
        return self._show(safe)

    def deltas(self, tokens: Iterable[int]) -> Iterator[str]:
        """Push every token of ``tokens``, yielding the showable text, until a stop; then the held-back
        tail."""
        for tok in tokens:
            delta = self.push(tok)
            if delta:
                yield delta
            if self.stopped:
                break
        tail = self.finish()
        if tail:
            yield tail

    def finish(self, reason: str = "length") -> str:
        """End of generation: flush a held-back tail that never became a stop string."""
        if self.finish_reason is None:
            self.finish_reason = reason
        return self._flush()

    def _flush(self) -> str:
        full = self._decode()
        safe, hit = scan_stops(full, self.stops)
        if hit:
            self.finish_reason = "stop"
        return self._show(safe if hit else full)

    def _decode(self) -> str:
        if self.tokenizer is None:
            return ""
        return str(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))

    def _show(self, safe: str) -> str:
        if len(safe) > len(self.text):
            delta = safe[len(self.text) :]
            self.text = safe
            return delta
        return ""
