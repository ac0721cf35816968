"""Stop strings over streamed text: what may be shown now, and where the text ends (pure logic)."""

from __future__ import annotations

from collections.abc import Sequence


def scan(text: str, stops: Sequence[str]) -> tuple[str, bool]:
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
