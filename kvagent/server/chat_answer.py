"""One chat/completion request's answer, whole or streamed: admitted (kvagent.server.chat_admission),
billed (chat_billing), metered (chat_meter) and rendered in OpenAI's shapes (chat_render). The routes in
kvagent.server.openai_routes validate the request and hand its job here."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..chat import tools as tl
from ..chat.turn import Cached, TurnEvent
from ..engines import Finish
from . import chat_render as render
from .chat import ChatJob, ChatService
from .chat_admission import admitted_events
from .chat_billing import ChatBill
from .chat_meter import ChatMeter
from .state import State


class ChatRun:
    """One request's generation: starts ``job`` on the model thread and renders its events as OpenAI JSON
    (``kind`` ``chat`` or ``completion``; ``fmt`` the tool-call format to parse the reply for, if any)."""

    def __init__(self, st: State, svc: ChatService, job: ChatJob, kind: render.Kind, stops: list[str],
                 fmt: tl.ToolFormat | None, request: Request, digest: str) -> None:
        self.st, self.svc, self.job, self.kind = st, svc, job, kind
        host = svc.host
        self.bill = ChatBill(st, job.principal, request, digest, len(job.ids), job.params.max_new_tokens)
        self.meter = ChatMeter(st.metrics, kind, len(job.ids), job.started)
        self.reply = render.ShownReply(host.agent.tokenizer, job.params, stops, fmt)
        self.env = render.Envelope(kind, host.name, host.fingerprint)

    async def answer(self, stream: bool, include_usage: bool) -> Response:
        """The answer: streamed or whole. A repeated Idempotency-Key is answered first, before the engine
        runs: the same non-streamed request replays its stored answer (charged 0); otherwise the key's
        refusal (409 already served or refunded, 422 reused by another request). Never generated again."""
        replayed = await self.bill.replay()
        if replayed is not None:
            return replayed
        return await (self.stream(include_usage) if stream else self.whole())

    def _events(self) -> AsyncGenerator[TurnEvent, None]:
        return admitted_events(self.st, self.svc, self.job)

    def _usage(self) -> dict[str, Any]:
        return render.usage(self.meter.n_prompt, self.meter.n_generated, self.meter.cached_tokens)

    def _report(self) -> dict[str, Any]:
        return render.kvagent_report(self.meter.info, self.meter.ttft)

    async def whole(self) -> JSONResponse:
        """The whole answer; a generation that fails is refunded and answered with its HTTP error."""
        content: list[str] = []
        events = self._events()
        try:
            async for ev in events:
                self.meter.observe(ev)
                if render.failed(ev):
                    self.meter.ended("error")
                    await self.bill.refund("generation failed: nothing was answered")
                    raise render.generation_error(ev)
                if isinstance(ev, Cached):
                    await self.bill.charge(self.meter.info)
                text, _calls = self.reply.deltas(ev)
                content.append(text)
        finally:
            await events.aclose()
        await self.bill.settle(self.meter.cached_tokens, self.meter.n_generated)
        self.meter.ended("ok")
        body = self.env.whole("".join(content), self.reply.calls, self.reply.finish_reason(), self._usage(),
                              self._report())
        answer = JSONResponse(body, headers=self.bill.headers())  # settled: what it moved
        await self.bill.keep(bytes(answer.body), self.env.id)  # what a repeat of its Idempotency-Key replays
        return answer

    async def stream(self, include_usage: bool) -> Response:
        """The answer as server-sent events, once admitted and pre-charged (errors until then are plain HTTP
        errors); a failure later is an error frame, and the bill settles whenever the stream ends."""
        events = self._events()
        first = await events.__anext__()  # admission and the prompt's KV: errors here are plain HTTP errors
        self.meter.observe(first)
        try:
            if render.failed(first):
                self.meter.ended("error")
                raise render.generation_error(first)
            await self.bill.charge(self.meter.info)
        except BaseException:
            await events.aclose()
            raise
        frames = render.Frames(self.env, include_usage)
        return StreamingResponse(self._sse(events, frames), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          **self.bill.headers()})

    async def _sse(self, events: AsyncGenerator[TurnEvent, None],
                   frames: render.Frames) -> AsyncIterator[bytes]:
        ok = False
        try:
            if self.kind == "chat":
                yield frames.role()
            async for ev in events:
                self.meter.observe(ev)
                if render.failed(ev):
                    yield render.ERROR_FRAME
                    return
                text, calls = self.reply.deltas(ev)
                if text:
                    yield frames.text(text)
                for c in calls:
                    yield frames.call(c)
                if isinstance(ev, Finish):
                    yield frames.finish(self.reply.finish_reason())
                    if frames.include_usage:
                        yield frames.usage(self._usage(), self._report())
                    yield render.DONE_FRAME
                    ok = True
        finally:  # the client may be gone and this task cancelled: count first, then clean up for sure
            self.meter.ended("ok" if ok else "cancelled")
            try:
                await events.aclose()
            finally:
                await self.bill.settle(self.meter.cached_tokens, self.meter.n_generated)
