"""``ChatKVAgent``: a LangChain chat model that resumes from the longest cached prompt prefix."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import LangSmithParams
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from ._reuse import Completion, chat_template_ids
from ._settings import KVAgentSettings


def to_chat_dicts(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as the ``{"role", "content"}`` dicts a tokenizer's chat template takes."""
    out = []
    for m in messages:
        if isinstance(m, SystemMessage):
            role = "system"
        elif isinstance(m, HumanMessage):
            role = "user"
        elif isinstance(m, AIMessage):
            role = "assistant"
        elif isinstance(m, ToolMessage):
            role = "tool"
        elif isinstance(m, ChatMessage):
            role = m.role
        else:
            raise ValueError(f"ChatKVAgent cannot render a {type(m).__name__} message")
        out.append({"role": role, "content": m.text})
    return out


def _usage(done: Completion) -> UsageMetadata:
    n_out = len(done.token_ids)
    return UsageMetadata(
        input_tokens=done.prompt_tokens,
        output_tokens=n_out,
        total_tokens=done.prompt_tokens + n_out,
        input_token_details={"cache_read": done.info.cached_tokens},
    )


class ChatKVAgent(KVAgentSettings, BaseChatModel):
    """A local kvagent model as a LangChain chat model.

    Messages are rendered with the tokenizer's chat template (as token ids, with the generation
    prompt); the longest cached KV that is a prefix of them is resumed from, and the prompt's KV is
    kept for the next call. A document read by ``KVDocumentLoader`` is a prefix of a prompt whose
    first message after the default system prompt is a user message starting with the document;
    any prompt repeated up to its question (e.g. a system message holding the document) hits from
    its second call on. ``response_metadata`` reports the cache: ``kv_status``, ``kv_cached_tokens``...
    """

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

    def prompt_ids(self, messages: list[BaseMessage]) -> list[int]:
        """The token ids the messages are run as (chat template, generation prompt added)."""
        return chat_template_ids(self.kv_agent.tokenizer, to_chat_dicts(messages))

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        done = self._runner().complete(self.prompt_ids(messages), self._params(**kwargs), self._stops(stop))
        meta = {**done.metadata(), "model_name": self.model or "default"}
        message = AIMessage(content=done.text, response_metadata=meta, usage_metadata=_usage(done))
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=meta)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        done, deltas = self._runner().run(
            self.prompt_ids(messages), self._params(**kwargs), self._stops(stop)
        )
        for delta in deltas:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager is not None:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        meta = {**done.metadata(), "model_name": self.model or "default"}
        last = AIMessageChunk(
            content="", response_metadata=meta, usage_metadata=_usage(done), chunk_position="last"
        )
        yield ChatGenerationChunk(message=last, generation_info=meta)
