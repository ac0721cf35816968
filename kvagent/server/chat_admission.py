"""Admission of one chat/completion request: the principal's generate slot (its quota), a place in the
host's queue (429 with Retry-After when full), then the job on a thread of its own, its events streamed
back to the route."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from starlette.concurrency import run_in_threadpool

from ..chat.turn import TurnEvent
from .chat import ChatJob, ChatService
from .events import thread_events
from .http import finish
from .state import State


async def admitted_events(st: State, svc: ChatService, job: ChatJob) -> AsyncGenerator[TurnEvent, None]:
    """The events of ``job`` (Cached, Token... or one Guided, then one Finish) once it is admitted. Leaving
    the iteration (done, or the client went away) stops the generation and frees the queue place and the
    quota slot, even when the task is being cancelled."""
    p = job.principal
    lease = await run_in_threadpool(st.quotas.acquire, p.name, p.limits)
    try:
        with svc.admitted():
            events = thread_events(lambda sink, cancel: svc.run(job, sink, cancel), "kvagent-chat")
            try:
                async for ev in events:
                    yield ev
            finally:  # the client went away (or we are done): stop generating
                await events.aclose()
    finally:
        await finish(st.quotas.release, lease)
