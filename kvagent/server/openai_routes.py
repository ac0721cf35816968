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
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from ..chat import guided
from ..chat import tools as tl
from ..costs import market as mk
from ..engines.params import GenerationParams
from ..errors import ToolsUnsupportedError
from .chat import ChatJob, ChatService, load_secret
from .chat_answer import ChatRun
from .http import ApiError, read_body
from .state import State

if TYPE_CHECKING:
    from .host import ModelHost

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
        run = ChatRun(st, svc, job, "chat", stops, fmt, request, digest)
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
        job = ChatJob(ids, gen, p, stops=tuple(stops))
        run = ChatRun(st, svc, job, "completion", stops, None, request, digest)
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

