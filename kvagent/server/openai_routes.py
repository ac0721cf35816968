"""OpenAI-compatible routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``.

Any OpenAI client (the official ``openai`` package, LangChain's ``ChatOpenAI``, LlamaIndex, the Agents SDK,
curl) gets transparent, token-exact KV reuse: the messages are rendered with the model's chat template
(as ``apply_chat_template(..., add_generation_prompt=True)`` would), and the prompt resumes from the longest
cached token prefix the caller may use (see kvagent.server.chat). Cache use is reported the standard way,
``usage.prompt_tokens_details.cached_tokens``, plus a ``kvagent`` field saying where the tokens came from.
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` (see kvagent.server.http).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool

from ..chat import guided
from ..chat import tools as tl
from ..chat.turn import Cached, Guided, Reply, TurnEvent, settled
from ..costs import market as mk
from ..engines import Finish, Token
from ..engines.params import GenerationParams
from ..errors import ContextLengthError, KVAgentError, ToolsUnsupportedError
from ..reuse.info import CacheInfo
from . import market_routes
from .chat import ChatJob, ChatService, load_secret
from .events import thread_events
from .http import ApiError, finish, read_body
from .state import State

if TYPE_CHECKING:
    from .host import ModelHost

log = logging.getLogger("kvagent.server")

MAX_CHAT_BODY = 8 << 20
Number = Annotated[float, Field(allow_inf_nan=False)]


class _Lenient(BaseModel):
    """Known fields are type-checked strictly; unknown ones (``store``, ``metadata``...) are ignored."""

    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Lenient):
    name: StrictStr
    arguments: StrictStr


class ToolCallIn(_Lenient):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: StrictStr | None = None


class StreamOptions(_Lenient):
    include_usage: StrictBool = False


class _Sampling(_Lenient):
    model: StrictStr
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    n: StrictInt | None = None
    user: StrictStr | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logprobs: StrictBool | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | list[StrictInt]
    echo: StrictBool | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, code or "invalid_request_error", message, param=param)


async def _body(request: Request, model: type[BaseModel]) -> tuple[Any, str]:
    """The request, validated, and its digest (route and whole JSON body, canonical: what an Idempotency-Key
    is bound to, unknown fields included)."""
    body = await read_body(request, MAX_CHAT_BODY, "request_too_large")
    try:
        req = model.model_validate_json(body)
        return req, mk.request_digest(request.url.path, "", json.loads(body))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("str", "list[TextPart]"))
        raise _bad(
            f"{loc}: {err.get('msg', 'invalid')}" if loc else err.get("msg", "invalid request"), loc or None
        ) from exc


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise _bad("stop: at most 4 stop sequences", "stop")
    return stops


def _text(content: str | list[TextPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.text for p in content)


def routes(st: State) -> APIRouter:
    """The OpenAI-compatible routes over ``st`` (answer 404 ``model_not_found`` on a registry-only node)."""
    app = APIRouter()
    service = ChatService(st, load_secret(st.settings.data_dir), st.settings.max_queue) if st.host else None
    created = int(time.time())

    def served(model: str) -> ChatService:
        if service is None or model != service.host.name:
            names = (
                f"the only model here is {service.host.name!r}" if service else "this node serves no model"
            )
            raise ApiError(
                404, "model_not_found", f"The model {model!r} does not exist ({names})", param="model"
            )
        return service

    def params(host: ModelHost, req: _Sampling, max_tokens: int | None, default_max: int) -> GenerationParams:
        if req.n not in (None, 1):
            raise _bad("n: only n=1 is supported", "n")
        if req.logprobs:
            raise _bad("logprobs are not supported", "logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) not in (None, 0):
                raise _bad(f"{name}: only 0 is supported", name)
        template = host.agent.template
        return GenerationParams(
            max_new_tokens=max_tokens or default_max,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            seed=req.seed,
            stop_token_ids=template.stop_token_ids if template else (),
        )

    def check_length(host: ModelHost, n_prompt: int, p: GenerationParams) -> None:
        limit = host.max_positions
        if limit and n_prompt + p.max_new_tokens > limit and not host.agent.config.allow_context_overflow:
            raise ApiError(
                400,
                "context_length_exceeded",
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + p.max_new_tokens} tokens ({n_prompt} in the messages, {p.max_new_tokens} in "
                "the "
                "completion). Please reduce the length of the messages or completion.",
                param="messages",
            )

    @app.get("/v1/models")
    def list_models(request: Request) -> dict[str, Any]:
        st.principal(request)
        data = (
            [{"id": st.host.name, "object": "model", "created": created, "owned_by": "kvagent"}]
            if st.host
            else []
        )
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model}")
    def get_model(model: str, request: Request) -> dict[str, Any]:
        st.principal(request)
        served(model)
        return {"id": model, "object": "model", "created": created, "owned_by": "kvagent"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        p = st.buyer(request)  # with x402 on, a wallet pays a priced host by PAYMENT-SIGNATURE
        req: ChatRequest
        req, digest = await _body(request, ChatRequest)
        svc = served(req.model)
        host = svc.host
        if host.agent.tokenizer is None:
            raise _bad(
                f"model {host.name!r} has no tokenizer here: chat requests cannot be rendered", "model"
            )
        max_tokens = req.max_completion_tokens or req.max_tokens
        gen = params(host, req, max_tokens, st.settings.default_max_tokens)
        messages = [_message(m) for m in req.messages]
        # rendered even with tool_choice "none", so the prompt (and its KV) stays the same
        tools = req.tools or None
        fmt = None
        guide = None
        try:
            if tools:
                fmt = tl.require_tool_format(host.agent.tokenizer, host.name)
                forced = tl.forced_tool(req.tool_choice, tools)
                # "required" or a named function: the call is written, its arguments decoded
                if forced is not None:
                    tool_fmt, chosen = fmt, forced

                    def guide(cont: Any) -> str:
                        return guided.guided_tool_call(tool_fmt, tools, chosen, cont)
            ids = tl.render(host.agent.tokenizer, messages, tools, model_name=host.name)
        except ToolsUnsupportedError as exc:
            raise _bad(str(exc), "tools") from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise _bad(
                f"messages cannot be rendered with this model's chat template: {exc}", "messages"
            ) from exc
        schema = _json_schema(req.response_format)
        if schema is not None and guide is None:
            def guide(cont: Any) -> str:
                return guided.guided_json(schema, cont)[0]
        check_length(host, len(ids), gen)
        stops = _stops(req.stop)
        job = ChatJob(ids, gen, p, guide=guide, stops=tuple(stops))
        if req.tool_choice == "none":
            fmt = None  # the tools stay in the prompt, but the reply is not read for calls
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        run = _Run(st, svc, job, "chat", stops, fmt, request, digest)
        return await run.answer(req.stream, include_usage)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        p = st.buyer(request)
        req: CompletionRequest
        req, digest = await _body(request, CompletionRequest)
        svc = served(req.model)
        host = svc.host
        if req.echo or (req.best_of not in (None, 1)) or req.suffix:
            raise _bad("echo, best_of > 1 and suffix are not supported")
        gen = params(host, req, req.max_tokens, 16)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise _bad("prompt: only one prompt per request is supported", "prompt")
            prompt = prompt[0]
        if host.agent.tokenizer is None:
            raise _bad(
                f"model {host.name!r} has no tokenizer here: completions cannot be decoded", "model"
            )
        if isinstance(prompt, str):
            if not prompt:
                raise _bad("prompt: must not be empty", "prompt")
            ids = [int(t) for t in host.agent.tokenizer.encode(prompt, add_special_tokens=True)]
        else:
            vocab = host.engine.config.get_text_config(decoder=True).vocab_size
            if not prompt or any(not 0 <= t < vocab for t in prompt):  # type: ignore[operator]
                raise _bad(f"prompt: token ids must be a non-empty list of ids in [0, {vocab})", "prompt")
            ids = [int(t) for t in prompt]  # type: ignore[arg-type]
        check_length(host, len(ids), gen)
        stops = _stops(req.stop)
        run = _Run(st, svc, ChatJob(ids, gen, p, stops=tuple(stops)), "completion", stops, None, request,
                   digest)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await run.answer(req.stream, include_usage)

    return app


def _json_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema a ``response_format`` asks for (None: plain text)."""
    if not response_format or response_format.get("type") in (None, "text"):
        return None
    if response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            return schema
        raise _bad("response_format.json_schema.schema must be a JSON schema object", "response_format")
    raise _bad(
        "response_format: 'text' and 'json_schema' are supported ('json_object' is not: give a schema)",
        "response_format",
    )


def _message(m: Message) -> dict[str, Any]:
    role = "system" if m.role == "developer" else m.role
    out: dict[str, Any] = {"role": role, "content": _text(m.content)}
    if m.role == "user" and not out["content"] and m.content is None:
        raise _bad("messages: a user message needs content", "messages")
    if m.tool_calls:
        if m.role != "assistant":
            raise _bad("messages: only assistant messages carry tool_calls", "messages")
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in m.tool_calls
        ]
    if m.role == "tool":
        if m.tool_call_id is None:
            raise _bad("messages: a tool message needs tool_call_id", "messages")
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


class _Run:
    """One request's generation: starts the job on the model thread and renders its events as OpenAI JSON."""

    def __init__(self, st: State, svc: ChatService, job: ChatJob, kind: str, stops: list[str],
                 fmt: tl.ToolFormat | None, request: Request, digest: str) -> None:
        self.st, self.svc, self.job, self.kind, self.request = st, svc, job, kind, request
        self.digest = digest  # the request's, which its Idempotency-Key is bound to (with the route)
        self.host = svc.host
        self.receipt: Any = None  # the market's pre-charge (None when hosting is free)
        self.given_back = 0  # what settling the pre-charge returned (unused output tokens, found cache)
        self.charged_cached = 0  # the prompt tokens the pre-charge billed as cached
        self.reply = Reply(self.host.agent.tokenizer, job.params, stops)
        self.parser = tl.StreamParser(fmt) if fmt else None
        self.calls: list[tl.ToolCall] = []
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.info: CacheInfo | None = None
        self.n_generated = 0
        self.ttft: float | None = None
        self.guided = False  # the reply was written by kvagent.chat.guided (ends with "stop" or "tool_calls")

    # -- the generation -----------------------------------------------------------------------
    async def _events(self) -> AsyncGenerator[TurnEvent, None]:
        p = self.job.principal
        # the principal's generate slots
        lease = await run_in_threadpool(self.st.quotas.acquire, p.name, p.limits)
        try:
            with self.svc.admitted():
                events = thread_events(lambda sink, cancel: self.svc.run(self.job, sink, cancel),
                                       "kvagent-chat")
                try:
                    async for ev in events:
                        yield ev
                finally:  # the client went away (or we are done): stop generating
                    await events.aclose()
        finally:
            await finish(self.st.quotas.release, lease)

    async def _charge(self) -> None:
        """Pre-charge the request once its cache use is known (host token prices, plus the royalty of a
        published
        artifact it resumed from); a refusal is a 402 with a quote, before anything is served."""
        info = self.info
        row = None
        if info is not None and info.source == "registry" and info.origin:
            try:
                row = await run_in_threadpool(self.st.visible, info.origin, self.job.principal)
            except ApiError:
                row = None
        cached = info.cached_tokens if info else 0
        if self.st.x402 is not None:
            # a 402's x402 requirements are priced before the buyer is known (anonymous, or a bearer whose
            # cache may change before it pays) and the paid request's after (the wallet's own private cache):
            # the pre-charge counts no prompt token as cached, so the amount signed for is the amount checked;
            # settling gives the cache's discount back
            cached = 0
        self.charged_cached = cached
        self.receipt = await run_in_threadpool(
            market_routes.charge_chat, self.st, self.job.principal, self.request, len(self.job.ids), cached,
            self.job.params.max_new_tokens, self.request.url.path, self.digest, row)

    async def _settle(self) -> None:
        cached = self.info.cached_tokens if self.info else 0

        def settle() -> None:  # an engine that resolved the prompt itself reported its cached tokens by now
            self.given_back = market_routes.settle_chat(
                self.st, self.receipt, len(self.job.ids), self.charged_cached, cached,
                self.job.params.max_new_tokens, self.n_generated)

        await finish(settle)

    async def _refund(self, why: str) -> None:
        """Reverse the pre-charge of a request that answers nothing (a replay's was never charged here)."""
        if self.receipt is not None and not self.receipt.replayed:
            await finish(self.st.market.refund, self.receipt.receipt, why)
        self.receipt = None

    def _observe(self, ev: TurnEvent) -> None:
        m = self.st.metrics
        if isinstance(ev, Cached):
            self.info = ev.info
            m.prompt_tokens.inc(len(self.job.ids))
            m.prefix_cache_queries.inc(len(self.job.ids))
            if self.info and self.info.cached_tokens and self.info.source:
                m.prefix_cache_hits.labels(self.info.source).inc(self.info.cached_tokens)
        elif isinstance(ev, Token):
            self.n_generated += 1
            m.generation_tokens.inc()
            if self.ttft is None:
                self.ttft = time.perf_counter() - self.job.started
                m.ttft.labels(self.kind).observe(self.ttft)
        elif isinstance(ev, Guided):
            self.guided = True
            self.n_generated = ev.n_tokens
            m.generation_tokens.inc(self.n_generated)
            self.ttft = time.perf_counter() - self.job.started
        elif isinstance(ev, Finish) and ev.reason != "error":
            m.observe_finish(self.kind, ev.usage)
            if self.info is not None and self.info.status == "engine":  # the engine reused what it found
                self.info = settled(self.info, ev.usage)
                if self.info.cached_tokens:
                    m.prefix_cache_hits.labels(self.info.source).inc(self.info.cached_tokens)

    def _deltas(self, ev: TurnEvent) -> tuple[str, list[tl.ToolCallDelta]]:
        """The text (and complete tool calls) an event makes showable."""
        if isinstance(ev, Guided):
            if self.parser is None:
                return ev.text, []
            parsed = tl.parse(ev.text, self.parser.fmt)
            calls = [tl.ToolCallDelta(i, c) for i, c in enumerate(parsed.tool_calls)]
            self.calls += list(parsed.tool_calls)
            return parsed.content, calls
        if isinstance(ev, Finish) and self.guided:
            return "", []
        if isinstance(ev, (Token, Finish)):
            text = self.reply.feed(ev)
        else:
            return "", []
        if self.parser is None:
            return text, []
        events = self.parser.feed(text) if text else []
        if isinstance(ev, Finish):
            events += self.parser.finish()
        content = "".join(e.text for e in events if isinstance(e, tl.ContentDelta))
        calls = [e for e in events if isinstance(e, tl.ToolCallDelta)]
        self.calls += [c.call for c in calls]
        return content, calls

    def _finish_reason(self) -> str:
        if self.calls:
            return "tool_calls"
        return "stop" if self.guided else self.reply.finish_reason

    def _usage(self) -> dict[str, Any]:
        n_prompt = len(self.job.ids)
        cached = self.info.cached_tokens if self.info else 0
        return {
            "prompt_tokens": n_prompt,
            "completion_tokens": self.n_generated,
            "total_tokens": n_prompt + self.n_generated,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _kvagent(self) -> dict[str, Any]:
        info = self.info
        return {
            "cache": {
                "status": info.status if info else "prefill",
                "source": (info.source or None) if info else None,
                "cached_tokens": info.cached_tokens if info else 0,
                "reason": info.reason if info else "",
            },
            "time_to_first_token_s": round(self.ttft, 4) if self.ttft is not None else None,
        }

    @staticmethod
    def _failed(ev: TurnEvent) -> bool:
        return isinstance(ev, Finish) and ev.reason == "error"

    @staticmethod
    def _raise(ev: TurnEvent) -> None:
        exc = ev.error if isinstance(ev, Finish) else None
        if isinstance(exc, ContextLengthError):
            raise ApiError(400, "context_length_exceeded", str(exc), param="messages")
        if isinstance(exc, ApiError):
            raise exc
        if isinstance(exc, KVAgentError):
            raise ApiError(400, "invalid_request_error", str(exc)[:1000])
        raise ApiError(500, "server_error", "generation failed")

    # -- answers ------------------------------------------------------------------------------
    async def answer(self, stream: bool, include_usage: bool) -> Response:
        """The answer: streamed or whole. A repeated Idempotency-Key is answered first, before the engine
        runs: the same non-streamed request replays its stored answer (charged 0); otherwise the key's
        refusal (409 already served or refunded, 422 reused by another request). Never generated again."""
        replayed = await run_in_threadpool(market_routes.replay, self.st, self.job.principal, self.request,
                                           self.request.url.path, self.digest)
        if replayed is not None:
            return replayed
        return await (self.stream(include_usage) if stream else self.whole())

    async def whole(self) -> JSONResponse:
        content: list[str] = []
        events = self._events()
        try:
            async for ev in events:
                self._observe(ev)
                if self._failed(ev):
                    self.st.metrics.requests.labels(self.kind, "error").inc()
                    await self._refund("generation failed: nothing was answered")
                    self._raise(ev)
                if isinstance(ev, Cached):
                    await self._charge()
                text, _calls = self._deltas(ev)
                content.append(text)
        finally:
            await events.aclose()
        await self._settle()
        self.st.metrics.requests.labels(self.kind, "ok").inc()
        body = "".join(content)
        if self.kind == "chat":
            message: dict[str, Any] = {
                "role": "assistant",
                "content": body if body or not self.calls else None,
            }
            if self.calls:
                message["tool_calls"] = [c.openai() for c in self.calls]
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None,
                                      "finish_reason": self._finish_reason()}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": body, "logprobs": None, "finish_reason": self._finish_reason()}
            obj = "text_completion"
        answer = JSONResponse({
            "id": self.id, "object": obj, "created": self.created, "model": self.host.name,
            "system_fingerprint": f"kvagent-{self.host.fingerprint[:12]}",
            "choices": [choice], "usage": self._usage(), "kvagent": self._kvagent(),
        }, headers={**market_routes.receipt_headers(self.receipt, self.given_back),  # settled: what it moved
                    **market_routes.payment_headers(self.request)})
        try:  # what a repeat of this request's Idempotency-Key replays
            await finish(market_routes.keep_answer, self.st, self.receipt, self.request, bytes(answer.body))
        except Exception:  # the answer is paid for and still given; a repeat is refused (409), never served
            log.warning("could not keep the answer of %s for its Idempotency-Key", self.id, exc_info=True)
        return answer

    async def stream(self, include_usage: bool) -> Response:
        events = self._events()
        first = await events.__anext__()  # admission and the prompt's KV: errors here are plain HTTP errors
        self._observe(first)
        try:
            if self._failed(first):
                self.st.metrics.requests.labels(self.kind, "error").inc()
                self._raise(first)
            await self._charge()
        except BaseException:
            await events.aclose()
            raise
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"

        def chunk(delta: dict[str, Any] | str | None, finish: str | None = None, **extra: Any) -> bytes:
            if self.kind == "chat":
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish,
                }
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            body: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created,
                                    "model": self.host.name,
                                    "system_fingerprint": f"kvagent-{self.host.fingerprint[:12]}",
                                    "choices": [choice], **extra}
            if include_usage:
                body.setdefault("usage", None)
            return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

        async def sse() -> AsyncIterator[bytes]:
            ok = False
            try:
                if self.kind == "chat":
                    yield chunk({"role": "assistant", "content": ""})
                async for ev in events:
                    self._observe(ev)
                    if self._failed(ev):
                        err = {
                            "error": {
                                "message": "generation failed",
                                "type": "server_error",
                                "param": None,
                                "code": "server_error",
                            }
                        }
                        yield b"data: " + json.dumps(err).encode() + b"\n\n"
                        return
                    text, calls = self._deltas(ev)
                    if text:
                        yield chunk({"content": text} if self.kind == "chat" else text)
                    for c in calls:
                        call = c.call.openai()
                        yield chunk({"tool_calls": [{"index": c.index, **call}]})
                    if isinstance(ev, Finish):
                        yield chunk({} if self.kind == "chat" else "", self._finish_reason())
                        if include_usage:
                            body = {"id": self.id, "object": obj, "created": self.created,
                                    "model": self.host.name, "choices": [], "usage": self._usage(),
                                    "kvagent": self._kvagent()}
                            yield b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
                        yield b"data: [DONE]\n\n"
                        ok = True
            finally:  # the client may be gone and this task cancelled: count first, then clean up for sure
                self.st.metrics.requests.labels(self.kind, "ok" if ok else "cancelled").inc()
                try:
                    await events.aclose()
                finally:
                    await self._settle()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          **market_routes.receipt_headers(self.receipt),
                                          **market_routes.payment_headers(self.request)})
