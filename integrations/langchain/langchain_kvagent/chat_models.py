"""``ChatKVAgent``: a LangChain chat model that resumes from the longest cached prompt prefix."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Literal

from kvagent import (
    ContentDelta,
    GenerationParams,
    Parsed,
    StreamParser,
    ToolFormat,
    forced_tool,
    guided_json,
    guided_tool_call,
    normalize_tools,
    parse_tool_calls,
    render_chat,
    require_tool_format,
    tool_format,
)
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import LangSmithParams, LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_openai_tool

from ._reuse import Completion, PromptRunner
from ._settings import KVAgentSettings
from .tool_calls import StructuredOutputParser, lc_tool_call, lc_tool_call_chunk, to_chat_dicts

__all__ = ["ChatKVAgent", "to_chat_dicts"]

JSON_INSTRUCTION = "Reply with only a JSON value that matches this JSON schema:\n"


@dataclass
class _Turn:
    """One call's prompt and what it must produce: free text, a forced tool call, or schema JSON."""

    ids: list[int]
    fmt: ToolFormat | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    forced: str | list[str] | None = None
    json_schema: dict[str, Any] | None = None
    parse_calls: bool = False


def _usage(done: Completion, output_tokens: int | None = None) -> UsageMetadata:
    n_out = len(done.token_ids) if output_tokens is None else output_tokens
    return UsageMetadata(
        input_tokens=done.prompt_tokens,
        output_tokens=n_out,
        total_tokens=done.prompt_tokens + n_out,
        input_token_details={"cache_read": done.info.cached_tokens},
        output_token_details={},
    )


class ChatKVAgent(KVAgentSettings, BaseChatModel):
    """A local kvagent model as a LangChain chat model.

    Messages are rendered with the tokenizer's chat template (as token ids, with the generation
    prompt); the longest cached KV that is a prefix of them is resumed from, and the prompt's KV is
    kept for the next call. A document read by ``KVDocumentLoader`` is a prefix of a prompt whose
    first message after the default system prompt is a user message starting with the document;
    any prompt repeated up to its question (e.g. a system message holding the document) hits from
    its second call on. ``response_metadata`` reports the cache: ``kv_status``, ``kv_cached_tokens``...

    Tools (``bind_tools``) are rendered through the template and the reply's calls parsed
    (Hermes/Qwen ``<tool_call>`` or Llama 3.1 JSON, see ``kvagent.chat.tools``); a forcing
    ``tool_choice`` and ``with_structured_output`` decode the arguments guided by their JSON
    schema (``kvagent.chat.guided``). A template without tools refuses them (``ToolsUnsupportedError``).
    """

    streaming: bool = False
    """Whether ``invoke`` streams internally (callbacks see each token), as in ``ChatOpenAI``."""

    @property
    def _llm_type(self) -> str:
        return "kvagent-chat"

    @property
    def _identifying_params(self) -> Mapping[str, Any]:
        return self._settings_params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="kvagent",
            ls_model_name=kwargs.get("model", self.model or "default"),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        stops = self._stops(stop)
        if stops:
            params["ls_stop"] = stops
        return params

    # -- tools and structured output -------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | Any],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (OpenAI dicts, Pydantic models, functions, ``BaseTool``s) and a ``tool_choice``:
        None/"auto" lets the model decide, "any"/"required"/True forces a call, a tool's name forces it,
        "none" renders the tools but parses no calls."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        forced_tool(tool_choice, formatted)  # refuses a choice that names no bound tool now, not at call time
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        method: Literal["function_calling", "json_mode", "json_schema"] = "function_calling",
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Replies as ``schema`` (a JSON schema, TypedDict or Pydantic model), decoded guided by its schema:
        as a forced tool call where the template has tools and ``method="function_calling"``, otherwise
        as a JSON reply (the schema is added to the prompt as a final system message)."""
        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        tool = convert_to_openai_tool(schema)
        llm = self.bind(
            structured_output={"tool": tool, "method": method},
            ls_structured_output_format={"kwargs": {"method": method}, "schema": schema},
        )
        parser = StructuredOutputParser(target=schema)
        if include_raw:
            parsed = RunnablePassthrough.assign(
                parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
            )
            fallback = RunnablePassthrough.assign(parsed=lambda _: None)
            return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")
        return llm | parser

    def _model_name(self) -> str:
        agent = self.runtime
        return self.model or agent.config.model or agent.loaded.name

    def _turn(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> _Turn:
        """The prompt ids and the kind of reply, from the bound
        ``tools``/``tool_choice``/``structured_output``."""
        tools = kwargs.pop("tools", None) or []
        choice = kwargs.pop("tool_choice", None)
        structured = kwargs.pop("structured_output", None)
        tokenizer = self.runtime.tokenizer
        dicts = to_chat_dicts(messages)
        if structured is not None:
            fmt = tool_format(getattr(tokenizer, "chat_template", None))
            if structured["method"] == "function_calling" and fmt is not None:
                tools, choice = [structured["tool"]], structured["tool"]["function"]["name"]
            else:
                schema = structured["tool"]["function"]["parameters"]
                dicts.append({"role": "system", "content": JSON_INSTRUCTION + json.dumps(schema)})
                return _Turn(render_chat(tokenizer, dicts), json_schema=schema)
        if not tools:
            return _Turn(render_chat(tokenizer, dicts))
        name = self._model_name()
        fmt = require_tool_format(tokenizer, name)
        tools = normalize_tools(tools)
        return _Turn(
            render_chat(tokenizer, dicts, tools, model_name=name),
            fmt=fmt,
            tools=tools,
            forced=forced_tool(choice, tools),
            parse_calls=choice != "none",
        )

    def _guided(self, turn: _Turn, runner: PromptRunner, params: GenerationParams) -> tuple[str, Completion]:
        """Write the forced call or schema JSON, each value continued by the model from the prompt."""
        if turn.forced is not None and turn.fmt is not None:
            fmt, tools, forced = turn.fmt, turn.tools, turn.forced

            def guide(cont: Callable[[str], Iterator[str]]) -> str:
                return guided_tool_call(fmt, tools, forced, cont)
        else:
            def guide(cont: Callable[[str], Iterator[str]]) -> str:
                return guided_json(turn.json_schema or {}, cont)[0]

        reply = runner.turns.guided(turn.ids, params, guide, on_save=lambda save: save(), reuse=runner.reuse,
                                    keep=runner.save, min_save_tokens=runner.min_save_tokens)
        if reply.info is None:  # every value fixed by the schema: run the prompt once, for its KV and usage
            return reply.text, runner.complete(turn.ids, GenerationParams(max_new_tokens=1))
        return reply.text, Completion(info=reply.info, prompt_tokens=len(turn.ids))

    # -- generation ------------------------------------------------------------------------
    def prompt_ids(self, messages: list[BaseMessage], **kwargs: Any) -> list[int]:
        """The token ids the messages are run as (chat template, tools bound in ``kwargs``, generation
        prompt)."""
        return self._turn(messages, dict(kwargs)).ids

    def _message_meta(self, done: Completion, n_out: int | None, calls: bool) -> dict[str, Any]:
        meta = {**done.metadata(), "model_name": self.model or "default"}
        if n_out is not None:  # guided: the reply is forced syntax plus several continuations
            meta["completion_tokens"], meta["finish_reason"] = n_out, "stop"
        if calls:
            meta["finish_reason"] = "tool_calls"
        return meta

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        turn = self._turn(messages, kwargs)
        params, runner = self._params(**kwargs), self._runner()
        n_out: int | None = None
        if turn.forced is not None or turn.json_schema is not None:
            text, done = self._guided(turn, runner, params)
            n_out = len(self.runtime.tokenizer.encode(text, add_special_tokens=False))
        else:
            done = runner.complete(turn.ids, params, self._stops(stop))
            text = done.text
        parsed = parse_tool_calls(text, turn.fmt) if turn.fmt is not None and turn.parse_calls else Parsed(text)
        meta = self._message_meta(done, n_out, bool(parsed.tool_calls))
        message = AIMessage(
            content=parsed.content,
            tool_calls=[lc_tool_call(c) for c in parsed.tool_calls],
            response_metadata=meta,
            usage_metadata=_usage(done, n_out),
        )
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=meta)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        turn = self._turn(messages, kwargs)
        params, runner = self._params(**kwargs), self._runner()
        parser = StreamParser(turn.fmt) if turn.fmt is not None and turn.parse_calls else None
        if turn.forced is not None or turn.json_schema is not None:
            text, done = self._guided(turn, runner, params)
            deltas: Iterator[str] = iter([text])
            n_out: int | None = len(self.runtime.tokenizer.encode(text, add_special_tokens=False))
        else:
            done, deltas = runner.run(turn.ids, params, self._stops(stop))
            n_out = None
        n_calls = 0
        for delta in deltas:
            events = parser.feed(delta) if parser is not None else [ContentDelta(delta)]
            for chunk in self._chunks(events):
                n_calls += bool(chunk.message.tool_call_chunks)  # type: ignore[attr-defined]
                if run_manager is not None:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        for chunk in self._chunks(parser.finish() if parser is not None else []):
            n_calls += bool(chunk.message.tool_call_chunks)  # type: ignore[attr-defined]
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
        meta = self._message_meta(done, n_out, n_calls > 0)
        last = AIMessageChunk(
            content="", response_metadata=meta, usage_metadata=_usage(done, n_out), chunk_position="last"
        )
        yield ChatGenerationChunk(message=last, generation_info=meta)

    @staticmethod
    def _chunks(events: Sequence[Any]) -> Iterator[ChatGenerationChunk]:
        for ev in events:
            if isinstance(ev, ContentDelta):
                yield ChatGenerationChunk(message=AIMessageChunk(content=ev.text))
            else:
                chunk = AIMessageChunk(content="", tool_call_chunks=[lc_tool_call_chunk(ev.call, ev.index)])
                yield ChatGenerationChunk(message=chunk)
