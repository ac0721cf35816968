"""langchain-tests standard suites for ChatKVAgent.

The unit suite never loads a model (it is loaded lazily). The integration suite runs the real
embedded SmolLM2-135M weights under the real Qwen3 chat template (Hermes ``<tool_call>`` tools), so
the tool-calling and structured-output tests exercise real rendering, guided decoding and parsing.
Every skip left is listed with its reason in the package README.
"""

from __future__ import annotations

from typing import Any

import pytest
from _tool_models import template, with_template
from kvagent import KVAgent
from langchain_core.messages import AIMessage, HumanMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_kvagent import ChatKVAgent


class TestChatKVAgentUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatKVAgent]:
        return ChatKVAgent

    @property
    def chat_model_params(self) -> dict:
        return {"model": "smollm2"}

    @property
    def has_tool_calling(self) -> bool:
        return True  # binding only: these tests never run the model (SmolLM2's own template refuses tools)

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one loaded model per instance: a per-call ``model=`` cannot switch weights


AGENT_LOOP_REASON = (
    "binds a tool without tool_choice and needs the model to decide on its own to call it: SmolLM2-135M "
    "answers in text instead (a model property; forced calls, tool results and next turns are tested)"
)


@pytest.fixture(scope="module")
def tool_agent(agent: KVAgent, tmp_path_factory: pytest.TempPathFactory) -> KVAgent:
    return with_template(agent, template("qwen3"), tmp_path_factory.mktemp("qwen3-template"))


@pytest.mark.slow
class TestChatKVAgentIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatKVAgent]:
        return ChatKVAgent

    @property
    def chat_model_params(self) -> dict:
        return {"max_tokens": 4}

    @pytest.fixture
    def model(self, request: Any, tool_agent: KVAgent) -> ChatKVAgent:
        extra = getattr(request, "param", None) or {}
        params = {**self.standard_chat_model_params, **self.chat_model_params, **extra}
        # timeout / max_retries configure the registry client a model builds; agent= brings its own, and
        # ChatKVAgent refuses settings it would ignore (tested in test_fields.py)
        params = {k: v for k, v in params.items() if k not in ("timeout", "max_retries")}
        self.tool_agent = tool_agent  # for invoke_with_cache_read_input, which takes no fixtures
        return ChatKVAgent(agent=tool_agent, **params)

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """The second call with the same long prefix resumes from the first one's KV."""
        chat = ChatKVAgent(agent=self.tool_agent, max_tokens=2)
        prompt = "Summarise these notes. " + "The harbour office opens at six. " * 12
        chat.invoke([HumanMessage(prompt), HumanMessage("First question?")])
        messages = [HumanMessage(prompt), HumanMessage("Second question?")]
        if stream:
            chunks = list(chat.stream(messages))
            msg = chunks[0]
            for c in chunks[1:]:
                msg += c
        else:
            msg = chat.invoke(messages)
        assert isinstance(msg, AIMessage) and msg.usage_metadata is not None
        assert msg.usage_metadata["input_token_details"]["cache_read"] > 40  # really read from the cache
        return msg

    @property
    def has_tool_choice(self) -> bool:
        return True

    @pytest.mark.xfail(reason=AGENT_LOOP_REASON, run=False)
    def test_agent_loop(self, model: ChatKVAgent) -> None:
        super().test_agent_loop(model)

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}


