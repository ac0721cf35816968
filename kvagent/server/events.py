"""The one bridge from a generation running on threads (the turn's preparation, then the engine's scheduler)
to an async route: events arrive on an asyncio queue, and leaving the iteration (done, or the client went
away) cancels the generation."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from typing import Any

from ..engines import Cancel, Finish, Usage
from ..errors import KVAgentError

log = logging.getLogger("kvagent.server")

#: ``start(sink, cancel)``: runs on a thread of its own, sends events to ``sink`` until one Finish
Start = Callable[[Callable[[Any], None], Cancel], None]


async def thread_events(start: Start, name: str = "kvagent-turn") -> AsyncGenerator[Any, None]:
    """Run ``start`` on a new thread and yield the events it (or the engine it submits to) sends, up to and
    including the Finish. An exception from ``start`` becomes ``Finish("error")``."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancel = Cancel()

    def sink(ev: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, ev)
        except RuntimeError:  # the event loop is gone (shutdown): nobody listens any more
            cancel.cancel()

    def run() -> None:
        try:
            start(sink, cancel)
        except KVAgentError as exc:
            sink(Finish("error", Usage(0, 0, 0), exc))
        except Exception as exc:  # reported to the client as a generic 500, logged here
            log.exception("generation failed")
            sink(Finish("error", Usage(0, 0, 0), exc))

    threading.Thread(target=run, daemon=True, name=name).start()
    try:
        while True:
            ev = await queue.get()
            yield ev
            if isinstance(ev, Finish):
                return
    finally:  # runs when the client went away too: stop generating
        cancel.cancel()
